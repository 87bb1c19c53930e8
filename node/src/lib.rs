//! shardkv: a sharded key/value store replicated with Multi-Paxos.
//!
//! - [`paxos`]: the replication core (sans-I/O), storage, simulator.
//! - [`replica`]: the driver that runs a core on a thread with real storage and transport.
//! - [`shardmaster`]: the configuration service (which group serves which shard).
//! - [`shardkv`]: the key/value service: replica groups, shard handoff, the client.
//! - [`linearizability`]: a checker for recorded histories.
//! - [`daemon`]: running a role as a process (storage, health, metrics, shutdown).
//! - [`net`]: the source address of outgoing connections.

pub mod daemon;
pub mod linearizability;
pub mod net;
pub mod paxos;
pub mod replica;
pub mod shardkv;
pub mod shardmaster;

/// Generated gRPC types.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("shardkv.paxos");

    pub mod shardmaster {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("shardkv.shardmaster");
    }

    pub mod kv {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("shardkv.kv");
    }
}
