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
//! 2. Every replica streams each pulling shard's frozen copy from the group
//!    that holds it into its own store; once a majority holds it, the
//!    leader proposes [`Command::InstallShardStreamed`], which carries only
//!    the copy's summary. The shard is served from then on, whatever the
//!    state of other shards. ([`Command::InstallShard`], with the data in
//!    the log, remains for shards that had no data anywhere, and for one
//!    that comes back from this group's own frozen copy.)
//! 3. It then tells the old holder, which proposes [`Command::DeleteShard`]
//!    in its own log and drops the copy; once that is acknowledged the new
//!    owner proposes [`Command::DeleteAcknowledged`]. Data thus lives on
//!    both groups only until the new owner has it durably.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::store::{
    CopyId, CopySummary, FinishedImport, Import, Space, Stager, Store, StoreError, StoreOptions,
    StoreView, StreamSummary, USER_KEY_BYTES_MAX,
};
use super::{key_to_shard, put_hash_value};
use crate::paxos::Slot;
use crate::replica::{
    ApplyError, FetchJob, RestoreJob, RestoreOutput, SharedMachine, StateMachine,
};
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
    /// A pulled shard for configuration `config_num`, streamed from its
    /// `source` by each replica into its own store beforehand: only this
    /// small step goes through the log. A replica applies it once it holds
    /// exactly the copy `summary` describes (fetching it then if need be).
    InstallShardStreamed {
        config_num: u64,
        shard: u64,
        source: Source,
        summary: CopySummary,
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

/// A shard's contents as they travel between groups, as one unit, so a
/// retry that reaches the new owner is still recognised. (At rest they
/// are in the [`Store`].)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardData {
    pub kv: BTreeMap<Bytes, Bytes>,
    pub sessions: BTreeMap<u64, Session>,
    /// `(last_write_ms, client)` of every session, oldest first.
    pub idle_order: BTreeSet<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardStatus {
    /// Present and served.
    Serving,
    /// Owned in the current configuration; waiting for its data.
    Pulling,
}

/// A shard owned in the current configuration, and where its keys are.
///
/// No key count: keeping one exact costs a read of the store before every
/// Put and Delete (at 1 GiB of data, about a third of the write
/// throughput). The status reports the store's estimate instead, and
/// whether the group's copies hold any key, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedShard {
    pub status: ShardStatus,
    pub copy: CopyId,
    /// Client sessions held, kept exactly as writes apply (every replica
    /// agrees): the session is read anyway, for its duplicate table.
    pub sessions: u64,
}

/// A frozen copy handed off to the shard's new owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenCopy {
    pub copy: CopyId,
}

/// The copies a group holds and a view of its store, for the key figure
/// its status reports.
pub struct KeyCensus {
    /// The copies held (see `KvState::held_copies`).
    copies: Vec<CopyId>,
    /// The store's estimate of its data records.
    approximate: u64,
    /// The committed store when the copies were listed.
    view: StoreView,
}

impl KeyCensus {
    /// 0 exactly when no copy holds a key (one seek a copy, past the
    /// deletions compaction has not yet dropped), otherwise the store's
    /// estimate, at least 1: it counts versions and deletions not yet
    /// merged, and copies still being dropped.
    pub fn reported(&self) -> Result<u64, StoreError> {
        for &copy in &self.copies {
            if self.view.copy_has_keys(copy)? {
                return Ok(self.approximate.max(1));
            }
        }
        Ok(0)
    }
}

/// [`OwnedShard`] as stores written before 2026-12-02 hold it, with a key
/// count that is dropped when read.
#[derive(Deserialize)]
struct OwnedShardCounted {
    status: ShardStatus,
    copy: CopyId,
    _keys: u64,
    sessions: u64,
}

/// [`Meta`] as those stores hold it (unmarked).
#[derive(Deserialize)]
struct MetaCounted {
    gid: Gid,
    config: Config,
    prev_config: Config,
    owned: BTreeMap<u64, OwnedShardCounted>,
    outgoing: BTreeMap<(u64, u64), (CopyId, u64)>,
    pending_deletes: BTreeSet<(u64, Source)>,
    incarnation: Option<u64>,
    clock_ms: u64,
}

impl From<MetaCounted> for Meta {
    fn from(old: MetaCounted) -> Self {
        let owned = (old.owned.into_iter())
            .map(|(shard, o)| {
                let owned = OwnedShard {
                    status: o.status,
                    copy: o.copy,
                    sessions: o.sessions,
                };
                (shard, owned)
            })
            .collect();
        let outgoing = (old.outgoing.into_iter())
            .map(|(at, (copy, _keys))| (at, FrozenCopy { copy }))
            .collect();
        Meta {
            gid: old.gid,
            config: old.config,
            prev_config: old.prev_config,
            owned,
            outgoing,
            pending_deletes: old.pending_deletes,
            incarnation: old.incarnation,
            clock_ms: old.clock_ms,
        }
    }
}

/// Starts the group's small state in the store since it has no key
/// counts; unmarked, it is a [`MetaCounted`] (see [`LAYOUT_V2`] for why ten
/// bytes of 0xff tell the two apart for certain).
const META_V2: [u8; 11] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 4,
];

fn encode_meta(meta: &Meta) -> Bytes {
    // Our own types always encode; see `encode`.
    match postcard::to_extend(meta, META_V2.to_vec()) {
        Ok(bytes) => Bytes::from(bytes),
        Err(_) => Bytes::new(),
    }
}

fn decode_meta(bytes: &[u8]) -> Result<Meta, postcard::Error> {
    match bytes.strip_prefix(&META_V2[..]) {
        Some(current) => postcard::from_bytes(current),
        None => postcard::from_bytes::<MetaCounted>(bytes).map(Into::into),
    }
}

/// The group's small state: what [`KvState`] keeps in memory and the
/// store keeps under `meta`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    gid: Gid,
    config: Config,
    prev_config: Config,
    owned: BTreeMap<u64, OwnedShard>,
    outgoing: BTreeMap<(u64, u64), FrozenCopy>,
    pending_deletes: BTreeSet<(u64, Source)>,
    incarnation: Option<u64>,
    clock_ms: u64,
}

/// Where a replica fetches state it must have and does not: its own
/// group's state from a peer, and shard copies from other groups.
pub trait PeerSource: Send + Sync {
    /// Streams a peer's state, applied through `min_applied` or later, into
    /// `import`, and returns what its sender vouched for. For a replica
    /// that is behind the log or lost its disk.
    fn fetch(&self, min_applied: Slot, import: &mut Import) -> Result<StreamSummary, String>;
    /// Fetches the copy of `shard` that `source` holds into `copy`, and
    /// marks it complete; it must be exactly `expected`.
    fn fetch_copy(
        &self,
        stager: &Stager,
        copy: CopyId,
        source: &Source,
        shard: u64,
        expected: CopySummary,
    ) -> Result<(), String>;
}

/// The copies of shards being pulled that a fetch may write into, and
/// which of them a fetch is writing now. A fetch (the service's, in the
/// background, or the replica thread's at the install) claims a copy first;
/// the install closes it. The lock is held only to look and mark, never
/// across I/O, and a claim never waits on the state's lock, so the replica
/// thread may wait for one while holding it.
#[derive(Default)]
pub struct FetchBoard {
    /// Open copies, with the claim of the fetch writing one now, if any.
    copies: std::sync::Mutex<Board>,
    released: std::sync::Condvar,
}

#[derive(Default)]
struct Board {
    copies: BTreeMap<CopyId, Option<ClaimId>>,
    /// The last claim handed out: a claim ends only its own entry, so one
    /// that outlived a reset (a fetch into the store a snapshot replaced)
    /// cannot end a newer fetch's claim and let a third overlap it.
    last_claim: ClaimId,
}

type ClaimId = u64;

impl FetchBoard {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims an open copy no fetch holds.
    fn try_claim(&self, copy: CopyId) -> Option<ClaimId> {
        let mut board = self.board();
        board.last_claim += 1;
        let id = board.last_claim;
        match board.copies.get_mut(&copy) {
            Some(claim @ None) => {
                *claim = Some(id);
                Some(id)
            }
            _ => None,
        }
    }

    /// Waits for a fetch of `copy` under way to end, then claims it; `None`
    /// if it is not open.
    fn claim_waiting(&self, copy: CopyId) -> Option<ClaimId> {
        let mut board = self.board();
        loop {
            board.last_claim += 1;
            let id = board.last_claim;
            match board.copies.get_mut(&copy) {
                None => return None,
                Some(claim @ None) => {
                    *claim = Some(id);
                    return Some(id);
                }
                Some(Some(_)) => {
                    board = self.released.wait(board).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Ends claim `id` of `copy`, if it is still the copy's claim.
    fn release(&self, copy: CopyId, id: ClaimId) {
        if let Some(claim) = self.board().copies.get_mut(&copy) {
            if *claim == Some(id) {
                *claim = None;
            }
        }
        self.released.notify_all();
    }

    /// Waits for a fetch of `copy` under way to end, then claims it; the
    /// claim ends when the guard is dropped. `None` if it is not open.
    pub fn claim_waiting_guard(self: &Arc<Self>, copy: CopyId) -> Option<ReleaseOnDrop> {
        let id = self.claim_waiting(copy)?;
        Some(ReleaseOnDrop {
            board: self.clone(),
            copy,
            id,
        })
    }

    /// Claims an open copy no fetch holds and that no fetch has completed
    /// yet: what a background fetch may start on. The claim ends when the
    /// guard is dropped, even if the fetch panics.
    pub fn claim_unfetched(
        self: &Arc<Self>,
        copy: CopyId,
        stager: &Stager,
    ) -> Option<ReleaseOnDrop> {
        let id = self.try_claim(copy)?;
        let claim = ReleaseOnDrop {
            board: self.clone(),
            copy,
            id,
        };
        // Checked under the claim: a fetch (the install's) may have
        // completed it since the caller looked, and fetching it again would
        // clear it first.
        match stager.staged(copy) {
            Ok(None) => Some(claim),
            _ => None,
        }
    }

    fn open(&self, copy: CopyId) {
        self.board().copies.entry(copy).or_insert(None);
    }

    /// The copy is installed: no fetch may write into it again.
    fn close(&self, copy: CopyId) {
        self.board().copies.remove(&copy);
        self.released.notify_all();
    }

    /// Exactly `open` are open (after the state is loaded anew). A claim
    /// under way on a copy still open stays: its fetch writes into the
    /// store that was replaced, and a new fetch of the copy waits for it.
    fn reset(&self, open: impl Iterator<Item = CopyId>) {
        let mut board = self.board();
        let copies = open
            .map(|c| (c, board.copies.get(&c).copied().flatten()))
            .collect();
        board.copies = copies;
        self.released.notify_all();
    }
}

/// A claim on a copy of the [`FetchBoard`], ended when dropped.
pub struct ReleaseOnDrop {
    board: Arc<FetchBoard>,
    copy: CopyId,
    id: ClaimId,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.board.release(self.copy, self.id);
    }
}

/// The group's replicated state.
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
    pub outgoing: BTreeMap<(u64, u64), FrozenCopy>,
    /// Installed shards whose previous holder must still drop its copy.
    /// A shard can have several: it may move away and back before an old
    /// holder answers.
    pub pending_deletes: BTreeSet<(u64, Source)>,
    /// This life of the group's data (see [`Command::Begin`]); `None`
    /// until the first leader takes one.
    pub incarnation: Option<u64>,
    /// The group's logged time: the latest [`Command::Clock`].
    pub clock_ms: u64,
    /// Snapshots this replica has installed from a peer since it started
    /// (not replicated): each one a copy of the whole group's data.
    pub snapshots_installed: u64,
    /// The data, sessions and expiry order, on disk.
    store: Store,
    /// The last slot applied (committed to the store at the end of a turn).
    applied: Slot,
    /// The small state changed this turn: the commit writes it.
    meta_dirty: bool,
    /// Copies dropped this turn, handed to the store once committed.
    dropped: Vec<CopyId>,
    /// Where a snapshot comes from when this replica must install one.
    source: Option<Arc<dyn PeerSource>>,
    /// Held while a shard copy is being fetched into the store, by the
    /// service in the background or by the replica thread at the install:
    /// one fetch of a copy at a time.
    fetches: Arc<FetchBoard>,
    /// Slots up to here are in the store already (as of the last load or
    /// commit): the log replays them after a restart or a snapshot
    /// install, and they are skipped. Every command of a slot above it is
    /// applied, however many the slot's batch holds.
    skip_through: Slot,
    /// The small state as last committed: what other groups are handed
    /// (a copy the current turn made outgoing is not in the store yet).
    committed: Option<Meta>,
    /// A command could not be applied from the log: the state of a peer
    /// that applied it through this slot must be taken instead.
    needs_snapshot: Option<Slot>,
    /// The install (slot, copy) whose copy a fetch outside the lock was
    /// last asked for: it is asked for once.
    fetch_tried: Option<(Slot, CopyId)>,
    /// The slot a restore under way must reach.
    restoring: Option<Slot>,
    /// A store failure met while applying: the turn's commit reports it,
    /// and the replica stops rather than go on from a state it cannot
    /// write.
    failed: Option<StoreError>,
}

/// The state as encoded before it lived on disk: whole, in a snapshot.
#[derive(Deserialize)]
struct KvStateV2 {
    gid: Gid,
    config: Config,
    prev_config: Config,
    owned: BTreeMap<u64, OwnedShardV2>,
    outgoing: BTreeMap<(u64, u64), ShardData>,
    pending_deletes: BTreeSet<(u64, Source)>,
    incarnation: Option<u64>,
    clock_ms: u64,
}

#[derive(Deserialize)]
struct OwnedShardV2 {
    status: ShardStatus,
    data: ShardData,
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

impl From<KvStateV1> for KvStateV2 {
    fn from(old: KvStateV1) -> Self {
        KvStateV2 {
            gid: old.gid,
            config: old.config,
            prev_config: old.prev_config,
            owned: (old.owned.into_iter())
                .map(|(shard, o)| {
                    let owned = OwnedShardV2 {
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

/// Starts a snapshot that only points at the store: the log keeps this
/// small descriptor, and the state itself streams from a peer's store.
const LAYOUT_STORE: [u8; 11] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 3,
];

/// What the log keeps as the snapshot of a store-backed group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoreDescriptor {
    gid: Gid,
    /// The slot the store was persisted through.
    applied: Slot,
}

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

fn session_key(copy: CopyId, client: u64) -> Vec<u8> {
    copy.key(&client.to_be_bytes())
}

fn idle_key(copy: CopyId, last_write_ms: u64, client: u64) -> Vec<u8> {
    let mut suffix = [0u8; 16];
    suffix[..8].copy_from_slice(&last_write_ms.to_be_bytes());
    suffix[8..].copy_from_slice(&client.to_be_bytes());
    copy.key(&suffix)
}

fn parse_idle_key(key: &[u8]) -> Option<(u64, u64)> {
    let suffix = key.get(12..28)?;
    let at = u64::from_be_bytes(suffix[..8].try_into().ok()?);
    let client = u64::from_be_bytes(suffix[8..].try_into().ok()?);
    Some((at, client))
}

/// Sessions looked at per store scan while ending or lifting sessions.
const SESSION_SCAN_BATCH: usize = 1024;

/// Reads one copy out of a view into its travelling form.
pub fn export_copy(view: &StoreView, copy: CopyId) -> Result<ShardData, StoreError> {
    let mut data = ShardData::default();
    for item in view.copy_records(Space::Data, copy) {
        let (key, value) = item?;
        data.kv.insert(key, value);
    }
    for item in view.copy_records(Space::Sessions, copy) {
        let (key, value) = item?;
        let client = u64::from_be_bytes(
            key.as_ref()
                .try_into()
                .map_err(|_| corrupt(view, "session key"))?,
        );
        let session: Session =
            postcard::from_bytes(&value).map_err(|_| corrupt(view, "session"))?;
        data.idle_order.insert((session.last_write_ms, client));
        data.sessions.insert(client, session);
    }
    Ok(data)
}

fn corrupt(view: &StoreView, what: &str) -> StoreError {
    StoreError::Corrupt {
        path: view.path().to_path_buf(),
        message: format!("undecodable {what}"),
    }
}

impl KvState {
    /// Opens the state of group `gid` kept at `path` (empty if new).
    /// `source` fetches a snapshot from a peer when one must be installed.
    pub fn open(
        gid: Gid,
        path: &Path,
        source: Option<Arc<dyn PeerSource>>,
        store: StoreOptions,
    ) -> Result<Self, StoreError> {
        Self::from_store(gid, Store::open(path, store)?, source)
    }

    /// A state whose store is removed when it is dropped, for tests.
    pub fn temporary(gid: Gid, path: &Path) -> Result<Self, StoreError> {
        Self::from_store(gid, Store::temporary(path)?, None)
    }

    fn from_store(
        gid: Gid,
        store: Store,
        source: Option<Arc<dyn PeerSource>>,
    ) -> Result<Self, StoreError> {
        let mut state = KvState {
            gid,
            config: empty_config(),
            prev_config: empty_config(),
            owned: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            pending_deletes: BTreeSet::new(),
            incarnation: None,
            clock_ms: 0,
            snapshots_installed: 0,
            store,
            applied: 0,
            meta_dirty: false,
            dropped: Vec::new(),
            source,
            fetches: Arc::new(FetchBoard::default()),
            skip_through: 0,
            committed: None,
            needs_snapshot: None,
            fetch_tried: None,
            restoring: None,
            failed: None,
        };
        state.load()?;
        Ok(state)
    }

    /// Reads the small state and the applied slot back from the store.
    fn load(&mut self) -> Result<(), StoreError> {
        let (applied, meta) = self.store.load_meta()?;
        self.applied = applied;
        self.skip_through = applied;
        self.config = empty_config();
        self.prev_config = empty_config();
        self.owned.clear();
        self.outgoing.clear();
        self.pending_deletes.clear();
        self.incarnation = None;
        self.clock_ms = 0;
        self.committed = None;
        self.fetches.reset(std::iter::empty());
        let Some(bytes) = meta else {
            return Ok(());
        };
        let meta = decode_meta(&bytes).map_err(|e| StoreError::Corrupt {
            path: self.store.path().to_path_buf(),
            message: format!("group state: {e}"),
        })?;
        if meta.gid != self.gid {
            return Err(StoreError::Corrupt {
                path: self.store.path().to_path_buf(),
                message: format!("holds group {}, this is group {}", meta.gid, self.gid),
            });
        }
        self.config = meta.config;
        self.prev_config = meta.prev_config;
        self.owned = meta.owned;
        self.outgoing = meta.outgoing;
        self.pending_deletes = meta.pending_deletes;
        self.incarnation = meta.incarnation;
        self.clock_ms = meta.clock_ms;
        self.fetches.reset(self.pulling_copies());
        self.committed = Some(self.meta());
        Ok(())
    }

    fn pulling_copies(&self) -> impl Iterator<Item = CopyId> + '_ {
        (self.owned.values())
            .filter(|o| o.status == ShardStatus::Pulling)
            .map(|o| o.copy)
    }

    fn meta(&self) -> Meta {
        Meta {
            gid: self.gid,
            config: self.config.clone(),
            prev_config: self.prev_config.clone(),
            owned: self.owned.clone(),
            outgoing: self.outgoing.clone(),
            pending_deletes: self.pending_deletes.clone(),
            incarnation: self.incarnation,
            clock_ms: self.clock_ms,
        }
    }

    /// The last slot applied here.
    pub fn applied(&self) -> Slot {
        self.applied
    }

    /// A point-in-time view of the committed state (for snapshot streams).
    pub fn view(&self) -> StoreView {
        self.store.view()
    }

    /// A view holding the outgoing copy at (`config_num`, `shard`), if
    /// held as of the last commit: a copy the turn being applied froze
    /// may still miss that turn's writes in the store.
    pub fn outgoing_view(&self, config_num: u64, shard: u64) -> Option<(StoreView, CopyId)> {
        let frozen = self
            .committed
            .as_ref()?
            .outgoing
            .get(&(config_num, shard))?;
        Some((self.store.view(), frozen.copy))
    }

    /// The configuration as of the last commit.
    pub fn committed_config_num(&self) -> u64 {
        self.committed.as_ref().map_or(0, |m| m.config.num)
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

    /// Applies one command. A store failure is kept for the turn's commit
    /// (which stops the replica), and the command's reply is then moot.
    pub fn apply_command(&mut self, command: Command) -> CommandReply {
        match self.try_apply(command) {
            Ok(reply) => reply,
            Err(e) => {
                let message = e.to_string();
                self.failed.get_or_insert(e);
                CommandReply::Malformed(message)
            }
        }
    }

    fn try_apply(&mut self, command: Command) -> Result<CommandReply, StoreError> {
        Ok(match command {
            // Logged before writes were stamped: applied by the rules of
            // then (no age, no bounds), so a replica replaying it agrees
            // with one that restored a snapshot taken after it.
            Command::Client(op) | Command::ClientAt { op, .. }
                if op.key.is_empty() || op.key.len() > USER_KEY_BYTES_MAX =>
            {
                // The store cannot take it (the server refuses such keys
                // first; a command logged anyway is refused alike everywhere).
                CommandReply::Malformed(format!("a key of {} bytes", op.key.len()))
            }
            Command::Client(op) => CommandReply::Op(self.apply_client(op, None)?),
            Command::ClientAt { op, proposed_ms } => {
                CommandReply::Op(self.apply_client(op, Some(proposed_ms))?)
            }
            Command::Begin { incarnation } => {
                if self.incarnation.is_some() {
                    return Ok(CommandReply::Step(false));
                }
                self.incarnation = Some(incarnation);
                self.meta_dirty = true;
                CommandReply::Step(true)
            }
            Command::Clock { now_ms } => CommandReply::Step(self.apply_clock(now_ms)?),
            Command::Reconfigure(next) => CommandReply::Step(self.apply_reconfigure(next)),
            Command::InstallShard {
                config_num,
                shard,
                data,
                source,
            } => CommandReply::Step(self.apply_install(config_num, shard, data, source)),
            Command::InstallShardStreamed {
                config_num,
                shard,
                source,
                summary,
            } => {
                CommandReply::Step(self.apply_streamed_install(config_num, shard, source, summary)?)
            }
            Command::DeleteShard { config_num, shard } => {
                if self.config.num < config_num {
                    return Ok(CommandReply::NotYet);
                }
                match self.outgoing.remove(&(config_num, shard)) {
                    Some(frozen) => {
                        self.dropped.push(frozen.copy);
                        self.meta_dirty = true;
                        CommandReply::Step(true)
                    }
                    None => CommandReply::Step(false),
                }
            }
            Command::DeleteAcknowledged { shard, source } => {
                let removed = self.pending_deletes.remove(&(shard, source));
                self.meta_dirty |= removed;
                CommandReply::Step(removed)
            }
        })
    }

    fn apply_clock(&mut self, now_ms: u64) -> Result<bool, StoreError> {
        if now_ms <= self.clock_ms {
            return Ok(false);
        }
        let next_ms = if self.clock_ms == 0 {
            now_ms
        } else {
            now_ms.min(self.clock_ms + CLOCK_STEP_MS_MAX)
        };
        let previous_ms = std::mem::replace(&mut self.clock_ms, next_ms);
        self.meta_dirty = true;
        let copies: Vec<(ShardStatus, CopyId)> =
            self.owned.values().map(|o| (o.status, o.copy)).collect();
        for (status, copy) in copies {
            // Written since the last clock: just now, however far this
            // clock jumps (a group's first, or one after a leader whose
            // clock was behind). Their idle time starts here, or they
            // would end at once.
            self.lift_recent_sessions(copy, previous_ms, next_ms)?;
            // Frozen outgoing copies are left as they are: their sessions
            // expire at the new owner, by its clock.
            if status == ShardStatus::Serving {
                let ended = self.expire_sessions(copy, next_ms)? as u64;
                if let Some(o) = self.owned.get_mut(&u64::from(copy.shard)) {
                    debug_assert!(o.sessions >= ended);
                    o.sessions = o.sessions.saturating_sub(ended);
                }
            }
        }
        Ok(true)
    }

    /// Moves every session of `copy` last written at `from_ms` (the
    /// previous clock) or later up to just below `to_ms`: only those
    /// written since the previous clock, so the cost is that of the writes
    /// in one interval. Just below, so the next clock does not take them
    /// for recent again.
    fn lift_recent_sessions(
        &mut self,
        copy: CopyId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<(), StoreError> {
        debug_assert!(to_ms > from_ms);
        let lifted = to_ms - 1;
        let end = idle_key(copy, lifted, 0);
        let mut start = idle_key(copy, from_ms, 0);
        loop {
            let found = self
                .store
                .scan(Space::Idle, &start, &end, SESSION_SCAN_BATCH)?;
            for (key, _) in &found {
                if let Some((at, client)) = parse_idle_key(key) {
                    self.set_last_write(copy, client, at, lifted)?;
                }
            }
            match found.last() {
                Some((key, _)) if found.len() == SESSION_SCAN_BATCH => {
                    start = key.clone();
                    start.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    /// Moves a session's place in the expiry order.
    fn set_last_write(
        &mut self,
        copy: CopyId,
        client: u64,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<(), StoreError> {
        if from_ms == to_ms {
            return Ok(());
        }
        let Some(mut session) = self.session(copy, client)? else {
            return Ok(());
        };
        session.last_write_ms = to_ms;
        self.store
            .delete(Space::Idle, idle_key(copy, from_ms, client));
        self.store
            .put(Space::Idle, idle_key(copy, to_ms, client), Bytes::new());
        self.put_session(copy, client, &session);
        Ok(())
    }

    /// Ends the sessions whose last write here is older than
    /// [`SESSION_IDLE_MS_MAX`] at `now_ms`.
    fn expire_sessions(&mut self, copy: CopyId, now_ms: u64) -> Result<usize, StoreError> {
        let Some(cutoff) = now_ms.checked_sub(SESSION_IDLE_MS_MAX) else {
            return Ok(0);
        };
        let mut start = idle_key(copy, 0, 0);
        // Last write strictly before `cutoff` ends the session.
        let end = idle_key(copy, cutoff, 0);
        let mut ended = 0;
        loop {
            let found = self
                .store
                .scan(Space::Idle, &start, &end, SESSION_SCAN_BATCH)?;
            for (key, _) in &found {
                let Some((_, client)) = parse_idle_key(key) else {
                    return Err(StoreError::Corrupt {
                        path: self.store.path().to_path_buf(),
                        message: format!("an expiry entry of {} bytes", key.len()),
                    });
                };
                self.store.delete(Space::Idle, key.clone());
                self.store
                    .delete(Space::Sessions, session_key(copy, client));
                ended += 1;
            }
            match found.last() {
                // Past the ones just ended: the scan never re-reads them.
                Some((key, _)) if found.len() == SESSION_SCAN_BATCH => {
                    start = key.clone();
                    start.push(0);
                }
                _ => return Ok(ended),
            }
        }
    }

    fn session(&self, copy: CopyId, client: u64) -> Result<Option<Session>, StoreError> {
        let Some(bytes) = self
            .store
            .get(Space::Sessions, &session_key(copy, client))?
        else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.store.path().to_path_buf(),
                message: format!("session of client {client}: {e}"),
            })
    }

    fn put_session(&mut self, copy: CopyId, client: u64, session: &Session) {
        self.store
            .put(Space::Sessions, session_key(copy, client), encode(session));
    }

    /// A Get at this point of the log: the value if the key's shard is
    /// owned and present here, else `WrongGroup`. Served without the log
    /// after a read barrier, and the same answer a logged Get gets.
    pub fn get(&self, key: &[u8]) -> Result<OpReply, StoreError> {
        if !self.serves(key) {
            return Ok(OpReply::WrongGroup);
        }
        let Some(owned) = self.owned.get(&self.shard_of(key)) else {
            return Ok(OpReply::WrongGroup);
        };
        Ok(OpReply::Value(
            self.store.get(Space::Data, &owned.copy.key(key))?,
        ))
    }

    /// `proposed_ms`: the logged time its kvserver proposed it at; `None`
    /// for a write logged before writes were stamped (old rules: no age,
    /// no bounds).
    fn apply_client(
        &mut self,
        op: ClientOp,
        proposed_ms: Option<u64>,
    ) -> Result<OpReply, StoreError> {
        if op.kind == OpKind::Get {
            return self.get(&op.key);
        }
        let shard = self.shard_of(&op.key);
        let Some(owned) = self.owned.get(&shard).copied() else {
            return Ok(OpReply::WrongGroup);
        };
        if owned.status != ShardStatus::Serving || self.config.shards.is_empty() {
            return Ok(OpReply::WrongGroup);
        }
        let copy = owned.copy;
        let now_ms = self.clock_ms;
        let existing = self.session(copy, op.client)?;
        // An answer already given comes first: every copy of a write gets
        // the same one, applied or refused.
        if let Some(session) = &existing {
            if op.seq < session.acked_below {
                return Ok(OpReply::Stale);
            }
            if let Some(reply) = session.replies.get(&op.seq) {
                return Ok(reply.clone());
            }
        }
        let bounded = proposed_ms.is_some();
        let new_session = existing.is_none();
        let mut session = existing.unwrap_or_default();
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
            debug_assert!(!new_session);
            self.put_session(copy, op.client, &session);
            return Ok(OpReply::TooManyPending);
        }
        // Never lowered: a write stamped by a clock that is behind must not
        // shorten a session.
        let last_write_ms = session.last_write_ms.max(now_ms);
        if !new_session {
            self.store.delete(
                Space::Idle,
                idle_key(copy, session.last_write_ms, op.client),
            );
        }
        session.last_write_ms = last_write_ms;
        self.store.put(
            Space::Idle,
            idle_key(copy, last_write_ms, op.client),
            Bytes::new(),
        );
        if proposed_ms.is_some_and(|p| now_ms > p.saturating_add(WRITE_AGE_MS_MAX)) {
            // Kept as its answer, so a copy still in flight is refused too.
            session.replies.insert(op.seq, OpReply::TooOld);
            self.put_session(copy, op.client, &session);
            if new_session {
                if let Some(o) = self.owned.get_mut(&shard) {
                    o.sessions += 1;
                }
                self.meta_dirty = true;
            }
            return Ok(OpReply::TooOld);
        }
        let data_key = copy.key(&op.key);
        let reply = match op.kind {
            OpKind::Get => unreachable!("handled above"),
            // Blind: no read of the store (see `OwnedShard`).
            OpKind::Put => {
                self.store.put(Space::Data, data_key, op.value);
                OpReply::Done
            }
            OpKind::Append => match self.store.get(Space::Data, &data_key)? {
                Some(old) if old.len() + op.value.len() > STORED_VALUE_BYTES_MAX => {
                    OpReply::ValueTooLarge
                }
                Some(old) => {
                    let mut joined = Vec::with_capacity(old.len() + op.value.len());
                    joined.extend_from_slice(&old);
                    joined.extend_from_slice(&op.value);
                    self.store.put(Space::Data, data_key, Bytes::from(joined));
                    OpReply::Done
                }
                None => {
                    self.store.put(Space::Data, data_key, op.value);
                    OpReply::Done
                }
            },
            OpKind::PutHash => {
                let previous = self.store.get(Space::Data, &data_key)?;
                let previous = previous.unwrap_or_default();
                self.store
                    .put(Space::Data, data_key, put_hash_value(&previous, &op.value));
                OpReply::Value(Some(previous))
            }
            OpKind::Delete => {
                self.store.delete(Space::Data, data_key);
                OpReply::Done
            }
        };
        if new_session {
            if let Some(o) = self.owned.get_mut(&shard) {
                o.sessions += 1;
            }
            self.meta_dirty = true;
        }
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
        self.put_session(copy, op.client, &session);
        Ok(reply)
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
                    let frozen = FrozenCopy { copy: s.copy };
                    self.outgoing.insert((next.num, shard), frozen);
                }
            } else if is_mine && !was_mine {
                // In configuration 1 every shard is new: nothing to pull.
                let status = if self.config.num == 0 {
                    ShardStatus::Serving
                } else {
                    ShardStatus::Pulling
                };
                // A shard is gained at most once per configuration, so
                // this copy's keys are its own.
                let copy = CopyId {
                    shard: shard as u32,
                    generation: next.num,
                };
                let owned = OwnedShard {
                    status,
                    copy,
                    sessions: 0,
                };
                if status == ShardStatus::Pulling {
                    self.fetches.open(copy);
                }
                self.owned.insert(shard, owned);
            }
        }
        self.prev_config = std::mem::replace(&mut self.config, next);
        self.meta_dirty = true;
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
        let floor_ms = self.clock_ms;
        let Some(owned) = self.owned.get_mut(&shard) else {
            return false;
        };
        if owned.status != ShardStatus::Pulling {
            return false;
        }
        let copy = owned.copy;
        // No fetch may be writing into it (none is for a shard installed
        // this way, but make sure), and none may from now on.
        let _ = self.fetches.claim_waiting(copy);
        self.fetches.close(copy);
        let Some(owned) = self.owned.get_mut(&shard) else {
            return false;
        };
        owned.status = ShardStatus::Serving;
        owned.sessions = data.sessions.len() as u64;
        let copy = owned.copy;
        if let Some(source) = source {
            self.pending_deletes.insert((shard, source));
        }
        self.meta_dirty = true;
        self.write_copy(copy, data, floor_ms);
        true
    }

    /// The copy a shard being pulled in the current configuration goes to,
    /// and whether it is already fetched, for the service's background
    /// fetch. `None` if the shard is not being pulled.
    pub fn pulling_copy(&self, shard: u64) -> Result<Option<(CopyId, bool)>, StoreError> {
        match self.owned.get(&shard) {
            Some(o) if o.status == ShardStatus::Pulling => {
                Ok(Some((o.copy, self.store.staged(o.copy)?.is_some())))
            }
            _ => Ok(None),
        }
    }

    /// The summary of the fetched copy of a shard being pulled.
    pub fn staged_summary(&self, shard: u64) -> Result<Option<CopySummary>, StoreError> {
        match self.owned.get(&shard) {
            Some(o) if o.status == ShardStatus::Pulling => self.store.staged(o.copy),
            _ => Ok(None),
        }
    }

    /// What fetches a copy into the store, and the board every fetch
    /// claims its copy on.
    pub fn stager(&self) -> (Stager, Arc<FetchBoard>) {
        (self.store.stager(), self.fetches.clone())
    }

    /// Before applying `command` at `slot`: if it installs a shard copy
    /// this replica has not fetched, the fetch, to run without the state's
    /// lock (a fetch takes as long as the shard is large, and under the
    /// lock it would stall every reader, and in a process that runs several
    /// groups, the runtime that serves the copy's holder). Once per
    /// command: on the second apply a copy still missing is taken from a
    /// peer's state instead.
    fn fetch_before_install(&mut self, slot: Slot, command: &Command) -> Option<FetchJob> {
        let Command::InstallShardStreamed {
            config_num,
            shard,
            source,
            summary,
        } = command
        else {
            return None;
        };
        let owned = self.owned.get(shard)?;
        if *config_num != self.config.num || owned.status != ShardStatus::Pulling {
            return None;
        }
        let copy = owned.copy;
        // A store error here is met again, and reported, by the apply.
        if self.store.staged(copy).ok()? == Some(*summary) {
            return None;
        }
        if self.fetch_tried == Some((slot, copy)) {
            return None;
        }
        let peers = self.source.clone()?;
        self.fetch_tried = Some((slot, copy));
        let (stager, board) = self.stager();
        let (gid, source, shard, summary) = (self.gid, source.clone(), *shard, *summary);
        Some(Box::new(move || {
            // A background fetch under way finishes first.
            let Some(claim) = board.claim_waiting_guard(copy) else {
                return;
            };
            let fetched = match stager.staged(copy) {
                Ok(Some(staged)) if staged == summary => Ok(()),
                _ => peers.fetch_copy(&stager, copy, &source, shard, summary),
            };
            drop(claim);
            if let Err(e) = fetched {
                tracing::warn!(gid, shard, error = %e, "cannot fetch the shard being installed");
            }
        }))
    }

    fn apply_streamed_install(
        &mut self,
        config_num: u64,
        shard: u64,
        source: Source,
        summary: CopySummary,
    ) -> Result<bool, StoreError> {
        if config_num != self.config.num {
            return Ok(false);
        }
        let Some(owned) = self.owned.get(&shard).copied() else {
            return Ok(false);
        };
        if owned.status != ShardStatus::Pulling {
            return Ok(false);
        }
        let copy = owned.copy;
        // A background fetch under way finishes first; from here on no
        // fetch writes into this copy.
        let board = self.fetches.clone();
        let claimed = board.claim_waiting(copy);
        debug_assert!(claimed.is_some(), "a copy being pulled is open");
        board.close(copy);
        if self.store.staged(copy)? != Some(summary) {
            // The fetch before this apply (`fetch_before_install`) failed:
            // the holder may have dropped the copy since the group took it,
            // and the group's other replicas hold it now. The driver
            // fetches their state (outside the lock).
            tracing::warn!(
                gid = self.gid,
                shard,
                "the shard being installed could not be fetched; taking a snapshot from a peer"
            );
            self.needs_snapshot = Some(self.applied);
            return Ok(true);
        }
        debug_assert_eq!(self.store.staged(copy)?, Some(summary));
        // Sessions are kept for their full idle time by this group's clock.
        let floor_ms = self.clock_ms;
        for (key, value) in self.store.scan_copy(Space::Sessions, copy)? {
            let client = key[12..].try_into().map(u64::from_be_bytes).unwrap_or(0);
            let mut session: Session =
                postcard::from_bytes(&value).map_err(|e| StoreError::Corrupt {
                    path: self.store.path().to_path_buf(),
                    message: format!("fetched session of client {client}: {e}"),
                })?;
            session.last_write_ms = session.last_write_ms.max(floor_ms);
            self.store.put(
                Space::Idle,
                idle_key(copy, session.last_write_ms, client),
                Bytes::new(),
            );
            self.put_session(copy, client, &session);
        }
        self.store.unmark_staged(copy);
        if let Some(o) = self.owned.get_mut(&shard) {
            o.status = ShardStatus::Serving;
            o.sessions = summary.sessions;
        }
        self.pending_deletes.insert((shard, source));
        self.meta_dirty = true;
        Ok(true)
    }

    /// Writes a shard's travelling form under `copy`. Every session's last
    /// write is raised to at least `floor_ms`: a shard arriving from a
    /// group whose clock is behind keeps its sessions for their full idle
    /// time by this group's clock.
    fn write_copy(&mut self, copy: CopyId, data: ShardData, floor_ms: u64) {
        for (key, value) in data.kv {
            if key.is_empty() || key.len() > USER_KEY_BYTES_MAX {
                tracing::error!(
                    gid = self.gid,
                    bytes = key.len(),
                    "a key too large for the store is left out of an installed shard"
                );
                continue;
            }
            self.store.put(Space::Data, copy.key(&key), value);
        }
        for (client, mut session) in data.sessions {
            session.last_write_ms = session.last_write_ms.max(floor_ms);
            self.store.put(
                Space::Idle,
                idle_key(copy, session.last_write_ms, client),
                Bytes::new(),
            );
            self.put_session(copy, client, &session);
        }
    }

    /// An owned shard's contents, as they would travel (tests, tools).
    pub fn shard_data(&self, shard: u64) -> Result<ShardData, StoreError> {
        let Some(owned) = self.owned.get(&shard) else {
            return Ok(ShardData::default());
        };
        self.copy_data(owned.copy)
    }

    /// An outgoing copy's contents, if held.
    pub fn outgoing_data(
        &self,
        config_num: u64,
        shard: u64,
    ) -> Result<Option<ShardData>, StoreError> {
        match self.outgoing.get(&(config_num, shard)) {
            Some(frozen) => self.copy_data(frozen.copy).map(Some),
            None => Ok(None),
        }
    }

    /// A copy as of the last write, the uncommitted ones included.
    fn copy_data(&self, copy: CopyId) -> Result<ShardData, StoreError> {
        let mut data = ShardData::default();
        for (key, value) in self.store.scan_copy(Space::Data, copy)? {
            data.kv.insert(Bytes::copy_from_slice(&key[12..]), value);
        }
        for (key, value) in self.store.scan_copy(Space::Sessions, copy)? {
            let client = key[12..].try_into().map(u64::from_be_bytes).unwrap_or(0);
            let session: Session =
                postcard::from_bytes(&value).map_err(|e| StoreError::Corrupt {
                    path: self.store.path().to_path_buf(),
                    message: format!("session of client {client}: {e}"),
                })?;
            data.idle_order.insert((session.last_write_ms, client));
            data.sessions.insert(client, session);
        }
        Ok(data)
    }

    /// Client sessions held in owned shards.
    pub fn session_count(&self) -> u64 {
        self.owned.values().map(|s| s.sessions).sum()
    }

    /// The copies held: owned (serving or being pulled) and outgoing.
    fn held_copies(&self) -> impl Iterator<Item = CopyId> + '_ {
        let owned = self.owned.values().map(|o| o.copy);
        owned.chain(self.outgoing.values().map(|c| c.copy))
    }

    /// What the status's key figure needs, as committed: taken under the
    /// state's lock, counted after it is released (see
    /// [`KeyCensus::reported`]).
    pub fn key_census(&self) -> KeyCensus {
        KeyCensus {
            copies: self.held_copies().collect(),
            approximate: self.store.approximate_data_records(),
            view: self.store.view(),
        }
    }

    /// The exact number of keys held, owned and outgoing: a scan of every
    /// copy, O(keys). For tests and checks, never on a request path.
    pub fn count_keys(&self) -> Result<u64, StoreError> {
        let view = self.store.view();
        let mut keys = 0;
        for copy in self.held_copies() {
            keys += view.count_copy_keys(copy)?;
        }
        Ok(keys)
    }

    /// Writes this turn's changes and its last slot in one batch (no
    /// fsync), then drops a bounded part of any copy being dropped.
    fn commit_turn(&mut self) -> Result<(), StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let meta = std::mem::take(&mut self.meta_dirty).then(|| self.meta());
        let encoded = meta.as_ref().map(encode_meta);
        let dropped = std::mem::take(&mut self.dropped);
        self.store.commit(self.applied, encoded, dropped)?;
        self.skip_through = self.applied;
        if let Some(meta) = meta {
            self.committed = Some(meta);
        }
        if self.store.sweeping() {
            self.store.sweep()?;
        }
        Ok(())
    }

    /// The fetch of a peer's state applied through `min_applied` at
    /// least, into a fresh store beside this one: run by the driver with
    /// no lock held, then handed to `finish_restore`.
    fn fetch_job(&mut self, min_applied: Slot) -> Result<RestoreJob, String> {
        let Some(source) = self.source.clone() else {
            return Err(format!(
                "must install a snapshot at slot {min_applied} (this replica holds {}), and has no peer to fetch it from",
                self.applied
            ));
        };
        let mut import = self.store.import().map_err(|e| e.to_string())?;
        self.restoring = Some(min_applied);
        Ok(Box::new(move || {
            let summary = source.fetch(min_applied, &mut import)?;
            let finished: FinishedImport = import.finish(summary).map_err(|e| e.to_string())?;
            Ok(Box::new(finished) as RestoreOutput)
        }))
    }

    /// Loads a whole-state snapshot of an earlier version into the store
    /// (once, after an upgrade): it replaces everything.
    fn restore_legacy(&mut self, index: Slot, snapshot: &[u8]) -> Result<(), String> {
        let old: KvStateV2 =
            decode_versioned::<KvStateV2, KvStateV1>(snapshot).map_err(|e| e.to_string())?;
        if old.gid != self.gid {
            return Err(format!(
                "snapshot is of group {}, this is group {}",
                old.gid, self.gid
            ));
        }
        let held: Vec<CopyId> = self.held_copies().collect();
        self.dropped.extend(held);
        self.config = old.config;
        self.prev_config = old.prev_config;
        self.pending_deletes = old.pending_deletes;
        self.incarnation = old.incarnation;
        self.clock_ms = old.clock_ms;
        self.owned.clear();
        self.outgoing.clear();
        // Fresh generations above any in use (configuration numbers are
        // never that high), and above those of any earlier restore.
        let mut generation = u64::MAX / 2 + (index << 20);
        for (shard, o) in old.owned {
            generation += 1;
            let copy = CopyId {
                shard: shard as u32,
                generation,
            };
            let owned = OwnedShard {
                status: o.status,
                copy,
                sessions: o.data.sessions.len() as u64,
            };
            self.owned.insert(shard, owned);
            self.write_copy(copy, o.data, 0);
        }
        for ((num, shard), data) in old.outgoing {
            generation += 1;
            let copy = CopyId {
                shard: shard as u32,
                generation,
            };
            self.outgoing.insert((num, shard), FrozenCopy { copy });
            self.write_copy(copy, data, 0);
        }
        self.applied = index;
        self.meta_dirty = true;
        self.fetches
            .reset(self.pulling_copies().collect::<Vec<_>>().into_iter());
        self.commit_turn().map_err(|e| e.to_string())?;
        self.store.persist().map_err(|e| e.to_string())
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
    fn apply(&mut self, slot: Slot, command: &[u8]) -> Result<Bytes, ApplyError> {
        if slot <= self.skip_through {
            // Already in the store: replayed from the log after a restart,
            // or covered by a snapshot fetched from a peer. Nobody waits
            // for these (a leader neither restarts nor installs).
            return Ok(Bytes::new());
        }
        debug_assert!(slot >= self.applied, "slots are applied in order");
        let reply = match postcard::from_bytes::<Command>(command) {
            Ok(command) => {
                if let Some(job) = self.fetch_before_install(slot, &command) {
                    // Nothing applied yet: the driver fetches, then asks again.
                    return Err(ApplyError::NeedsFetch(job));
                }
                self.applied = slot;
                self.apply_command(command)
            }
            Err(e) => {
                self.applied = slot;
                CommandReply::Malformed(e.to_string())
            }
        };
        if let Some(e) = &self.failed {
            return Err(ApplyError::Failed(e.to_string()));
        }
        if let Some(through) = self.needs_snapshot.take() {
            return Err(ApplyError::NeedsSnapshot { through });
        }
        Ok(encode(&reply))
    }

    fn end_turn(&mut self) -> Result<(), String> {
        self.commit_turn().map_err(|e| e.to_string())
    }

    fn checkpoint(&mut self, _applied: Slot) -> Result<(Slot, Bytes), String> {
        self.store.persist().map_err(|e| e.to_string())?;
        let descriptor = StoreDescriptor {
            gid: self.gid,
            applied: self.applied,
        };
        let mut bytes = LAYOUT_STORE.to_vec();
        bytes.extend_from_slice(&encode(&descriptor));
        Ok((self.applied, Bytes::from(bytes)))
    }

    fn snapshot(&self) -> Bytes {
        let descriptor = StoreDescriptor {
            gid: self.gid,
            applied: self.applied,
        };
        let mut bytes = LAYOUT_STORE.to_vec();
        bytes.extend_from_slice(&encode(&descriptor));
        Bytes::from(bytes)
    }

    fn restore(&mut self, index: Slot, snapshot: &[u8]) -> Result<(), String> {
        if index <= self.applied {
            // The store already holds this state or a later one (the
            // usual case at a restart).
            return Ok(());
        }
        if snapshot.starts_with(&LAYOUT_STORE[..]) {
            return Err("a store snapshot is installed by a fetch (begin_restore)".into());
        }
        self.restore_legacy(index, snapshot)
    }

    fn begin_restore(
        &mut self,
        index: Slot,
        snapshot: &[u8],
    ) -> Result<Option<RestoreJob>, String> {
        if index <= self.applied {
            return Ok(None);
        }
        let Some(descriptor) = snapshot.strip_prefix(&LAYOUT_STORE[..]) else {
            return Ok(None);
        };
        let d: StoreDescriptor = postcard::from_bytes(descriptor).map_err(|e| e.to_string())?;
        if d.gid != self.gid {
            return Err(format!(
                "snapshot is of group {}, this is group {}",
                d.gid, self.gid
            ));
        }
        self.fetch_job(index).map(Some)
    }

    fn begin_catch_up(&mut self, through: Slot) -> Result<RestoreJob, String> {
        self.fetch_job(through)
    }

    fn finish_restore(&mut self, fetched: RestoreOutput) -> Result<(), String> {
        let Some(min_applied) = self.restoring.take() else {
            return Err("no restore is under way".into());
        };
        let finished = fetched
            .downcast::<FinishedImport>()
            .map_err(|_| "a restore fetched something else".to_string())?;
        // What this turn applied is covered by the peer's state.
        self.store.discard_overlay();
        self.dropped.clear();
        self.meta_dirty = false;
        self.failed = None;
        self.store
            .switch_to_imported(*finished)
            .map_err(|e| e.to_string())?;
        self.load().map_err(|e| e.to_string())?;
        if self.applied < min_applied {
            return Err(format!(
                "the snapshot fetched reaches slot {}, not {min_applied}",
                self.applied
            ));
        }
        self.snapshots_installed += 1;
        tracing::info!(
            gid = self.gid,
            applied = self.applied,
            "installed a snapshot from a peer"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh path under the system's temporary directory.
    pub(super) fn scratch_dir(name: &str) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("shardkv-{name}-{}-{n}", std::process::id()))
    }

    /// A state on a store removed when it is dropped.
    fn state(gid: Gid) -> KvState {
        KvState::temporary(gid, &scratch_dir("state")).unwrap()
    }

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
        let mut s = state(1);
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
        let data = s.shard_data(shard).unwrap();
        let session = &data.sessions[&7];
        assert_eq!(session.replies.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn put_hash_returns_the_previous_value_and_stores_the_hash() {
        let mut s = state(1);
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
    fn the_key_count_reported_is_zero_exactly_when_no_key_is_held() {
        let mut s = state(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1, 1])));
        s.commit_turn().unwrap();
        assert_eq!(s.key_census().reported().unwrap(), 0);
        let mut seq = 0;
        let mut write = |s: &mut KvState, kind, key: &str, value| {
            seq += 1;
            let reply = s.apply_command(op(1, seq, kind, key, value));
            assert_eq!(reply, CommandReply::Op(OpReply::Done));
        };
        for i in 0..10 {
            write(&mut s, OpKind::Put, &format!("k{i}"), "v");
        }
        s.commit_turn().unwrap();
        // Overwrites are blind: the estimate may count their versions.
        for i in 0..10 {
            write(&mut s, OpKind::Put, &format!("k{i}"), "w");
        }
        s.commit_turn().unwrap();
        assert_eq!(s.count_keys().unwrap(), 10);
        assert!(s.key_census().reported().unwrap() >= 10);
        for i in 0..10 {
            write(&mut s, OpKind::Delete, &format!("k{i}"), "");
        }
        // Deleting a key that is not there changes nothing.
        write(&mut s, OpKind::Delete, "absent", "");
        s.commit_turn().unwrap();
        assert_eq!(s.count_keys().unwrap(), 0);
        assert_eq!(get(&mut s, "k3"), CommandReply::Op(OpReply::Value(None)));
        // The deletions are still in the store; the figure is still 0.
        assert_eq!(s.key_census().reported().unwrap(), 0);
    }

    #[test]
    fn a_group_state_written_with_key_counts_still_loads() {
        let mut s = state(1);
        s.apply_command(Command::Reconfigure(config(1, vec![1, 1])));
        s.apply_command(op(1, 1, OpKind::Put, &key_in(1, 2), "v"));
        s.apply_command(Command::Reconfigure(config(2, vec![1, 2])));
        s.commit_turn().unwrap();
        let meta = s.meta();
        assert!(!meta.owned.is_empty() && !meta.outgoing.is_empty());
        // As stores written before held it: a key count in every copy,
        // unmarked.
        let owned: BTreeMap<u64, (ShardStatus, CopyId, u64, u64)> = (meta.owned.iter())
            .map(|(shard, o)| (*shard, (o.status, o.copy, 7, o.sessions)))
            .collect();
        let outgoing: BTreeMap<(u64, u64), (CopyId, u64)> = (meta.outgoing.iter())
            .map(|(at, c)| (*at, (c.copy, 1)))
            .collect();
        let old = postcard::to_allocvec(&(
            meta.gid,
            &meta.config,
            &meta.prev_config,
            &owned,
            &outgoing,
            &meta.pending_deletes,
            meta.incarnation,
            meta.clock_ms,
        ))
        .unwrap();
        assert_eq!(decode_meta(&old).unwrap(), meta);
        assert_eq!(decode_meta(&encode_meta(&meta)).unwrap(), meta);
        // And a store holding the old layout opens with it.
        let dir = scratch_dir("counted-meta");
        {
            let mut store = Store::open(&dir, StoreOptions::default()).unwrap();
            store.commit(5, Some(Bytes::from(old)), Vec::new()).unwrap();
            store.persist().unwrap();
        }
        let reopened = KvState::open(1, &dir, None, StoreOptions::default()).unwrap();
        assert_eq!(reopened.meta(), meta);
        assert_eq!(reopened.applied(), 5);
    }

    #[test]
    fn a_shard_moves_with_its_duplicate_table_and_both_sides_clean_up() {
        let n = 2;
        let moving = key_in(1, n);
        let staying = key_in(0, n);
        let mut a = state(1);
        let mut b = state(2);
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
        let data = a.outgoing_data(2, 1).unwrap().unwrap();
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
        let mut a = state(1);
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
        let mut a = state(1);
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
        let mut s = state(1);
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
        let mut s = state(1);
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
            let mut s = state(1);
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
        let mut s = state(1);
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
        let mut a = state(1);
        let mut b = state(2);
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
        let data = a.outgoing_data(2, 1).unwrap().unwrap();
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
        let mut s = state(1);
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
        let mut s = state(1);
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
        let data = &s.shard_data(shard).unwrap();
        assert_eq!(
            data.sessions.keys().copied().collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(data.idle_order.len(), 2);
    }

    #[test]
    fn a_session_keeps_a_bounded_number_of_small_replies() {
        let mut s = state(1);
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
        let mut s = state(1);
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
        let mut s = state(1);
        s.restore(40, &postcard::to_allocvec(&old).unwrap())
            .unwrap();
        assert_eq!(s.applied(), 40);
        let owned = s.shard_data(0).unwrap();
        assert_eq!(owned.sessions[&7].replies[&2], OpReply::Done);
        assert_eq!(owned.idle_order, BTreeSet::from([(0, 7)]));
        assert_eq!(s.outgoing_data(2, 1).unwrap().unwrap().kv.len(), 1);
        assert_eq!(s.count_keys().unwrap(), 2);
        assert_eq!(s.session_count(), 1);
        let shard = decode_shard(&postcard::to_allocvec(&data()).unwrap()).unwrap();
        assert_eq!(shard.sessions[&7].acked_below, 2);
        // The current layout is marked, and reads back as it was.
        assert_eq!(decode_shard(&encode_versioned(&shard)).unwrap(), shard);
    }

    #[test]
    fn undecodable_commands_change_nothing() {
        let mut shared = SharedKvState::new(state(1));
        let before = shared.lock().meta();
        let reply: CommandReply =
            postcard::from_bytes(&shared.apply(1, b"\xff\xfe").unwrap()).unwrap();
        assert!(matches!(reply, CommandReply::Malformed(_)));
        assert_eq!(shared.lock().meta(), before);
    }

    /// Streams another state's committed store, as a peer would.
    struct LocalSource {
        view: std::sync::Mutex<StoreView>,
        /// Vouch for one record fewer than sent: a damaged transfer.
        lie: bool,
    }

    impl PeerSource for LocalSource {
        fn fetch(&self, min_applied: Slot, import: &mut Import) -> Result<StreamSummary, String> {
            let view = self.view.lock().unwrap();
            assert!(view.applied().unwrap() >= min_applied);
            let mut hasher = crc32fast::Hasher::new();
            let mut records = 0;
            let mut chunk = Vec::new();
            for r in view.records() {
                let r = r.map_err(|e| e.to_string())?;
                super::super::store::checksum_record(&mut hasher, &r);
                records += 1;
                chunk.push(r);
                if chunk.len() == 7 {
                    import.add(&chunk).map_err(|e| e.to_string())?;
                    chunk.clear();
                }
            }
            import.add(&chunk).map_err(|e| e.to_string())?;
            Ok(StreamSummary {
                records: records - u64::from(self.lie),
                crc32: hasher.finalize(),
            })
        }

        fn fetch_copy(
            &self,
            _: &Stager,
            _: CopyId,
            _: &Source,
            _: u64,
            _: CopySummary,
        ) -> Result<(), String> {
            Err("not in this test".into())
        }
    }

    /// A group with writes in both shards, through slot `slots`, committed.
    fn written(dir: &Path, slots: u64) -> KvState {
        let mut s = KvState::open(1, dir, None, StoreOptions::default()).unwrap();
        let mut slot = 0;
        let mut apply = |s: &mut KvState, c: Command| {
            slot += 1;
            s.apply(slot, &encode(&c)).unwrap();
        };
        apply(&mut s, Command::Reconfigure(config(1, vec![1, 1])));
        for i in 1..slots {
            apply(
                &mut s,
                op(7, i, OpKind::Put, &format!("k{i}"), &format!("v{i}")),
            );
        }
        s.end_turn().unwrap();
        s
    }

    /// Installs a snapshot as the driver does: the fetch outside the state.
    fn install(s: &mut KvState, index: Slot, descriptor: &[u8]) -> Result<(), String> {
        match s.begin_restore(index, descriptor)? {
            Some(job) => s.finish_restore(job()?),
            None => s.restore(index, descriptor),
        }
    }

    fn generations(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("gen-")
            })
            .count()
    }

    #[test]
    fn every_command_of_a_slot_is_applied() {
        let mut s = state(1);
        s.apply(1, &encode(&Command::Reconfigure(config(1, vec![1, 1]))))
            .unwrap();
        s.end_turn().unwrap();
        // One slot's batch holds many commands: all of them count.
        for i in 0..3 {
            let reply = s
                .apply(2, &encode(&op(7, i + 1, OpKind::Append, "k", "x")))
                .unwrap();
            let reply: CommandReply = postcard::from_bytes(&reply).unwrap();
            assert_eq!(reply, CommandReply::Op(OpReply::Done), "command {i}");
        }
        s.end_turn().unwrap();
        assert_eq!(
            get(&mut s, "k"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("xxx"))))
        );
    }

    #[test]
    fn a_copy_frozen_in_the_turn_being_applied_is_not_handed_out() {
        let mut s = state(1);
        let n = 2;
        s.apply(1, &encode(&Command::Reconfigure(config(1, vec![1, 1]))))
            .unwrap();
        s.end_turn().unwrap();
        let key = key_in(1, n);
        s.apply(2, &encode(&op(7, 1, OpKind::Put, &key, "v")))
            .unwrap();
        s.apply(3, &encode(&Command::Reconfigure(config(2, vec![1, 2]))))
            .unwrap();
        // Frozen in memory, its write not yet in the store: not yet.
        assert!(s.outgoing.contains_key(&(2, 1)));
        assert!(s.outgoing_view(2, 1).is_none());
        assert_eq!(s.committed_config_num(), 1);
        s.end_turn().unwrap();
        let (view, copy) = s.outgoing_view(2, 1).unwrap();
        let data = export_copy(&view, copy).unwrap();
        assert_eq!(data.kv.get(key.as_bytes()), Some(&Bytes::from("v")));
    }

    #[test]
    fn a_restart_finds_the_data_and_skips_the_slots_it_holds() {
        let dir = scratch_dir("restart");
        let mut s = written(&dir, 50);
        assert_eq!(s.applied(), 50);
        let (covered, _) = s.checkpoint(50).unwrap();
        assert_eq!(covered, 50);
        // A turn committed after the checkpoint, not synced, is kept too
        // by a clean close.
        s.apply(51, &encode(&op(7, 50, OpKind::Put, "late", "x")))
            .unwrap();
        s.end_turn().unwrap();
        drop(s);
        let mut s = KvState::open(1, &dir, None, StoreOptions::default()).unwrap();
        assert_eq!(s.applied(), 51);
        assert_eq!(s.count_keys().unwrap(), 50);
        // Client 7 wrote to both shards: a session in each.
        assert_eq!(s.session_count(), 2);
        assert_eq!(
            get(&mut s, "k9"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("v9"))))
        );
        // The log replays slots the store already holds: they change nothing.
        let replayed = s
            .apply(30, &encode(&op(7, 30, OpKind::Append, "k1", "again")))
            .unwrap();
        assert!(replayed.is_empty());
        assert_eq!(
            get(&mut s, "k1"),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("v1"))))
        );
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_streams_into_a_fresh_store_and_replaces_the_old_one() {
        let (dir_a, dir_b) = (scratch_dir("snap-a"), scratch_dir("snap-b"));
        let mut a = written(&dir_a, 40);
        let (index, descriptor) = a.checkpoint(40).unwrap();
        // The log keeps a few bytes, not the data.
        assert!(descriptor.len() < 32, "{} bytes", descriptor.len());
        let source = |lie| {
            Some(Arc::new(LocalSource {
                view: std::sync::Mutex::new(a.view()),
                lie,
            }) as Arc<dyn PeerSource>)
        };
        // A damaged stream is refused and leaves the old store as it was.
        let mut b = KvState::open(1, &dir_b, source(true), StoreOptions::default()).unwrap();
        let err = install(&mut b, index, &descriptor).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
        assert_eq!(b.applied(), 0);
        drop(b);
        let mut b = KvState::open(1, &dir_b, source(false), StoreOptions::default()).unwrap();
        assert_eq!(generations(&dir_b), 1, "the partial import is gone");
        install(&mut b, index, &descriptor).unwrap();
        assert_eq!(b.applied(), 40);
        assert_eq!(b.meta(), a.meta());
        for shard in 0..2 {
            assert_eq!(b.shard_data(shard).unwrap(), a.shard_data(shard).unwrap());
        }
        drop(b);
        // The switch is durable: a reopen finds the fetched state.
        let b = KvState::open(1, &dir_b, None, StoreOptions::default()).unwrap();
        assert_eq!(b.applied(), 40);
        assert_eq!(b.count_keys().unwrap(), 39);
        drop((a, b));
        for dir in [dir_a, dir_b] {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_dropped_copy_goes_in_bounded_batches_and_is_not_in_snapshots() {
        let mut a = state(1);
        let mut slot = 0;
        let mut apply = |s: &mut KvState, c: Command| {
            slot += 1;
            s.apply(slot, &encode(&c)).unwrap();
            s.end_turn().unwrap();
        };
        apply(&mut a, Command::Reconfigure(config(1, vec![1, 1])));
        let keys = super::super::store::DROP_KEYS_PER_BATCH + 100;
        let mut written = 0;
        for i in 0.. {
            let key = format!("k{i}");
            if a.shard_of(key.as_bytes()) == 1 {
                apply(&mut a, op(7, i + 1, OpKind::Put, &key, "v"));
                written += 1;
                if written == keys {
                    break;
                }
            }
        }
        apply(&mut a, Command::Reconfigure(config(2, vec![1, 2])));
        assert_eq!(a.outgoing_data(2, 1).unwrap().unwrap().kv.len(), keys);
        apply(
            &mut a,
            Command::DeleteShard {
                config_num: 2,
                shard: 1,
            },
        );
        // The copy is gone at once for everyone; its keys go in batches,
        // on a thread of their own.
        assert!(a.outgoing.is_empty());
        assert!(a.store.sweeping());
        let leaked = a
            .view()
            .records()
            .filter(|r| r.as_ref().unwrap().space == Space::Data)
            .count();
        assert_eq!(leaked, 0, "a snapshot carries no dropped keys");
        a.end_turn().unwrap();
        a.store.sweep_to_end().unwrap();
        assert!(!a.store.sweeping());
        let left = a
            .store
            .scan(Space::Data, &[], &[0xff; 13], usize::MAX)
            .unwrap();
        assert!(left.is_empty(), "{} keys left", left.len());
    }

    /// Hands out another state's outgoing copy, as its group's servers
    /// would, counting the fetches.
    struct CopySource {
        /// The holder's view of the copy.
        copy: std::sync::Mutex<Option<(StoreView, CopyId)>>,
        fetches: std::sync::atomic::AtomicUsize,
        /// Answer as a holder that has dropped its copy would.
        dropped: bool,
    }

    impl CopySource {
        fn new(dropped: bool) -> Arc<CopySource> {
            Arc::new(CopySource {
                copy: Default::default(),
                fetches: Default::default(),
                dropped,
            })
        }
    }

    impl PeerSource for CopySource {
        fn fetch(&self, _: Slot, _: &mut Import) -> Result<StreamSummary, String> {
            Err("not in this test".into())
        }

        fn fetch_copy(
            &self,
            stager: &Stager,
            copy: CopyId,
            _: &Source,
            _: u64,
            expected: CopySummary,
        ) -> Result<(), String> {
            self.fetches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.dropped {
                return Err("already handed off".into());
            }
            let held = self.copy.lock().unwrap();
            let (view, from) = held.as_ref().ok_or("no copy")?;
            let records: Vec<super::super::store::Record> = view
                .copy_stream(*from)
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let mut chunk = Some(records);
            stager.write_copy(copy, || Ok(chunk.take()))?;
            stager
                .mark_staged(copy, expected)
                .map_err(|e| e.to_string())
        }
    }

    /// Group 1 holds shard 1 frozen for configuration 2, and group 2 (with
    /// `source` to fetch from) is pulling it; the install command.
    fn pulling(source: Arc<CopySource>) -> (KvState, KvState, Command, String) {
        let moving = key_in(1, 2);
        let mut a = state(1);
        let mut b = KvState::open(
            2,
            &scratch_dir("puller"),
            Some(source.clone()),
            StoreOptions::default(),
        )
        .unwrap();
        let (c1, c2) = (config(1, vec![1, 1]), config(2, vec![1, 2]));
        for s in [&mut a, &mut b] {
            s.apply_command(Command::Reconfigure(c1.clone()));
        }
        a.apply_command(op(9, 1, OpKind::Append, &moving, "x"));
        for s in [&mut a, &mut b] {
            s.apply_command(Command::Reconfigure(c2.clone()));
            s.end_turn().unwrap();
        }
        *source.copy.lock().unwrap() = a.outgoing_view(2, 1);
        assert!(source.copy.lock().unwrap().is_some());
        let install = Command::InstallShardStreamed {
            config_num: 2,
            shard: 1,
            source: Source {
                gid: 1,
                config_num: 2,
                servers: vec!["g1".into()],
            },
            summary: CopySummary {
                records: 2,
                crc32: 7,
                keys: 1,
                sessions: 1,
            },
        };
        (a, b, install, moving)
    }

    #[test]
    fn a_claim_that_outlived_a_reset_neither_lapses_nor_ends_a_newer_one() {
        let copy = CopyId {
            shard: 1,
            generation: 2,
        };
        let board = FetchBoard::default();
        board.open(copy);
        let old = board.try_claim(copy).unwrap();
        // A snapshot replaced the store while that fetch ran.
        board.reset([copy].into_iter());
        assert!(
            board.try_claim(copy).is_none(),
            "the fetch under way lapsed"
        );
        board.release(copy, old);
        let new = board.try_claim(copy).unwrap();
        board.release(copy, old);
        assert!(
            board.try_claim(copy).is_none(),
            "a stale claim's release ended a newer fetch's claim"
        );
        board.release(copy, new);
        assert!(board.try_claim(copy).is_some());
    }

    #[test]
    fn a_copy_missing_at_its_install_is_fetched_outside_the_apply() {
        let source = CopySource::new(false);
        let (_a, mut b, install, moving) = pulling(source.clone());
        let applied = b.applied;
        let fetches = || source.fetches.load(std::sync::atomic::Ordering::SeqCst);
        // The apply does not fetch (it holds the state's lock): it asks the
        // driver to, and changes nothing.
        let Err(ApplyError::NeedsFetch(job)) = b.apply(10, &encode(&install)) else {
            panic!("the install did not ask for a fetch");
        };
        assert_eq!(fetches(), 0, "the apply fetched");
        assert_eq!(b.applied, applied);
        assert_eq!(get(&mut b, &moving), CommandReply::Op(OpReply::WrongGroup));
        // Until fetched, a background fetch may claim the copy, and its
        // claim ends with it.
        let copy = b.owned[&1].copy;
        let (stager, board) = b.stager();
        let claim = board.claim_unfetched(copy, &stager);
        assert!(claim.is_some(), "an unfetched copy could not be claimed");
        assert!(
            board.claim_unfetched(copy, &stager).is_none(),
            "claimed twice"
        );
        drop(claim);
        job();
        assert_eq!(fetches(), 1);
        // Once fetched, a background fetch listed before may not start on
        // it again (it would clear it, and the install would wait for it).
        assert!(
            board.claim_unfetched(copy, &stager).is_none(),
            "a fetched copy was claimed for a fetch"
        );
        let reply: CommandReply =
            postcard::from_bytes(&b.apply(10, &encode(&install)).unwrap()).unwrap();
        assert_eq!(reply, CommandReply::Step(true));
        assert_eq!(b.applied, 10);
        assert_eq!(
            get(&mut b, &moving),
            CommandReply::Op(OpReply::Value(Some(Bytes::from("x"))))
        );
        assert_eq!(fetches(), 1);
    }

    #[test]
    fn a_copy_that_cannot_be_fetched_at_its_install_is_taken_from_a_peer() {
        let source = CopySource::new(true);
        let (_a, mut b, install, _) = pulling(source.clone());
        let Err(ApplyError::NeedsFetch(job)) = b.apply(10, &encode(&install)) else {
            panic!("the install did not ask for a fetch");
        };
        job();
        // Asked once only: then the group's state is fetched instead.
        match b.apply(10, &encode(&install)) {
            Err(ApplyError::NeedsSnapshot { through }) => assert_eq!(through, 10),
            other => panic!("expected a snapshot to be asked for, got {other:?}"),
        }
        assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
