//! Recovery from a lost disk. An acceptor that forgets its promises and
//! acceptances could vote twice and break agreement. So a replica whose
//! storage is blank (and `recover_when_empty` is set) does not vote: it asks
//! every peer for its acceptor state. Once floor(n/2)+1 *initialised* peers
//! have answered, it adopts the highest promise among them, the newest
//! snapshot, and for each slot above it the value known decided, else the
//! one accepted in the highest ballot, persists that with the `initialized`
//! mark, and joins as a follower. If instead every other replica has
//! answered and none has ever accepted a value (each is blank, or
//! initialised but empty), no value can have been chosen: the group is new,
//! and the replica starts with the highest promise it heard. A new group
//! therefore needs all its members up once; a lost disk needs a majority of
//! the others. (Unless the group is known to exist, `existing_group`: then
//! blank answers from every other first voter make this replica a new
//! member, since the group may live on in members added since.)
//!

use super::*;

impl Paxos {
    pub(super) fn send_recover_requests(&mut self) {
        let now = self.now_tick;
        // The first voters answer for the group's state. In a group known
        // to exist, every replica it may have is asked too: any member
        // added since answers with a membership that makes this replica a
        // new member (were the first voters all blank, they could not tell
        // it). The transport drops what it has no address for.
        let voters: Vec<NodeId> = if self.config.existing_group {
            (0..crate::paxos::types::NODE_ID_LIMIT).collect()
        } else {
            self.membership().voter_ids().collect()
        };
        let Role::Recovering(r) = &mut self.role else {
            return;
        };
        r.sent_tick = now;
        let incarnation = self.incarnations[self.config.id as usize];
        for peer in voters {
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

    pub(super) fn on_recover_request(
        &mut self,
        from: NodeId,
        incarnation: Incarnation,
        from_slot: Slot,
    ) {
        if !self.is_member_self() {
            // Not a member this replica's storage can answer for (a joiner
            // not yet added, a replaced life): its answer is no vote.
            return;
        }
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
                for_incarnation: incarnation,
                from_slot,
                initialized: true,
                promised: self.promised,
                entries,
                commit: self.commit,
                snapshot,
                incarnations,
                more,
                memberships: self.memberships.clone(),
            },
        );
    }

    pub(super) fn on_recover_reply(&mut self, from: NodeId, page: Option<PeerState>, more: bool) {
        // The voters as this replica knows them (the group's first: after
        // a change, a lost disk rejoins as a new member).
        let peers = self.membership().voters.count_ones() as usize;
        let Role::Recovering(r) = &mut self.role else {
            return;
        };
        if r.replies.get(&from).is_some_and(Option::is_some) {
            return; // its whole answer is in: a late duplicate page
        }
        if page.as_ref().is_some_and(|p| {
            p.promised.epoch() > 0
                || p.memberships.last().is_some_and(|m| m.epoch > 0)
                || p.entries
                    .values()
                    .any(|(_, batch)| batch.as_stop_sign().is_some())
        }) {
            // The group has changed its members since it started, or may
            // have (a stop sign was accepted): the argument above needs the
            // voters this replica voted with, which it no longer knows. So
            // no answer counts (the acceptors of the first stop sign, but
            // for this replica, meet every majority of the others), and
            // the replica starts over as a new member instead: it votes in
            // nothing until a change records its new life.
            tracing::warn!(
                replica = self.config.id,
                incarnation = self.incarnation(),
                "this replica lost its disk after the group changed its members: it starts \
                 over as a new member, which takes part in nothing until it is added \
                 (`shardkvctl member remove` its old life, then `member add` it)"
            );
            self.start_as_joiner();
            return;
        }
        if !self.membership().is_voter(from) {
            // Asked only for a change it may know of (above), which it did
            // not show: its answer is no first voter's.
            return;
        }
        let Role::Recovering(r) = &mut self.role else {
            return;
        };
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
            if self.config.existing_group {
                // The group exists, so the first voters' blank answers mean
                // they all lost their disks: the group, if it lives on, does
                // in members added since, which no first voter asks.
                tracing::warn!(
                    replica = self.config.id,
                    incarnation = self.incarnation(),
                    "every first voter of this existing group answered blank: this replica \
                     starts over as a new member, which takes part in nothing until it is \
                     added"
                );
                self.start_as_joiner();
                return;
            }
            // No other replica has ever accepted anything, so no value was
            // ever chosen: a new group (or one that has lost a majority of
            // its disks, which nothing can repair). Start from the promises.
            self.adopt(initialized);
        }
    }

    /// Becomes a voter holding everything the answering peers hold.
    pub(super) fn adopt(&mut self, peers: Vec<PeerState>) {
        let promised = peers.iter().map(|p| p.promised).max().unwrap_or_default();
        let snapshot = peers
            .iter()
            .filter_map(|p| p.snapshot.clone())
            .max_by_key(|s| s.index);
        let floor = snapshot.as_ref().map_or(0, |s| s.index);
        let memberships = (peers.iter())
            .map(|p| p.memberships.clone())
            .max_by_key(|m| m.last().map(|m| m.epoch))
            .unwrap_or_default();
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
            self.adopt_snapshot_membership(floor, &memberships);
        }
        for (slot, (_, ballot, batch)) in best {
            self.accept_locally(slot, ballot, batch);
        }
        self.out.persist.initialized = true;
        self.out.persist.incarnations = Some(self.incarnations.clone());
        self.stats.recoveries += 1;
        self.reset_election_deadline();
    }
}
