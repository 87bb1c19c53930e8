//! The replicated state of one replica group: its shards' data, their
//! duplicate tables, and where it stands in the sequence of configurations.
//!
//! Every change arrives as a [`Command`] decided in the group's log, so all
//! replicas make the same changes in the same order, client operations and
//! reconfiguration steps interleaved identically. The handoff protocol:
//!
//! 1. The leader sees configuration `num + 1` at the shardmaster and proposes
//!    [`Command::Reconfigure`]. It applies only once every shard owned in
//!    `num` is present (none is still being pulled), so configurations are
//!    taken strictly in order. Shards kept are served throughout; shards
//!    lost become *outgoing* copies, frozen, keyed by the new number; shards
//!    gained are *pulling* until their data arrives.
//! 2. The leader pulls each pulling shard from the group that holds it and
//!    proposes [`Command::InstallShard`]; the shard is served from then on,
//!    whatever the state of other shards.
//! 3. It then tells the old holder, which proposes [`Command::DeleteShard`]
//!    in its own log and drops the copy; once that is acknowledged the new
//!    owner proposes [`Command::DeleteAcknowledged`]. Data thus lives on
//!    both groups only until the new owner has it durably.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{key_to_shard, put_hash_value};
use crate::paxos::Slot;
use crate::replica::{SharedMachine, StateMachine};
use crate::shardmaster::{Config, Gid};

/// A stored value may grow by Append up to this size, and no further. A
/// constant, not a flag: every replica must make the same decision.
pub const STORED_VALUE_BYTES_MAX: usize = 64 << 20;

/// A client's session in a shard ends after this much of the group's
/// logged time without a write from it there. Constants, not flags, for
/// the same reason as above.
pub const SESSION_IDLE_MS_MAX: u64 = 10 * 60 * 1000;

/// A write decided this long (of logged time) after the kvserver proposed
/// it is refused, not applied: so a delayed copy can never outlive its
/// session and be applied twice. A session expires only after
/// [`SESSION_IDLE_MS_MAX`], so a duplicate would need a client still
/// re-sending a write minutes after its first copy was applied; the Clerk
/// gives up after at most [`crate::shardkv::clerk::CLERK_TIMEOUT_MAX`].
pub const WRITE_AGE_MS_MAX: u64 = 2 * 60 * 1000;

/// One [`Command::Clock`] moves the logged time by at most this much (but
/// a group's first clock sets it outright). The leader proposes one per
/// `clock_interval` (2 s), so logged time runs at most 5 times as fast as a
/// leader's own timer, whatever its wall clock says: a session cannot end
/// within seconds because one leader's clock is hours ahead.
pub const CLOCK_STEP_MS_MAX: u64 = 10_000;

/// Replies a session keeps for writes its client has not acknowledged; a
/// write past it is refused. The Clerk never has more in flight.
pub const SESSION_REPLIES_MAX: usize = 1024;

/// A reply larger than this (a PutHash's previous value) is answered once
/// and kept only as "applied": a retry learns it was applied, not the
/// value. Bounds a session to about `SESSION_REPLIES_MAX` × this.
pub const KEPT_REPLY_BYTES_MAX: usize = 4 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    Get,
    Put,
    Append,
    PutHash,
    Delete,
}

/// A client operation as logged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientOp {
    pub client: u64,
    /// Unique per client for writes; 0 for Gets, which are not deduplicated.
    pub seq: u64,
    /// The client has its replies for every seq below this.
    pub first_unacked: u64,
    pub kind: OpKind,
    pub key: Bytes,
    pub value: Bytes,
}

/// The result of a client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpReply {
    /// Get: the value, if any. PutHash: the previous value (empty if none).
    Value(Option<Bytes>),
    /// Put, Append, Delete applied.
    Done,
    /// This group does not serve the key's shard at this point of its log.
    WrongGroup,
    /// The client already acknowledged this seq, so its reply is gone; the
    /// operation was applied once, or never will be. Only a delayed copy of
    /// an old request gets this.
    Stale,
    /// The Append would make the value larger than [`STORED_VALUE_BYTES_MAX`].
    ValueTooLarge,
    /// Decided more than [`WRITE_AGE_MS_MAX`] after it was proposed: not
    /// applied, now or ever.
    TooOld,
    /// The session already holds [`SESSION_REPLIES_MAX`] unacknowledged
    /// replies: not applied.
    TooManyPending,
    /// Applied once; its reply was larger than [`KEPT_REPLY_BYTES_MAX`]
    /// and is not kept for retries.
    AppliedReplyNotKept { bytes: u64 },
}

/// Where a shard's previous copy lives, so its holder can be told to drop it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    pub gid: Gid,
    /// The holder's key for the copy: the first configuration in which it
    /// no longer owned the shard.
    pub config_num: u64,
    pub servers: Vec<String>,
}

/// Everything in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Client(ClientOp),
    Reconfigure(Config),
    /// A pulled shard's data, for configuration `config_num`. `source` is
    /// `None` for a shard that never had data anywhere.
    InstallShard {
        config_num: u64,
        shard: u64,
        data: ShardData,
        source: Option<Source>,
    },
    /// The new owner has the copy outgoing at (`config_num`, `shard`).
    DeleteShard {
        config_num: u64,
        shard: u64,
    },
    /// The old holder dropped its copy: stop telling it to.
    DeleteAcknowledged {
        shard: u64,
        source: Source,
    },
    /// This life of the group's data: the first one applied wins. Taken
    /// before any configuration, and claimed at the shardmaster, so a group
    /// whose every replica lost its storage cannot pass for a new one.
    Begin {
        incarnation: u64,
    },
    /// The group's logged time moves to `now_ms` (never back); sessions
    /// idle past [`SESSION_IDLE_MS_MAX`] end.
    Clock {
        now_ms: u64,
    },
    /// A client operation, with the logged time at which the kvserver
    /// proposed it (see [`WRITE_AGE_MS_MAX`]).
    ClientAt {
        op: ClientOp,
        proposed_ms: u64,
    },
}

/// What applying a [`Command`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandReply {
    Op(OpReply),
    /// A reconfiguration step took effect (false: it was stale or early and
    /// changed nothing; the leader retries if still needed).
    Step(bool),
    /// DeleteShard for a configuration this replica has not reached yet.
    NotYet,
    /// The command could not be decoded.
    Malformed(String),
}

/// One client's duplicate table within one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Replies to every seq below this were received by the client.
    pub acked_below: u64,
    /// Replies the client may still ask for again.
    pub replies: BTreeMap<u64, OpReply>,
    /// The logged time of its last write here, for expiry.
    pub last_write_ms: u64,
}

/// A shard's contents: they move between groups as one unit, so a retry
/// that reaches the new owner is still recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardData {
    pub kv: BTreeMap<Bytes, Bytes>,
    pub sessions: BTreeMap<u64, Session>,
    /// `(last_write_ms, client)` of every session, oldest first: expiry
    /// looks only at the sessions that end.
    pub idle_order: BTreeSet<(u64, u64)>,
}

impl ShardData {
    /// Moves every session last written at `from_ms` (the previous clock)
    /// or later up to just below `to_ms`: only those written since the
    /// previous clock, so the cost is that of the writes in one interval.
    /// Just below, so the next clock does not take them for recent again.
    fn lift_recent_sessions(&mut self, from_ms: u64, to_ms: u64) {
        debug_assert!(to_ms > from_ms);
        let recent = self.idle_order.split_off(&(from_ms, 0));
        for (at, client) in recent {
            let lifted = at.max(to_ms - 1);
            self.idle_order.insert((lifted, client));
            if let Some(session) = self.sessions.get_mut(&client) {
                session.last_write_ms = lifted;
            }
        }
    }

    /// Raises every session's last write to at least `floor_ms`: a shard
    /// arriving from a group whose clock is behind keeps its sessions for
    /// their full idle time by this group's clock. Installing a shard
    /// costs its size anyway.
    fn raise_sessions_to(&mut self, floor_ms: u64) {
        let old = self.idle_order.split_off(&(0, 0));
        for (at, client) in old {
            let raised = at.max(floor_ms);
            self.idle_order.insert((raised, client));
            if let Some(session) = self.sessions.get_mut(&client) {
                session.last_write_ms = raised;
            }
        }
    }

    /// Ends the sessions whose last write here is older than
    /// [`SESSION_IDLE_MS_MAX`] at `now_ms`.
    fn expire_sessions(&mut self, now_ms: u64) -> usize {
        let mut ended = 0;
        while let Some(&(last_write_ms, client)) = self.idle_order.first() {
            if last_write_ms.saturating_add(SESSION_IDLE_MS_MAX) >= now_ms {
                break;
            }
            self.idle_order.pop_first();
            self.sessions.remove(&client);
            ended += 1;
        }
        debug_assert_eq!(self.idle_order.len(), self.sessions.len());
        ended
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardStatus {
    /// Present and served.
    Serving,
    /// Owned in the current configuration; waiting for its data.
    Pulling,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedShard {
    pub status: ShardStatus,
    pub data: ShardData,
}

/// The group's replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvState {
    pub gid: Gid,
    /// The configuration applied last, and the one before it (which says
    /// where pulling shards come from).
    pub config: Config,
    pub prev_config: Config,
    /// Shards owned in `config`.
    pub owned: BTreeMap<u64, OwnedShard>,
    /// Copies handed off, by (first configuration not owning it, shard),
    /// frozen until the new owner confirms it has them.
    pub outgoing: BTreeMap<(u64, u64), ShardData>,
    /// Installed shards whose previous holder must still drop its copy.
    /// A shard can have several: it may move away and back before an old
    /// holder answers.
    pub pending_deletes: BTreeSet<(u64, Source)>,
    /// This life of the group's data (see [`Command::Begin`]); `None`
    /// until the first leader takes one.
    pub incarnation: Option<u64>,
    /// The group's logged time: the latest [`Command::Clock`].
    pub clock_ms: u64,
}

/// The state as encoded before incarnations and logged time.
#[derive(Deserialize)]
struct KvStateV1 {
    gid: Gid,
    config: Config,
    prev_config: Config,
    owned: BTreeMap<u64, OwnedShardV1>,
    outgoing: BTreeMap<(u64, u64), ShardDataV1>,
    pending_deletes: BTreeSet<(u64, Source)>,
}

#[derive(Deserialize)]
struct OwnedShardV1 {
    status: ShardStatus,
    data: ShardDataV1,
}

#[derive(Deserialize)]
struct ShardDataV1 {
    kv: BTreeMap<Bytes, Bytes>,
    sessions: BTreeMap<u64, SessionV1>,
}

#[derive(Deserialize)]
struct SessionV1 {
    acked_below: u64,
    replies: BTreeMap<u64, OpReply>,
}

impl From<ShardDataV1> for ShardData {
    fn from(old: ShardDataV1) -> Self {
        // Old sessions count as written at time 0: the first clock ends them
        // once they have been idle that long by the group's new clock.
        let sessions: BTreeMap<u64, Session> = (old.sessions.into_iter())
            .map(|(client, s)| {
                let session = Session {
                    acked_below: s.acked_below,
                    replies: s.replies,
                    last_write_ms: 0,
                };
                (client, session)
            })
            .collect();
        let idle_order = sessions.keys().map(|c| (0, *c)).collect();
        ShardData {
            kv: old.kv,
            sessions,
            idle_order,
        }
    }
}

impl From<KvStateV1> for KvState {
    fn from(old: KvStateV1) -> Self {
        KvState {
            gid: old.gid,
            config: old.config,
            prev_config: old.prev_config,
            owned: (old.owned.into_iter())
                .map(|(shard, o)| {
                    let owned = OwnedShard {
                        status: o.status,
                        data: o.data.into(),
                    };
                    (shard, owned)
                })
                .collect(),
            outgoing: (old.outgoing.into_iter())
                .map(|(key, data)| (key, data.into()))
                .collect(),
            pending_deletes: old.pending_deletes,
            incarnation: None,
            clock_ms: 0,
        }
    }
}

/// Reads a shard as another group handed it out, in this layout or the
/// one before it.
pub fn decode_shard(bytes: &[u8]) -> Result<ShardData, postcard::Error> {
    decode_versioned::<ShardData, ShardDataV1>(bytes)
}

/// Starts every snapshot and shard transfer since sessions expire. Ten
/// bytes of 0xff are no valid varint, so no older encoding (which starts
/// with one) begins with them: the layout is told apart for certain, not
/// guessed from whether a decode happens to succeed.
const LAYOUT_V2: [u8; 11] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2,
];

/// `value` in the current layout, marked as such.
pub fn encode_versioned<T: Serialize>(value: &T) -> Bytes {
    // Our own types always encode; see `encode`.
    match postcard::to_extend(value, LAYOUT_V2.to_vec()) {
        Ok(bytes) => Bytes::from(bytes),
        Err(_) => Bytes::new(),
    }
}

/// Reads the current layout if marked, else the one before it.
fn decode_versioned<T, Old>(bytes: &[u8]) -> Result<T, postcard::Error>
where
    T: serde::de::DeserializeOwned,
    Old: serde::de::DeserializeOwned + Into<T>,
{
    match bytes.strip_prefix(&LAYOUT_V2[..]) {
        Some(current) => postcard::from_bytes(current),
        None => postcard::from_bytes::<Old>(bytes).map(Into::into),
    }
}

fn empty_config() -> Config {
    // The shard count is learnt from the first configuration.
    Config::initial(0)
}

impl KvState {
    pub fn new(gid: Gid) -> Self {
        KvState {
            gid,
            config: empty_config(),
            prev_config: empty_config(),
            owned: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            pending_deletes: BTreeSet::new(),
            incarnation: None,
            clock_ms: 0,
        }
    }

    /// The shard a key maps to in this group's configuration.
    pub fn shard_of(&self, key: &[u8]) -> u64 {
        key_to_shard(key, self.config.shards.len()) as u64
    }

    /// True when the key's shard is owned and present here.
    pub fn serves(&self, key: &[u8]) -> bool {
        !self.config.shards.is_empty()
            && self
                .owned
                .get(&self.shard_of(key))
                .is_some_and(|s| s.status == ShardStatus::Serving)
    }

    /// True when the next configuration may be applied.
    pub fn ready_for_next_config(&self) -> bool {
        self.owned
            .values()
            .all(|s| s.status == ShardStatus::Serving)
    }

    pub fn apply_command(&mut self, command: Command) -> CommandReply {
        match command {
            // Logged before writes were stamped: applied by the rules of
            // then (no age, no bounds), so a replica replaying it agrees
            // with one that restored a snapshot taken after it.
            Command::Client(op) => CommandReply::Op(self.apply_client(op, None)),
            Command::ClientAt { op, proposed_ms } => {
                CommandReply::Op(self.apply_client(op, Some(proposed_ms)))
            }
            Command::Begin { incarnation } => {
                if self.incarnation.is_some() {
                    return CommandReply::Step(false);
                }
                self.incarnation = Some(incarnation);
                CommandReply::Step(true)
            }
            Command::Clock { now_ms } => {
                if now_ms <= self.clock_ms {
                    return CommandReply::Step(false);
                }
                let next_ms = if self.clock_ms == 0 {
                    now_ms
                } else {
                    now_ms.min(self.clock_ms + CLOCK_STEP_MS_MAX)
                };
                let previous_ms = std::mem::replace(&mut self.clock_ms, next_ms);
                let now_ms = next_ms;
                for owned in self.owned.values_mut() {
                    // Written since the last clock: just now, however far
                    // this clock jumps (a group's first, or one after a
                    // leader whose clock was behind). Their idle time
                    // starts here, or they would end at once.
                    owned.data.lift_recent_sessions(previous_ms, now_ms);
                }
                // Frozen outgoing copies are left as they are: their
                // sessions expire at the new owner, by its clock.
                for owned in self.owned.values_mut() {
                    if owned.status == ShardStatus::Serving {
                        owned.data.expire_sessions(now_ms);
                    }
                }
                CommandReply::Step(true)
            }
            Command::Reconfigure(next) => CommandReply::Step(self.apply_reconfigure(next)),
            Command::InstallShard {
                config_num,
                shard,
                data,
                source,
            } => CommandReply::Step(self.apply_install(config_num, shard, data, source)),
            Command::DeleteShard { config_num, shard } => {
                if self.config.num < config_num {
                    return CommandReply::NotYet;
                }
                CommandReply::Step(self.outgoing.remove(&(config_num, shard)).is_some())
            }
            Command::DeleteAcknowledged { shard, source } => {
                CommandReply::Step(self.pending_deletes.remove(&(shard, source)))
            }
        }
    }

    /// A Get at this point of the log: the value if the key's shard is
    /// owned and present here, else `WrongGroup`. Served without the log
    /// after a read barrier, and the same answer a logged Get gets.
    pub fn get(&self, key: &[u8]) -> OpReply {
        if !self.serves(key) {
            return OpReply::WrongGroup;
        }
        let value = self
            .owned
            .get(&self.shard_of(key))
            .and_then(|s| s.data.kv.get(key).cloned());
        OpReply::Value(value)
    }

    /// `proposed_ms`: the logged time its kvserver proposed it at; `None`
    /// for a write logged before writes were stamped (old rules: no age,
    /// no bounds).
    fn apply_client(&mut self, op: ClientOp, proposed_ms: Option<u64>) -> OpReply {
        if op.kind == OpKind::Get {
            return self.get(&op.key);
        }
        let shard = self.shard_of(&op.key);
        let Some(owned) = self.owned.get_mut(&shard) else {
            return OpReply::WrongGroup;
        };
        if owned.status != ShardStatus::Serving || self.config.shards.is_empty() {
            return OpReply::WrongGroup;
        }
        let data = &mut owned.data;
        let now_ms = self.clock_ms;
        // An answer already given comes first: every copy of a write gets
        // the same one, applied or refused.
        if let Some(session) = data.sessions.get(&op.client) {
            if op.seq < session.acked_below {
                return OpReply::Stale;
            }
            if let Some(reply) = session.replies.get(&op.seq) {
                return reply.clone();
            }
        }
        let bounded = proposed_ms.is_some();
        let session = data.sessions.entry(op.client).or_default();
        // Acknowledged replies go first, so a client with few in flight
        // is never refused for the ones it already has.
        let first_unacked = op.first_unacked.min(op.seq);
        if first_unacked > session.acked_below {
            session.acked_below = first_unacked;
            session.replies = session.replies.split_off(&first_unacked);
        }
        if bounded && session.replies.len() >= SESSION_REPLIES_MAX {
            // Not kept: the bound is on what is kept. A new session has no
            // replies, so it is never refused here (it is in the index).
            return OpReply::TooManyPending;
        }
        // Never lowered: a write stamped by a clock that is behind must not
        // shorten a session.
        let last_write_ms = session.last_write_ms.max(now_ms);
        data.idle_order.remove(&(session.last_write_ms, op.client));
        session.last_write_ms = last_write_ms;
        data.idle_order.insert((last_write_ms, op.client));
        if proposed_ms.is_some_and(|p| now_ms > p.saturating_add(WRITE_AGE_MS_MAX)) {
            // Kept as its answer, so a copy still in flight is refused too.
            session.replies.insert(op.seq, OpReply::TooOld);
            return OpReply::TooOld;
        }
        let reply = match op.kind {
            OpKind::Get => unreachable!("handled above"),
            OpKind::Put => {
                data.kv.insert(op.key, op.value);
                OpReply::Done
            }
            OpKind::Append => match data.kv.get(&op.key) {
                Some(old) if old.len() + op.value.len() > STORED_VALUE_BYTES_MAX => {
                    OpReply::ValueTooLarge
                }
                Some(old) => {
                    let mut joined = Vec::with_capacity(old.len() + op.value.len());
                    joined.extend_from_slice(old);
                    joined.extend_from_slice(&op.value);
                    data.kv.insert(op.key, Bytes::from(joined));
                    OpReply::Done
                }
                None => {
                    data.kv.insert(op.key, op.value);
                    OpReply::Done
                }
            },
            OpKind::PutHash => {
                let previous = data.kv.get(&op.key).cloned().unwrap_or_default();
                data.kv.insert(op.key, put_hash_value(&previous, &op.value));
                OpReply::Value(Some(previous))
            }
            OpKind::Delete => {
                data.kv.remove(&op.key);
                OpReply::Done
            }
        };
        let kept = match &reply {
            OpReply::Value(Some(v)) if bounded && v.len() > KEPT_REPLY_BYTES_MAX => {
                OpReply::AppliedReplyNotKept {
                    bytes: v.len() as u64,
                }
            }
            other => other.clone(),
        };
        session.replies.insert(op.seq, kept);
        debug_assert!(!bounded || session.replies.len() <= SESSION_REPLIES_MAX);
        reply
    }

    fn apply_reconfigure(&mut self, next: Config) -> bool {
        if next.num != self.config.num + 1 || !self.ready_for_next_config() {
            return false;
        }
        if self.config.num > 0 && next.shards.len() != self.config.shards.len() {
            // The shardmaster never changes its shard count; refuse rather
            // than remap every key.
            tracing::error!(
                have = self.config.shards.len(),
                got = next.shards.len(),
                "configuration changes the number of shards; ignored"
            );
            return false;
        }
        let me = self.gid;
        for (shard, &owner) in next.shards.iter().enumerate() {
            let shard = shard as u64;
            let was_mine = self.config.shards.get(shard as usize) == Some(&me);
            let is_mine = owner == me;
            if was_mine && !is_mine {
                if let Some(s) = self.owned.remove(&shard) {
                    self.outgoing.insert((next.num, shard), s.data);
                }
            } else if is_mine && !was_mine {
                // In configuration 1 every shard is new: nothing to pull.
                let status = if self.config.num == 0 {
                    ShardStatus::Serving
                } else {
                    ShardStatus::Pulling
                };
                self.owned.insert(
                    shard,
                    OwnedShard {
                        status,
                        data: ShardData::default(),
                    },
                );
            }
        }
        self.prev_config = std::mem::replace(&mut self.config, next);
        true
    }

    fn apply_install(
        &mut self,
        config_num: u64,
        shard: u64,
        data: ShardData,
        source: Option<Source>,
    ) -> bool {
        if config_num != self.config.num {
            return false;
        }
        match self.owned.get_mut(&shard) {
            Some(owned) if owned.status == ShardStatus::Pulling => {
                let mut data = data;
                data.raise_sessions_to(self.clock_ms);
                owned.data = data;
                owned.status = ShardStatus::Serving;
                if let Some(source) = source {
                    self.pending_deletes.insert((shard, source));
                }
                true
            }
            _ => false,
        }
    }

    /// Client sessions held in owned shards.
    pub fn session_count(&self) -> usize {
        self.owned.values().map(|s| s.data.sessions.len()).sum()
    }

    /// Number of keys stored, owned and outgoing.
    pub fn key_count(&self) -> usize {
        self.owned.values().map(|s| s.data.kv.len()).sum::<usize>()
            + self.outgoing.values().map(|d| d.kv.len()).sum::<usize>()
    }
}

/// The state machine the replica applies to, shared with the gRPC service
/// (which reads shard status and outgoing copies without going through the
/// log).
pub type SharedKvState = SharedMachine<KvState>;

pub fn encode<T: Serialize>(value: &T) -> Bytes {
    // Our own types always encode; an empty result would be refused by the
    // reader as malformed rather than misread.
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .unwrap_or_default()
}

impl StateMachine for KvState {
    fn apply(&mut self, _slot: Slot, command: &[u8]) -> Bytes {
        let reply = match postcard::from_bytes::<Command>(command) {
            Ok(command) => self.apply_command(command),
            Err(e) => CommandReply::Malformed(e.to_string()),
        };
        encode(&reply)
    }

    fn snapshot(&self) -> Bytes {
        encode_versioned(self)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let state: KvState =
            decode_versioned::<KvState, KvStateV1>(snapshot).map_err(|e| e.to_string())?;
        if state.gid != self.gid {
            return Err(format!(
                "snapshot is of group {}, this is group {}",
                state.gid, self.gid
            ));
        }
        *self = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(num: u64, shards: Vec<Gid>) -> Config {
        let mut groups = BTreeMap::new();
        for g in &shards {
            if *g != 0 {
                groups.insert(*g, vec![format!("g{g}:1")]);
            }
        }
        Config {
            num,
            shards,
            groups,
        }
    }

    fn op(client: u64, seq: u64, kind: OpKind, key: &str, value: &str) -> Command {
        Command::Client(ClientOp {
            client,
            seq,
            first_unacked: seq,
            kind,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
    }

    fn get(state: &mut KvState, key: &str) -> CommandReply {
        state.apply_command(op(0, 0, OpKind::Get, key, ""))
    }

    /// A key of shard `shard` out of `n`.
    fn key_in(shard: u64, n: usize) -> String {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| key_to_shard(k.as_bytes(), n) as u64 == shard)
            .unwrap()
    }

    #[test]
    fn a_retried_write_is_applied_once_and_old_replies_are_forgotten() {
        let mut s = KvState::new(1);
        assert!(
            s.apply_command(Command::Reconfigure(config(1, vec![1, 1])))
                == CommandReply::Step(true)
        );
        let append = op(7, 1, OpKind::Append, "k", "x");
        assert_eq!(
            s.apply_command(append.clone()),
            CommandReply::Op(OpReply::Done)
        );
        assert_eq!(
            s.apply_command(append.clone()),
            CommandReply::Op(OpReply::Done)
        );
        assert_eq!(
            get(&mut s, "k"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
        // Seq 2 acknowledges seq 1: a delayed copy of 1 is now refused.
        s.apply_command(op(7, 2, OpKind::Append, "k", "y"));
        assert_eq!(s.apply_command(append), CommandReply::Op(OpReply::Stale));
        assert_eq!(
            get(&mut s, "k"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("xy"))))
        );
        let shard = s.shard_of(b"k");
        let session = &s.owned[&shard].data.sessions[&7];
        assert_eq!(session.replies.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn put_hash_returns_the_previous_value_and_stores_the_hash() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        assert_eq!(
            s.apply_command(op(1, 1, OpKind::PutHash, "k", "a")),
            CommandReply::Op(OpReply::Value(Some(Bytes::new())))
        );
        assert_eq!(
            s.apply_command(op(1, 2, OpKind::PutHash, "k", "b")),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("3826002220"))))
        );
        s.apply_command(op(1, 3, OpKind::Delete, "k", ""));
        assert_eq!(get(&mut s, "k"), CommandReply::Op(OpReply::Value(None)));
    }

    #[test]
    fn a_shard_moves_with_its_duplicate_table_and_both_sides_clean_up() {
        let n = 2;
        let moving = key_in(1, n);
        let staying = key_in(0, n);
        let mut a = KvState::new(1);
        let mut b = KvState::new(2);
        let c1 = config(1, vec![1, 1]);
        let c2 = config(2, vec![1, 2]);
        for s in [&mut a, &mut b] {
            s.apply_command(Command::Reconfigure(c1.clone()));
        }
        a.apply_command(op(9, 1, OpKind::Append, &moving, "x"));
        for s in [&mut a, &mut b] {
            assert_eq!(
                s.apply_command(Command::Reconfigure(c2.clone())),
                CommandReply::Step(true)
            );
        }
        // The old owner refuses the moved shard, serves the other one.
        assert_eq!(get(&mut a, &moving), CommandReply::Op(OpReply::WrongGroup));
        assert!(a.serves(staying.as_bytes()));
        // The new owner refuses until the data arrives, and cannot take a
        // further configuration before that.
        assert_eq!(get(&mut b, &moving), CommandReply::Op(OpReply::WrongGroup));
        assert_eq!(
            b.apply_command(Command::Reconfigure(config(3, vec![2, 2]))),
            CommandReply::Step(false)
        );
        let data = a.outgoing[&(2, 1)].clone();
        let source = Source {
            gid: 1,
            config_num: 2,
            servers: vec!["g1".into()],
        };
        let install = Command::InstallShard {
            config_num: 2,
            shard: 1,
            data,
            source: Some(source.clone()),
        };
        assert_eq!(b.apply_command(install.clone()), CommandReply::Step(true));
        assert_eq!(b.apply_command(install), CommandReply::Step(false));
        // The retried append (reply lost before the move) is not re-applied.
        assert_eq!(
            b.apply_command(op(9, 1, OpKind::Append, &moving, "x")),
            CommandReply::Op(OpReply::Done)
        );
        assert_eq!(
            get(&mut b, &moving),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
        // Deleting at the old owner, then acknowledging at the new one.
        assert_eq!(
            a.apply_command(Command::DeleteShard {
                config_num: 2,
                shard: 1
            }),
            CommandReply::Step(true)
        );
        assert!(a.outgoing.is_empty());
        b.apply_command(Command::DeleteAcknowledged { shard: 1, source });
        assert!(b.pending_deletes.is_empty());
    }

    #[test]
    fn a_delete_for_a_future_configuration_waits() {
        let mut a = KvState::new(1);
        assert_eq!(
            a.apply_command(Command::DeleteShard {
                config_num: 3,
                shard: 0
            }),
            CommandReply::NotYet
        );
    }

    #[test]
    fn configurations_apply_in_order_only() {
        let mut a = KvState::new(1);
        assert_eq!(
            a.apply_command(Command::Reconfigure(config(2, vec![1]))),
            CommandReply::Step(false)
        );
        assert_eq!(
            a.apply_command(Command::Reconfigure(config(1, vec![1]))),
            CommandReply::Step(true)
        );
        assert_eq!(
            a.apply_command(Command::Reconfigure(config(1, vec![1]))),
            CommandReply::Step(false)
        );
        assert_eq!(a.config.num, 1);
    }

    fn stamped(op: Command, proposed_ms: u64) -> Command {
        let Command::Client(op) = op else {
            unreachable!("a client op")
        };
        Command::ClientAt { op, proposed_ms }
    }

    /// Moves the logged time to `now_ms`, one step at a time as a leader
    /// would.
    fn clock(s: &mut KvState, now_ms: u64) {
        while s.clock_ms < now_ms {
            s.apply_command(Command::Clock { now_ms });
        }
        s.apply_command(Command::Clock { now_ms });
    }

    #[test]
    fn an_idle_session_ends_and_a_late_copy_of_its_write_is_refused() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        clock(&mut s, 1_000);
        let append = stamped(op(7, 1, OpKind::Append, "k", "x"), 1_000);
        assert_eq!(
            s.apply_command(append.clone()),
            CommandReply::Op(OpReply::Done)
        );
        assert_eq!(s.session_count(), 1);
        // Written since the clock of 1 s: its idle time starts at the next.
        clock(&mut s, 2_000);
        // A retry while the session lives gets the kept reply, however old.
        clock(&mut s, 2_000 + WRITE_AGE_MS_MAX * 2);
        assert_eq!(
            s.apply_command(append.clone()),
            CommandReply::Op(OpReply::Done)
        );
        // Its idle time started just below that clock. Idle for the whole
        // limit: not yet ended; one more ms: ended.
        clock(&mut s, 1_999 + SESSION_IDLE_MS_MAX);
        assert_eq!(s.session_count(), 1);
        clock(&mut s, 2_001 + SESSION_IDLE_MS_MAX);
        assert_eq!(s.session_count(), 0);
        // The old copy, decided now, is refused rather than applied twice.
        assert_eq!(s.apply_command(append), CommandReply::Op(OpReply::TooOld));
        assert_eq!(
            get(&mut s, "k"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
        // The clock never goes back.
        clock(&mut s, 5);
        assert_eq!(s.clock_ms, 2_001 + SESSION_IDLE_MS_MAX);
    }

    /// A write refused as too old keeps that answer: a copy of it still in
    /// flight elsewhere, decided later with a fresh stamp, is refused too,
    /// so "never" holds.
    #[test]
    fn a_write_refused_as_too_old_stays_refused() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        clock(&mut s, 1_000);
        let late = stamped(op(7, 1, OpKind::Append, "k", "x"), 1_000);
        clock(&mut s, 1_001 + WRITE_AGE_MS_MAX);
        assert_eq!(s.apply_command(late), CommandReply::Op(OpReply::TooOld));
        let fresh = stamped(op(7, 1, OpKind::Append, "k", "x"), 1_001 + WRITE_AGE_MS_MAX);
        assert_eq!(s.apply_command(fresh), CommandReply::Op(OpReply::TooOld));
        assert_eq!(get(&mut s, "k"), CommandReply::Op(OpReply::Value(None)));
    }

    /// Writes while the logged time stands still (the group's first
    /// moments, or a leader whose clock is behind proposes no clock) and
    /// then a clock far ahead: the sessions do not end at it, and a retry
    /// with a fresh stamp gets its kept reply.
    #[test]
    fn a_jump_of_the_clock_does_not_end_sessions_just_written() {
        for start_ms in [0, 1_000] {
            let mut s = KvState::new(1);
            s.apply_command(Command::Reconfigure(config(1, vec![1])));
            clock(&mut s, start_ms);
            let append = op(7, 1, OpKind::Append, "k", "x");
            assert_eq!(
                s.apply_command(stamped(append.clone(), start_ms)),
                CommandReply::Op(OpReply::Done)
            );
            // One clock from a leader whose wall clock is far ahead.
            s.apply_command(Command::Clock {
                now_ms: start_ms + SESSION_IDLE_MS_MAX * 3,
            });
            if start_ms > 0 {
                assert_eq!(s.clock_ms, start_ms + CLOCK_STEP_MS_MAX, "one step at most");
            }
            assert_eq!(s.session_count(), 1, "start {start_ms}");
            let now_ms = s.clock_ms;
            assert_eq!(
                s.apply_command(stamped(append, now_ms)),
                CommandReply::Op(OpReply::Done)
            );
            assert_eq!(
                get(&mut s, "k"),
                CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
            );
        }
    }

    /// A write, an ordinary clock after it, then a clock from a leader
    /// whose wall clock is an hour ahead: the logged time moves one step,
    /// so the session does not end and a retry gets its kept reply.
    #[test]
    fn a_leader_far_ahead_moves_the_logged_time_one_step() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        clock(&mut s, 1_000);
        let append = op(7, 1, OpKind::Append, "k", "x");
        s.apply_command(stamped(append.clone(), 1_000));
        clock(&mut s, 3_000);
        s.apply_command(Command::Clock {
            now_ms: 3_000 + 3_600_000,
        });
        assert_eq!(s.clock_ms, 3_000 + CLOCK_STEP_MS_MAX);
        assert_eq!(s.session_count(), 1);
        assert_eq!(
            s.apply_command(stamped(append, s.clock_ms)),
            CommandReply::Op(OpReply::Done)
        );
        assert_eq!(
            get(&mut s, "k"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
    }

    /// A shard arriving from a group whose clock is far behind keeps its
    /// sessions for their whole idle time by the new owner's clock.
    #[test]
    fn an_installed_shard_keeps_its_sessions_by_the_new_owners_clock() {
        let mut a = KvState::new(1);
        let mut b = KvState::new(2);
        a.apply_command(Command::Reconfigure(config(1, vec![1, 1])));
        b.apply_command(Command::Reconfigure(config(1, vec![1, 1])));
        clock(&mut a, 1_000);
        let moving = key_in(1, 2);
        let append = op(7, 1, OpKind::Append, &moving, "x");
        a.apply_command(stamped(append.clone(), 1_000));
        let behind_ms = 1_000 + SESSION_IDLE_MS_MAX * 5;
        clock(&mut b, behind_ms);
        for s in [&mut a, &mut b] {
            s.apply_command(Command::Reconfigure(config(2, vec![1, 2])));
        }
        let data = a.outgoing[&(2, 1)].clone();
        b.apply_command(Command::InstallShard {
            config_num: 2,
            shard: 1,
            data,
            source: None,
        });
        clock(&mut b, behind_ms + 1);
        assert_eq!(b.session_count(), 1);
        assert_eq!(
            b.apply_command(stamped(append, behind_ms + 1)),
            CommandReply::Op(OpReply::Done)
        );
        assert_eq!(
            get(&mut b, &moving),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
    }

    /// A write applied before the group's first clock (a new group, or one
    /// that just received its first shard) must not have its session end at
    /// that clock: a retry of it would then be applied twice.
    #[test]
    fn a_session_from_before_the_first_clock_does_not_end_at_it() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        let append = op(7, 1, OpKind::Append, "k", "x");
        s.apply_command(append.clone());
        clock(&mut s, 1_000 + SESSION_IDLE_MS_MAX * 3);
        assert_eq!(s.session_count(), 1);
        assert_eq!(s.apply_command(append), CommandReply::Op(OpReply::Done));
        assert_eq!(
            get(&mut s, "k"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
    }

    #[test]
    fn only_idle_sessions_end() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        for client in 1..=3 {
            clock(&mut s, client * 1_000);
            s.apply_command(stamped(
                op(client, 1, OpKind::Put, "k", "v"),
                client * 1_000,
            ));
        }
        // Client 1 writes again later: it is not idle.
        clock(&mut s, 4_000);
        s.apply_command(stamped(op(1, 2, OpKind::Put, "k", "w"), 4_000));
        // Each write's idle time starts just below the clock after it:
        // client 2's at 2.999 s, client 3's at 3.999 s.
        clock(&mut s, 3_500 + SESSION_IDLE_MS_MAX);
        let shard = s.shard_of(b"k");
        let data = &s.owned[&shard].data;
        assert_eq!(
            data.sessions.keys().copied().collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(data.idle_order.len(), 2);
    }

    #[test]
    fn a_session_keeps_a_bounded_number_of_small_replies() {
        let mut s = KvState::new(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1])));
        let unacked = |seq: u64| Command::ClientAt {
            op: ClientOp {
                client: 7,
                seq,
                first_unacked: 1,
                kind: OpKind::Append,
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"x"),
            },
            proposed_ms: 0,
        };
        for seq in 1..=SESSION_REPLIES_MAX as u64 {
            assert_eq!(
                s.apply_command(unacked(seq)),
                CommandReply::Op(OpReply::Done)
            );
        }
        let next = SESSION_REPLIES_MAX as u64 + 1;
        assert_eq!(
            s.apply_command(unacked(next)),
            CommandReply::Op(OpReply::TooManyPending)
        );
        // Acknowledging frees room.
        assert_eq!(
            s.apply_command(stamped(op(7, next, OpKind::Append, "k", "x"), 0)),
            CommandReply::Op(OpReply::Done)
        );
        // A large PutHash reply is answered once, then only as "applied".
        let big = "v".repeat(KEPT_REPLY_BYTES_MAX + 1);
        s.apply_command(stamped(op(8, 1, OpKind::Put, "big", &big), 0));
        let put_hash = stamped(op(8, 2, OpKind::PutHash, "big", "x"), 0);
        assert_eq!(
            s.apply_command(put_hash.clone()),
            CommandReply::Op(OpReply::Value(Some(Bytes::from(big.clone()))))
        );
        assert_eq!(
            s.apply_command(put_hash),
            CommandReply::Op(OpReply::AppliedReplyNotKept {
                bytes: big.len() as u64
            })
        );
    }

    #[test]
    fn the_first_incarnation_applied_wins() {
        let mut s = KvState::new(1);
        assert_eq!(
            s.apply_command(Command::Begin { incarnation: 5 }),
            CommandReply::Step(true)
        );
        assert_eq!(
            s.apply_command(Command::Begin { incarnation: 6 }),
            CommandReply::Step(false)
        );
        assert_eq!(s.incarnation, Some(5));
    }

    #[test]
    fn a_snapshot_from_before_sessions_expired_still_restores() {
        #[derive(Serialize)]
        struct OldSession {
            acked_below: u64,
            replies: BTreeMap<u64, OpReply>,
        }
        #[derive(Serialize)]
        struct OldData {
            kv: BTreeMap<Bytes, Bytes>,
            sessions: BTreeMap<u64, OldSession>,
        }
        #[derive(Serialize)]
        struct OldOwned {
            status: ShardStatus,
            data: OldData,
        }
        #[derive(Serialize)]
        struct Old {
            gid: Gid,
            config: Config,
            prev_config: Config,
            owned: BTreeMap<u64, OldOwned>,
            outgoing: BTreeMap<(u64, u64), OldData>,
            pending_deletes: BTreeSet<(u64, Source)>,
        }
        let data = || OldData {
            kv: BTreeMap::from([(Bytes::from("k"), Bytes::from("v"))]),
            sessions: BTreeMap::from([(
                7,
                OldSession {
                    acked_below: 2,
                    replies: BTreeMap::from([(2, OpReply::Done)]),
                },
            )]),
        };
        let old = Old {
            gid: 1,
            config: config(2, vec![1, 2]),
            prev_config: config(1, vec![1, 1]),
            owned: BTreeMap::from([(
                0,
                OldOwned {
                    status: ShardStatus::Serving,
                    data: data(),
                },
            )]),
            outgoing: BTreeMap::from([((2, 1), data())]),
            pending_deletes: BTreeSet::new(),
        };
        let mut s = KvState::new(1);
        s.restore(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(s.owned[&0].data.sessions[&7].replies[&2], OpReply::Done);
        assert_eq!(s.owned[&0].data.idle_order, BTreeSet::from([(0, 7)]));
        assert_eq!(s.outgoing[&(2, 1)].kv.len(), 1);
        let shard = decode_shard(&postcard::to_allocvec(&data()).unwrap()).unwrap();
        assert_eq!(shard.sessions[&7].acked_below, 2);
        // The current layout is marked, and reads back as it was.
        assert_eq!(decode_shard(&encode_versioned(&shard)).unwrap(), shard);
        let mut again = KvState::new(1);
        again.restore(&s.snapshot()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn undecodable_commands_change_nothing() {
        let mut shared = SharedKvState::new(KvState::new(1));
        let before = shared.lock().clone();
        let reply: CommandReply = postcard::from_bytes(&shared.apply(1, b"\xff\xfe")).unwrap();
        assert!(matches!(reply, CommandReply::Malformed(_)));
        assert_eq!(*shared.lock(), before);
    }
}
