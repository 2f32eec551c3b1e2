//! Process-level integration tests: real etcd, real Keel processes
