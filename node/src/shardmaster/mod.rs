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
use crate::replica::{ApplyError, SharedMachine, StateMachine};

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
    /// A Join as logged before gids were retired: applied by the rules of
    /// then (a gid that left may join again; any address), so a replica
    /// replaying an old log agrees with one that restored a later snapshot.
    /// Clients now send [`Op::JoinChecked`].
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
    /// A group's replicas record which life of its data they hold: the
    /// first claim of a gid wins, and a group whose storage was wiped (a
    /// new incarnation) is refused rather than replay history as if new.
    Claim {
        gid: Gid,
        incarnation: u64,
    },
    /// A Join: refused for a retired gid or a server that is not `host:port`.
    JoinChecked {
        gid: Gid,
        servers: Vec<String>,
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
    #[error("group {gid}'s server {address:?} is not host:port: {reason}")]
    BadServerAddress {
        gid: Gid,
        address: String,
        reason: String,
    },
    #[error(
        "gid {gid} left in configuration {left_in} and is retired: a gid is never reused, \
         since its old shards' history names it; join the group under a new gid"
    )]
    RetiredGroup { gid: Gid, left_in: u64 },
    #[error(
        "group {gid}'s replicas all started from blank storage (incarnation {offered}), \
         but the group already served data as incarnation {claimed}: that data is lost, \
         and replaying history as a new group would serve it empty, so its shards stay \
         unavailable. Restore the group's volumes if a copy survives; do not make it \
         leave (its shards' new owners would wait for the lost data)"
    )]
    GroupDataLost {
        gid: Gid,
        claimed: u64,
        offered: u64,
    },
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
    /// Gids that left, with the configuration that removed them: a Join
    /// of one is refused, since other groups' pulls and deletes for the
    /// shards it held still name it.
    retired: BTreeMap<Gid, u64>,
    /// The incarnation each gid's group claimed (see [`Op::Claim`]).
    incarnations: BTreeMap<Gid, u64>,
}

/// The state as encoded before gids were retired and claimed.
#[derive(Deserialize)]
struct ShardMasterStateV1 {
    configs: Vec<Config>,
    sessions: BTreeMap<u64, (u64, Reply)>,
}

impl ShardMasterState {
    pub fn new(shards: usize) -> Self {
        ShardMasterState {
            configs: vec![Config::initial(shards)],
            sessions: BTreeMap::new(),
            retired: BTreeMap::new(),
            incarnations: BTreeMap::new(),
        }
    }

    /// Reads a snapshot, in this layout or the one before it.
    fn decode(snapshot: &[u8]) -> Result<Self, String> {
        match postcard::from_bytes::<ShardMasterState>(snapshot) {
            Ok(state) => Ok(state),
            Err(new_error) => {
                let old: ShardMasterStateV1 = postcard::from_bytes(snapshot)
                    .map_err(|_| format!("shardmaster snapshot: {new_error}"))?;
                // Every gid in some configuration but not the latest has left.
                let mut retired = BTreeMap::new();
                let latest = old.configs.last().map(|c| c.groups.clone());
                for pair in old.configs.windows(2) {
                    for gid in pair[0].groups.keys() {
                        if !pair[1].groups.contains_key(gid) {
                            retired.insert(*gid, pair[1].num);
                        }
                    }
                }
                if let Some(latest) = latest {
                    retired.retain(|gid, _| !latest.contains_key(gid));
                }
                Ok(ShardMasterState {
                    configs: old.configs,
                    sessions: old.sessions,
                    retired,
                    incarnations: BTreeMap::new(),
                })
            }
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
        let checked = matches!(op, Op::JoinChecked { .. });
        match op {
            Op::Query { num } => return Ok(self.query(num).clone()),
            Op::Join { gid, servers } | Op::JoinChecked { gid, servers } => {
                if gid == 0 {
                    return Err(ShardMasterError::InvalidGid);
                }
                if servers.is_empty() {
                    return Err(ShardMasterError::NoServers(gid));
                }
                if checked {
                    for address in &servers {
                        check_server_address(address).map_err(|reason| {
                            ShardMasterError::BadServerAddress {
                                gid,
                                address: address.clone(),
                                reason,
                            }
                        })?;
                    }
                    if let Some(&left_in) = self.retired.get(&gid) {
                        return Err(ShardMasterError::RetiredGroup { gid, left_in });
                    }
                } else {
                    self.retired.remove(&gid);
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
                self.retired.insert(gid, next.num + 1);
            }
            Op::Claim { gid, incarnation } => {
                if gid == 0 {
                    return Err(ShardMasterError::InvalidGid);
                }
                // A gid in no configuration ever has owned nothing: a new
                // life of it replaces the old. (A first claim of a retired
                // gid is taken too: it may still owe its hand-offs.)
                let ever_member = next.groups.contains_key(&gid) || self.retired.contains_key(&gid);
                match self.incarnations.get(&gid) {
                    Some(&claimed) if claimed != incarnation && ever_member => {
                        return Err(ShardMasterError::GroupDataLost {
                            gid,
                            claimed,
                            offered: incarnation,
                        });
                    }
                    _ => {
                        self.incarnations.insert(gid, incarnation);
                    }
                }
                return Ok(next);
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
    fn apply(&mut self, _slot: Slot, command: &[u8]) -> Result<Bytes, ApplyError> {
        let reply = match postcard::from_bytes::<Request>(command) {
            Ok(request) => self.execute(request),
            Err(e) => Err(ShardMasterError::Malformed(e.to_string())),
        };
        // Encoding our own types cannot fail; an empty reply would be refused
        // by the client as malformed rather than misread.
        Ok(postcard::to_allocvec(&reply)
            .map(Bytes::from)
            .unwrap_or_default())
    }

    fn snapshot(&self) -> Bytes {
        postcard::to_allocvec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    fn restore(&mut self, _index: Slot, snapshot: &[u8]) -> Result<(), String> {
        *self = Self::decode(snapshot)?;
        Ok(())
    }
}

/// A server address as groups dial it: `host:port`, the host a DNS name,
/// an IPv4 address or a bracketed IPv6 one. Checked in the state machine,
/// so every replica refuses the same Joins.
pub fn check_server_address(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("no port".into());
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
    if host.is_empty() {
        return Err("no host".into());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner.strip_suffix(']').ok_or("unclosed '[' in the host")?;
        return ip
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("{ip:?} is not an IPv6 address"));
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
    if !host.chars().all(name_char) {
        return Err(format!(
            "host {host:?} has characters no name or address has"
        ));
    }
    Ok(())
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
            op: Op::JoinChecked {
                gid,
                servers: vec![format!("s{gid}:1")],
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

    fn claim(state: &mut ShardMasterState, seq: u64, gid: Gid, incarnation: u64) -> Reply {
        state.execute(Request {
            client: 9,
            seq,
            op: Op::Claim { gid, incarnation },
        })
    }

    #[test]
    fn the_first_claim_of_a_gid_wins_and_a_retired_gid_stays_retired() {
        let mut state = ShardMasterState::new(4);
        state.execute(join(7, 1, 1)).unwrap();
        assert!(claim(&mut state, 1, 1, 11).is_ok());
        assert!(claim(&mut state, 2, 1, 11).is_ok(), "the same life again");
        // Every replica wiped: a new life of a gid that served data.
        assert!(matches!(
            claim(&mut state, 3, 1, 12),
            Err(ShardMasterError::GroupDataLost {
                gid: 1,
                claimed: 11,
                offered: 12
            })
        ));
        state
            .execute(Request {
                client: 7,
                seq: 2,
                op: Op::Leave { gid: 1 },
            })
            .unwrap();
        assert!(matches!(
            state.execute(join(7, 3, 1)),
            Err(ShardMasterError::RetiredGroup { gid: 1, left_in: 2 })
        ));
        // A gid that joined, left before it ever claimed: its first claim
        // is taken (it may still owe hand-offs), a second life's is not.
        state.execute(join(7, 4, 2)).unwrap();
        state
            .execute(Request {
                client: 7,
                seq: 5,
                op: Op::Leave { gid: 2 },
            })
            .unwrap();
        assert!(claim(&mut state, 4, 2, 5).is_ok());
        assert!(claim(&mut state, 5, 2, 6).is_err());
        // A gid in no configuration yet: a new life replaces the old one
        // (the group was recreated before it ever joined).
        assert!(claim(&mut state, 6, 3, 7).is_ok());
        assert!(claim(&mut state, 7, 3, 8).is_ok());
        state.execute(join(7, 6, 3)).unwrap();
        assert!(claim(&mut state, 8, 3, 8).is_ok());
        assert!(claim(&mut state, 9, 3, 9).is_err());
        // Claims make no configuration.
        assert_eq!(state.latest().num, 5);
    }

    #[test]
    fn a_snapshot_from_before_retired_gids_learns_them_from_history() {
        #[derive(Serialize)]
        struct Old<'a> {
            configs: &'a Vec<Config>,
            sessions: &'a BTreeMap<u64, (u64, Reply)>,
        }
        let mut state = ShardMasterState::new(4);
        state.execute(join(7, 1, 1)).unwrap();
        state.execute(join(7, 2, 2)).unwrap();
        state
            .execute(Request {
                client: 7,
                seq: 3,
                op: Op::Leave { gid: 1 },
            })
            .unwrap();
        let old = postcard::to_allocvec(&Old {
            configs: &state.configs,
            sessions: &state.sessions,
        })
        .unwrap();
        let mut restored = ShardMasterState::new(4);
        restored.restore(0, &old).unwrap();
        assert_eq!(restored, state);
        assert_eq!(restored.retired, BTreeMap::from([(1, 3)]));
    }

    /// An old log's Join of a gid that had left replays as it was applied
    /// then, so replaying agrees with restoring a snapshot taken after it.
    #[test]
    fn an_old_log_rejoin_replays_by_the_old_rules() {
        let mut state = ShardMasterState::new(4);
        let legacy = |seq, gid: Gid| Request {
            client: 1,
            seq,
            op: Op::Join {
                gid,
                servers: vec![format!("old-style-{gid}")],
            },
        };
        state.execute(legacy(1, 1)).unwrap();
        state
            .execute(Request {
                client: 1,
                seq: 2,
                op: Op::Leave { gid: 1 },
            })
            .unwrap();
        let again = state.execute(legacy(3, 1)).unwrap();
        assert!(again.groups.contains_key(&1));
        assert!(state.retired.is_empty());
    }

    #[test]
    fn undecodable_commands_are_refused_without_effect() {
        let mut state = ShardMasterState::new(4);
        let reply: Reply =
            postcard::from_bytes(&state.apply(1, b"\xff\xff garbage").unwrap()).unwrap();
        assert!(matches!(reply, Err(ShardMasterError::Malformed(_))));
        assert_eq!(state.latest().num, 0);
    }
}
