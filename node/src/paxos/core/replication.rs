//! Phase 2 and deciding: proposals cut into slots, Accept and Accepted,
//! the commit index, and the leader's tick (resends, heartbeats, stepping
//! aside when a majority is silent).

use super::*;

impl Paxos {
    pub(super) fn accept_locally(&mut self, slot: Slot, ballot: Ballot, batch: Batch) {
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
    pub(super) fn flush_proposals(&mut self) {
        let id = self.config.id;
        loop {
            let Role::Leader(l) = &mut self.role else {
                return;
            };
            if l.pending.is_empty()
                || l.stop_slot.is_some()
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

    /// Sends `entries` to every other member, voters and learners.
    pub(super) fn broadcast_accept(&mut self, entries: Vec<(Slot, Batch)>) {
        let members: Vec<NodeId> = self.membership().members().collect();
        for peer in members {
            if peer != self.config.id {
                self.send_accepts(peer, entries.clone());
            }
        }
    }

    /// Sends `entries` in as many Accepts as `catchup_bytes_max` needs (a
    /// takeover or a resend may hold a whole window), so no message grows
    /// past what a peer's decoder takes.
    pub(super) fn send_accepts(&mut self, peer: NodeId, entries: Vec<(Slot, Batch)>) {
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

    pub(super) fn send_accept(&mut self, peer: NodeId, entries: Vec<(Slot, Batch)>) {
        let incarnations = self.wire_incarnations();
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        debug_assert!(
            l.ballot >= self.promised,
            "a leader promised no higher ballot"
        );
        debug_assert!(
            entries.iter().all(|(slot, _)| *slot < l.next_slot),
            "a leader sends only slots it has proposed"
        );
        let Some(progress) = l.peers.get_mut(&peer) else {
            return; // not a member of this leader's epoch
        };
        progress.sent_tick = self.now_tick;
        progress.commit_sent = self.commit;
        progress.read_round_sent = l.read_round;
        let accept = Message::Accept {
            ballot: l.ballot,
            entries,
            commit: self.commit,
            min_done: self.min_done,
            read_round: l.read_round,
            incarnations,
        };
        if self.out.persist.promised.is_some() || self.decides_alone() {
            // Its own promise of this ballot is not durable yet (a single
            // voter wins in the turn it stands): a crash now would let a
            // later life stand with the same ballot and propose other
            // values, so nothing may go out in it before the sync. And a
            // lone voter's commit index counts its own acceptances of this
            // very turn.
            self.out.persisted_messages.push((peer, accept));
        } else {
            // A leader's Accept leaves before its own sync (see `Ready::messages`).
            self.out.messages.push((peer, accept));
        }
    }

    pub(super) fn on_accept(
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
        if !self.is_member_self() {
            // A life of this replica the membership does not record: it
            // accepts nothing (its acceptance would count as the recorded
            // member's), but keeps up with what is decided, so it is ready
            // when a change adds it.
            if commit > self.commit {
                self.request_catchup(from);
            }
            return;
        }
        if ballot > self.promised || !matches!(self.role, Role::Follower { .. }) {
            self.step_down(Some(from));
        }
        self.set_promised(ballot);
        self.role = Role::Follower { leader: Some(from) };
        if self.config.check_quorum {
            // Only stickiness reads it; left alone otherwise, so replicas
            // that differ in nothing else stay equal (for the model check).
            self.leader_heard_tick = Some(self.now_tick);
        }
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
                commit: self.commit,
            },
        );
        // Commit what we hold from this very ballot; anything else must be fetched.
        self.advance_commit(commit, Some(ballot));
        if self.commit < commit {
            self.request_catchup(from);
        }
        if min_done > self.min_done {
            self.min_done = min_done;
            self.truncate_log();
        }
    }

    pub(super) fn on_accepted(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        slots: Vec<Slot>,
        done: Slot,
        read_round: u64,
        commit: Slot,
    ) {
        let now = self.now_tick;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if ballot != l.ballot {
            return;
        }
        let Some(progress) = l.peers.get_mut(&from) else {
            return; // not a member of this leader's epoch
        };
        progress.heard_tick = now;
        progress.read_round_acked = progress.read_round_acked.max(read_round.min(l.read_round));
        progress.done = done;
        progress.commit = progress.commit.max(commit);
        let group_done = l.group_done();
        // A learner's acceptance is recorded (so it is not sent again),
        // but decides nothing: `try_decide` counts voters only.
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

    pub(super) fn try_decide_all(&mut self) {
        let slots: Vec<Slot> = match &self.role {
            Role::Leader(l) => l.inflight.keys().copied().collect(),
            _ => return,
        };
        for slot in slots {
            self.try_decide(slot);
        }
    }

    pub(super) fn try_decide(&mut self, slot: Slot) {
        let quorum = self.quorum();
        let voters = self.membership().voters;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let Some(f) = l.inflight.get(&slot) else {
            return;
        };
        if ((f.acks & voters).count_ones() as usize) < quorum {
            return;
        }
        if let Some(f) = l.inflight.remove(&slot) {
            l.inflight_bytes -= f.bytes;
        }
        let ballot = l.ballot;
        if let Some(e) = self.log.get_mut(&slot) {
            // Its own value, or one it already knew decided (a takeover
            // keeps a decided entry as it is).
            debug_assert!(
                e.decided || e.ballot == ballot,
                "a leader decides only its own ballot's values"
            );
            e.decided = true;
        }
        self.advance_commit(Slot::MAX, None);
    }

    /// Moves the commit index over every following slot known decided, up
    /// to `limit`. A follower passes its leader's ballot: a slot it holds in
    /// that ballot is the leader's value, decided once the leader's commit
    /// index (`limit`) covers it. The one place the commit index moves, but
    /// for a snapshot install.
    pub(super) fn advance_commit(&mut self, limit: Slot, leaders_ballot: Option<Ballot>) {
        debug_assert!(
            leaders_ballot.is_none() || !self.is_leader(),
            "a leader's commit index comes only from its own majorities"
        );
        while self.commit < limit {
            let next = self.commit + 1;
            let stop_sign = match self.log.get_mut(&next) {
                Some(e) if e.decided || leaders_ballot == Some(e.ballot) => {
                    e.decided = true;
                    self.commit = next;
                    e.batch.as_stop_sign()
                }
                _ => break,
            };
            if let Some(membership) = stop_sign {
                // The epoch ends here: what follows belongs to the next,
                // and the leader's ballot no longer speaks for it.
                self.on_stop_sign_decided(next, membership);
                break;
            }
        }
        debug_assert!(
            self.commit == self.compacted_through || self.log.contains_key(&self.commit),
            "the commit index points at a slot held (or at the snapshot)"
        );
        self.note_commit();
    }

    /// Records a newer commit index (lets a restart re-apply at once). Only
    /// when it moved: a heartbeat that brings no news writes nothing.
    pub(super) fn note_commit(&mut self) {
        if self.commit > self.commit_noted {
            self.out.persist.commit = Some(self.commit);
            self.commit_noted = self.commit;
        }
    }

    pub(super) fn leader_tick(&mut self) {
        let now = self.now_tick;
        let quorum = self.quorum();
        let voters = self.membership().voters;
        let me = self.config.id;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        // Step aside when a majority has been silent for a whole election
        // timeout: we are probably cut off, and clients should go elsewhere.
        let heard = (l.peers.iter())
            .filter(|(id, p)| {
                voters & (1 << **id) != 0
                    && (**id == me || now - p.heard_tick <= self.config.election_timeout_max_ticks)
            })
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
        let mut resend: BTreeMap<NodeId, Vec<(Slot, Batch)>> = (l.peers.keys())
            .filter(|id| **id != me)
            .map(|id| (*id, Vec::new()))
            .collect();
        for (slot, f) in l.inflight.iter_mut() {
            if now - f.sent_tick < retry {
                continue;
            }
            f.sent_tick = now;
            let Some(entry) = self.log.get(slot) else {
                continue;
            };
            for (peer, entries) in resend.iter_mut() {
                if f.acks & (1 << *peer) == 0 {
                    entries.push((*slot, entry.batch.clone()));
                }
            }
        }
        let heartbeat = self.config.heartbeat_interval_ticks;
        for (peer, entries) in resend {
            let Role::Leader(l) = &self.role else { return };
            let Some(progress) = l.peers.get(&peer) else {
                continue;
            };
            let idle = now - progress.sent_tick >= heartbeat;
            let news = progress.commit_sent < self.commit;
            if !entries.is_empty() || idle || news {
                self.send_accepts(peer, entries);
            }
        }
    }
}
