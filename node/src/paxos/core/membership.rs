//! Membership changes: stop signs and epochs (see [`Membership`]).
//!
//! A change is proposed by the leader as a stop sign in the next slot.
//! Once every slot through it is decided, each replica *enters* the next
//! epoch: it forgets what it accepted after the stop sign, raises its
//! promise to the new epoch's floor (so it refuses every ballot of the old
//! one), and, if it votes, stands or waits for the new voters' leader.
//! Nothing after a decided stop sign is decided in its epoch: a leader
//! takes over at most through a stop sign it finds, and one that proposed
//! a stop sign proposes nothing after it; a leader of a higher ballot that
//! did not see the stop sign cannot have it decided before it either
//! (Paxos: a value chosen in ballot b is what every higher ballot proposes).
//!
//! A replica that hears of a later epoch than its own (a ballot, a refusal)
//! has missed a stop sign: it asks the sender for the decided slots, which
//! hold it, and enters the epochs in order as it commits them. That is also
//! how a new member learns it is one, and a removed one that it is not.

use super::*;
use crate::paxos::types::{ids, Member};

/// A membership change, as asked of the leader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// Who votes after the change.
    pub voters: Members,
    /// Who receives the log without voting after the change.
    pub learners: Members,
    /// Each replica new to the group, or a new life of one (it started
    /// again from a blank disk): the incarnation it runs as, and its
    /// address. Every member without a record needs one.
    pub joiners: BTreeMap<NodeId, Member>,
    /// Addresses of members the group has no record of yet (a group
    /// started from a peer list, at its first change).
    pub addresses: BTreeMap<NodeId, String>,
    /// The epoch the change was computed from, if it was: refused if the
    /// membership has changed since (two changes computed from one
    /// membership would otherwise undo each other's).
    pub expected_epoch: Option<u64>,
}

/// Why a membership change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("a membership change is already in progress (its stop sign is at slot {slot})")]
    InProgress { slot: Slot },
    #[error("a group needs at least one voter")]
    NoVoters,
    #[error("replica {id} cannot be both a voter and a learner")]
    VoterAndLearner { id: NodeId },
    #[error("the membership is already that")]
    Unchanged,
    #[error("the change was computed from epoch {expected}, but the group is in epoch {current}: compute it again")]
    EpochChanged { expected: u64, current: u64 },
    #[error("replica {id} has not answered this leader yet, so the life of its storage to record is not known: retry once it has")]
    NotHeardFrom { id: NodeId },
    #[error("replica {id} is new to the group: its incarnation and address are needed")]
    UnknownIdentity { id: NodeId },
    #[error("replica {id} votes as another life of its storage: remove it first, then add the new one as a learner")]
    VoterReplaced { id: NodeId },
    #[error("replica {id} is not a learner of the group: add it as a learner first, and promote it once it has caught up")]
    NotALearner { id: NodeId },
    #[error(
        "learner {id} is {behind} slots behind the leader (at most {allowed} to become a voter)"
    )]
    LearnerBehind {
        id: NodeId,
        behind: u64,
        allowed: u64,
    },
    #[error("only {up} of the {voters} voters after the change are up, and it needs {needed}")]
    NoQuorumUp {
        up: usize,
        voters: usize,
        needed: usize,
    },
}

impl Paxos {
    /// Whether `id` votes in the current epoch. For this replica, also that
    /// its storage is the life the membership records: one started again
    /// from a blank disk is a new replica until a change adds it. (A peer's
    /// votes are checked against the record as they arrive, in `step`.)
    pub(super) fn is_voter(&self, id: NodeId) -> bool {
        self.membership().is_voter(id) && (id != self.config.id || self.is_recorded_self())
    }

    /// Whether this replica is a member (voter or learner) of the current
    /// epoch, as the life of its storage the membership records.
    pub(super) fn is_member_self(&self) -> bool {
        self.membership().is_member(self.config.id) && self.is_recorded_self()
    }

    fn is_recorded_self(&self) -> bool {
        let me = self.config.id;
        self.membership()
            .is_recorded(me, self.incarnations[me as usize])
    }

    /// Votes that decide in the current epoch.
    pub(super) fn quorum(&self) -> usize {
        self.membership().quorum()
    }

    /// Makes room for `id` in the incarnations known.
    pub(super) fn cover_incarnations(&mut self, id: NodeId) {
        let len = id as usize + 1;
        if self.incarnations.len() < len {
            self.incarnations.resize(len, 0);
        }
    }

    /// The epoch a message speaks for, if it carries a ballot.
    fn message_epoch(msg: &Message) -> Option<u64> {
        match msg {
            Message::PreVote { ballot } => Some(ballot.epoch()),
            Message::PreVoteReply {
                ballot, promised, ..
            } => Some(ballot.epoch().max(promised.epoch())),
            other => other.ballot().map(|b| b.epoch()),
        }
    }

    /// False if `msg` is of a later epoch than this replica's: it missed a
    /// stop sign, and asks `from` (which has it) for the decided slots.
    pub(super) fn check_epoch(&mut self, from: NodeId, msg: &Message) -> bool {
        let Some(epoch) = Self::message_epoch(msg) else {
            return true;
        };
        if epoch <= self.membership().epoch {
            return true;
        }
        match self.role {
            Role::Recovering(_) => {}
            Role::Leader(_) | Role::Candidate(_) | Role::PreCandidate(_) => {
                // Its epoch is over (a later one exists only once its stop
                // sign is decided): it stops taking proposals now, rather
                // than when it misses its followers' answers, and learns
                // the stop sign as a follower.
                self.step_down(None);
                self.request_catchup(from);
            }
            Role::Follower { .. } => self.request_catchup(from),
        }
        false
    }

    /// The stop sign `next` was decided at `slot`, and every slot before
    /// it: the epoch ends here.
    pub(super) fn on_stop_sign_decided(&mut self, slot: Slot, next: Membership) {
        let current = self.membership();
        if next.epoch != current.epoch + 1 || next.first_slot != slot + 1 {
            // Entering an epoch forgets what its predecessor accepted
            // after the stop sign, so no stale stop sign is ever decided.
            debug_assert!(
                false,
                "a stop sign for epoch {} at slot {slot} decided in epoch {}",
                next.epoch, current.epoch
            );
            return;
        }
        self.enter_epoch(next);
    }

    /// Leaves the current epoch for `next`, whose first slot follows the
    /// commit index.
    pub(super) fn enter_epoch(&mut self, next: Membership) {
        debug_assert_eq!(
            next.first_slot,
            self.commit + 1,
            "an epoch starts after the commit index"
        );
        debug_assert!(next.epoch > self.membership().epoch, "epochs only grow");
        let me = self.config.id;
        let was_leader = self.is_leader();
        tracing::info!(
            replica = me,
            epoch = next.epoch,
            first_slot = next.first_slot,
            voters = ?ids(next.voters).collect::<Vec<_>>(),
            learners = ?ids(next.learners).collect::<Vec<_>>(),
            "entering a new membership"
        );
        let previous = self.membership().clone();
        self.step_down(None);
        // Accepted in the old epoch after its stop sign: never decided.
        drop(self.log.split_off(&next.first_slot));
        if was_leader {
            // Nobody else may hear that the stop sign is decided: the
            // members of both epochs are told here (a learner never stands,
            // and a new voter that missed it would wait for this one).
            let stop = next.first_slot - 1;
            let entries: Vec<(Slot, Batch)> = (self.log.get(&stop))
                .map(|e| (stop, e.batch.clone()))
                .into_iter()
                .collect();
            for peer in ids(previous.voters | previous.learners | next.voters | next.learners) {
                if peer != me {
                    // After the sync: a lone voter's decision is only as
                    // durable as its own writes.
                    self.out.persisted_messages.push((
                        peer,
                        Message::CatchUpReply {
                            snapshot: None,
                            entries: entries.clone(),
                            commit: stop,
                            memberships: Vec::new(),
                        },
                    ));
                }
            }
        }
        self.memberships.push(next.clone());
        self.prune_memberships();
        self.begin_epoch();
        if next.is_member(me) && !self.is_recorded_self() {
            tracing::warn!(
                replica = me,
                incarnation = self.incarnations[me as usize],
                recorded = ?next.members.get(&me).map(|m| m.incarnation),
                "the group's membership records another life of this replica (its storage \
                 was lost and started again): it takes no part until a change adds it anew"
            );
        }
        // The new epoch has no leader yet: the old leader, if it still
        // votes, stands at once rather than after a timeout.
        if self.is_voter(me) && (was_leader || next.voters == 1 << me) {
            self.start_election();
        }
    }

    /// Starts this (blank) replica as a new member, under its current
    /// incarnation: it knows of no epoch that counts it, not even the
    /// group's first (whose members are ids, not lives: under a replaced
    /// member's id it would otherwise vote blank), and waits to hear its
    /// membership from a peer.
    pub(super) fn start_as_joiner(&mut self) {
        self.memberships = vec![Membership {
            voters: 0,
            ..Membership::initial(self.config.peers)
        }];
        self.role = Role::Follower { leader: None };
        self.out.persist.initialized = true;
        self.out.persist.incarnations = Some(self.incarnations.clone());
        self.out.persist.memberships = Some(self.memberships.clone());
        self.reset_election_deadline();
    }

    /// Takes the membership a snapshot at `index` was taken in, from the
    /// memberships its sender sent along (from the one at its own snapshot
    /// on), if it is later than this replica's.
    pub(super) fn adopt_snapshot_membership(&mut self, index: Slot, memberships: &[Membership]) {
        let Some(at_index) = memberships.iter().rev().find(|m| m.first_slot <= index + 1) else {
            return;
        };
        if at_index.epoch <= self.membership().epoch {
            return;
        }
        let epoch = at_index.epoch;
        self.memberships = vec![at_index.clone()];
        self.step_down(None);
        // What older epochs accepted in this one's slots (all above the
        // snapshot, which cut the log there) is never decided.
        self.log
            .retain(|_, e| e.decided || e.ballot.epoch() >= epoch);
        self.begin_epoch();
    }

    /// What entering the membership now last in `memberships` takes, by a
    /// stop sign or a snapshot: room for its members' incarnations, the
    /// memberships durable with a promise at the epoch's floor (so every
    /// ballot of an earlier epoch is refused), and the news for the driver.
    fn begin_epoch(&mut self) {
        let current = self.membership().clone();
        for id in current.members() {
            self.cover_incarnations(id);
        }
        self.out.persist.memberships = Some(self.memberships.clone());
        let floor = Ballot::floor_of_epoch(current.epoch);
        self.max_round_seen = self.max_round_seen.max(floor.round);
        self.set_promised(floor);
        self.catchup_sent_tick = None;
        self.out.membership = Some(current);
        self.reset_election_deadline();
    }

    /// Forgets the memberships that ended at or before the snapshot (the
    /// one in force at it stays). Called where the log is truncated.
    pub(super) fn prune_memberships(&mut self) {
        let mut pruned = false;
        while self.memberships.len() >= 2
            && self.memberships[1].first_slot <= self.compacted_through + 1
        {
            self.memberships.remove(0);
            pruned = true;
        }
        if pruned {
            self.out.persist.memberships = Some(self.memberships.clone());
        }
    }

    /// A learner that hears no leader asks one voter (drawn at random)
    /// for the decided slots.
    pub(super) fn ask_a_voter_to_catch_up(&mut self) {
        let voters: Vec<NodeId> = self.membership().voter_ids().collect();
        if voters.is_empty() {
            return;
        }
        let pick = voters[(self.jitter.next() % voters.len() as u64) as usize];
        self.request_catchup(pick);
    }

    /// Proposes the membership `change` describes. Only the leader takes
    /// it, one change at a time; a new voter must be a learner that has
    /// caught up, and a majority of the new voters must be up. The change
    /// is decided as a stop sign in the next slot; commands queued behind
    /// it are dropped when the epoch ends, for their clients to retry with
    /// the new epoch's leader. Returns the membership proposed.
    pub fn propose_membership(
        &mut self,
        change: MembershipChange,
    ) -> Result<Membership, MembershipError> {
        let MembershipChange {
            voters,
            learners,
            joiners,
            addresses,
            expected_epoch,
        } = change;
        let current = self.membership().clone();
        if let Some(expected) = expected_epoch.filter(|e| *e != current.epoch) {
            return Err(MembershipError::EpochChanged {
                expected,
                current: current.epoch,
            });
        }
        let me = self.config.id;
        let own_incarnation = self.incarnation();
        let now = self.now_tick;
        let commit = self.commit;
        let heard_within = self.config.election_timeout_max_ticks;
        let allowed = self.config.promote_lag_slots_max;
        let l = leading(&mut self.role).map_err(|e| match e {
            ProposeError::NotLeader { leader } => MembershipError::NotLeader { leader },
            ProposeError::Busy { .. } => MembershipError::NotLeader { leader: Some(me) },
        })?;
        // Each member's record: a joiner's as given; a continuing member's
        // as recorded, or (the first change of a group started from a
        // peer list) the incarnation it reported to this leader itself.
        let mut members = BTreeMap::new();
        for id in ids(voters | learners) {
            let first_record = |id: NodeId| {
                let incarnation = if id == me {
                    Some(own_incarnation)
                } else {
                    l.peers.get(&id).and_then(|p| p.incarnation)
                };
                incarnation.map(|incarnation| Member {
                    incarnation,
                    address: addresses.get(&id).cloned().unwrap_or_default(),
                })
            };
            let recorded = match current.members.get(&id) {
                Some(recorded) => Some(recorded.clone()),
                None if current.members.is_empty() && current.is_member(id) => {
                    match first_record(id) {
                        Some(record) => Some(record),
                        None => return Err(MembershipError::NotHeardFrom { id }),
                    }
                }
                None => None,
            };
            let member = match (joiners.get(&id), recorded) {
                (Some(joiner), Some(recorded)) if joiner.incarnation == recorded.incarnation => {
                    Member {
                        address: joiner.address.clone(),
                        ..recorded
                    }
                }
                (Some(joiner), recorded) => {
                    // A new life of the replica: it cannot go on voting
                    // as the old one, whose votes it does not hold.
                    if recorded.is_some() && current.is_voter(id) && voters & (1 << id) != 0 {
                        return Err(MembershipError::VoterReplaced { id });
                    }
                    if recorded.is_some() && voters & !current.voters & (1 << id) != 0 {
                        return Err(MembershipError::NotALearner { id });
                    }
                    joiner.clone()
                }
                (None, Some(recorded)) => recorded,
                (None, None) => return Err(MembershipError::UnknownIdentity { id }),
            };
            members.insert(id, member);
        }
        if let Some(slot) = l.stop_slot {
            return Err(MembershipError::InProgress { slot });
        }
        if voters == 0 {
            return Err(MembershipError::NoVoters);
        }
        if let Some(id) = ids(voters & learners).next() {
            return Err(MembershipError::VoterAndLearner { id });
        }
        if voters == current.voters
            && learners == current.learners
            && (current.members.is_empty() || members == current.members)
        {
            return Err(MembershipError::Unchanged);
        }
        for id in ids(voters & !current.voters) {
            if current.learners & (1 << id) == 0 {
                return Err(MembershipError::NotALearner { id });
            }
            let reported = l.peers.get(&id).map_or(0, |p| p.commit);
            let behind = commit.saturating_sub(reported);
            if behind > allowed {
                return Err(MembershipError::LearnerBehind {
                    id,
                    behind,
                    allowed,
                });
            }
        }
        let up = ids(voters)
            .filter(|id| {
                *id == me
                    || l.peers
                        .get(id)
                        .is_some_and(|p| now - p.heard_tick <= heard_within)
            })
            .count();
        let needed = voters.count_ones() as usize / 2 + 1;
        if up < needed {
            return Err(MembershipError::NoQuorumUp {
                up,
                voters: voters.count_ones() as usize,
                needed,
            });
        }
        let slot = l.next_slot;
        l.next_slot += 1;
        l.stop_slot = Some(slot);
        let next = Membership {
            epoch: current.epoch + 1,
            first_slot: slot + 1,
            voters,
            learners,
            members,
        };
        let batch = Batch::stop_sign(&next);
        let bytes = batch.size_bytes();
        l.inflight_bytes += bytes;
        l.inflight.insert(
            slot,
            InFlight {
                acks: 1 << me,
                sent_tick: now,
                bytes,
            },
        );
        let ballot = l.ballot;
        self.stats.slots_proposed += 1;
        self.accept_locally(slot, ballot, batch.clone());
        self.broadcast_accept(vec![(slot, batch)]);
        self.try_decide(slot);
        Ok(next)
    }
}
