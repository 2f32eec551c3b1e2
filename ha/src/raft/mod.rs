//! The Raft HA backend (`high-availability.type: raft`): Keel's own replicated store on tikv's
//! raft-rs, so that a cluster of several machines needs no etcd.
//!
//! Layout:
//! - [`machine`]: the replicated state machine (sessions, leaders per role, fenced metadata) and
//!   the session timers of the Raft leader. Pure.
//! - [`storage`]: a member's durable log, hard state and snapshot (raft-rs's `Storage`), fsynced
//!   before anything is acknowledged, compacted by snapshots.
//! - [`node`]: one member's Ready loop on its own thread: raft-rs's `RawNode`, the storage and the
//!   machine; proposals, linearizable reads (read-index), snapshots.
//! - [`member`]: the member as a process (`keel ha-member`): the `HaMember` gRPC service and the
//!   transport of Raft messages between members.
//! - [`client`]: [`RaftHaServices`], the [`crate::HaServices`] of every other Keel process, which
//!   talks to the members.
//!
//! The protocol, the guarantees and the choices are described in docs/fencing.md ("The Raft
//! backend").

pub mod client;
pub mod machine;
pub mod member;
pub mod node;
pub mod storage;
pub mod testing;
#[cfg(test)]
mod tests;

pub use client::RaftHaServices;
pub use member::{Member, MemberService};
pub use node::{MemberSettings, MemberStatus, Timing};
