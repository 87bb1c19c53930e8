//! The sans-I/O Multi-Paxos replica.
//!
//! [`Paxos`] is a plain state machine. The driver feeds it messages
//! ([`Paxos::step`]), clock ticks ([`Paxos::tick`]) and client commands
//! ([`Paxos::propose`]), then collects the effects with [`Paxos::ready`]:
//! writes to make durable, messages to send and decided batches to apply.
//! A `Ready` says the order: `messages` may leave at once; then `persist`
//! is made durable (one sync); then `persisted_messages` (promises,
//! acceptances, refusals, recovery answers: they vouch for acceptor state,
//! which counts only once durable) leave and `committed` is applied. A
//! leader's Accepts are in the first half, so its sync and the followers'
//! run at once: it counts its own acceptance only when it handles later
//! input, by which time its sync is done. The simulator and the model check
//! run the same order, and crash replicas inside the sync.
//!
//! Protocol outline (one distinguished leader per ballot):
//! - A candidate picks a ballot above every round it has seen and sends one
//!   `Prepare` for all slots above its commit index. A majority of `Promise`s
//!   tells it every value that may have been chosen; it re-proposes those in
//!   its own ballot and fills holes with no-ops.
//! - In steady state each batch of commands costs one `Accept` to every
//!   follower and one `Accepted` back: 2(n-1) messages. The commit index rides
//!   on the next `Accept` or heartbeat, so deciding needs no extra messages.
//! - Up to `pipeline_window_slots` slots (and `pipeline_window_bytes_max`
//!   bytes) are in flight at once; commands that arrive while the window is
//!   full wait and go out together as one batch.
//! - A follower treats a slot as decided when the leader's commit index covers
//!   it and its own copy was accepted in the leader's ballot (so it is the
//!   leader's value); otherwise it asks for the decided value (catch-up).
//!   That is sound only because a leader's commit index comes from
//!   majorities in its own ballot, never from catch-up: a leader ignores
//!   catch-up replies (one that learned a decision by catch-up once made a
//!   follower apply its own, undecided value in that slot).
//! - Each replica reports the slot through which its state machine has taken
//!   a snapshot (`done`); the leader spreads the minimum over all replicas and
//!   the log below it is forgotten (the lab's Done/Min). A replica that falls
//!   further behind than `log_retain_slots_max` receives a snapshot instead.
//! - Elections that cannot succeed do not disrupt: a replica whose timeout
//!   runs out first asks for pre-votes (`Config::pre_vote`), and one that
//!   hears a live leader neither grants them nor promises a higher ballot
//!   (`Config::check_quorum`). Both only hold elections back, so they cannot
//!   affect safety.
//! - Every message of log entries is bounded in bytes (`catchup_bytes_max`):
//!   takeovers and resends go in several Accepts, recovery answers in pages,
//!   and a promise whose decided part would exceed it tells the candidate
//!   to catch up first.
//!
//! The code, by concern: [`election`] (pre-votes, Prepare and Promise,
//! takeover), [`replication`] (Accept and Accepted, the commit index, the
//! leader's tick), [`reads`] (ReadIndex), [`catchup`] (catch-up and
//! compaction), [`recovery`] (a lost disk), [`incarnation`] (why votes
//! from before a lost disk no longer count) and [`membership`] (changing
//! who votes: stop signs and epochs), one `impl Paxos` each.

mod catchup;
mod election;
mod incarnation;
mod membership;
mod reads;
mod recovery;
mod replication;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::storage::{DurableState, PersistBatch};
use super::types::{
    Ballot, Batch, Command, Incarnation, Incarnations, Members, Membership, Message, NodeId,
    PromisedEntry, Slot, Snapshot, NODE_ID_LIMIT,
};

pub use membership::{MembershipChange, MembershipError};

/// Tunables. Timeouts count ticks: the driver decides how long a tick is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// This replica's id in the group (below 64).
    pub id: NodeId,
    /// Number of replicas the group started with (its first voters are
    /// `0..peers`). Later memberships are in the log and storage.
    pub peers: u32,
    /// This replica joins a running group: started from blank storage, it
    /// is a new member (a new id, or a new life of a replaced one), takes
    /// part in nothing until a change records it, and waits to hear its
    /// membership from a peer (it is added as a learner first, see
    /// [`Paxos::propose_membership`]). Ignored once storage holds state.
    pub joining: bool,
    /// The group is known to exist (etcd's `--initial-cluster-state
    /// existing`): blank storage is never a new group's. Recovery that
    /// finds every other first voter blank too (the group's first voters
    /// all lost their disks, the group living on in members added since)
    /// starts over as a new member instead of as a new group, which would
    /// decide again in slots the group has decided.
    pub existing_group: bool,
    /// A learner may become a voter only once its commit index is within
    /// this many slots of the leader's.
    pub promote_lag_slots_max: u64,
    /// A leader sends at least one message to every follower this often.
    pub heartbeat_interval_ticks: u64,
    /// A follower that hears nothing from a leader for a random time in this
    /// range starts an election. Randomised so candidates rarely collide.
    pub election_timeout_min_ticks: u64,
    pub election_timeout_max_ticks: u64,
    /// Unanswered Prepares and Accepts are sent again after this long.
    pub retry_interval_ticks: u64,
    /// A replica whose election timeout runs out first asks whether a
    /// majority would promise it a ballot (`Message::PreVote`), and stands
    /// only if so. A replica cut off from the group (or one that can send
    /// but not receive) then never raises the others' ballots, so it cannot
    /// depose a leader they all follow when it returns.
    pub pre_vote: bool,
    /// A replica that has heard from a live leader within the minimum
    /// election timeout neither promises a higher ballot to another replica
    /// nor grants it a pre-vote (a leader counts itself live: it steps down
    /// on its own once a majority is silent). Raft's CheckQuorum.
    pub check_quorum: bool,
    /// Slots proposed but not yet decided, at most.
    pub pipeline_window_slots: usize,
    /// Payload bytes proposed but not yet decided, at most (past it, new
    /// commands wait): bounds what a takeover re-proposes and a promise
    /// reports of one leader's slots.
    pub pipeline_window_bytes_max: usize,
    /// Limits on one slot's batch.
    pub batch_commands_max: usize,
    pub batch_bytes_max: usize,
    /// Commands waiting for a slot, at most; past it `propose` says `Busy`.
    pub proposal_queue_max: usize,
    /// Decided entries in one catch-up reply, at most (a replica further
    /// behind asks again).
    pub catchup_entries_max: usize,
    /// Payload bytes of log entries in one message, at most (one entry
    /// always fits): a catch-up reply, a page of a recovery answer, an
    /// Accept (a takeover or a resend goes in several), and the decided
    /// part of a promise (a candidate further behind must catch up first).
    pub catchup_bytes_max: usize,
    /// Entries kept above the low-water mark for lagging replicas; past it the
    /// log is cut at this replica's snapshot and laggards get the snapshot.
    pub log_retain_slots_max: u64,
    /// Seeds the election-timeout jitter, so simulations replay exactly.
    pub seed: u64,
    /// First proposal id; differs per incarnation so ids are never reused
    /// across restarts (the driver passes e.g. a clock reading).
    pub proposal_id_start: u64,
    /// Blank storage may mean a lost disk: recover from the peers before
    /// voting. Only a caller that knows the group is brand new (a test, a
    /// simulation) may turn this off.
    pub recover_when_empty: bool,
    /// The incarnation to take when starting from blank storage with
    /// `recover_when_empty`: it should exceed any this replica had before
    /// (the driver passes a clock reading). If a peer knows a later one,
    /// the replica takes the one after it and asks again.
    pub blank_incarnation: Incarnation,
}

impl Config {
    pub fn new(id: NodeId, peers: u32) -> Self {
        Config {
            id,
            peers,
            joining: false,
            existing_group: false,
            promote_lag_slots_max: 64,
            heartbeat_interval_ticks: 2,
            election_timeout_min_ticks: 10,
            election_timeout_max_ticks: 20,
            retry_interval_ticks: 4,
            pre_vote: true,
            check_quorum: true,
            pipeline_window_slots: 32,
            pipeline_window_bytes_max: 64 << 20,
            batch_commands_max: 4096,
            batch_bytes_max: 4 << 20,
            proposal_queue_max: 65536,
            catchup_entries_max: 512,
            catchup_bytes_max: 16 << 20,
            log_retain_slots_max: 10_000,
            seed: 0,
            proposal_id_start: 1,
            recover_when_empty: true,
            blank_incarnation: 1,
        }
    }

    /// A member of a group known to be brand new, whose blank storage
    /// cannot be a lost disk: it votes at once. For tests and simulations.
    pub fn new_group(id: NodeId, peers: u32) -> Self {
        Config {
            recover_when_empty: false,
            ..Config::new(id, peers)
        }
    }

    /// Checks what [`Paxos::new`] requires, as an error a caller can report.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.peers) {
            return Err(format!("a group has 1 to 64 replicas, not {}", self.peers));
        }
        if self.id >= NODE_ID_LIMIT {
            return Err(format!(
                "replica id {} is not below {NODE_ID_LIMIT}",
                self.id
            ));
        }
        if self.id >= self.peers && !self.joining {
            return Err(format!(
                "replica id {} is not among the first voters (0 to {}), so it must be joining",
                self.id,
                self.peers - 1,
            ));
        }
        if self.election_timeout_min_ticks == 0
            || self.election_timeout_max_ticks < self.election_timeout_min_ticks
        {
            return Err("election timeout range must be non-empty and at least 1 tick".into());
        }
        if self.pipeline_window_slots == 0 || self.batch_commands_max == 0 {
            return Err("pipeline window and batch size must be at least 1".into());
        }
        Ok(())
    }
}

/// A leader's view of one member (see [`Paxos::members_progress`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MemberProgress {
    pub id: NodeId,
    /// Its commit index as it last reported it.
    pub commit: Slot,
    /// Ticks since the leader last heard from it.
    pub heard_ticks_ago: u64,
}

/// Why a proposal was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("proposal queue is full ({queued} commands waiting)")]
    Busy { queued: usize },
}

/// The effects of everything fed in since the last call to [`Paxos::ready`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ready {
    /// Make these durable (one sync) before sending `persisted_messages`
    /// and before applying `committed`.
    pub persist: PersistBatch,
    /// May leave at once, before `persist` is durable: they vouch for
    /// nothing this replica has yet to write (a leader's Accepts and
    /// heartbeats, Prepares, pre-votes, catch-up), so the followers' syncs
    /// overlap this one. A leader counts its own acceptance only on later
    /// input, which a driver handles after this sync.
    pub messages: Vec<(NodeId, Message)>,
    /// Must wait until `persist` is durable: they report this replica's
    /// acceptor state (promises, acceptances, refusals, recovery answers),
    /// which only counts once it survives a crash (raft-rs's
    /// `persisted_messages`).
    pub persisted_messages: Vec<(NodeId, Message)>,
    /// Install this in the state machine before applying `committed`.
    pub snapshot: Option<Snapshot>,
    /// Decided batches, in slot order, not yet handed out.
    pub committed: Vec<(Slot, Batch)>,
    /// Proposals from this replica that were dropped before getting a slot
    /// (leadership lost): they will never be decided. Also reads from
    /// [`Paxos::read_index`] that were dropped before being confirmed.
    pub dropped: Vec<u64>,
    /// Confirmed reads, as (id from [`Paxos::read_index`], read index): the
    /// read may be served from the state machine once it has applied
    /// through the read index.
    pub reads: Vec<(u64, Slot)>,
    /// The membership this replica has entered, if it changed: the driver
    /// connects to the new members, and a replica no longer a member stops.
    /// Comes with the decided slots through its stop sign, whose one
    /// command (origin [`STOP_SIGN_ORIGIN`](super::types::STOP_SIGN_ORIGIN))
    /// state machines skip.
    pub membership: Option<Membership>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.snapshot.is_none()
            && self.committed.is_empty()
            && self.dropped.is_empty()
            && self.reads.is_empty()
            && self.membership.is_none()
    }
}

/// What a replica is doing, for status displays and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleKind {
    /// Started on blank storage; not voting until it has recovered.
    Recovering,
    Follower,
    /// Asking whether a majority would vote for it (see `Config::pre_vote`).
    PreCandidate,
    Candidate,
    Leader,
    /// A member that does not vote (yet): it follows the log.
    Learner,
    /// Not a member of the group's current membership: it votes for
    /// nobody and stands for nothing, and answers catch-up requests.
    NotMember,
}

/// Counters a driver exports as metrics.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub elections_started: u64,
    pub slots_proposed: u64,
    pub commands_proposed: u64,
    pub catchup_requests_sent: u64,
    pub snapshots_installed: u64,
    /// Times this replica recovered its acceptor state from peers.
    pub recoveries: u64,
    /// Votes (promises, acceptances, recovery answers) ignored because they
    /// came from an incarnation of their sender older than one known here.
    pub stale_votes_ignored: u64,
    /// Pre-vote rounds begun (each may lead to an election).
    pub pre_votes_started: u64,
    /// Prepares ignored because this replica hears a live leader.
    pub prepares_ignored_leader_alive: u64,
}

// Counters are observations, not protocol state: two replicas that differ
// only in them behave identically, so they compare equal (this keeps a model
// checker's state space finite).
impl PartialEq for Stats {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Stats {}
impl std::hash::Hash for Stats {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LogEntry {
    ballot: Ballot,
    batch: Batch,
    decided: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct InFlight {
    /// Bit i set: replica i has accepted this slot in the current ballot.
    acks: u64,
    sent_tick: u64,
    /// Its payload, counted against `pipeline_window_bytes_max`.
    bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PreCandidacy {
    /// The ballot it would stand with.
    ballot: Ballot,
    /// Bit i set: replica i would promise it (own bit included).
    grants: u64,
    sent_tick: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Candidacy {
    ballot: Ballot,
    promises: BTreeMap<NodeId, Vec<PromisedEntry>>,
    sent_tick: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Leadership {
    ballot: Ballot,
    next_slot: Slot,
    inflight: BTreeMap<Slot, InFlight>,
    /// Payload bytes of `inflight`.
    inflight_bytes: usize,
    pending: VecDeque<Command>,
    /// What this leader knows of each member of its epoch, voters and
    /// learners (the own entry only carries `done`).
    peers: BTreeMap<NodeId, PeerProgress>,
    /// The slot of the stop sign this leader proposed or took over, if
    /// any: it proposes nothing after it (see [`Membership`]).
    stop_slot: Option<Slot>,
    /// The last slot this leader's takeover re-proposed: every value an
    /// earlier ballot may have chosen lies at or below it, so no read is
    /// served from a state short of it.
    takeover_last: Slot,
    /// Read-confirmation rounds begun in this ballot. Every Accept carries
    /// the latest; followers echo it.
    read_round: u64,
    /// Reads waiting for a majority to confirm their round, oldest first.
    reads: VecDeque<PendingRead>,
}

impl Leadership {
    /// The lowest snapshot point any replica reported: log below it can go.
    fn group_done(&self) -> Slot {
        self.peers.values().map(|p| p.done).min().unwrap_or(0)
    }
}

/// What a leader tracks of one replica in its ballot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PeerProgress {
    /// Last tick it was heard from, to step down when a majority is silent.
    heard_tick: u64,
    /// Last tick a message went to it, for heartbeats.
    sent_tick: u64,
    /// Commit index last sent to it, to send news promptly.
    commit_sent: Slot,
    /// Its reported snapshot point: the log below the group's lowest is
    /// no longer needed by anyone.
    done: Slot,
    /// The highest read round it has echoed in this ballot.
    read_round_acked: u64,
    /// The read round last sent to it.
    read_round_sent: u64,
    /// Its commit index, as it last reported: a learner is promoted only
    /// once this is close to the leader's.
    commit: Slot,
    /// Its own incarnation, as its acceptances to this leader report it:
    /// what a group's first change records for it (not what this leader
    /// heard of it from others, which may be a life it no longer has).
    incarnation: Option<Incarnation>,
}

impl PeerProgress {
    /// A replica as a new leader first sees it: heard from now (it just
    /// promised, or will be given an election timeout to answer).
    fn new(now_tick: u64) -> Self {
        PeerProgress {
            heard_tick: now_tick,
            sent_tick: 0,
            commit_sent: 0,
            done: 0,
            read_round_acked: 0,
            read_round_sent: 0,
            commit: 0,
            incarnation: None,
        }
    }
}

/// A linearizable read waiting for its leadership check (ReadIndex).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PendingRead {
    id: u64,
    /// The first round begun after the read arrived: once a majority has
    /// echoed it, no other leader could have chosen anything before the
    /// read arrived that this leader does not know.
    round: u64,
    /// The commit index when the read arrived (at least `takeover_last`).
    index: Slot,
}

/// What a peer reported to a recovering replica (over one or more pages).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct PeerState {
    promised: Ballot,
    entries: BTreeMap<Slot, (Ballot, Batch)>,
    /// Its entries at or below this are decided.
    commit: Slot,
    snapshot: Option<Snapshot>,
    memberships: Vec<Membership>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Recovery {
    /// Each peer's whole answer; `None` if that peer is blank itself.
    replies: BTreeMap<NodeId, Option<PeerState>>,
    /// Answers still coming, page by page, with the slot to ask from next.
    partial: BTreeMap<NodeId, (PeerState, Slot)>,
    sent_tick: u64,
}

impl PeerState {
    /// Folds in one page: the newest snapshot, the highest promise and
    /// commit, and per slot the value accepted in the highest ballot (a page
    /// delivered twice changes nothing).
    fn merge(&mut self, page: PeerState) {
        self.promised = self.promised.max(page.promised);
        self.commit = self.commit.max(page.commit);
        if page.snapshot.as_ref().map(|s| s.index) > self.snapshot.as_ref().map(|s| s.index) {
            self.snapshot = page.snapshot;
        }
        if page.memberships.last().map(|m| m.epoch) > self.memberships.last().map(|m| m.epoch) {
            self.memberships = page.memberships;
        }
        for (slot, (ballot, batch)) in page.entries {
            if self.entries.get(&slot).is_none_or(|(b, _)| ballot > *b) {
                self.entries.insert(slot, (ballot, batch));
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Role {
    Recovering(Recovery),
    Follower {
        leader: Option<NodeId>,
    },
    PreCandidate(PreCandidacy),
    Candidate(Candidacy),
    /// Boxed: it is much the largest, and replicas are mostly followers.
    Leader(Box<Leadership>),
}

/// The leadership, or why this replica may not take proposals or reads.
/// A function of the role alone, so callers keep using other fields.
fn leading(role: &mut Role) -> Result<&mut Leadership, ProposeError> {
    match role {
        Role::Leader(l) => Ok(l),
        Role::Follower { leader } => Err(ProposeError::NotLeader { leader: *leader }),
        Role::PreCandidate(_) | Role::Candidate(_) | Role::Recovering(_) => {
            Err(ProposeError::NotLeader { leader: None })
        }
    }
}

/// A small deterministic generator (SplitMix64): jitter needs no crypto, and
/// a seeded simulation must replay bit for bit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One Multi-Paxos replica. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Paxos {
    config: Config,
    now_tick: u64,
    jitter: Jitter,
    election_deadline_tick: u64,
    /// Highest round seen in any message, so a new ballot out-bids them all.
    max_round_seen: u64,
    promised: Ballot,
    log: BTreeMap<Slot, LogEntry>,
    /// Every slot at or below this was decided and is no longer in `log`.
    compacted_through: Slot,
    /// Every slot at or below this is decided.
    commit: Slot,
    /// The commit index last put in a `Ready`'s persist batch.
    commit_noted: Slot,
    /// Slots at or below this were handed out in a `Ready`.
    applied: Slot,
    /// Latest snapshot from the state machine (or installed from a peer).
    snapshot: Option<Snapshot>,
    /// The group-wide low-water mark: every replica has snapshotted through it.
    min_done: Slot,
    /// The highest incarnation known of each member (this one's own at its
    /// id). A vote counts only from its sender's newest known incarnation.
    incarnations: Vec<Incarnation>,
    /// The memberships from the one in force at the snapshot on, oldest
    /// first; the last is the one in force now (never empty). Kept so a
    /// snapshot sent to a peer comes with the membership it was taken in.
    memberships: Vec<Membership>,
    role: Role,
    /// When this follower last heard its leader (None: no leader known).
    /// With `check_quorum`, a leader heard within the minimum election
    /// timeout is live: its followers promise no one else.
    leader_heard_tick: Option<u64>,
    next_proposal_id: u64,
    catchup_sent_tick: Option<u64>,
    out: Ready,
    stats: Stats,
}

impl Paxos {
    /// Builds a replica from what its storage holds (empty for a new one).
    /// Panics on a config that fails [`Config::validate`]: check it first.
    pub fn new(config: Config, durable: DurableState) -> Self {
        if let Err(e) = config.validate() {
            panic!("invalid Paxos config: {e}");
        }
        let blank = durable.is_blank();
        let compacted_through = durable.snapshot.as_ref().map_or(0, |s| s.index);
        let commit = durable.commit.max(compacted_through);
        let memberships = if durable.memberships.is_empty() {
            vec![Membership::initial(config.peers)]
        } else {
            durable.memberships.clone()
        };
        let log = durable
            .entries
            .into_iter()
            .filter(|(slot, _)| *slot > compacted_through)
            // What an epoch's voters accepted after its stop sign is never
            // decided: entering the next epoch forgot it, and so does a
            // restart (it may still be on disk).
            .filter(|(slot, (ballot, _))| {
                *slot <= commit || ballot.epoch() >= epoch_of_slot(&memberships, *slot)
            })
            .map(|(slot, (ballot, batch))| {
                let decided = slot <= commit;
                (
                    slot,
                    LogEntry {
                        ballot,
                        batch,
                        decided,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        // A commit index with holes below it cannot be trusted; recompute it.
        let mut contiguous = compacted_through;
        while contiguous < commit && log.contains_key(&(contiguous + 1)) {
            contiguous += 1;
        }
        let jitter = Jitter(config.seed ^ (u64::from(config.id) << 32) ^ 0x5eed);
        let mut incarnations = durable.incarnations.clone();
        incarnations.resize(incarnations.len().max(config.peers as usize), 0);
        let epoch_floor = memberships.last().map_or(0, |m| m.epoch);
        let promised = durable.promised.max(Ballot::floor_of_epoch(epoch_floor));
        let mut paxos = Paxos {
            next_proposal_id: config.proposal_id_start,
            now_tick: 0,
            jitter,
            election_deadline_tick: 0,
            max_round_seen: promised.round,
            promised,
            log,
            compacted_through,
            commit: contiguous,
            commit_noted: contiguous,
            applied: 0,
            snapshot: durable.snapshot.clone(),
            min_done: 0,
            incarnations,
            memberships,
            role: Role::Follower { leader: None },
            leader_heard_tick: None,
            catchup_sent_tick: None,
            out: Ready::default(),
            stats: Stats::default(),
            config,
        };
        paxos.cover_incarnations(paxos.config.id);
        if let Some(snapshot) = durable.snapshot {
            paxos.applied = snapshot.index;
            paxos.out.snapshot = Some(snapshot);
        }
        paxos.reset_election_deadline();
        if blank {
            if paxos.config.joining {
                // A new member has voted in nothing, so it has nothing to
                // recover: a new life, recorded by the change that adds it.
                let me = paxos.config.id as usize;
                paxos.incarnations[me] = paxos.config.blank_incarnation.max(1);
                paxos.start_as_joiner();
                return paxos;
            }
            if paxos.config.recover_when_empty && paxos.config.peers > 1 {
                // A new life: votes from before the disk was lost must not
                // be counted with the ones it is about to give.
                let me = paxos.config.id as usize;
                paxos.incarnations[me] = paxos.config.blank_incarnation.max(1);
                paxos.role = Role::Recovering(Recovery {
                    replies: BTreeMap::new(),
                    partial: BTreeMap::new(),
                    sent_tick: 0,
                });
                paxos.send_recover_requests();
                return paxos;
            }
            // A member of a new group: it may vote from the start. Unless
            // the caller knows the group is new, it takes a life of its own
            // all the same: were the group not new after all (one first
            // started alone, grown since, and this its lost disk), no
            // membership that recorded its lost life counts it.
            if paxos.config.recover_when_empty {
                let me = paxos.config.id as usize;
                paxos.incarnations[me] = paxos.config.blank_incarnation.max(1);
                paxos.out.persist.incarnations = Some(paxos.incarnations.clone());
            }
            paxos.out.persist.initialized = true;
        }
        if paxos.is_voter(paxos.config.id) && paxos.membership().voters == 1 << paxos.config.id {
            // Alone, there is nobody to wait for.
            paxos.start_election();
        }
        paxos
    }

    // ----- Inputs -----

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.now_tick += 1;
        match &self.role {
            Role::Recovering(r) => {
                if self.now_tick - r.sent_tick >= self.config.retry_interval_ticks {
                    self.send_recover_requests();
                }
            }
            Role::Follower { .. } => {
                if self.now_tick >= self.election_deadline_tick {
                    let me = self.config.id;
                    if self.is_voter(me) {
                        self.campaign();
                    } else if self.is_member_self() {
                        // A learner never stands. Silence may mean its epoch
                        // ended without it hearing: it asks a voter.
                        self.reset_election_deadline();
                        self.ask_a_voter_to_catch_up();
                    }
                }
            }
            Role::PreCandidate(p) => {
                if self.now_tick >= self.election_deadline_tick {
                    self.campaign();
                } else if self.now_tick - p.sent_tick >= self.config.retry_interval_ticks {
                    self.send_pre_votes();
                }
            }
            Role::Candidate(c) => {
                if self.now_tick >= self.election_deadline_tick {
                    self.campaign();
                } else if self.now_tick - c.sent_tick >= self.config.retry_interval_ticks {
                    self.send_prepares(false);
                }
            }
            Role::Leader(_) => self.leader_tick(),
        }
    }

    /// Offers a command. The leader queues it for the next slot (cut at the
    /// next [`Paxos::ready`]); anyone else refuses with a hint. Returns the id
    /// the command will carry when decided.
    pub fn propose(&mut self, data: Bytes) -> Result<u64, ProposeError> {
        let id = self.config.id;
        let leadership = leading(&mut self.role)?;
        if leadership.pending.len() >= self.config.proposal_queue_max {
            return Err(ProposeError::Busy {
                queued: leadership.pending.len(),
            });
        }
        let proposal_id = self.next_proposal_id;
        self.next_proposal_id += 1;
        leadership.pending.push_back(Command {
            origin: id,
            id: proposal_id,
            data,
        });
        self.stats.commands_proposed += 1;
        // Slots are cut in `ready`, so everything proposed in one burst of
        // input shares a slot (and a sync, and a round trip).
        Ok(proposal_id)
    }

    /// Starts a linearizable read without a log entry (ReadIndex). The
    /// leader notes its commit index, then checks with a majority, by one
    /// round of Accepts begun after this call, that it still leads. The
    /// read comes back in [`Ready::reads`] with that index, or its id in
    /// [`Ready::dropped`] if leadership is lost first. Reads that arrive
    /// in one burst share a round. Anyone but the leader refuses.
    pub fn read_index(&mut self) -> Result<u64, ProposeError> {
        let commit = self.commit;
        let leadership = leading(&mut self.role)?;
        if leadership.reads.len() >= self.config.proposal_queue_max {
            return Err(ProposeError::Busy {
                queued: leadership.reads.len(),
            });
        }
        let id = self.next_proposal_id;
        self.next_proposal_id += 1;
        leadership.reads.push_back(PendingRead {
            id,
            round: leadership.read_round + 1,
            index: commit.max(leadership.takeover_last),
        });
        Ok(id)
    }

    /// Handles one message from replica `from`.
    pub fn step(&mut self, from: NodeId, msg: Message) {
        if from >= NODE_ID_LIMIT || from == self.config.id {
            return; // not a replica id: ignore rather than trust it
        }
        if !self.check_epoch(from, &msg) {
            return;
        }
        self.cover_incarnations(from);
        if let Some(ballot) = msg.ballot() {
            self.max_round_seen = self.max_round_seen.max(ballot.round);
        }
        if let Some(known) = msg.incarnations() {
            let reported_mine = known.get(self.config.id as usize).copied();
            let sender = known.get(from as usize).copied().unwrap_or(0);
            if !self.learn_incarnations(from, known) && msg.is_vote() {
                // Sent by an incarnation of `from` that has since lost its
                // disk: its vote may contradict what the new one gives.
                self.stats.stale_votes_ignored += 1;
                return;
            }
            if msg.is_vote()
                && !matches!(self.role, Role::Recovering(_))
                && !self.membership().is_recorded(from, sender)
            {
                // Not the life of `from` the membership counts (a replaced
                // member, or one not yet added): its vote is not one.
                self.stats.stale_votes_ignored += 1;
                return;
            }
            if let (Message::Accepted { .. }, Role::Leader(l)) = (&msg, &mut self.role) {
                if let Some(progress) = l.peers.get_mut(&from) {
                    progress.incarnation = Some(sender);
                }
            }
            if !self.check_own_incarnation(reported_mine.unwrap_or(0)) {
                return;
            }
        }
        if let Role::Recovering(_) = self.role {
            // Not a voter yet: answer recovery questions, ignore the rest.
            match msg {
                Message::RecoverRequest {
                    incarnation,
                    from_slot,
                } => {
                    // Remembered (not durably: this replica holds nothing
                    // yet), so the requester sees its request was taken.
                    self.learn_incarnation(from, incarnation);
                    let incarnations = self.wire_incarnations();
                    self.send(
                        from,
                        Message::RecoverReply {
                            for_incarnation: incarnation,
                            from_slot,
                            initialized: false,
                            promised: Ballot::default(),
                            entries: Vec::new(),
                            commit: 0,
                            snapshot: None,
                            incarnations,
                            more: false,
                            memberships: Vec::new(),
                        },
                    )
                }
                Message::RecoverReply {
                    for_incarnation,
                    from_slot,
                    initialized,
                    promised,
                    entries,
                    commit,
                    snapshot,
                    incarnations: _,
                    more,
                    memberships,
                } => {
                    if !self.answers_current_request(from, for_incarnation, from_slot) {
                        return;
                    }
                    let page = initialized.then(|| PeerState {
                        promised,
                        entries: (entries.into_iter())
                            .map(|(slot, ballot, batch)| (slot, (ballot, batch)))
                            .collect(),
                        commit,
                        snapshot,
                        memberships,
                    });
                    self.on_recover_reply(from, page, more);
                }
                _ => {}
            }
            return;
        }
        match msg {
            Message::PreVote { ballot } => self.on_pre_vote(from, ballot),
            Message::PreVoteReply {
                ballot,
                granted,
                promised,
            } => self.on_pre_vote_reply(from, ballot, granted, promised),
            Message::Prepare { ballot, from_slot } => self.on_prepare(from, ballot, from_slot),
            Message::Promise {
                ballot,
                entries,
                commit,
                behind,
                incarnations: _,
            } => self.on_promise(from, ballot, entries, commit, behind),
            Message::Accept {
                ballot,
                entries,
                commit,
                min_done,
                read_round,
                incarnations: _,
            } => self.on_accept(from, ballot, entries, commit, min_done, read_round),
            Message::Accepted {
                ballot,
                slots,
                done,
                read_round,
                incarnations: _,
                commit,
            } => self.on_accepted(from, ballot, slots, done, read_round, commit),
            Message::Nack { promised } => self.on_nack(promised),
            Message::CatchUpRequest { from_slot } => self.on_catchup_request(from, from_slot),
            Message::CatchUpReply {
                snapshot,
                entries,
                commit,
                memberships,
            } => self.on_catchup_reply(from, snapshot, entries, commit, memberships),
            Message::RecoverRequest {
                incarnation,
                from_slot,
            } => self.on_recover_request(from, incarnation, from_slot),
            Message::RecoverReply { .. } => {} // we are not recovering
        }
    }

    /// The state machine has captured everything through `index` in `data`:
    /// the log up to there may be forgotten once every replica is done too.
    /// `index` is clamped to what has been handed out.
    pub fn compact(&mut self, index: Slot, data: Bytes) {
        let index = index.min(self.applied);
        if self.snapshot.as_ref().is_some_and(|s| s.index >= index) || index == 0 {
            return;
        }
        let snapshot = Snapshot { index, data };
        self.out.persist.snapshot = Some(snapshot.clone());
        self.snapshot = Some(snapshot);
        if let Role::Leader(l) = &mut self.role {
            if let Some(own) = l.peers.get_mut(&self.config.id) {
                own.done = index;
            }
            self.min_done = self.min_done.max(l.group_done());
        }
        self.truncate_log();
    }

    /// Takes the effects accumulated since the last call.
    pub fn ready(&mut self) -> Ready {
        self.begin_read_round();
        self.flush_proposals();
        self.send_read_round();
        self.release_reads();
        if self.commit > self.applied {
            let start = self.applied + 1;
            self.out.committed.extend(
                self.log
                    .range(start..=self.commit)
                    .map(|(slot, e)| (*slot, e.batch.clone())),
            );
            self.applied = self.commit;
        }
        std::mem::take(&mut self.out)
    }

    /// Queues a message in the half of the `Ready` its kind belongs to.
    fn send(&mut self, to: NodeId, msg: Message) {
        if msg.reports_acceptor_state() || self.decides_alone() {
            self.out.persisted_messages.push((to, msg));
        } else {
            self.out.messages.push((to, msg));
        }
    }

    // ----- Queries -----

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The life of this replica's storage (see [`Incarnation`]): what a
    /// membership change records when it adds this replica.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnations[self.config.id as usize]
    }

    pub fn role(&self) -> RoleKind {
        match self.role {
            Role::Recovering(_) => RoleKind::Recovering,
            Role::Follower { .. } if !self.is_member_self() => RoleKind::NotMember,
            Role::Follower { .. } if !self.is_voter(self.config.id) => RoleKind::Learner,
            Role::Follower { .. } => RoleKind::Follower,
            Role::PreCandidate(_) => RoleKind::PreCandidate,
            Role::Candidate(_) => RoleKind::Candidate,
            Role::Leader(_) => RoleKind::Leader,
        }
    }

    /// As leader: how far each other member of the epoch has come, by
    /// what it last reported. Empty on a replica that does not lead.
    pub fn members_progress(&self) -> Vec<MemberProgress> {
        let Role::Leader(l) = &self.role else {
            return Vec::new();
        };
        (l.peers.iter())
            .filter(|(id, _)| **id != self.config.id)
            .map(|(id, p)| MemberProgress {
                id: *id,
                commit: p.commit,
                heard_ticks_ago: self.now_tick.saturating_sub(p.heard_tick),
            })
            .collect()
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    /// Who this replica believes leads, if anyone.
    pub fn leader_hint(&self) -> Option<NodeId> {
        match &self.role {
            Role::Follower { leader } => *leader,
            Role::PreCandidate(_) | Role::Candidate(_) | Role::Recovering(_) => None,
            Role::Leader(_) => Some(self.config.id),
        }
    }

    pub fn ballot(&self) -> Ballot {
        match &self.role {
            Role::Leader(l) => l.ballot,
            Role::Candidate(c) => c.ballot,
            Role::Follower { .. } | Role::PreCandidate(_) | Role::Recovering(_) => self.promised,
        }
    }

    pub fn promised(&self) -> Ballot {
        self.promised
    }

    /// Highest slot such that it and every slot below are decided.
    pub fn commit_index(&self) -> Slot {
        self.commit
    }

    /// Highest slot handed out through `ready`.
    pub fn applied_index(&self) -> Slot {
        self.applied
    }

    /// The decided value of `slot`, if this replica still has it.
    pub fn decided_value(&self, slot: Slot) -> Option<&Batch> {
        self.log
            .get(&slot)
            .filter(|e| e.decided || slot <= self.commit)
            .map(|e| &e.batch)
    }

    /// The lab's `Min()`: one above the slot every replica has snapshotted.
    pub fn min_slot(&self) -> Slot {
        self.min_done + 1
    }

    /// Slots below and including this were forgotten.
    pub fn compacted_through(&self) -> Slot {
        self.compacted_through
    }

    /// Entries held in memory (and on disk) right now.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Payload bytes held in the log.
    pub fn log_bytes(&self) -> usize {
        self.log.values().map(|e| e.batch.size_bytes()).sum()
    }

    pub fn snapshot_index(&self) -> Slot {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }

    /// Size of the latest snapshot.
    pub fn snapshot_bytes(&self) -> usize {
        self.snapshot.as_ref().map_or(0, |s| s.data.len())
    }

    /// Commands waiting for a slot on a leader.
    pub fn queued_commands(&self) -> usize {
        match &self.role {
            Role::Leader(l) => l.pending.len(),
            _ => 0,
        }
    }

    pub fn inflight_slots(&self) -> usize {
        match &self.role {
            Role::Leader(l) => l.inflight.len(),
            _ => 0,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn now_tick(&self) -> u64 {
        self.now_tick
    }

    /// True for the one voter of an epoch: its own acceptance decides,
    /// in the turn it is made, so whatever it says of its decisions (a
    /// commit index, a decided value) holds only once its writes are
    /// durable. Everything it sends waits for its sync.
    fn decides_alone(&self) -> bool {
        self.membership().voters == 1 << self.config.id
    }

    /// The membership in force: who votes in the current epoch.
    pub fn membership(&self) -> &Membership {
        self.memberships
            .last()
            .expect("a replica always knows a membership")
    }
}

/// The epoch whose slots include `slot`, by the memberships known.
fn epoch_of_slot(memberships: &[Membership], slot: Slot) -> u64 {
    memberships
        .iter()
        .rev()
        .find(|m| m.first_slot <= slot)
        .map_or(0, |m| m.epoch)
}
