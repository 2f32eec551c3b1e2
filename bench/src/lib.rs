//! The pieces the benchmarks share: the Kafka side (input, the bare loop, reading outputs back),
//! a Keel cluster of real `keel` processes, and what /proc says about a process. Two binaries use
//! them: `keel-bench` (Keel against a bare rdkafka loop) and `keel-versus` (Keel beside Apache
//! Flink and Kafka Streams on the same broker).

pub mod cluster;
pub mod flink;
pub mod kafka;
pub mod procfs;
pub mod report;
pub mod scrape;
pub mod streams;
pub mod workload;
