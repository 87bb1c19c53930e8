//! Values and messages of the Multi-Paxos protocol.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Index of a replica within its group (its position in the peer list).
pub type NodeId = u32;

/// Which life of a replica's storage a vote comes from. A replica that
/// starts from blank storage (a lost disk) takes a new, higher incarnation,
/// and votes from an older one no longer count (see `Paxos` on recovery).
pub type Incarnation = u64;

/// What one replica knows of every member's incarnation, indexed by node id
/// (its own included). Trailing zeros are left off on the wire, so a group
/// that never lost a disk sends an empty list.
pub type Incarnations = Vec<Incarnation>;

/// Position in the replicated log. Slot 0 is never used: an index of 0 means "nothing".
pub type Slot = u64;

/// A proposal number. Ordered by round first, so a node can always out-bid
/// any ballot it has seen; the node id breaks ties so ballots are unique.
///
/// The round's high bits are the membership epoch it belongs to (see
/// [`Membership`]): every ballot of a later epoch out-ranks every ballot of
/// an earlier one, so an acceptor that has entered an epoch refuses the
/// ones before it. Epoch 0's rounds are the small numbers ballots always
/// had, so a log written before memberships existed reads as epoch 0.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Ballot {
    pub round: u64,
    pub node: NodeId,
}

/// Rounds of one epoch: epoch e's rounds are `e << EPOCH_SHIFT` and up.
pub const EPOCH_SHIFT: u32 = 40;

impl Ballot {
    pub fn new(round: u64, node: NodeId) -> Self {
        Ballot { round, node }
    }

    /// The membership epoch this ballot belongs to.
    pub fn epoch(&self) -> u64 {
        self.round >> EPOCH_SHIFT
    }

    /// Below every ballot a replica of `epoch` may stand with.
    pub fn floor_of_epoch(epoch: u64) -> Self {
        Ballot {
            round: epoch << EPOCH_SHIFT,
            node: 0,
        }
    }
}

/// Bit `id` set for each member: replica ids are below 64.
pub type Members = u64;

/// Replica ids are below this (they index the bits of [`Members`]).
pub const NODE_ID_LIMIT: NodeId = 64;

/// Who votes and who follows in one epoch of a group's log.
///
/// A membership change is a *stop sign* (Stoppable Paxos, as OmniPaxos
/// does it): a slot whose value names the next membership. Once it is
/// decided, and every slot before it, its epoch ends there: what the old
/// members accepted after it is never applied, and the slots after it are
/// decided by the new voters alone, in ballots of the next epoch. Each
/// epoch is then a Multi-Paxos instance of its own over a range of slots,
/// and agreement across a change needs no quorum intersection between the
/// old voters and the new: the stop sign is decided before anything of
/// the next epoch can be.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Membership {
    /// 0 for the group as first started; one more for each change.
    pub epoch: u64,
    /// The first slot decided in this epoch (the one after its stop sign).
    pub first_slot: Slot,
    /// Replicas whose votes count: a majority of them decides.
    pub voters: Members,
    /// Replicas that receive the log but do not vote (new members catching
    /// up, to be promoted by a later change).
    pub learners: Members,
    /// Who each member is and where it is reached, recorded by the change
    /// that made this membership (empty for the group as first started,
    /// whose members are its peer list). A member is one life of a
    /// replica's storage: a replica whose incarnation differs from its
    /// record (it started again from a blank disk) is not that member,
    /// neither voting nor counted, until a change records it anew.
    pub members: BTreeMap<NodeId, Member>,
}

/// One member's identity in a [`Membership`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The life of its storage that is the member (see [`Incarnation`]).
    pub incarnation: Incarnation,
    /// Where its peers and clients reach it (`host:port`), for the
    /// drivers: the core only carries it.
    pub address: String,
}

impl Membership {
    /// The group as first started: voters `0..replicas`, from slot 1.
    pub fn initial(replicas: u32) -> Self {
        debug_assert!((1..=NODE_ID_LIMIT).contains(&replicas));
        Membership {
            epoch: 0,
            first_slot: 1,
            voters: members_below(replicas),
            learners: 0,
            members: BTreeMap::new(),
        }
    }

    /// Whether `incarnation` is the life of replica `id` this membership
    /// means: the recorded one, or any if nothing is recorded (the group
    /// as first started).
    pub fn is_recorded(&self, id: NodeId, incarnation: Incarnation) -> bool {
        self.members.is_empty() || self.members.get(&id).map(|m| m.incarnation) == Some(incarnation)
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        id < NODE_ID_LIMIT && self.voters & (1 << id) != 0
    }

    pub fn is_member(&self, id: NodeId) -> bool {
        id < NODE_ID_LIMIT && (self.voters | self.learners) & (1 << id) != 0
    }

    /// Votes that make a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.count_ones() as usize / 2 + 1
    }

    /// Voters and learners, in id order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> {
        ids(self.voters | self.learners)
    }

    pub fn voter_ids(&self) -> impl Iterator<Item = NodeId> {
        ids(self.voters)
    }
}

/// The set of ids `0..n`.
pub fn members_below(n: u32) -> Members {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The ids in a set, in order.
pub fn ids(set: Members) -> impl Iterator<Item = NodeId> {
    (0..NODE_ID_LIMIT).filter(move |id| set & (1 << id) != 0)
}

/// The `origin` of a command the core itself proposes: a stop sign. No
/// replica has this id (ids are below [`NODE_ID_LIMIT`]), so no driver
/// mistakes it for one of its own proposals.
pub const STOP_SIGN_ORIGIN: NodeId = u32::MAX;

/// One client command inside a batch. `origin` and `id` let the proposing
/// replica recognise its own command when it is decided and wake the waiter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Command {
    pub origin: NodeId,
    pub id: u64,
    pub data: Bytes,
}

/// The value of one slot: a batch of commands. An empty batch is a no-op,
/// used by a new leader to fill holes left by its predecessors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Batch {
    pub commands: Vec<Command>,
}

impl Batch {
    pub fn noop() -> Self {
        Batch::default()
    }

    /// A slot value that ends the current epoch and starts `next` (see
    /// [`Membership`]). It is a batch of one command the core recognises
    /// by its origin, so logs and messages keep one format for values.
    pub fn stop_sign(next: &Membership) -> Self {
        let data = postcard::to_allocvec(next).unwrap_or_default();
        Batch {
            commands: vec![Command {
                origin: STOP_SIGN_ORIGIN,
                id: next.epoch,
                data: Bytes::from(data),
            }],
        }
    }

    /// The membership this value starts, if it is a stop sign.
    pub fn as_stop_sign(&self) -> Option<Membership> {
        match self.commands.as_slice() {
            [c] if c.origin == STOP_SIGN_ORIGIN => postcard::from_bytes(&c.data).ok(),
            _ => None,
        }
    }

    pub fn is_noop(&self) -> bool {
        self.commands.is_empty()
    }

    /// Payload bytes, used to bound batches and catch-up replies.
    pub fn size_bytes(&self) -> usize {
        self.commands.iter().map(|c| c.data.len() + 16).sum()
    }
}

/// Application state at a slot, taken by the state machine above the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every slot up to and including this one is reflected in `data`.
    pub index: Slot,
    pub data: Bytes,
}

/// An accepted value as reported in a promise.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PromisedEntry {
    pub slot: Slot,
    pub ballot: Ballot,
    pub batch: Batch,
    /// The reporter knows this value is chosen; the new leader takes it as is.
    pub decided: bool,
}

/// Everything replicas say to each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Message {
    /// "Would you promise this ballot if I stood?", asked before a real
    /// election (Raft's PreVote). It changes nothing at the receiver, so a
    /// replica that cannot win (cut off, or with a live leader everyone
    /// else hears) never raises the ballots of the others.
    PreVote { ballot: Ballot },
    /// The answer: granted when the receiver has promised nothing as high
    /// and hears no live leader. `promised` lets the asker out-bid it.
    PreVoteReply {
        ballot: Ballot,
        granted: bool,
        promised: Ballot,
    },
    /// Phase 1a for every slot from `from_slot` on: one per ballot, not per slot.
    Prepare { ballot: Ballot, from_slot: Slot },
    /// Phase 1b. `behind` means the candidate is too far behind this replica
    /// to lead (it must catch up first), so no entries are listed.
    /// `incarnations` is what the sender knows of every member's
    /// incarnation, its own included: a vote counts only from the newest.
    Promise {
        ballot: Ballot,
        entries: Vec<PromisedEntry>,
        commit: Slot,
        behind: bool,
        incarnations: Incarnations,
    },
    /// Phase 2a for some slots, carrying the leader's commit index and the
    /// group-wide low-water mark. With no entries it is the heartbeat.
    /// `read_round` is the leader's latest read-confirmation round.
    Accept {
        ballot: Ballot,
        entries: Vec<(Slot, Batch)>,
        commit: Slot,
        min_done: Slot,
        read_round: u64,
        /// The leader's knowledge of incarnations, so a member learns when
        /// a peer knows a later incarnation of it than its own (see
        /// `Paxos::check_own_incarnation`).
        incarnations: Incarnations,
    },
    /// Phase 2b, also the heartbeat reply: proves liveness and reports the
    /// sender's compaction point (`done`) for the low-water mark. It echoes
    /// the Accept's `read_round`: the sender still took this ballot after
    /// that round began, which is what a linearizable read waits for.
    /// `incarnations` as in `Promise`.
    Accepted {
        ballot: Ballot,
        slots: Vec<Slot>,
        done: Slot,
        read_round: u64,
        incarnations: Incarnations,
        /// The sender's commit index: how far a learner has caught up,
        /// before it may be promoted to a voter.
        commit: Slot,
    },
    /// A Prepare or Accept was refused because a higher ballot was promised.
    Nack { promised: Ballot },
    /// "Send me the decided values from this slot on."
    CatchUpRequest { from_slot: Slot },
    /// Decided values, preceded by a snapshot when the sender has forgotten
    /// the requested slots.
    CatchUpReply {
        snapshot: Option<Snapshot>,
        entries: Vec<(Slot, Batch)>,
        commit: Slot,
        /// The sender's memberships from the one in force at its snapshot
        /// on: a snapshot may cover stop signs the receiver never saw.
        memberships: Vec<Membership>,
    },
    /// From a replica that started with empty storage: "tell me what you
    /// hold as an acceptor, from this slot on, and remember that my
    /// incarnation is now this" (see `Paxos` on recovery). The answer comes
    /// in pages bounded in bytes; each asks for the next.
    RecoverRequest {
        incarnation: Incarnation,
        from_slot: Slot,
    },
    /// The sender's acceptor state; `initialized` false (and the state
    /// empty) if it is itself new or recovering. `incarnations` is what the
    /// sender knows, durably, once it has recorded the requester's.
    /// `snapshot` comes when the requested slot is at or below it; `more`
    /// says entries past these remain. `for_incarnation` and `from_slot`
    /// echo the request it answers: a page for an earlier request (an
    /// earlier attempt, or a page already taken) must not count.
    RecoverReply {
        for_incarnation: Incarnation,
        from_slot: Slot,
        initialized: bool,
        promised: Ballot,
        entries: Vec<(Slot, Ballot, Batch)>,
        commit: Slot,
        snapshot: Option<Snapshot>,
        incarnations: Incarnations,
        more: bool,
        /// As in `CatchUpReply`.
        memberships: Vec<Membership>,
    },
}

impl Message {
    /// The ballot a message speaks for, if any, so receivers learn of higher rounds.
    pub fn ballot(&self) -> Option<Ballot> {
        match self {
            Message::Prepare { ballot, .. }
            | Message::Promise { ballot, .. }
            | Message::Accept { ballot, .. }
            | Message::Accepted { ballot, .. } => Some(*ballot),
            Message::Nack { promised } => Some(*promised),
            // A pre-vote's ballot is only a question: nobody raises theirs for it.
            Message::PreVote { .. }
            | Message::PreVoteReply { .. }
            | Message::CatchUpRequest { .. }
            | Message::CatchUpReply { .. }
            | Message::RecoverRequest { .. }
            | Message::RecoverReply { .. } => None,
        }
    }

    /// True for messages that vouch for the sender's acceptor state: they
    /// may leave only once the `Ready` they came with is durable. The rest
    /// (a leader's Accepts, Prepares, catch-up) may go out first, so the
    /// followers' syncs overlap the sender's.
    pub fn reports_acceptor_state(&self) -> bool {
        matches!(
            self,
            Message::Promise { .. }
                | Message::Accepted { .. }
                | Message::Nack { .. }
                | Message::RecoverReply { .. }
        )
    }

    /// The sender's knowledge of incarnations, where a message carries it.
    pub fn incarnations(&self) -> Option<&[Incarnation]> {
        match self {
            Message::Promise { incarnations, .. }
            | Message::Accepted { incarnations, .. }
            | Message::RecoverReply { incarnations, .. }
            | Message::Accept { incarnations, .. } => Some(incarnations),
            _ => None,
        }
    }

    /// True for votes and acceptor state (promises, acceptances, recovery
    /// answers): they count only from their sender's newest incarnation.
    pub fn is_vote(&self) -> bool {
        matches!(
            self,
            Message::Promise { .. } | Message::Accepted { .. } | Message::RecoverReply { .. }
        )
    }

    /// Payload bytes it carries (log entries and snapshots), to bound
    /// bursts of input and messages by size as well as count.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Message::Promise { entries, .. } => entries.iter().map(|e| e.batch.size_bytes()).sum(),
            Message::Accept { entries, .. } => entries.iter().map(|(_, b)| b.size_bytes()).sum(),
            Message::CatchUpReply {
                snapshot, entries, ..
            } => {
                let entries: usize = entries.iter().map(|(_, b)| b.size_bytes()).sum();
                entries + snapshot.as_ref().map_or(0, |s| s.data.len())
            }
            Message::RecoverReply {
                snapshot, entries, ..
            } => {
                let entries: usize = entries.iter().map(|(_, _, b)| b.size_bytes()).sum();
                entries + snapshot.as_ref().map_or(0, |s| s.data.len())
            }
            _ => 0,
        }
    }

    /// A short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::PreVote { .. } => "prevote",
            Message::PreVoteReply { .. } => "prevote_reply",
            Message::Prepare { .. } => "prepare",
            Message::Promise { .. } => "promise",
            Message::Accept { entries, .. } if entries.is_empty() => "heartbeat",
            Message::Accept { .. } => "accept",
            Message::Accepted { .. } => "accepted",
            Message::Nack { .. } => "nack",
            Message::CatchUpRequest { .. } => "catchup_request",
            Message::CatchUpReply { .. } => "catchup_reply",
            Message::RecoverRequest { .. } => "recover_request",
            Message::RecoverReply { .. } => "recover_reply",
        }
    }
}
