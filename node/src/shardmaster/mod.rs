//! The shardmaster: which replica group serves each shard.
//!
//! A replicated state machine on the Paxos core. Every request, queries
//! included, goes through the log, so every replica computes the same
//! configurations and a query reflects every change decided before it.

pub mod client;
pub mod rebalance;
pub mod service;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::paxos::Slot;
use crate::replica::{SharedMachine, StateMachine};

/// Shards in a new deployment unless configured otherwise. Fixed for the
/// life of the shardmaster group: keys map to shards by hash modulo this.
pub const DEFAULT_SHARDS: usize = 64;

/// A replica group's id. 0 means "no group".
pub type Gid = u64;

/// Which group serves each shard, and where each group's servers are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub num: u64,
    /// `shards[i]` is the gid serving shard i (0: none).
    pub shards: Vec<Gid>,
    /// Each group's server addresses, in the order given at Join.
    pub groups: BTreeMap<Gid, Vec<String>>,
}

impl Config {
    /// Configuration 0: no groups, every shard unassigned.
    pub fn initial(shards: usize) -> Self {
        Config {
            num: 0,
            shards: vec![0; shards],
            groups: BTreeMap::new(),
        }
    }
}

/// What a client asks of the shardmaster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Join {
        gid: Gid,
        servers: Vec<String>,
    },
    Leave {
        gid: Gid,
    },
    Move {
        shard: u64,
        gid: Gid,
    },
    /// `None` (or a number past the latest) asks for the latest.
    Query {
        num: Option<u64>,
    },
}

/// A request as logged: the client id and sequence number make retries
/// apply once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: u64,
    pub seq: u64,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ShardMasterError {
    #[error("gid must be positive (0 means no group)")]
    InvalidGid,
    #[error("group {0} needs at least one server")]
    NoServers(Gid),
    #[error("shard {shard} is out of range (there are {shards})")]
    ShardOutOfRange { shard: u64, shards: usize },
    #[error("group {0} is not in the current configuration")]
    UnknownGroup(Gid),
    #[error("request could not be decoded: {0}")]
    Malformed(String),
}

/// The result of a request: the configuration it produced or asked for.
pub type Reply = Result<Config, ShardMasterError>;

/// The replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMasterState {
    /// Every configuration ever made; `configs[i].num == i`.
    configs: Vec<Config>,
    /// Last sequence number and reply per client, for at-most-once.
    sessions: BTreeMap<u64, (u64, Reply)>,
}

impl ShardMasterState {
    pub fn new(shards: usize) -> Self {
        ShardMasterState {
            configs: vec![Config::initial(shards)],
            sessions: BTreeMap::new(),
        }
    }

    pub fn latest(&self) -> &Config {
        // Never empty: configuration 0 is made in `new`.
        &self.configs[self.configs.len() - 1]
    }

    pub fn query(&self, num: Option<u64>) -> &Config {
        match num {
            Some(n) if (n as usize) < self.configs.len() => &self.configs[n as usize],
            _ => self.latest(),
        }
    }

    /// Applies a request, once per (client, seq).
    pub fn execute(&mut self, request: Request) -> Reply {
        if let Some((seq, reply)) = self.sessions.get(&request.client) {
            if *seq == request.seq {
                return reply.clone();
            }
            if *seq > request.seq {
                // An older retry: its effect (if any) is already in place.
                return Ok(self.latest().clone());
            }
        }
        let reply = self.apply_op(request.op);
        self.sessions
            .insert(request.client, (request.seq, reply.clone()));
        reply
    }

    fn apply_op(&mut self, op: Op) -> Reply {
        let mut next = self.latest().clone();
        match op {
            Op::Query { num } => return Ok(self.query(num).clone()),
            Op::Join { gid, servers } => {
                if gid == 0 {
                    return Err(ShardMasterError::InvalidGid);
                }
                if servers.is_empty() {
                    return Err(ShardMasterError::NoServers(gid));
                }
                if next.groups.get(&gid) == Some(&servers) {
                    return Ok(next); // already joined with these servers
                }
                next.groups.insert(gid, servers);
            }
            Op::Leave { gid } => {
                if gid == 0 {
                    return Err(ShardMasterError::InvalidGid);
                }
                if next.groups.remove(&gid).is_none() {
                    return Ok(next); // leaving an unknown group is harmless
                }
            }
            Op::Move { shard, gid } => {
                if gid == 0 {
                    return Err(ShardMasterError::InvalidGid);
                }
                let shards = next.shards.len();
                if shard as usize >= shards {
                    return Err(ShardMasterError::ShardOutOfRange { shard, shards });
                }
                if !next.groups.contains_key(&gid) {
                    return Err(ShardMasterError::UnknownGroup(gid));
                }
                if next.shards[shard as usize] == gid {
                    return Ok(next);
                }
                next.shards[shard as usize] = gid;
                next.num += 1;
                self.configs.push(next.clone());
                return Ok(next);
            }
        }
        let groups: BTreeSet<Gid> = next.groups.keys().copied().collect();
        rebalance::rebalance(&mut next.shards, &groups);
        next.num += 1;
        self.configs.push(next.clone());
        Ok(next)
    }
}

impl StateMachine for ShardMasterState {
    fn apply(&mut self, _slot: Slot, command: &[u8]) -> Bytes {
        let reply = match postcard::from_bytes::<Request>(command) {
            Ok(request) => self.execute(request),
            Err(e) => Err(ShardMasterError::Malformed(e.to_string())),
        };
        // Encoding our own types cannot fail; an empty reply would be refused
        // by the client as malformed rather than misread.
        postcard::to_allocvec(&reply)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    fn snapshot(&self) -> Bytes {
        postcard::to_allocvec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = postcard::from_bytes(snapshot).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The state shared by the replica thread and the service, which answers
/// queries from it after a read barrier.
pub type SharedMasterState = SharedMachine<ShardMasterState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn join(client: u64, seq: u64, gid: Gid) -> Request {
        Request {
            client,
            seq,
            op: Op::Join {
                gid,
                servers: vec![format!("s{gid}")],
            },
        }
    }

    #[test]
    fn a_retried_request_is_applied_once() {
        let mut state = ShardMasterState::new(10);
        let first = state.execute(join(7, 1, 1)).unwrap();
        state
            .execute(Request {
                client: 8,
                seq: 1,
                op: Op::Leave { gid: 1 },
            })
            .unwrap();
        // Client 7 retries its join after client 8's leave: it must not
        // re-join; it gets its original answer.
        assert_eq!(state.execute(join(7, 1, 1)).unwrap(), first);
        assert!(state.latest().groups.is_empty());
        assert_eq!(state.latest().num, 2);
        // An older sequence number than the last applied changes nothing.
        state.execute(join(7, 2, 3)).unwrap();
        let num = state.latest().num;
        state.execute(join(7, 1, 1)).unwrap();
        assert_eq!(state.latest().num, num);
    }

    #[test]
    fn undecodable_commands_are_refused_without_effect() {
        let mut state = ShardMasterState::new(4);
        let reply: Reply = postcard::from_bytes(&state.apply(1, b"\xff\xff garbage")).unwrap();
        assert!(matches!(reply, Err(ShardMasterError::Malformed(_))));
        assert_eq!(state.latest().num, 0);
    }
}
