//! The submission check of an exactly-once sink's `transaction.timeout.ms`.
//!
//! Two bounds:
//! - **Above**: the broker's `transaction.max.timeout.ms` (15 min by default). A producer asking
//!   for more is refused by `init_transactions` (INVALID_TRANSACTION_TIMEOUT), so every task
//!   would fail at open. Flink's Kafka sink defaults to 1 h, which a default broker refuses.
//! - **Below**: a transaction stays open from the commit of one checkpoint until the
//!   completion of the next (about one checkpoint interval), longer when a failure intervenes
//!   (the failover budget: the time to detect a lost TaskManager plus the restart strategy's
//!   longest delay). A broker that aborts it first bumps the producer's epoch: the commit is
//!   fenced, the task fails, restarts, and the next transaction times out again.
//!
//! [`broker_transaction_max_timeout`] asks the broker (DescribeConfigs through the admin API);
//! [`check_transaction_timeout`] compares. The JobManager runs both at submission and upgrade.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::Duration;

use keel_proto::{error_chain, KeelError, Result};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use crate::options::KafkaSinkOptions;

/// `transaction.timeout.ms` of exactly-once sinks unless the spec sets it: 15 min, the default
/// `transaction.max.timeout.ms` of Kafka brokers.
pub const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The broker setting that caps `transaction.timeout.ms`.
pub const BROKER_MAX_KEY: &str = "transaction.max.timeout.ms";

/// The sink's `transaction.timeout.ms`: `properties.transaction.timeout.ms`, else
/// [`DEFAULT_TRANSACTION_TIMEOUT`]. A value that is not a positive number of milliseconds is
/// an error naming the field.
pub fn transaction_timeout(opts: &KafkaSinkOptions) -> Result<Duration> {
    match opts.client_properties.get("transaction.timeout.ms") {
        None => Ok(DEFAULT_TRANSACTION_TIMEOUT),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(KeelError::invalid_spec(
                format!("{}.properties.transaction.timeout.ms", opts.field_prefix),
                format!("{v:?} is not a positive number of milliseconds"),
            )),
        },
    }
}

/// The `transaction.max.timeout.ms` of one broker of the sink's cluster (they share it in
/// practice), read through the admin API. Blocking, for up to about `timeout`.
pub fn broker_transaction_max_timeout(opts: &KafkaSinkOptions, timeout: Duration) -> Result<Duration> {
    let mut config = ClientConfig::new();
    for (k, v) in &opts.client_properties {
        config.set(k, v);
    }
    // Producer settings the admin client does not know would only be warned about.
    for key in ["transactional.id", "transaction.timeout.ms", "partitioner", "acks", "enable.idempotence"] {
        config.remove(key);
    }
    config.set("log_level", "3");
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| {
        KeelError::invalid_spec(
            format!("{}.properties", opts.field_prefix),
            format!("the Kafka client refuses the configuration: {}", error_chain(&e)),
        )
    })?;
    let unavailable = |what: &str, e: &rdkafka::error::KafkaError| {
        KeelError::unavailable(&opts.bootstrap_servers, format!("{what}: {}", error_chain(e)))
    };
    let metadata = admin
        .inner()
        .fetch_metadata(None, timeout)
        .map_err(|e| unavailable("fetching the cluster's brokers", &e))?;
    let broker = metadata.brokers().first().map(|b| b.id()).ok_or_else(|| {
        KeelError::unavailable(&opts.bootstrap_servers, "the cluster's metadata lists no broker".to_string())
    })?;
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let resources = block_on(admin.describe_configs([&ResourceSpecifier::Broker(broker)], &options))
        .map_err(|e| unavailable(&format!("describing the configuration of broker {broker}"), &e))?;
    let resource = resources
        .into_iter()
        .next()
        .ok_or_else(|| KeelError::internal(format!("no configuration returned for broker {broker}")))?
        .map_err(|code| {
            KeelError::unavailable(
                &opts.bootstrap_servers,
                format!("describing the configuration of broker {broker}: {code:?}"),
            )
        })?;
    let value = resource
        .get(BROKER_MAX_KEY)
        .and_then(|e| e.value.clone())
        .ok_or_else(|| KeelError::internal(format!("broker {broker} did not report {BROKER_MAX_KEY}")))?;
    let ms = value.trim().parse::<u64>().map_err(|_| {
        KeelError::internal(format!("broker {broker} reported {BROKER_MAX_KEY} = {value:?}, not a number"))
    })?;
    Ok(Duration::from_millis(ms))
}

/// Checks the sink's `transaction.timeout.ms` against the broker's maximum (when known) and
/// against `checkpoint_interval + failover_budget`. Errors are `InvalidSpec` naming
/// `<sink>.properties.transaction.timeout.ms`.
pub fn check_transaction_timeout(
    opts: &KafkaSinkOptions,
    broker_max: Option<Duration>,
    checkpoint_interval: Duration,
    failover_budget: Duration,
) -> Result<()> {
    let field = format!("{}.properties.transaction.timeout.ms", opts.field_prefix);
    let set = opts.client_properties.contains_key("transaction.timeout.ms");
    let timeout = transaction_timeout(opts)?;
    let ms = |d: Duration| d.as_millis();
    let origin = if set { "" } else { " (Keel's default)" };
    if let Some(max) = broker_max {
        if timeout > max {
            return Err(KeelError::invalid_spec(
                field,
                format!(
                    "{} ms{origin} is above the broker's {BROKER_MAX_KEY} ({} ms) on {}: the broker would \
                     refuse every producer of this sink; set it to at most {} ms (or raise the broker's \
                     {BROKER_MAX_KEY})",
                    ms(timeout),
                    ms(max),
                    opts.bootstrap_servers,
                    ms(max)
                ),
            ));
        }
    }
    let needed = checkpoint_interval + failover_budget;
    if timeout <= needed {
        return Err(KeelError::invalid_spec(
            field,
            format!(
                "{} ms{origin} is not above the checkpoint interval ({} ms) plus the failover budget \
                 ({} ms: heartbeat.timeout and the restart strategy's longest delay): a transaction stays \
                 open until the next checkpoint completes, and the broker would abort it first, fencing \
                 the sink at every commit; set it above {} ms",
                ms(timeout),
                ms(checkpoint_interval),
                ms(failover_budget),
                ms(needed)
            ),
        ));
    }
    Ok(())
}

/// Drives one future to completion on this thread (the admin client's futures are completed
/// by librdkafka's own threads).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sink(timeout: Option<&str>) -> KafkaSinkOptions {
        let mut m: BTreeMap<String, String> = [
            ("topic", "out"),
            ("properties.bootstrap.servers", "b:9092"),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.transactional-id-prefix", "p"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if let Some(t) = timeout {
            m.insert("properties.transaction.timeout.ms".into(), t.into());
        }
        KafkaSinkOptions::from_spec("sinks[1]", &m).expect("valid")
    }

    const FIELD: &str = "sinks[1].properties.transaction.timeout.ms";

    fn field_of(e: KeelError) -> (String, String) {
        match e {
            KeelError::InvalidSpec { field, reason } => (field, reason),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    /// Flink's default (1 h) against a default broker (15 min): refused, naming the field, the
    /// broker's maximum and the bound to use.
    #[test]
    fn above_the_broker_maximum_is_refused_naming_the_field() {
        let max = Some(Duration::from_secs(900));
        let (field, reason) = field_of(
            check_transaction_timeout(
                &sink(Some("3600000")),
                max,
                Duration::from_secs(1),
                Duration::from_secs(70),
            )
            .expect_err("refused"),
        );
        assert_eq!(field, FIELD);
        assert!(
            reason.contains("3600000 ms is above the broker's transaction.max.timeout.ms (900000 ms)"),
            "{reason}"
        );
        // Keel's default fits a default broker, and is named as the default when it does not.
        check_transaction_timeout(&sink(None), max, Duration::from_secs(1), Duration::from_secs(70))
            .expect("fits");
        let (_, reason) = field_of(
            check_transaction_timeout(
                &sink(None),
                Some(Duration::from_secs(60)),
                Duration::ZERO,
                Duration::ZERO,
            )
            .expect_err("refused"),
        );
        assert!(reason.contains("900000 ms (Keel's default) is above"), "{reason}");
    }

    /// A timeout not above interval + failover budget is refused naming the field and the sum;
    /// just above it passes; an unknown broker maximum skips only that bound. (A value that is
    /// not a number is refused by the options' own parse, naming the same field.)
    #[test]
    fn not_above_interval_plus_failover_budget_is_refused() {
        let interval = Duration::from_secs(60);
        let budget = Duration::from_secs(65);
        let (field, reason) = field_of(
            check_transaction_timeout(&sink(Some("125000")), None, interval, budget).expect_err("refused"),
        );
        assert_eq!(field, FIELD);
        assert!(reason.contains("set it above 125000 ms"), "{reason}");
        check_transaction_timeout(&sink(Some("125001")), None, interval, budget).expect("fits");
    }
}
