//! What the reader and the writer share: librdkafka's logs and errors as `tracing` events, and
//! rdkafka errors as `KeelError`s.

use keel_proto::{error_chain, KeelError};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Forwards one librdkafka log line to `tracing`.
pub(crate) fn log(role: &'static str, subtask: u32, level: RDKafkaLogLevel, facility: &str, message: &str) {
    // A failed connection ("FAIL") is logged as an error by librdkafka, but it retries by itself:
    // a broker outage is a warning until it outlasts a timeout.
    let level = match (level, facility) {
        (RDKafkaLogLevel::Error, "FAIL") => RDKafkaLogLevel::Warning,
        (level, _) => level,
    };
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", role, subtask, facility, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", role, subtask, facility, "{message}")
        }
        RDKafkaLogLevel::Notice => tracing::info!(target: "librdkafka", role, subtask, facility, "{message}"),
        RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", role, subtask, facility, "{message}")
        }
    }
}

/// True for errors that say the cluster (or the path to it) is not reachable right now:
/// librdkafka retries these by itself.
pub(crate) fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotCoordinator
            | C::CoordinatorNotAvailable
            | C::CoordinatorLoadInProgress
            | C::WaitingForCoordinator
            | C::TimedOutQueue
            | C::MessageTimedOut
            | C::UnknownLeaderEpoch
            | C::FencedLeaderEpoch
            | C::KafkaStorageError
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::BrokerDestroy
            | C::DestroyBroker
            | C::PartitionEOF
    )
}

/// Maps an rdkafka error of `what` (a sentence fragment: "fetching metadata") to a `KeelError`:
/// unreachable cluster → `Unavailable` naming the bootstrap servers; anything else →
/// `FailedPrecondition` with the same context.
pub(crate) fn to_keel(e: &KafkaError, what: &str, bootstrap: &str) -> KeelError {
    match e.rdkafka_error_code() {
        Some(code) if is_transient(code) => {
            KeelError::unavailable(bootstrap, format!("{what}: {}", error_chain(e)))
        }
        _ => KeelError::precondition(format!("{what} (bootstrap servers {bootstrap}): {}", error_chain(e))),
    }
}
