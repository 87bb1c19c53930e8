//! Elections: pre-votes, Prepare and Promise, taking over as leader, stepping down.

use super::*;

impl Paxos {
    pub(super) fn reset_election_deadline(&mut self) {
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
    pub(super) fn campaign(&mut self) {
        if !self.is_voter(self.config.id) {
            // It stopped voting meanwhile (a change, or a later
            // incarnation of it that the membership does not record).
            self.step_down(None);
            self.reset_election_deadline();
            return;
        }
        if self.config.pre_vote && self.membership().voters.count_ones() > 1 {
            self.start_pre_vote();
        } else {
            self.start_election();
        }
    }

    pub(super) fn start_pre_vote(&mut self) {
        self.drop_leadership();
        let ballot = Ballot::new(
            self.max_round_seen.max(self.promised.round) + 1,
            self.config.id,
        );
        debug_assert_eq!(
            ballot.epoch(),
            self.membership().epoch,
            "a replica stands only in its own epoch"
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

    pub(super) fn send_pre_votes(&mut self) {
        let now = self.now_tick;
        let Role::PreCandidate(p) = &mut self.role else {
            return;
        };
        p.sent_tick = now;
        let (ballot, grants) = (p.ballot, p.grants);
        let voters = self.membership().voters;
        for peer in crate::paxos::types::ids(voters & !grants) {
            self.send(peer, Message::PreVote { ballot });
        }
    }

    /// With `check_quorum`: this replica leads, or follows a leader it has
    /// heard within the minimum election timeout.
    pub(super) fn hears_live_leader(&self) -> bool {
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

    pub(super) fn on_pre_vote(&mut self, from: NodeId, ballot: Ballot) {
        // Not binding, but a replica that does not vote does not say how
        // the voters would.
        let granted =
            ballot > self.promised && !self.hears_live_leader() && self.is_voter(self.config.id);
        self.send(
            from,
            Message::PreVoteReply {
                ballot,
                granted,
                promised: self.promised,
            },
        );
    }

    pub(super) fn on_pre_vote_reply(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        granted: bool,
        promised: Ballot,
    ) {
        // Out-bid whoever refused for a promise as high: the next try can win.
        self.max_round_seen = self.max_round_seen.max(promised.round);
        let quorum = self.quorum();
        let voters = self.membership().voters;
        let Role::PreCandidate(p) = &mut self.role else {
            return;
        };
        if ballot != p.ballot || !granted || voters & (1 << from) == 0 {
            return;
        }
        p.grants |= 1 << from;
        if (p.grants & voters).count_ones() as usize >= quorum {
            self.start_election();
        }
    }

    pub(super) fn start_election(&mut self) {
        self.drop_leadership();
        let ballot = Ballot::new(
            self.max_round_seen.max(self.promised.round) + 1,
            self.config.id,
        );
        debug_assert_eq!(
            ballot.epoch(),
            self.membership().epoch,
            "a replica stands only in its own epoch"
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

    pub(super) fn send_prepares(&mut self, all: bool) {
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        c.sent_tick = self.now_tick;
        let msg = Message::Prepare {
            ballot: c.ballot,
            from_slot: self.commit + 1,
        };
        let targets: Vec<NodeId> = (self.memberships.last().into_iter())
            .flat_map(|m| m.voter_ids())
            .filter(|p| *p != self.config.id && (all || !c.promises.contains_key(p)))
            .collect();
        for peer in targets {
            self.send(peer, msg.clone());
        }
    }

    /// True if the entries from `from_slot` through the commit index hold
    /// more than `limit` payload bytes (stops counting there).
    pub(super) fn decided_bytes_exceed(&self, from_slot: Slot, limit: usize) -> bool {
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

    pub(super) fn promised_entries(&self, from_slot: Slot) -> Vec<PromisedEntry> {
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

    pub(super) fn on_prepare(&mut self, from: NodeId, ballot: Ballot, from_slot: Slot) {
        if !self.is_voter(from) && ballot.epoch() == self.membership().epoch {
            // Only a voter stands; a replica of an older epoch is told of
            // this one by the refusal below.
            return;
        }
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
        if !self.is_voter(self.config.id) {
            // A learner, or a life of this replica the membership does not
            // record: its promise is no vote.
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

    pub(super) fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<PromisedEntry>,
        commit: Slot,
        behind: bool,
    ) {
        let voter = self.is_voter(from);
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        if ballot != c.ballot || !voter {
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

    pub(super) fn maybe_win(&mut self) {
        let Role::Candidate(c) = &self.role else {
            return;
        };
        if c.promises.len() < self.quorum() {
            return;
        }
        let ballot = c.ballot;
        // For each open slot: a value known decided wins, else the one
        // accepted in the highest ballot, else a no-op. Nothing after a
        // stop sign: this epoch ends there.
        let mut chosen: BTreeMap<Slot, (bool, Ballot, Batch)> = BTreeMap::new();
        let epoch = self.membership().epoch;
        for entry in c.promises.values().flatten() {
            // Accepted in an earlier epoch, in this one's slots: after that
            // epoch's stop sign, so never decided (a replica that entered
            // this epoch forgot it; one that recovered may still hold it).
            if entry.slot <= self.commit || (!entry.decided && entry.ballot.epoch() < epoch) {
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
        let stop_slot = (chosen.iter())
            .find(|(_, (_, _, batch))| batch.as_stop_sign().is_some())
            .map(|(slot, _)| *slot);
        if let Some(stop) = stop_slot {
            drop(chosen.split_off(&(stop + 1)));
        }
        let last = chosen.keys().next_back().copied().unwrap_or(self.commit);
        let members = self.membership().members().collect::<Vec<_>>();
        let mut leadership = Leadership {
            ballot,
            next_slot: last + 1,
            inflight: BTreeMap::new(),
            inflight_bytes: 0,
            pending: VecDeque::new(),
            peers: (members.into_iter())
                .chain([self.config.id])
                .map(|id| (id, PeerProgress::new(self.now_tick)))
                .collect(),
            stop_slot,
            takeover_last: last,
            read_round: 0,
            reads: VecDeque::new(),
        };
        if let Some(own) = leadership.peers.get_mut(&self.config.id) {
            own.done = self.snapshot_index();
        }
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

    pub(super) fn on_nack(&mut self, promised: Ballot) {
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
    pub(super) fn step_down(&mut self, leader: Option<NodeId>) {
        self.drop_leadership();
        self.role = Role::Follower { leader };
        // Whoever leads now has not been heard from yet.
        self.leader_heard_tick = None;
    }

    pub(super) fn drop_leadership(&mut self) {
        if let Role::Leader(l) = &mut self.role {
            self.out.dropped.extend(l.pending.drain(..).map(|c| c.id));
            self.out.dropped.extend(l.reads.drain(..).map(|r| r.id));
        }
    }

    pub(super) fn set_promised(&mut self, ballot: Ballot) {
        if ballot > self.promised {
            self.promised = ballot;
            self.out.persist.promised = Some(ballot);
        }
    }
}
