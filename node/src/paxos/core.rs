//! The sans-I/O Multi-Paxos replica.
//!
//! [`Paxos`] is a plain state machine. The driver feeds it messages
//! ([`Paxos::step`]), clock ticks ([`Paxos::tick`]) and client commands
//! ([`Paxos::propose`]), then collects the effects with [`Paxos::ready`]:
//! writes to make durable, messages to send and decided batches to apply.
//! The driver must persist a `Ready`'s writes (one sync) before sending the
//! messages that report its acceptor state (`Message::reports_acceptor_state`:
//! promises and acceptances are only valid once durable) and before applying
//! what it decided. Other messages, such as a leader's Accepts, may go out
//! before the sync: the leader counts its own acceptance only when it handles
//! later input, by which time its sync is done, so its sync and the
//! followers' run at once.
//!
//! Protocol outline (one distinguished leader per ballot):
//! - A candidate picks a ballot above every round it has seen and sends one
//!   `Prepare` for all slots above its commit index. A majority of `Promise`s
//!   tells it every value that may have been chosen; it re-proposes those in
//!   its own ballot and fills holes with no-ops.
//! - In steady state each batch of commands costs one `Accept` to every
//!   follower and one `Accepted` back: 2(n-1) messages. The commit index rides
//!   on the next `Accept` or heartbeat, so deciding needs no extra messages.
//! - Up to `pipeline_window_slots` slots are in flight at once; commands that
//!   arrive while the window is full wait and go out together as one batch.
//! - A follower treats a slot as decided when the leader's commit index covers
//!   it and its own copy was accepted in the leader's ballot (so it is the
//!   leader's value); otherwise it asks for the decided value (catch-up).
//! - Each replica reports the slot through which its state machine has taken
//!   a snapshot (`done`); the leader spreads the minimum over all replicas and
//!   the log below it is forgotten (the lab's Done/Min). A replica that falls
//!   further behind than `log_retain_slots_max` receives a snapshot instead.
//!
//! Recovery from a lost disk. An acceptor that forgets its promises and
//! acceptances could vote twice and break agreement. So a replica whose
//! storage is blank (and `recover_when_empty` is set) does not vote: it asks
//! every peer for its acceptor state. Once floor(n/2)+1 *initialised* peers
//! have answered, it adopts the highest promise among them, the newest
//! snapshot, and for each slot above it the value accepted in the highest
//! ballot, persists that with the `initialized` mark, and joins as a
//! follower. Any quorum the lost acceptor was part of (for a promise or an
//! acceptance) shares a member with those answers, so what it adopts covers
//! everything it may have promised or helped choose. If instead every other
//! replica has answered and none has ever accepted a value (each is blank,
//! or initialised but empty), no value can have been chosen: the group is
//! new, and the replica starts with the highest promise it heard. A new
//! group therefore needs all its members up once; a lost disk needs a
//! majority of the others.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::storage::{DurableState, PersistBatch};
use super::types::{
    Ballot, Batch, Command, Incarnation, Incarnations, Message, NodeId, PromisedEntry, Slot,
    Snapshot,
};

/// Tunables. Timeouts count ticks: the driver decides how long a tick is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// This replica's index in the group.
    pub id: NodeId,
    /// Number of replicas in the group (ids are `0..peers`).
    pub peers: u32,
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
        if self.id >= self.peers {
            return Err(format!(
                "replica id {} is not below the group size {}",
                self.id, self.peers
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

    fn quorum(&self) -> usize {
        self.peers as usize / 2 + 1
    }
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
    /// Last tick each replica was heard from in this ballot (own entry unused).
    heard_tick: Vec<u64>,
    /// Last tick a message went to each replica, for heartbeats.
    sent_tick: Vec<u64>,
    /// Commit index last sent to each replica, to send news promptly.
    commit_sent: Vec<Slot>,
    /// Each replica's reported snapshot point.
    done: Vec<Slot>,
    /// The last slot this leader's takeover re-proposed: every value an
    /// earlier ballot may have chosen lies at or below it, so no read is
    /// served from a state short of it.
    takeover_last: Slot,
    /// Read-confirmation rounds begun in this ballot. Every Accept carries
    /// the latest; followers echo it.
    read_round: u64,
    /// The highest round each replica has echoed in this ballot (own entry
    /// unused).
    read_round_acked: Vec<u64>,
    /// The round last sent to each replica.
    read_round_sent: Vec<u64>,
    /// Reads waiting for a majority to confirm their round, oldest first.
    reads: VecDeque<PendingRead>,
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
        let log = durable
            .entries
            .into_iter()
            .filter(|(slot, _)| *slot > compacted_through)
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
        incarnations.resize(config.peers as usize, 0);
        let mut paxos = Paxos {
            next_proposal_id: config.proposal_id_start,
            now_tick: 0,
            jitter,
            election_deadline_tick: 0,
            max_round_seen: durable.promised.round,
            promised: durable.promised,
            log,
            compacted_through,
            commit: contiguous,
            commit_noted: contiguous,
            applied: 0,
            snapshot: durable.snapshot.clone(),
            min_done: 0,
            incarnations,
            role: Role::Follower { leader: None },
            leader_heard_tick: None,
            catchup_sent_tick: None,
            out: Ready::default(),
            stats: Stats::default(),
            config,
        };
        if let Some(snapshot) = durable.snapshot {
            paxos.applied = snapshot.index;
            paxos.out.snapshot = Some(snapshot);
        }
        paxos.reset_election_deadline();
        if blank {
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
            // A member of a new group: it may vote from the start.
            paxos.out.persist.initialized = true;
        }
        if paxos.config.peers == 1 {
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
                    self.campaign();
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
        if from >= self.config.peers || from == self.config.id {
            return; // not a member of this group: ignore rather than trust it
        }
        if let Some(ballot) = msg.ballot() {
            self.max_round_seen = self.max_round_seen.max(ballot.round);
        }
        if let Some(known) = msg.incarnations() {
            let reported_mine = known.get(self.config.id as usize).copied();
            if !self.learn_incarnations(from, known) {
                // Sent by an incarnation of `from` that has since lost its
                // disk: its vote may contradict what the new one gives.
                self.stats.stale_votes_ignored += 1;
                return;
            }
            if let Message::RecoverReply { .. } = msg {
                if !self.check_own_incarnation(reported_mine.unwrap_or(0)) {
                    return;
                }
            }
        }
        if let Role::Recovering(_) = self.role {
            // Not a voter yet: answer recovery questions, ignore the rest.
            match msg {
                Message::RecoverRequest { incarnation, .. } => {
                    // Remembered (not durably: this replica holds nothing
                    // yet), so the requester sees its request was taken.
                    self.learn_incarnation(from, incarnation);
                    let incarnations = self.wire_incarnations();
                    self.send(
                        from,
                        Message::RecoverReply {
                            initialized: false,
                            promised: Ballot::default(),
                            entries: Vec::new(),
                            commit: 0,
                            snapshot: None,
                            incarnations,
                            more: false,
                        },
                    )
                }
                Message::RecoverReply {
                    initialized,
                    promised,
                    entries,
                    commit,
                    snapshot,
                    incarnations: _,
                    more,
                } => {
                    let page = initialized.then(|| PeerState {
                        promised,
                        entries: (entries.into_iter())
                            .map(|(slot, ballot, batch)| (slot, (ballot, batch)))
                            .collect(),
                        commit,
                        snapshot,
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
            } => self.on_accept(from, ballot, entries, commit, min_done, read_round),
            Message::Accepted {
                ballot,
                slots,
                done,
                read_round,
                incarnations: _,
            } => self.on_accepted(from, ballot, slots, done, read_round),
            Message::Nack { promised } => self.on_nack(promised),
            Message::CatchUpRequest { from_slot } => self.on_catchup_request(from, from_slot),
            Message::CatchUpReply {
                snapshot,
                entries,
                commit,
            } => self.on_catchup_reply(from, snapshot, entries, commit),
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
            l.done[self.config.id as usize] = index;
            self.min_done = self.min_done.max(l.done.iter().copied().min().unwrap_or(0));
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
        if msg.reports_acceptor_state() {
            self.out.persisted_messages.push((to, msg));
        } else {
            self.out.messages.push((to, msg));
        }
    }

    // ----- Queries -----

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn role(&self) -> RoleKind {
        match self.role {
            Role::Recovering(_) => RoleKind::Recovering,
            Role::Follower { .. } => RoleKind::Follower,
            Role::PreCandidate(_) => RoleKind::PreCandidate,
            Role::Candidate(_) => RoleKind::Candidate,
            Role::Leader(_) => RoleKind::Leader,
        }
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

    // ----- Elections -----

    fn reset_election_deadline(&mut self) {
        let span =
            self.config.election_timeout_max_ticks - self.config.election_timeout_min_ticks + 1;
        // Draw only when there is a choice: replicas that differ in nothing
        // but unused draws then stay identical (for the model checker).
        let jitter = if span > 1 {
            self.jitter.next() % span
        } else {
            0
        };
        let timeout = self.config.election_timeout_min_ticks + jitter;
        self.election_deadline_tick = self.now_tick + timeout;
    }

    /// The election timeout ran out: stand, after a pre-vote if enabled.
    fn campaign(&mut self) {
        if self.config.pre_vote && self.config.peers > 1 {
            self.start_pre_vote();
        } else {
            self.start_election();
        }
    }

    fn start_pre_vote(&mut self) {
        self.drop_leadership();
        let ballot = Ballot::new(
            self.max_round_seen.max(self.promised.round) + 1,
            self.config.id,
        );
        self.stats.pre_votes_started += 1;
        self.role = Role::PreCandidate(PreCandidacy {
            ballot,
            grants: 1 << self.config.id,
            sent_tick: self.now_tick,
        });
        self.leader_heard_tick = None;
        self.reset_election_deadline();
        self.send_pre_votes();
    }

    fn send_pre_votes(&mut self) {
        let now = self.now_tick;
        let Role::PreCandidate(p) = &mut self.role else {
            return;
        };
        p.sent_tick = now;
        let (ballot, grants) = (p.ballot, p.grants);
        for peer in 0..self.config.peers {
            if grants & (1 << peer) == 0 {
                self.send(peer, Message::PreVote { ballot });
            }
        }
    }

    /// With `check_quorum`: this replica leads, or follows a leader it has
    /// heard within the minimum election timeout.
    fn hears_live_leader(&self) -> bool {
        if !self.config.check_quorum {
            return false;
        }
        match self.role {
            Role::Leader(_) => true,
            Role::Follower { leader: Some(_) } => self
                .leader_heard_tick
                .is_some_and(|t| self.now_tick - t < self.config.election_timeout_min_ticks),
            _ => false,
        }
    }

    fn on_pre_vote(&mut self, from: NodeId, ballot: Ballot) {
        let granted = ballot > self.promised && !self.hears_live_leader();
        self.send(
            from,
            Message::PreVoteReply {
                ballot,
                granted,
                promised: self.promised,
            },
        );
    }

    fn on_pre_vote_reply(&mut self, from: NodeId, ballot: Ballot, granted: bool, promised: Ballot) {
        // Out-bid whoever refused for a promise as high: the next try can win.
        self.max_round_seen = self.max_round_seen.max(promised.round);
        let quorum = self.config.quorum();
        let Role::PreCandidate(p) = &mut self.role else {
            return;
        };
        if ballot != p.ballot || !granted {
            return;
        }
        p.grants |= 1 << from;
        if p.grants.count_ones() as usize >= quorum {
            self.start_election();
        }
    }

    fn start_election(&mut self) {
        self.drop_leadership();
        let ballot = Ballot::new(
            self.max_round_seen.max(self.promised.round) + 1,
            self.config.id,
        );
        self.max_round_seen = ballot.round;
        self.set_promised(ballot);
        self.stats.elections_started += 1;
        let own = self.promised_entries(self.commit + 1);
        let mut promises = BTreeMap::new();
        promises.insert(self.config.id, own);
        self.role = Role::Candidate(Candidacy {
            ballot,
            promises,
            sent_tick: self.now_tick,
        });
        self.reset_election_deadline();
        self.send_prepares(true);
        self.maybe_win();
    }

    fn send_prepares(&mut self, all: bool) {
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        c.sent_tick = self.now_tick;
        let msg = Message::Prepare {
            ballot: c.ballot,
            from_slot: self.commit + 1,
        };
        let targets: Vec<NodeId> = (0..self.config.peers)
            .filter(|p| *p != self.config.id && (all || !c.promises.contains_key(p)))
            .collect();
        for peer in targets {
            self.send(peer, msg.clone());
        }
    }

    /// True if the entries from `from_slot` through the commit index hold
    /// more than `limit` payload bytes (stops counting there).
    fn decided_bytes_exceed(&self, from_slot: Slot, limit: usize) -> bool {
        if from_slot > self.commit {
            return false;
        }
        let mut bytes = 0;
        for e in self
            .log
            .range(from_slot.max(1)..=self.commit)
            .map(|(_, e)| e)
        {
            bytes += e.batch.size_bytes();
            if bytes > limit {
                return true;
            }
        }
        false
    }

    fn promised_entries(&self, from_slot: Slot) -> Vec<PromisedEntry> {
        self.log
            .range(from_slot.max(1)..)
            .map(|(slot, e)| PromisedEntry {
                slot: *slot,
                ballot: e.ballot,
                batch: e.batch.clone(),
                decided: e.decided || *slot <= self.commit,
            })
            .collect()
    }

    fn on_prepare(&mut self, from: NodeId, ballot: Ballot, from_slot: Slot) {
        if ballot > self.promised && self.hears_live_leader() {
            // A majority follows a live leader: a higher ballot would only
            // depose it. Ignored, as if lost; the sender asks again later.
            self.stats.prepares_ignored_leader_alive += 1;
            return;
        }
        if ballot < self.promised {
            self.send(
                from,
                Message::Nack {
                    promised: self.promised,
                },
            );
            return;
        }
        if ballot > self.promised {
            self.step_down(Some(ballot.node));
            self.set_promised(ballot);
            self.reset_election_deadline();
        }
        // A candidate we are far ahead of could not rebuild the slots we
        // compacted, and a huge list would not fit a message: it must catch
        // up first. (What lies above our commit index is bounded by the
        // leaders' windows.)
        let behind = from_slot <= self.compacted_through
            || self.commit.saturating_sub(from_slot) >= self.config.catchup_entries_max as u64
            || self.decided_bytes_exceed(from_slot, self.config.catchup_bytes_max);
        let entries = if behind {
            Vec::new()
        } else {
            self.promised_entries(from_slot)
        };
        let incarnations = self.wire_incarnations();
        self.send(
            from,
            Message::Promise {
                ballot,
                entries,
                commit: self.commit,
                behind,
                incarnations,
            },
        );
    }

    fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<PromisedEntry>,
        commit: Slot,
        behind: bool,
    ) {
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        if ballot != c.ballot {
            return;
        }
        if behind {
            // Catch up from that replica first; a later election will do.
            self.role = Role::Follower { leader: None };
            self.request_catchup(from);
            return;
        }
        c.promises.insert(from, entries);
        if commit > self.commit {
            self.request_catchup(from);
        }
        self.maybe_win();
    }

    fn maybe_win(&mut self) {
        let Role::Candidate(c) = &self.role else {
            return;
        };
        if c.promises.len() < self.config.quorum() {
            return;
        }
        let ballot = c.ballot;
        // For each open slot: a value known decided wins, else the one
        // accepted in the highest ballot, else a no-op.
        let mut chosen: BTreeMap<Slot, (bool, Ballot, Batch)> = BTreeMap::new();
        for entry in c.promises.values().flatten() {
            if entry.slot <= self.commit {
                continue;
            }
            let candidate = (entry.decided, entry.ballot);
            match chosen.get(&entry.slot) {
                Some((d, b, _)) if (*d, *b) >= candidate => {}
                _ => {
                    chosen.insert(
                        entry.slot,
                        (entry.decided, entry.ballot, entry.batch.clone()),
                    );
                }
            }
        }
        let last = chosen.keys().next_back().copied().unwrap_or(self.commit);
        let peers = self.config.peers as usize;
        let mut leadership = Leadership {
            ballot,
            next_slot: last + 1,
            inflight: BTreeMap::new(),
            inflight_bytes: 0,
            pending: VecDeque::new(),
            heard_tick: vec![self.now_tick; peers],
            sent_tick: vec![0; peers],
            commit_sent: vec![0; peers],
            done: vec![0; peers],
            takeover_last: last,
            read_round: 0,
            read_round_acked: vec![0; peers],
            read_round_sent: vec![0; peers],
            reads: VecDeque::new(),
        };
        leadership.done[self.config.id as usize] = self.snapshot_index();
        let mut entries = Vec::new();
        for slot in self.commit + 1..=last {
            let batch = chosen.remove(&slot).map(|(_, _, b)| b).unwrap_or_default();
            self.accept_locally(slot, ballot, batch.clone());
            let bytes = batch.size_bytes();
            leadership.inflight_bytes += bytes;
            leadership.inflight.insert(
                slot,
                InFlight {
                    acks: 1 << self.config.id,
                    sent_tick: self.now_tick,
                    bytes,
                },
            );
            entries.push((slot, batch));
        }
        tracing::debug!(
            id = self.config.id,
            ?ballot,
            recovered = entries.len(),
            "elected leader"
        );
        self.role = Role::Leader(Box::new(leadership));
        self.broadcast_accept(entries);
        self.try_decide_all();
    }

    fn on_nack(&mut self, promised: Ballot) {
        let mine = match &self.role {
            Role::Leader(l) => l.ballot,
            Role::Candidate(c) => c.ballot,
            Role::Follower { .. } | Role::PreCandidate(_) | Role::Recovering(_) => return,
        };
        if promised > mine {
            self.step_down(Some(promised.node));
            self.reset_election_deadline();
        }
    }

    /// Leaves leader or candidate state; queued proposals can never be decided.
    fn step_down(&mut self, leader: Option<NodeId>) {
        self.drop_leadership();
        self.role = Role::Follower { leader };
        // Whoever leads now has not been heard from yet.
        self.leader_heard_tick = None;
    }

    fn drop_leadership(&mut self) {
        if let Role::Leader(l) = &mut self.role {
            self.out.dropped.extend(l.pending.drain(..).map(|c| c.id));
            self.out.dropped.extend(l.reads.drain(..).map(|r| r.id));
        }
    }

    fn set_promised(&mut self, ballot: Ballot) {
        if ballot > self.promised {
            self.promised = ballot;
            self.out.persist.promised = Some(ballot);
        }
    }

    // ----- Phase 2 -----

    fn accept_locally(&mut self, slot: Slot, ballot: Ballot, batch: Batch) {
        if slot <= self.compacted_through {
            return;
        }
        if let Some(existing) = self.log.get(&slot) {
            if existing.decided || slot <= self.commit {
                return; // a chosen value never changes
            }
        }
        self.out.persist.entries.push((slot, ballot, batch.clone()));
        self.log.insert(
            slot,
            LogEntry {
                ballot,
                batch,
                decided: false,
            },
        );
    }

    /// Moves queued commands into new slots while the pipeline has room.
    /// Called only from `ready`, so whatever arrived since the last one
    /// (including while the window was full) leaves together.
    fn flush_proposals(&mut self) {
        let id = self.config.id;
        loop {
            let Role::Leader(l) = &mut self.role else {
                return;
            };
            if l.pending.is_empty()
                || l.inflight.len() >= self.config.pipeline_window_slots
                || l.inflight_bytes >= self.config.pipeline_window_bytes_max
            {
                return;
            }
            let mut commands = Vec::new();
            let mut bytes = 0;
            while let Some(cmd) = l.pending.front() {
                let size = cmd.data.len() + 16;
                if !commands.is_empty()
                    && (commands.len() >= self.config.batch_commands_max
                        || bytes + size > self.config.batch_bytes_max)
                {
                    break;
                }
                bytes += size;
                commands.extend(l.pending.pop_front());
            }
            let slot = l.next_slot;
            l.next_slot += 1;
            let ballot = l.ballot;
            l.inflight_bytes += bytes;
            l.inflight.insert(
                slot,
                InFlight {
                    acks: 1 << id,
                    sent_tick: self.now_tick,
                    bytes,
                },
            );
            let batch = Batch { commands };
            self.stats.slots_proposed += 1;
            self.accept_locally(slot, ballot, batch.clone());
            self.broadcast_accept(vec![(slot, batch)]);
            self.try_decide(slot);
        }
    }

    fn broadcast_accept(&mut self, entries: Vec<(Slot, Batch)>) {
        for peer in 0..self.config.peers {
            if peer != self.config.id {
                self.send_accepts(peer, entries.clone());
            }
        }
    }

    /// Sends `entries` in as many Accepts as `catchup_bytes_max` needs (a
    /// takeover or a resend may hold a whole window), so no message grows
    /// past what a peer's decoder takes.
    fn send_accepts(&mut self, peer: NodeId, entries: Vec<(Slot, Batch)>) {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for (slot, batch) in entries {
            let size = batch.size_bytes();
            if !chunk.is_empty() && bytes + size > self.config.catchup_bytes_max {
                self.send_accept(peer, std::mem::take(&mut chunk));
                bytes = 0;
            }
            bytes += size;
            chunk.push((slot, batch));
        }
        self.send_accept(peer, chunk);
    }

    fn send_accept(&mut self, peer: NodeId, entries: Vec<(Slot, Batch)>) {
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        l.sent_tick[peer as usize] = self.now_tick;
        l.commit_sent[peer as usize] = self.commit;
        l.read_round_sent[peer as usize] = l.read_round;
        // A leader's Accept leaves before its own sync (see `Ready::messages`).
        self.out.messages.push((
            peer,
            Message::Accept {
                ballot: l.ballot,
                entries,
                commit: self.commit,
                min_done: self.min_done,
                read_round: l.read_round,
            },
        ));
    }

    fn on_accept(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<(Slot, Batch)>,
        commit: Slot,
        min_done: Slot,
        read_round: u64,
    ) {
        if ballot < self.promised {
            self.send(
                from,
                Message::Nack {
                    promised: self.promised,
                },
            );
            return;
        }
        if ballot > self.promised || !matches!(self.role, Role::Follower { .. }) {
            self.step_down(Some(from));
        }
        self.set_promised(ballot);
        self.role = Role::Follower { leader: Some(from) };
        self.leader_heard_tick = Some(self.now_tick);
        self.reset_election_deadline();
        let mut slots = Vec::with_capacity(entries.len());
        for (slot, batch) in entries {
            self.accept_locally(slot, ballot, batch);
            slots.push(slot);
        }
        let incarnations = self.wire_incarnations();
        self.send(
            from,
            Message::Accepted {
                ballot,
                slots,
                done: self.snapshot_index(),
                read_round,
                incarnations,
            },
        );
        // Commit what we hold from this very ballot; anything else must be fetched.
        while self.commit < commit {
            let next = self.commit + 1;
            match self.log.get_mut(&next) {
                Some(e) if e.decided || e.ballot == ballot => {
                    e.decided = true;
                    self.commit = next;
                }
                _ => break,
            }
        }
        self.note_commit();
        if self.commit < commit {
            self.request_catchup(from);
        }
        if min_done > self.min_done {
            self.min_done = min_done;
            self.truncate_log();
        }
    }

    fn on_accepted(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        slots: Vec<Slot>,
        done: Slot,
        read_round: u64,
    ) {
        let now = self.now_tick;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if ballot != l.ballot {
            return;
        }
        l.heard_tick[from as usize] = now;
        let acked = &mut l.read_round_acked[from as usize];
        *acked = (*acked).max(read_round.min(l.read_round));
        l.done[from as usize] = done;
        let group_done = l.done.iter().copied().min().unwrap_or(0);
        for slot in &slots {
            if let Some(f) = l.inflight.get_mut(slot) {
                f.acks |= 1 << from;
            }
        }
        for slot in slots {
            self.try_decide(slot);
        }
        if group_done > self.min_done {
            self.min_done = group_done;
            self.truncate_log();
        }
        self.release_reads();
    }

    // ----- Linearizable reads (ReadIndex) -----

    /// Begins a new round if a read is waiting for one not yet begun.
    fn begin_read_round(&mut self) {
        if let Role::Leader(l) = &mut self.role {
            if l.reads.back().is_some_and(|r| r.round > l.read_round) {
                l.read_round += 1;
            }
        }
    }

    /// Sends the current round to every replica that has not had it: a
    /// heartbeat, unless new slots already carried it.
    fn send_read_round(&mut self) {
        for peer in 0..self.config.peers {
            let behind = matches!(&self.role, Role::Leader(l)
                if l.read_round_sent[peer as usize] < l.read_round);
            if peer != self.config.id && behind {
                self.send_accept(peer, Vec::new());
            }
        }
    }

    /// Hands out the reads whose round a majority (this leader included)
    /// has echoed.
    fn release_reads(&mut self) {
        let quorum = self.config.quorum();
        let me = self.config.id as usize;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        // A read's round is confirmed once a majority, counting this
        // leader if it has begun the round, has echoed it or a later one.
        // Rounds only grow along the queue, so stop at the first unconfirmed.
        while let Some(read) = l.reads.front() {
            let echoed = (l.read_round_acked.iter().enumerate())
                .filter(|&(peer, &acked)| {
                    let round = if peer == me { l.read_round } else { acked };
                    round >= read.round
                })
                .count();
            if echoed < quorum {
                break;
            }
            if let Some(r) = l.reads.pop_front() {
                self.out.reads.push((r.id, r.index));
            }
        }
    }

    fn try_decide_all(&mut self) {
        let slots: Vec<Slot> = match &self.role {
            Role::Leader(l) => l.inflight.keys().copied().collect(),
            _ => return,
        };
        for slot in slots {
            self.try_decide(slot);
        }
    }

    fn try_decide(&mut self, slot: Slot) {
        let quorum = self.config.quorum();
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let Some(f) = l.inflight.get(&slot) else {
            return;
        };
        if (f.acks.count_ones() as usize) < quorum {
            return;
        }
        if let Some(f) = l.inflight.remove(&slot) {
            l.inflight_bytes -= f.bytes;
        }
        if let Some(e) = self.log.get_mut(&slot) {
            e.decided = true;
        }
        while self.log.get(&(self.commit + 1)).is_some_and(|e| e.decided) {
            self.commit += 1;
        }
        self.note_commit();
    }

    /// Records a newer commit index (lets a restart re-apply at once). Only
    /// when it moved: a heartbeat that brings no news writes nothing.
    fn note_commit(&mut self) {
        if self.commit > self.commit_noted {
            self.out.persist.commit = Some(self.commit);
            self.commit_noted = self.commit;
        }
    }

    fn leader_tick(&mut self) {
        let now = self.now_tick;
        let quorum = self.config.quorum();
        let me = self.config.id as usize;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        // Step aside when a majority has been silent for a whole election
        // timeout: we are probably cut off, and clients should go elsewhere.
        let heard = l
            .heard_tick
            .iter()
            .enumerate()
            .filter(|(i, t)| *i == me || now - **t <= self.config.election_timeout_max_ticks)
            .count();
        if heard < quorum {
            tracing::debug!(
                id = self.config.id,
                "leader lost contact with a majority; stepping down"
            );
            self.step_down(None);
            self.reset_election_deadline();
            return;
        }
        // Resend what a follower has not acknowledged, in one message per follower.
        let retry = self.config.retry_interval_ticks;
        let mut resend: Vec<Vec<(Slot, Batch)>> = vec![Vec::new(); self.config.peers as usize];
        for (slot, f) in l.inflight.iter_mut() {
            if now - f.sent_tick < retry {
                continue;
            }
            f.sent_tick = now;
            let Some(entry) = self.log.get(slot) else {
                continue;
            };
            for (peer, entries) in resend.iter_mut().enumerate() {
                if peer != me && f.acks & (1 << peer) == 0 {
                    entries.push((*slot, entry.batch.clone()));
                }
            }
        }
        let heartbeat = self.config.heartbeat_interval_ticks;
        for (peer, entries) in resend.into_iter().enumerate() {
            if peer == me {
                continue;
            }
            let Role::Leader(l) = &self.role else { return };
            let idle = now - l.sent_tick[peer] >= heartbeat;
            let news = l.commit_sent[peer] < self.commit;
            if !entries.is_empty() || idle || news {
                self.send_accepts(peer as NodeId, entries);
            }
        }
    }

    // ----- Catch-up and compaction -----

    fn request_catchup(&mut self, from: NodeId) {
        if self
            .catchup_sent_tick
            .is_some_and(|t| self.now_tick - t < self.config.retry_interval_ticks)
        {
            return;
        }
        self.catchup_sent_tick = Some(self.now_tick);
        self.stats.catchup_requests_sent += 1;
        self.send(
            from,
            Message::CatchUpRequest {
                from_slot: self.commit + 1,
            },
        );
    }

    fn on_catchup_request(&mut self, from: NodeId, from_slot: Slot) {
        if from_slot > self.commit {
            return; // nothing decided to offer
        }
        let snapshot = if from_slot <= self.compacted_through {
            self.snapshot.clone()
        } else {
            None
        };
        let start = snapshot.as_ref().map_or(from_slot, |s| s.index + 1);
        let mut entries: Vec<(Slot, Batch)> = Vec::new();
        let mut bytes = 0;
        if start <= self.commit {
            for (slot, e) in self.log.range(start..=self.commit) {
                if entries.len() >= self.config.catchup_entries_max
                    || (!entries.is_empty()
                        && bytes + e.batch.size_bytes() > self.config.catchup_bytes_max)
                {
                    break; // the requester asks again for the rest
                }
                bytes += e.batch.size_bytes();
                entries.push((*slot, e.batch.clone()));
            }
        }
        self.send(
            from,
            Message::CatchUpReply {
                snapshot,
                entries,
                commit: self.commit,
            },
        );
    }

    fn on_catchup_reply(
        &mut self,
        from: NodeId,
        snapshot: Option<Snapshot>,
        entries: Vec<(Slot, Batch)>,
        commit: Slot,
    ) {
        self.catchup_sent_tick = None;
        if self.is_leader() {
            // A leader has re-proposed every slot above its commit index in
            // its own ballot, so it never needs catch-up, and it must not
            // learn decisions this way: followers commit the slots they
            // hold in the leader's ballot once its commit index covers
            // them, which is sound only if that index came from a majority
            // in this ballot. A decision learned here that differs from its
            // own proposal (or a snapshot over slots it proposed) means a
            // higher ballot chose it: this leader is deposed and will hear
            // so. (Taking it once let a follower apply the deposed leader's
            // value: `scenarios::deposed_leader_learning_*`.)
            return;
        }
        if let Some(snapshot) = snapshot {
            if snapshot.index > self.commit {
                self.install_snapshot(snapshot);
            }
        }
        for (slot, batch) in entries {
            if slot <= self.compacted_through {
                continue;
            }
            let known = self.log.get(&slot).is_some_and(|e| e.decided);
            if !known {
                // A decided value may be recorded under any ballot: every
                // later proposal for this slot carries the same value.
                let ballot = self.log.get(&slot).map_or(Ballot::default(), |e| e.ballot);
                self.out.persist.entries.push((slot, ballot, batch.clone()));
                self.log.insert(
                    slot,
                    LogEntry {
                        ballot,
                        batch,
                        decided: true,
                    },
                );
            }
        }
        while self.log.get(&(self.commit + 1)).is_some_and(|e| e.decided) {
            self.commit += 1;
        }
        self.note_commit();
        if self.commit < commit {
            self.request_catchup(from);
        }
    }

    // ----- Recovery from blank storage -----

    fn send_recover_requests(&mut self) {
        let now = self.now_tick;
        let Role::Recovering(r) = &mut self.role else {
            return;
        };
        r.sent_tick = now;
        let incarnation = self.incarnations[self.config.id as usize];
        for peer in 0..self.config.peers {
            // Ask again whoever has not answered as initialised: a blank
            // peer may have started since. An answer in pages goes on from
            // the page it has reached.
            if peer != self.config.id && !r.replies.get(&peer).is_some_and(Option::is_some) {
                let from_slot = r.partial.get(&peer).map_or(0, |(_, next)| *next);
                self.out.messages.push((
                    peer,
                    Message::RecoverRequest {
                        incarnation,
                        from_slot,
                    },
                ));
            }
        }
    }

    fn on_recover_request(&mut self, from: NodeId, incarnation: Incarnation, from_slot: Slot) {
        // Recorded durably before the reply leaves (it reports acceptor
        // state, so it waits for the sync): from now on this replica never
        // counts a vote of `from`'s older incarnations, and says so in its
        // own votes. That is what the recovery argument needs.
        self.learn_incarnation(from, incarnation);
        // A page of the log, bounded as a catch-up reply is; the snapshot
        // too if the page starts at or below it (the first always does).
        let snapshot = (from_slot <= self.compacted_through)
            .then(|| self.snapshot.clone())
            .flatten();
        let start = from_slot.max(self.compacted_through + 1);
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for (slot, e) in self.log.range(start..) {
            let size = e.batch.size_bytes();
            if !entries.is_empty()
                && (entries.len() >= self.config.catchup_entries_max
                    || bytes + size > self.config.catchup_bytes_max)
            {
                more = true;
                break;
            }
            bytes += size;
            entries.push((*slot, e.ballot, e.batch.clone()));
        }
        let incarnations = self.wire_incarnations();
        self.send(
            from,
            Message::RecoverReply {
                initialized: true,
                promised: self.promised,
                entries,
                commit: self.commit,
                snapshot,
                incarnations,
                more,
            },
        );
    }

    // ----- Incarnations -----

    /// What this replica knows of every member's incarnation, for a message.
    fn wire_incarnations(&self) -> Incarnations {
        let len = (self.incarnations.iter())
            .rposition(|i| *i != 0)
            .map_or(0, |last| last + 1);
        self.incarnations[..len].to_vec()
    }

    /// Folds in what a peer reports. Returns false if the report's own
    /// sender speaks from an incarnation older than one known here.
    fn learn_incarnations(&mut self, from: NodeId, known: &[Incarnation]) -> bool {
        let me = self.config.id as usize;
        let peers = self.config.peers as usize;
        for (peer, incarnation) in known.iter().copied().enumerate().take(peers) {
            if peer != me {
                self.learn_incarnation(peer as NodeId, incarnation);
            }
        }
        let sender = known.get(from as usize).copied().unwrap_or(0);
        sender >= self.incarnations[from as usize]
    }

    /// Records that `peer` has reached `incarnation`. Votes counted from its
    /// older incarnations are forgotten: they may contradict the new one's.
    fn learn_incarnation(&mut self, peer: NodeId, incarnation: Incarnation) {
        let known = &mut self.incarnations[peer as usize];
        if incarnation <= *known || peer == self.config.id {
            return;
        }
        *known = incarnation;
        match &mut self.role {
            Role::Recovering(r) => {
                r.replies.remove(&peer);
                r.partial.remove(&peer);
            }
            Role::Candidate(c) => {
                c.promises.remove(&peer);
            }
            Role::Leader(l) => {
                let others = !(1u64 << peer);
                for f in l.inflight.values_mut() {
                    f.acks &= others;
                }
                l.read_round_acked[peer as usize] = 0;
                l.done[peer as usize] = 0;
            }
            Role::PreCandidate(p) => {
                // Not binding, but a quorum of them should be current too.
                p.grants &= !(1u64 << peer);
            }
            Role::Follower { .. } => {}
        }
        // A recovering replica has nothing on disk yet: it writes what it
        // knows when it adopts.
        if !matches!(self.role, Role::Recovering(_)) {
            self.out.persist.incarnations = Some(self.incarnations.clone());
        }
    }

    /// A recovery answer also tells what the peer knows of this replica.
    /// Returns false if the answer must not count: it is to an older
    /// request (the peer may not have recorded the current incarnation), or
    /// the peer knows a later incarnation than ours, so this replica takes
    /// the next one and asks everyone again.
    fn check_own_incarnation(&mut self, reported: Incarnation) -> bool {
        if !matches!(self.role, Role::Recovering(_)) {
            return true;
        }
        let me = self.config.id as usize;
        let mine = self.incarnations[me];
        if reported > mine {
            self.incarnations[me] = reported + 1;
            if let Role::Recovering(r) = &mut self.role {
                r.replies.clear();
                r.partial.clear();
            }
            self.send_recover_requests();
            return false;
        }
        reported == mine
    }

    fn on_recover_reply(&mut self, from: NodeId, page: Option<PeerState>, more: bool) {
        let peers = self.config.peers as usize;
        let Role::Recovering(r) = &mut self.role else {
            return;
        };
        if r.replies.get(&from).is_some_and(Option::is_some) {
            return; // its whole answer is in: a late duplicate page
        }
        let state = match page {
            None => {
                r.partial.remove(&from);
                None
            }
            Some(page) => {
                let last = page.entries.keys().next_back().copied();
                let (mut state, next) = r.partial.remove(&from).unwrap_or_default();
                state.merge(page);
                if more {
                    // Ask for the next page at once.
                    let next = last.map_or(next, |slot| next.max(slot + 1));
                    r.partial.insert(from, (state, next));
                    let incarnation = self.incarnations[self.config.id as usize];
                    self.out.messages.push((
                        from,
                        Message::RecoverRequest {
                            incarnation,
                            from_slot: next,
                        },
                    ));
                    return;
                }
                Some(state)
            }
        };
        r.replies.insert(from, state);
        let initialized: Vec<PeerState> = r.replies.values().flatten().cloned().collect();
        let nothing_accepted = initialized
            .iter()
            .all(|p| p.entries.is_empty() && p.snapshot.is_none());
        if initialized.len() > peers / 2 {
            self.adopt(initialized);
        } else if r.replies.len() == peers - 1 && nothing_accepted {
            // No other replica has ever accepted anything, so no value was
            // ever chosen: a new group (or one that has lost a majority of
            // its disks, which nothing can repair). Start from the promises.
            self.adopt(initialized);
        }
    }

    /// Becomes a voter holding everything the answering peers hold.
    fn adopt(&mut self, peers: Vec<PeerState>) {
        let promised = peers.iter().map(|p| p.promised).max().unwrap_or_default();
        let snapshot = peers
            .iter()
            .filter_map(|p| p.snapshot.clone())
            .max_by_key(|s| s.index);
        let floor = snapshot.as_ref().map_or(0, |s| s.index);
        // For each slot, a value some peer knows decided, else the one
        // accepted in the highest ballot.
        let mut best: BTreeMap<Slot, (bool, Ballot, Batch)> = BTreeMap::new();
        for peer in peers {
            for (slot, (ballot, batch)) in peer.entries {
                let rank = (slot <= peer.commit, ballot);
                if slot > floor && best.get(&slot).is_none_or(|(d, b, _)| rank > (*d, *b)) {
                    best.insert(slot, (rank.0, ballot, batch));
                }
            }
        }
        self.role = Role::Follower { leader: None };
        self.max_round_seen = self.max_round_seen.max(promised.round);
        self.set_promised(promised);
        if let Some(snapshot) = snapshot {
            self.install_snapshot(snapshot);
        }
        for (slot, (_, ballot, batch)) in best {
            self.accept_locally(slot, ballot, batch);
        }
        self.out.persist.initialized = true;
        self.out.persist.incarnations = Some(self.incarnations.clone());
        self.stats.recoveries += 1;
        self.reset_election_deadline();
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) {
        let index = snapshot.index;
        // A leader's commit index must come from its own majorities (see
        // `on_catchup_reply`); this also means no proposal of a leader is
        // ever swallowed by a snapshot without an answer.
        debug_assert!(!self.is_leader(), "a leader installs no snapshot");
        self.log = self.log.split_off(&(index + 1));
        self.compacted_through = index;
        self.commit = index;
        self.applied = index;
        self.stats.snapshots_installed += 1;
        self.out.persist.snapshot = Some(snapshot.clone());
        self.out.persist.truncate_through = Some(index);
        self.out.persist.entries.retain(|(s, _, _)| *s > index);
        // Committed entries not yet handed out are superseded by the snapshot.
        self.out.committed.clear();
        self.out.snapshot = Some(snapshot.clone());
        self.snapshot = Some(snapshot);
        self.note_commit();
    }

    /// Forgets log entries every replica has snapshotted, or, past the
    /// retention limit, everything this replica's snapshot covers.
    fn truncate_log(&mut self) {
        let done = self.snapshot_index();
        let through = self
            .min_done
            .min(done)
            .max(done.saturating_sub(self.config.log_retain_slots_max));
        if through <= self.compacted_through {
            return;
        }
        self.log = self.log.split_off(&(through + 1));
        self.compacted_through = through;
        self.out.persist.truncate_through = Some(through);
        self.out.persist.entries.retain(|(s, _, _)| *s > through);
    }
}
