//! shardkv: a sharded key/value store replicated with Multi-Paxos.
//!
//! - [`paxos`]: the replication core (sans-I/O), storage, simulator.

pub mod paxos;
