//! The kvservers end to end: replica groups (Paxos in-process, so tests can
//! cut replicas off; client and group-to-group RPCs over gRPC on loopback,
//! storage in a write-ahead log), a shardmaster group, and Clerks.
//!
//! `basic` ports the lab's shardkv suite; `history` records concurrent
//! histories under faults and checks them linearizable; `handoff` covers
//! garbage collection and deduplication across migration; `lifecycle` the
//! edges of a group's life: wiped, readdressed, gone before its deletes.

mod basic;
mod common;
mod handoff;
mod history;
mod lifecycle;
