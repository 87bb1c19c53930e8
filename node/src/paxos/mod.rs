//! Multi-Paxos replication: the sans-I/O core, its storage, and a simulator.
//!
//! - [`core`]: the protocol as a plain state machine ([`Paxos`]).
//! - [`storage`]: the durable-state trait and the in-memory implementation.
//! - [`redb_storage`]: the on-disk implementation.
//! - [`sim`]: a seeded in-process network for tests and benchmarks.

pub mod core;
pub mod redb_storage;
pub mod sim;
pub mod storage;
pub mod types;

pub use self::core::{Config, Paxos, ProposeError, Ready, RoleKind, Stats};
pub use redb_storage::RedbStorage;
pub use storage::{DurableState, MemStorage, PersistBatch, Storage, StorageError};
pub use types::{Ballot, Batch, Command, Message, NodeId, PromisedEntry, Slot, Snapshot};
