//! Failure detection by RPC outcome (Flink's `heartbeat.rpc-failure-threshold`): a peer that a
//! number of consecutive calls could not reach at all (connection refused, reset, no route) is
//! declared lost without waiting for its heartbeats to time out.
//!
//! Only calls that did not reach the peer count. A call that timed out is inconclusive (a busy
//! or paused peer is left to the heartbeat timeout), and any answer, an error included, shows
//! that the peer is there and resets its count.
//!
//! [`RpcFailureDetector`] is the counting, pure; [`call_peer`] makes one call with a timeout and
//! says how it went.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use keel_proto::{KeelError, Result};

use crate::status_error;

/// How one call to a peer went, for failure detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcOutcome {
    /// The peer answered (successfully or with an error of its own).
    Answered,
    /// The call did not reach the peer: connection refused or reset, unreachable host.
    Unreachable,
    /// Nothing can be concluded (a timeout, or the call was never made).
    Inconclusive,
}

impl RpcOutcome {
    /// Classifies a failed call by its status. A status that a server sent carries Keel's
    /// error details or a code other than `Unavailable`/`Unknown`; a transport failure (tonic's
    /// connect and connection errors) has neither.
    pub fn of_status(status: &tonic::Status) -> RpcOutcome {
        let from_server = !status.details().is_empty();
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown if !from_server => RpcOutcome::Unreachable,
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled if !from_server => {
                RpcOutcome::Inconclusive
            }
            _ => RpcOutcome::Answered,
        }
    }
}

/// Makes one call to the peer at `address` with a timeout. Returns the answer or the typed
/// error (naming the peer and, for a timeout, the RPC), and the outcome for failure detection.
pub async fn call_peer<T, Fut>(
    address: &str,
    rpc: &str,
    timeout: Duration,
    call: Fut,
) -> (Result<T>, RpcOutcome)
where
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => (Ok(response.into_inner()), RpcOutcome::Answered),
        Ok(Err(status)) => (Err(status_error(&status, address)), RpcOutcome::of_status(&status)),
        Err(_) => (
            Err(KeelError::unavailable(address, format!("{rpc} timed out after {timeout:?}"))),
            RpcOutcome::Inconclusive,
        ),
    }
}

/// What the detector concluded about a peer after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The peer answered, or has no failed calls.
    Reachable,
    /// The last `consecutive` calls did not reach the peer; below the threshold.
    Failing { consecutive: u32 },
    /// This call reached the threshold: declare the peer lost. Reported once; the count starts
    /// again from zero.
    Lost { consecutive: u32 },
}

/// Consecutive unreachable calls per peer (by address), against a threshold.
#[derive(Debug, Default)]
pub struct RpcFailureDetector {
    /// `None`: detection is off (`heartbeat.rpc-failure-threshold: -1`); calls are still
    /// counted, but never declare a peer lost.
    threshold: Option<u32>,
    consecutive: HashMap<String, u32>,
}

impl RpcFailureDetector {
    pub fn new(threshold: Option<u32>) -> Self {
        RpcFailureDetector { threshold, consecutive: HashMap::new() }
    }

    pub fn threshold(&self) -> Option<u32> {
        self.threshold
    }

    /// Records how a call to `peer` went.
    pub fn record(&mut self, peer: &str, outcome: RpcOutcome) -> Verdict {
        match outcome {
            RpcOutcome::Answered => {
                self.consecutive.remove(peer);
                Verdict::Reachable
            }
            RpcOutcome::Inconclusive => match self.consecutive(peer) {
                0 => Verdict::Reachable,
                n => Verdict::Failing { consecutive: n },
            },
            RpcOutcome::Unreachable => {
                let n = {
                    let count = self.consecutive.entry(peer.to_string()).or_insert(0);
                    *count = count.saturating_add(1);
                    *count
                };
                match self.threshold {
                    Some(t) if n >= t => {
                        self.consecutive.remove(peer);
                        Verdict::Lost { consecutive: n }
                    }
                    _ => Verdict::Failing { consecutive: n },
                }
            }
        }
    }

    /// The current count of consecutive unreachable calls to `peer`.
    pub fn consecutive(&self, peer: &str) -> u32 {
        self.consecutive.get(peer).copied().unwrap_or(0)
    }

    /// Forgets a peer (it was declared lost by other means, or left).
    pub fn forget(&mut self, peer: &str) {
        self.consecutive.remove(peer);
    }
}

/// The reason given when a peer is declared lost by the detector.
pub fn lost_reason(consecutive: u32, address: &str) -> String {
    format!("{consecutive} consecutive RPCs could not reach {address} (heartbeat.rpc-failure-threshold)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use RpcOutcome::*;

    #[test]
    fn consecutive_unreachable_calls_declare_the_peer_lost_once() {
        let mut d = RpcFailureDetector::new(Some(2));
        assert_eq!(d.record("a", Unreachable), Verdict::Failing { consecutive: 1 });
        assert_eq!(d.record("a", Unreachable), Verdict::Lost { consecutive: 2 });
        // Reported once: counting starts again.
        assert_eq!(d.consecutive("a"), 0);
        assert_eq!(d.record("a", Unreachable), Verdict::Failing { consecutive: 1 });
    }

    #[test]
    fn an_answer_resets_the_count_and_a_timeout_changes_nothing() {
        let mut d = RpcFailureDetector::new(Some(3));
        d.record("a", Unreachable);
        d.record("a", Unreachable);
        assert_eq!(d.record("a", Inconclusive), Verdict::Failing { consecutive: 2 });
        assert_eq!(d.record("a", Answered), Verdict::Reachable);
        assert_eq!(d.record("a", Unreachable), Verdict::Failing { consecutive: 1 });
        assert_eq!(d.record("a", Inconclusive), Verdict::Failing { consecutive: 1 });
        assert_eq!(d.record("b", Inconclusive), Verdict::Reachable);
    }

    #[test]
    fn peers_are_counted_apart() {
        let mut d = RpcFailureDetector::new(Some(2));
        d.record("a", Unreachable);
        assert_eq!(d.record("b", Unreachable), Verdict::Failing { consecutive: 1 });
        assert_eq!(d.record("a", Unreachable), Verdict::Lost { consecutive: 2 });
        d.forget("b");
        assert_eq!(d.consecutive("b"), 0);
    }

    #[test]
    fn a_threshold_of_one_declares_at_the_first_failure_and_none_never() {
        let mut d = RpcFailureDetector::new(Some(1));
        assert_eq!(d.record("a", Unreachable), Verdict::Lost { consecutive: 1 });
        let mut off = RpcFailureDetector::new(None);
        for n in 1..=10 {
            assert_eq!(off.record("a", Unreachable), Verdict::Failing { consecutive: n });
        }
    }

    /// Transport failures count; anything a server said does not, even when it is an error.
    #[test]
    fn statuses_are_classified_by_who_produced_them() {
        let refused = tonic::Status::unavailable("tcp connect error: Connection refused (os error 111)");
        assert_eq!(RpcOutcome::of_status(&refused), Unreachable);
        assert_eq!(RpcOutcome::of_status(&tonic::Status::unknown("transport error")), Unreachable);
        assert_eq!(RpcOutcome::of_status(&tonic::Status::deadline_exceeded("slow")), Inconclusive);
        let from_server: tonic::Status =
            KeelError::StaleEpoch { role: "jobmanager".into(), received: 1, seen: 2 }.into();
        assert_eq!(RpcOutcome::of_status(&from_server), Answered);
        // A Keel server's own Unavailable carries details: the server answered.
        let keel_unavailable: tonic::Status = KeelError::unavailable("x:1", "busy").into();
        assert_eq!(RpcOutcome::of_status(&keel_unavailable), Answered);
        assert_eq!(RpcOutcome::of_status(&tonic::Status::unimplemented("Ping")), Answered);
    }

    /// A real call to a port nobody listens on (a killed process) is classified unreachable.
    #[tokio::test]
    async fn a_refused_connection_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        let channel = crate::channel(&address).expect("channel");
        let mut client = keel_proto::pb::job_manager_client::JobManagerClient::new(channel);
        for _ in 0..2 {
            let call = client.leader_info(keel_proto::pb::LeaderInfoRequest {});
            let (r, o) = call_peer(&address, "LeaderInfo", Duration::from_secs(5), call).await;
            assert_eq!(o, Unreachable, "{r:?}");
            assert!(matches!(r, Err(KeelError::Unavailable { .. })), "{r:?}");
        }
    }

    #[tokio::test]
    async fn call_peer_reports_the_outcome() {
        let ok = async { Ok::<_, tonic::Status>(tonic::Response::new(7u32)) };
        let (r, o) = call_peer("x:1", "Ping", Duration::from_secs(1), ok).await;
        assert_eq!((r.ok(), o), (Some(7), Answered));
        let refused = async { Err::<tonic::Response<u32>, _>(tonic::Status::unavailable("refused")) };
        let (r, o) = call_peer("x:1", "Ping", Duration::from_secs(1), refused).await;
        assert!(matches!(r, Err(KeelError::Unavailable { ref address, .. }) if address == "x:1"));
        assert_eq!(o, Unreachable);
        let slow = std::future::pending::<std::result::Result<tonic::Response<u32>, tonic::Status>>();
        let (r, o) = call_peer("x:1", "Ping", Duration::from_millis(10), slow).await;
        assert!(r.is_err_and(|e| e.to_string().contains("Ping timed out")));
        assert_eq!(o, Inconclusive);
    }
}
