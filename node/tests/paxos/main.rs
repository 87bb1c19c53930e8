//! The Paxos core's test suite: the lab's Paxos tests ported to Multi-Paxos,
//! plus message economy, crash-restart, the on-disk storage and an
//! exhaustive model check.
//! Every randomised test prints its seed; `SHARDKV_SEED=N` replays it.

mod common;

mod agreement;
mod compaction;
mod crash;
mod disruption;
mod economy;
mod faults;
mod membership;
mod model;
mod partitions;
mod reads;
mod scenarios;
mod sizes;
mod storage;
