//! Multi-Paxos replication: the sans-I/O core, its storage, and a simulator.
//!
//! - [`core`]: the protocol as a plain state machine ([`Paxos`]).
//! - [`storage`]: the durable-state trait and the in-memory implementation.
//! - [`wal_storage`]: the on-disk implementation (a write-ahead log).
//! - [`sim`]: a seeded in-process network for tests and benchmarks.

pub mod core;
pub mod sim;
pub mod storage;
pub mod types;
pub mod wal_storage;

pub use self::core::{
    Config, MemberProgress, MembershipChange, MembershipError, Paxos, ProposeError, Ready,
    RoleKind, Stats,
};
pub use storage::{DurableState, MemStorage, PersistBatch, Storage, StorageError};
pub use types::{
    Ballot, Batch, Command, Incarnation, Incarnations, Member, Members, Membership, Message,
    NodeId, PromisedEntry, Slot, Snapshot, NODE_ID_LIMIT, STOP_SIGN_ORIGIN,
};
pub use wal_storage::{WalOptions, WalStorage};
