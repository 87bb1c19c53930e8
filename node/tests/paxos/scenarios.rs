//! Hand-driven interleavings: every message is held until the test delivers
//! or drops it, so an exact schedule that a review found can be replayed
//! step by step. Each test is one schedule that broke agreement (or another
//! invariant) before its fix; the harness checks agreement on every apply.

use std::collections::BTreeMap;

use bytes::Bytes;
use shardkv::paxos::{
    Batch, Config, DurableState, Incarnation, MemStorage, Message, NodeId, Paxos, RoleKind, Slot,
    Storage,
};

/// A group whose network is the test's hands.
pub struct Net {
    pub nodes: Vec<Option<Paxos>>,
    pub storages: Vec<MemStorage>,
    configs: Vec<Config>,
    /// Messages sent and not yet delivered or dropped, oldest first.
    pub held: Vec<(NodeId, NodeId, Message)>,
    /// The value each slot was applied with, first seen; checked on every apply.
    pub chosen: BTreeMap<Slot, Batch>,
    /// Per replica: every (slot, batch) it applied, in order.
    pub applied: Vec<Vec<(Slot, Batch)>>,
    /// Proposal ids whose proposers were told "dropped", per replica.
    pub dropped: Vec<Vec<u64>>,
    /// Restarts so far: each gives new proposal ids and incarnations.
    restarts: u64,
    /// Every message sent: (kind, payload bytes).
    pub sent: Vec<(&'static str, usize)>,
}

impl Net {
    /// `n` replicas of a new group. Timeouts are long: nothing happens unless
    /// the test ticks a replica on purpose (`campaign`, `heartbeat`).
    pub fn new(n: u32) -> Self {
        Self::with_config(n, |_| {})
    }

    pub fn with_config(n: u32, tweak: impl Fn(&mut Config)) -> Self {
        let configs: Vec<Config> = (0..n)
            .map(|id| {
                let mut c = Config::new_group(id, n);
                // The schedules elect whom they choose, when they choose:
                // pre-votes and leader stickiness only ever hold an election
                // back (as if its messages were lost or it came later), so
                // every schedule here is one the full protocol can run too.
                c.pre_vote = false;
                c.check_quorum = false;
                c.election_timeout_min_ticks = 3;
                c.election_timeout_max_ticks = 3;
                c.heartbeat_interval_ticks = 1;
                c.retry_interval_ticks = 1_000;
                tweak(&mut c);
                c
            })
            .collect();
        let mut net = Net {
            nodes: configs
                .iter()
                .map(|c| Some(Paxos::new(c.clone(), DurableState::default())))
                .collect(),
            storages: vec![MemStorage::new(); n as usize],
            configs,
            held: Vec::new(),
            chosen: BTreeMap::new(),
            applied: vec![Vec::new(); n as usize],
            dropped: vec![Vec::new(); n as usize],
            restarts: 0,
            sent: Vec::new(),
        };
        for id in 0..n {
            net.drain(id);
        }
        net
    }

    pub fn node(&self, id: NodeId) -> &Paxos {
        self.nodes[id as usize].as_ref().expect("replica is up")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Paxos {
        self.nodes[id as usize].as_mut().expect("replica is up")
    }

    /// Persists, holds the messages, applies the decisions (checking agreement).
    pub fn drain(&mut self, id: NodeId) {
        let Some(node) = self.nodes[id as usize].as_mut() else {
            return;
        };
        let ready = node.ready();
        let early = ready.messages.into_iter();
        let (persist, persisted) = (ready.persist, ready.persisted_messages);
        for (to, msg) in early {
            self.sent.push((msg.kind(), msg.payload_bytes()));
            self.held.push((id, to, msg));
        }
        self.storages[id as usize]
            .persist(&persist)
            .expect("memory storage");
        for (to, msg) in persisted {
            self.sent.push((msg.kind(), msg.payload_bytes()));
            self.held.push((id, to, msg));
        }
        if ready.snapshot.is_some() {
            self.applied[id as usize].clear();
        }
        for (slot, batch) in ready.committed {
            match self.chosen.get(&slot) {
                Some(v) => assert_eq!(
                    v, &batch,
                    "AGREEMENT VIOLATED: replica {id} applied slot {slot} as {batch:?}, \
                     another replica as {v:?}"
                ),
                None => {
                    self.chosen.insert(slot, batch.clone());
                }
            }
            self.applied[id as usize].push((slot, batch));
        }
        self.dropped[id as usize].extend(ready.dropped);
    }

    /// Ticks `id` until it stands for election (its Prepares are held).
    pub fn campaign(&mut self, id: NodeId) {
        for _ in 0..100 {
            self.node_mut(id).tick();
            self.drain(id);
            if self.node(id).role() == RoleKind::Candidate {
                return;
            }
        }
        panic!("replica {id} never stood for election");
    }

    /// One tick of a leader: with a heartbeat interval of 1, a heartbeat to each follower.
    pub fn tick(&mut self, id: NodeId) {
        self.node_mut(id).tick();
        self.drain(id);
    }

    pub fn propose(&mut self, id: NodeId, data: &str) -> u64 {
        let proposal = self
            .node_mut(id)
            .propose(Bytes::from(data.to_string()))
            .expect("the replica leads");
        self.drain(id);
        proposal
    }

    /// Delivers every held message from `from` to `to` that `pick` selects,
    /// in the order sent; returns how many. Replies are held, not delivered.
    pub fn deliver_where(
        &mut self,
        from: NodeId,
        to: NodeId,
        pick: impl Fn(&Message) -> bool,
    ) -> usize {
        let mut count = 0;
        let mut i = 0;
        while i < self.held.len() {
            let (f, t, msg) = &self.held[i];
            if *f == from && *t == to && pick(msg) {
                let (f, t, msg) = self.held.remove(i);
                count += 1;
                if self.nodes[t as usize].is_some() {
                    self.node_mut(t).step(f, msg);
                    self.drain(t);
                }
            } else {
                i += 1;
            }
        }
        count
    }

    /// Delivers every held message from `from` to `to`.
    pub fn deliver(&mut self, from: NodeId, to: NodeId) -> usize {
        self.deliver_where(from, to, |_| true)
    }

    /// Delivers what `from` sent to each of `to`, and their answers back.
    pub fn exchange(&mut self, from: NodeId, to: &[NodeId]) {
        for t in to {
            self.deliver(from, *t);
        }
        for t in to {
            self.deliver(*t, from);
        }
    }

    /// Drops every held message from `from` to `to` that `pick` selects.
    pub fn drop_where(&mut self, from: NodeId, to: NodeId, pick: impl Fn(&Message) -> bool) {
        self.held
            .retain(|(f, t, msg)| !(*f == from && *t == to && pick(msg)));
    }

    /// Drops every held message from `from` to anyone in `to`.
    pub fn drop(&mut self, from: NodeId, to: &[NodeId]) {
        for t in to {
            self.drop_where(from, *t, |_| true);
        }
    }

    /// Delivers everything, answers included, until the network is quiet
    /// (bounded, so a livelock fails instead of hanging).
    pub fn deliver_all(&mut self) {
        for _ in 0..100_000 {
            if self.held.is_empty() {
                return;
            }
            let (f, t, msg) = self.held.remove(0);
            if self.nodes[t as usize].is_some() {
                self.node_mut(t).step(f, msg);
                self.drain(t);
            }
        }
        panic!("the network never went quiet");
    }

    /// Lets every live replica tick and talk until `done` holds; the
    /// agreement check runs all along.
    pub fn run_until(&mut self, ticks: u64, done: impl Fn(&Net) -> bool) -> bool {
        for _ in 0..ticks {
            if done(self) {
                return true;
            }
            for id in 0..self.nodes.len() as NodeId {
                if self.nodes[id as usize].is_some() {
                    self.tick(id);
                }
            }
            self.deliver_all();
        }
        done(self)
    }

    pub fn crash(&mut self, id: NodeId) {
        self.nodes[id as usize] = None;
    }

    /// Restarts `id` from its storage, or from blank storage (a lost disk,
    /// so it recovers from its peers before it votes again), with an
    /// incarnation above any before (a new one per restart).
    pub fn restart(&mut self, id: NodeId, lose_disk: bool) {
        self.restart_with(id, lose_disk, self.restarts + 1);
    }

    /// As `restart`, taking `incarnation` if the storage is blank (what the
    /// driver's clock reading would give).
    pub fn restart_with(&mut self, id: NodeId, lose_disk: bool, incarnation: Incarnation) {
        if lose_disk {
            self.storages[id as usize] = MemStorage::new();
        }
        let mut config = self.configs[id as usize].clone();
        config.recover_when_empty = true;
        self.restarts += 1;
        config.proposal_id_start = self.restarts << 40;
        config.blank_incarnation = incarnation;
        let durable = self.storages[id as usize].load().expect("memory storage");
        self.nodes[id as usize] = Some(Paxos::new(config, durable));
        self.applied[id as usize].clear();
        self.drain(id);
    }
}

pub fn is_catchup_request(m: &Message) -> bool {
    matches!(m, Message::CatchUpRequest { .. })
}

pub fn is_catchup_reply(m: &Message) -> bool {
    matches!(m, Message::CatchUpReply { .. })
}

/// Replicas A to E of a 5-replica group.
const A: NodeId = 0;
const B: NodeId = 1;
const C: NodeId = 2;
const D: NodeId = 3;
const E: NodeId = 4;

/// Steps 1-4 of the first review finding: A leads with a catch-up request
/// to B still in flight, its slot 2 (value "v") accepted by C alone; D,
/// elected by {D, E, B}, has decided "v-prime" in slot 2; B has committed it.
/// Returns the net with B's catch-up reply to A held.
fn deposed_leader_with_late_catchup(compact_b: bool) -> Net {
    let mut net = Net::with_config(5, |c| {
        if compact_b {
            // B forgets its log at its snapshot, so it answers with one.
            c.log_retain_slots_max = 0;
        }
    });
    // B leads first and decides "x1" in slot 1 with C and D; A and E miss it.
    net.campaign(B);
    net.exchange(B, &[A, C, D, E]);
    assert!(net.node(B).is_leader());
    net.propose(B, "x1");
    net.drop(B, &[A, E]);
    net.exchange(B, &[C, D]);
    assert_eq!(net.node(B).commit_index(), 1);
    // 1. A campaigns; B's promise reports a higher commit, so A asks B to
    //    catch it up. That request is delayed. A wins with B and E.
    net.campaign(A);
    net.drop(A, &[C, D]);
    net.deliver(A, B);
    net.deliver(A, E);
    net.deliver_where(B, A, |m| matches!(m, Message::Promise { .. }));
    net.deliver(E, A);
    assert!(net.node(A).is_leader(), "A leads");
    let held_request = net
        .held
        .iter()
        .any(|(f, t, m)| *f == A && *t == B && is_catchup_request(m));
    assert!(held_request, "A asked B to catch it up");
    // A's takeover re-decides slot 1 with B and E (C and D get it too).
    for peer in [B, E, C, D] {
        net.deliver_where(A, peer, |m| matches!(m, Message::Accept { .. }));
    }
    for peer in [B, E, C, D] {
        net.deliver(peer, A);
    }
    assert_eq!(net.node(A).commit_index(), 1);
    // 2. A proposes "v" in slot 2; only C accepts.
    net.propose(A, "v");
    net.drop_where(A, B, |m| matches!(m, Message::Accept { .. }));
    net.drop(A, &[D, E]);
    net.exchange(A, &[C]);
    assert_eq!(net.node(A).commit_index(), 1, "v is not chosen");
    // 3. D is elected by {D, E, B}, none of which holds slot 2, and decides
    //    "v-prime" there; its next Accept tells B.
    net.campaign(D);
    net.drop(D, &[A, C]);
    net.exchange(D, &[B, E]);
    assert!(net.node(D).is_leader(), "D leads");
    net.exchange(D, &[B, E]);
    net.propose(D, "v-prime");
    net.drop(D, &[A, C]);
    net.exchange(D, &[B, E]);
    net.propose(D, "w3");
    net.drop(D, &[A, C]);
    net.deliver(D, B);
    assert!(net.node(B).commit_index() >= 2, "B has committed slot 2");
    assert_eq!(
        net.chosen.get(&2).map(|b| b.commands[0].data.clone()),
        Some(Bytes::from_static(b"v-prime"))
    );
    if compact_b {
        net.node_mut_compact(B, 2);
    }
    // 4. B answers A's old catch-up request; B's Nacks to A stay delayed.
    net.deliver_where(A, B, is_catchup_request);
    net
}

impl Net {
    fn node_mut_compact(&mut self, id: NodeId, index: Slot) {
        self.node_mut(id)
            .compact(index, Bytes::from_static(b"snapshot"));
        self.drain(id);
        assert!(self.node(id).compacted_through() >= index);
    }
}

/// Finishes the schedule: A gets the reply, heartbeats C, and then
/// everyone talks until all have applied slot 2.
fn finish_late_catchup(mut net: Net) {
    // 5. A, still leading in its own ballot, takes B's reply.
    net.deliver_where(B, A, is_catchup_reply);
    // 6. A's next heartbeat carries its commit index to C, which holds
    //    slot 2 in A's ballot with "v".
    if net.node(A).is_leader() {
        net.tick(A);
        net.deliver_where(A, C, |m| matches!(m, Message::Accept { .. }));
    }
    // Whatever A did, the group must converge on one value per slot.
    let converged = net.run_until(200, |n| {
        (0..5).all(|id| n.applied[id].iter().any(|(slot, _)| *slot >= 2))
    });
    assert!(converged, "the group never applied slot 2 everywhere");
}

#[test]
fn deposed_leader_learning_a_decision_by_catchup_keeps_agreement() {
    finish_late_catchup(deposed_leader_with_late_catchup(false));
}

#[test]
fn deposed_leader_learning_a_snapshot_by_catchup_keeps_agreement() {
    finish_late_catchup(deposed_leader_with_late_catchup(true));
}

/// The second review finding: a promise sent by a replica's previous
/// incarnation, before it lost its disk, is counted after the replica has
/// recovered and voted again. R promises C's ballot (the promise is slow);
/// R loses its disk and recovers from L, B and A, which have not seen that
/// ballot; L decides "v" with {L, R, B}; then C counts R's old promise with
/// A's and its own, and decides "w" in the same slot.
#[test]
fn a_promise_from_before_a_lost_disk_is_not_counted() {
    const L: NodeId = 0;
    const R: NodeId = 1;
    const B: NodeId = 2;
    const C: NodeId = 3;
    const A: NodeId = 4;
    let mut net = Net::new(5);
    net.campaign(L);
    net.exchange(L, &[R, B, C, A]);
    assert!(net.node(L).is_leader());
    // C stands with a higher ballot; only R hears it, and R's promise is slow.
    net.campaign(C);
    net.drop(C, &[L, B]);
    net.deliver(C, R);
    let stale_promise = net
        .held
        .iter()
        .any(|(f, t, m)| *f == R && *t == C && matches!(m, Message::Promise { .. }));
    assert!(stale_promise, "R promised C's ballot");
    // R loses its disk and recovers from L, B and A.
    net.crash(R);
    net.restart(R, true);
    assert_eq!(net.node(R).role(), RoleKind::Recovering);
    net.drop_where(R, C, |m| matches!(m, Message::RecoverRequest { .. }));
    for peer in [L, B, A] {
        net.deliver_where(R, peer, |m| matches!(m, Message::RecoverRequest { .. }));
        net.deliver(peer, R);
    }
    assert_eq!(net.node(R).role(), RoleKind::Follower, "R recovered");
    // L decides "v" in slot 1 with R and B.
    net.propose(L, "v");
    net.drop(L, &[C, A]);
    net.exchange(L, &[R, B]);
    assert_eq!(net.node(L).commit_index(), 1, "v is chosen");
    // A now promises C's ballot; C counts A's promise and R's old one.
    net.deliver(C, A);
    net.deliver(A, C);
    net.deliver(R, C);
    if net.node(C).is_leader() {
        net.propose(C, "w");
        net.exchange(C, &[A, R]);
    }
    let converged = net.run_until(200, |n| {
        (0..5).all(|id| n.applied[id].iter().any(|(slot, _)| *slot >= 1))
    });
    assert!(converged, "the group never applied slot 1 everywhere");
}

/// The same hole with acceptances: R's acceptance of "v", sent before R
/// lost its disk, reaches the leader L after R has recovered from B, C and
/// A (none of which held "v" then) and helped C decide "w" in that slot.
/// B's acceptance, sent after B answered R's recovery, says R has a new
/// incarnation; L must then not count R's old one.
#[test]
fn an_acceptance_from_before_a_lost_disk_is_not_counted() {
    const L: NodeId = 0;
    const R: NodeId = 1;
    const B: NodeId = 2;
    const C: NodeId = 3;
    const A: NodeId = 4;
    let is_accept = |m: &Message| matches!(m, Message::Accept { .. });
    let mut net = Net::new(5);
    net.campaign(L);
    net.exchange(L, &[R, B, C, A]);
    assert!(net.node(L).is_leader());
    // L proposes "v"; R accepts at once (its answer is slow), B's copy is slow.
    net.propose(L, "v");
    net.drop(L, &[C, A]);
    net.deliver_where(L, R, is_accept);
    // R loses its disk and recovers from B, C and A.
    net.crash(R);
    net.restart(R, true);
    net.drop_where(R, L, |m| matches!(m, Message::RecoverRequest { .. }));
    for peer in [B, C, A] {
        net.deliver_where(R, peer, |m| matches!(m, Message::RecoverRequest { .. }));
        net.deliver(peer, R);
    }
    assert_eq!(net.node(R).role(), RoleKind::Follower, "R recovered");
    // B now accepts "v".
    net.deliver_where(L, B, is_accept);
    // C is elected by R, A and itself and decides "w" in slot 1.
    net.campaign(C);
    net.drop(C, &[L, B]);
    net.exchange(C, &[R, A]);
    assert!(net.node(C).is_leader(), "C leads");
    net.exchange(C, &[R, A]);
    net.propose(C, "w");
    net.drop(C, &[L, B]);
    net.exchange(C, &[R, A]);
    assert_eq!(net.node(C).commit_index(), 1, "w is chosen");
    // L hears R's old acceptance, then B's.
    net.deliver(R, L);
    net.deliver(B, L);
    assert_eq!(
        net.node(L).commit_index(),
        0,
        "v was not chosen by current voters"
    );
    let converged = net.run_until(200, |n| {
        (0..5).all(|id| n.applied[id].iter().any(|(slot, _)| *slot >= 1))
    });
    assert!(converged, "the group never applied slot 1 everywhere");
}

fn is_recover_request(m: &Message) -> bool {
    matches!(m, Message::RecoverRequest { .. })
}

/// Found by review. A page of a recovery answer for a request of an
/// earlier attempt (the recovering replica crashed while still blank and
/// restarted) was taken as P's whole answer, without the slots before it:
/// R adopted without the value L decided with {L, R, P}, and A (elected by
/// A, R, B) filled that slot with a no-op. A page now names the request it
/// answers (incarnation and first slot), and only the one awaited counts.
#[test]
fn a_late_recovery_page_from_an_earlier_attempt_is_not_taken() {
    const L: NodeId = 0;
    const R: NodeId = 1;
    const P: NodeId = 2;
    const A: NodeId = 3;
    const B: NodeId = 4;
    // One entry per page; recovery requests are resent once the schedule
    // is over and the group runs freely.
    let mut net = Net::with_config(5, |c| {
        c.catchup_entries_max = 1;
        c.retry_interval_ticks = 5;
    });
    net.campaign(L);
    net.exchange(L, &[R, P, A, B]);
    assert!(net.node(L).is_leader());
    // L decides "x" (slot 1) and "y" (slot 2) with R and P; A and B miss both.
    for value in ["x", "y"] {
        net.propose(L, value);
        net.drop(L, &[A, B]);
        net.exchange(L, &[R, P]);
    }
    assert_eq!(net.node(L).commit_index(), 2);
    assert_eq!(
        net.chosen.get(&1).map(|b| b.commands[0].data.clone()),
        Some(Bytes::from_static(b"x"))
    );
    // R loses its disk (incarnation 1). P answers page 1 (slot 1, more);
    // R asks P for the page from slot 2; that request is slow.
    net.crash(R);
    net.restart_with(R, true, 1);
    assert_eq!(net.node(R).role(), RoleKind::Recovering);
    net.deliver_where(R, P, is_recover_request);
    net.deliver(P, R);
    let asked_from_2 = net.held.iter().any(|(f, t, m)| {
        *f == R && *t == P && matches!(m, Message::RecoverRequest { from_slot: 2, .. })
    });
    assert!(asked_from_2, "R asked P for its second page");
    for peer in [L, A, B] {
        net.drop_where(R, peer, is_recover_request);
    }
    // R crashes before it has recovered: its storage is still blank, so it
    // restarts recovering (incarnation 2) and asks everyone from slot 0.
    net.crash(R);
    net.restart_with(R, false, 2);
    assert_eq!(net.node(R).role(), RoleKind::Recovering);
    // P takes the new request first (records incarnation 2), then the slow
    // one from the previous attempt; its answer to that comes back first.
    net.deliver_where(R, P, |m| {
        matches!(
            m,
            Message::RecoverRequest {
                incarnation: 2,
                from_slot: 0
            }
        )
    });
    net.deliver_where(R, P, |m| {
        matches!(m, Message::RecoverRequest { from_slot: 2, .. })
    });
    net.deliver_where(P, R, |m| {
        matches!(m, Message::RecoverReply { entries, .. } if entries.first().is_some_and(|e| e.0 == 2))
    });
    net.drop(P, &[R]);
    // A and B (which hold nothing) answer; L's answer is lost.
    net.drop_where(R, L, is_recover_request);
    for peer in [A, B] {
        net.deliver_where(R, peer, is_recover_request);
        net.deliver(peer, R);
    }
    assert_eq!(
        net.node(R).role(),
        RoleKind::Recovering,
        "a page for an earlier attempt does not complete P's answer"
    );
    // A stands, with A, R and B; R cannot vote yet.
    net.campaign(A);
    net.drop(A, &[L, P]);
    net.exchange(A, &[R, B]);
    if net.node(A).is_leader() {
        net.exchange(A, &[R, B]);
    }
    let converged = net.run_until(200, |n| {
        (0..5).all(|id| n.applied[id].iter().any(|(slot, _)| *slot >= 1))
    });
    assert!(converged, "the group never applied slot 1 everywhere");
    // The invariant the recovery needs: R holds every value it may have
    // voted for in a decision.
    let r = net.storages[R as usize].state();
    let holds_slot_1 =
        r.entries.contains_key(&1) || r.snapshot.as_ref().is_some_and(|s| s.index >= 1);
    assert!(
        holds_slot_1,
        "R recovered without slot 1, which it helped decide"
    );
}

/// Found by review: the incarnation rule needs every life of a replica to
/// take a new number. The driver once took the clock in seconds, so two
/// disk losses within a second gave two lives the same number, and peers
/// could not tell a vote of the earlier life from one of the later (the
/// schedule of `a_promise_from_before_a_lost_disk_is_not_counted`, with
/// both lives at 7). It now takes nanoseconds. This test shows the
/// assumption that remains, so it is not run: it fails by design.
#[test]
#[ignore = "documents an assumption: two lives of a replica never draw the same clock reading"]
fn two_lives_with_one_incarnation_cannot_be_told_apart() {
    two_lives(7, 7);
}

/// Control: the same schedule with a strictly newer second incarnation holds.
#[test]
fn two_lives_with_distinct_incarnations_hold() {
    two_lives(7, 8);
}

fn two_lives(first: Incarnation, second: Incarnation) {
    const L: NodeId = 0;
    const R: NodeId = 1;
    const B: NodeId = 2;
    const C: NodeId = 3;
    const A: NodeId = 4;
    let mut net = Net::with_config(5, |_| {});
    net.campaign(L);
    net.exchange(L, &[R, B, C, A]);
    assert!(net.node(L).is_leader());
    // R loses its disk once and recovers from everyone at incarnation 7.
    net.crash(R);
    net.restart_with(R, true, first);
    for peer in [L, B, C, A] {
        net.deliver_where(R, peer, is_recover_request);
        net.deliver(peer, R);
    }
    assert_eq!(net.node(R).role(), RoleKind::Follower, "R recovered");
    net.exchange(L, &[R, B, C, A]);
    // C stands with a higher ballot; only R hears it; R's promise is slow.
    net.campaign(C);
    net.drop(C, &[L, B]);
    net.deliver(C, R);
    // R loses its disk again within the same second: incarnation 7 again.
    net.crash(R);
    net.restart_with(R, true, second);
    net.drop_where(R, C, is_recover_request);
    for peer in [L, B, A] {
        net.deliver_where(R, peer, is_recover_request);
        net.deliver(peer, R);
    }
    assert_eq!(net.node(R).role(), RoleKind::Follower, "R recovered again");
    // L decides "v" in slot 1 with R and B.
    net.propose(L, "v");
    net.drop(L, &[C, A]);
    net.exchange(L, &[R, B]);
    assert_eq!(net.node(L).commit_index(), 1, "v is chosen");
    // A promises C's ballot; C counts A's promise and R's old one.
    net.deliver(C, A);
    net.deliver(A, C);
    net.deliver(R, C);
    if net.node(C).is_leader() {
        net.propose(C, "w");
        net.exchange(C, &[A, R]);
    }
    let converged = net.run_until(200, |n| {
        (0..5).all(|id| n.applied[id].iter().any(|(slot, _)| *slot >= 1))
    });
    assert!(converged, "the group never applied slot 1 everywhere");
}

/// Found by review: R restarts blank at incarnation 5 and L records it; R
/// crashes while still blank and comes back at 3 (the clock stepped back);
/// P, Q and S answer first and R adopts at 3. L then ignored every vote R
/// gave in this life, for good (a group of 5 survived one fewer failure).
/// Now the leader's Accepts carry what it knows, and R, hearing of a later
/// incarnation of itself, takes the next one.
#[test]
fn an_incarnation_below_one_a_peer_knows_is_raised() {
    const L: NodeId = 0;
    const R: NodeId = 1;
    const P: NodeId = 2;
    const Q: NodeId = 3;
    const S: NodeId = 4;
    let mut net = Net::with_config(5, |_| {});
    net.campaign(L);
    net.exchange(L, &[R, P, Q, S]);
    assert!(net.node(L).is_leader());
    net.crash(R);
    net.restart_with(R, true, 5);
    net.deliver_where(R, L, is_recover_request);
    net.drop(L, &[R]);
    net.drop(R, &[P, Q, S]);
    net.crash(R);
    net.restart_with(R, false, 3);
    net.drop_where(R, L, is_recover_request);
    for peer in [P, Q, S] {
        net.deliver_where(R, peer, is_recover_request);
        net.deliver(peer, R);
    }
    assert_eq!(net.node(R).role(), RoleKind::Follower, "R recovered");
    // L proposes; only R accepts (P, Q, S are slow). R's current vote is ignored.
    net.propose(L, "v");
    net.drop(L, &[P, Q, S]);
    net.exchange(L, &[R]);
    assert_eq!(
        net.node(L).stats().stale_votes_ignored,
        0,
        "L ignored R's acceptance from R's current (and only live) life"
    );
}
