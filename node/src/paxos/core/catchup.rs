//! Catch-up (decided values and snapshots for a replica that is behind)
//! and compaction of the log.

use super::*;

impl Paxos {
    pub(super) fn request_catchup(&mut self, from: NodeId) {
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

    pub(super) fn on_catchup_request(&mut self, from: NodeId, from_slot: Slot) {
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
        let memberships = if snapshot.is_some() {
            self.memberships.clone()
        } else {
            Vec::new() // the stop signs are in the entries
        };
        self.send(
            from,
            Message::CatchUpReply {
                snapshot,
                entries,
                commit: self.commit,
                memberships,
            },
        );
    }

    pub(super) fn on_catchup_reply(
        &mut self,
        from: NodeId,
        snapshot: Option<Snapshot>,
        entries: Vec<(Slot, Batch)>,
        commit: Slot,
        memberships: Vec<Membership>,
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
                let index = snapshot.index;
                self.install_snapshot(snapshot);
                // It may cover stop signs this replica never saw.
                self.adopt_snapshot_membership(index, &memberships);
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
        self.advance_commit(Slot::MAX, None);
        if self.commit < commit {
            self.request_catchup(from);
        }
    }

    pub(super) fn install_snapshot(&mut self, snapshot: Snapshot) {
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
        self.prune_memberships();
        self.note_commit();
    }

    /// Forgets log entries every replica has snapshotted, or, past the
    /// retention limit, everything this replica's snapshot covers.
    pub(super) fn truncate_log(&mut self) {
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
        self.prune_memberships();
    }
}
