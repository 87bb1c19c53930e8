//! Incarnations. Adopting the answers is not enough on its own: a promise
//! or an acceptance the old incarnation sent before the disk was lost may
//! still be in flight, and counted with the new incarnation's votes it
//! lets the same replica vote twice (with 5 replicas: R promises C's
//! ballot, the promise is slow; R recovers from three peers that have not
//! seen that ballot, and helps L choose v; then C counts R's old promise
//! with two others and chooses another value). So a replica that starts
//! from blank storage takes a new incarnation (above any it had: the driver
//! passes a clock reading, and a peer that knows a later one makes it take
//! the next and ask again). The rule:
//! - a peer answering a recovery records the requester's incarnation
//!   durably before its answer leaves, and an answer counts only if it
//!   reports the requester's current incarnation;
//! - every vote (promise, acceptance, recovery answer) carries what its
//!   sender knows of every member's incarnation, and a receiver takes the
//!   highest it hears;
//! - a vote whose sender's incarnation is older than the one known is
//!   ignored, and learning a newer incarnation forgets the votes already
//!   counted from that member (a candidate's promises, a leader's
//!   acceptances and read confirmations).
//!
//! Why it suffices: take any quorum Q that counted a vote of the old
//! incarnation, and the recovery's answers S. Q without that member and S
//! share a member X (both are majorities). If X answered the recovery
//! before giving its own vote in Q, that vote says the member has a newer
//! incarnation, and whoever counted Q had to drop the old vote first. If X
//! answered after, its answer holds its vote (its promise, its accepted
//! value), which the new incarnation adopts, as if it had never forgotten.
//! This needs recoveries one at a time: a replica may lose its disk only
//! after every earlier recovery has finished, so that the answers it
//! recovers from know every earlier incarnation (it adopts their knowledge).

use super::*;

impl Paxos {
    /// What this replica knows of every member's incarnation, for a message.
    pub(super) fn wire_incarnations(&self) -> Incarnations {
        let len = (self.incarnations.iter())
            .rposition(|i| *i != 0)
            .map_or(0, |last| last + 1);
        self.incarnations[..len].to_vec()
    }

    /// Folds in what a peer reports. Returns false if the report's own
    /// sender speaks from an incarnation older than one known here.
    pub(super) fn learn_incarnations(&mut self, from: NodeId, known: &[Incarnation]) -> bool {
        let me = self.config.id as usize;
        for (peer, incarnation) in (known.iter().copied().enumerate()).take(NODE_ID_LIMIT as usize)
        {
            if peer != me {
                self.cover_incarnations(peer as NodeId);
                self.learn_incarnation(peer as NodeId, incarnation);
            }
        }
        self.cover_incarnations(from);
        let sender = known.get(from as usize).copied().unwrap_or(0);
        sender >= self.incarnations[from as usize]
    }

    /// Records that `peer` has reached `incarnation`. Votes counted from its
    /// older incarnations are forgotten: they may contradict the new one's.
    pub(super) fn learn_incarnation(&mut self, peer: NodeId, incarnation: Incarnation) {
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
                if let Some(progress) = l.peers.get_mut(&peer) {
                    progress.read_round_acked = 0;
                    progress.done = 0;
                }
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

    /// A vote also tells what its sender knows of this replica. If that is
    /// a later incarnation than ours (an earlier life took a higher number:
    /// a clock stepped back), this replica takes the next one: otherwise
    /// that peer, and everyone it tells, would ignore all its votes. A
    /// recovering replica then asks everyone again (returns false: the
    /// answer does not count); a voter records it and goes on (it only
    /// makes peers drop its older votes).
    pub(super) fn check_own_incarnation(&mut self, reported: Incarnation) -> bool {
        let me = self.config.id as usize;
        if reported <= self.incarnations[me] {
            return true;
        }
        self.incarnations[me] = reported + 1;
        if let Role::Recovering(r) = &mut self.role {
            r.replies.clear();
            r.partial.clear();
            self.send_recover_requests();
            return false;
        }
        tracing::warn!(
            replica = self.config.id,
            incarnation = reported + 1,
            "a peer knows a later incarnation of this replica (its storage is older than \
             its last recovery, or the clock stepped back); taking the next one"
        );
        self.out.persist.incarnations = Some(self.incarnations.clone());
        true
    }

    /// Whether a recovery answer is to the request this replica is waiting
    /// for from `from`: its current incarnation (so the peer has recorded
    /// it), and the page it asked for next (0 for the first). Anything else
    /// answers an earlier attempt, or is a page already taken.
    pub(super) fn answers_current_request(
        &self,
        from: NodeId,
        for_incarnation: Incarnation,
        from_slot: Slot,
    ) -> bool {
        let Role::Recovering(r) = &self.role else {
            return false;
        };
        let expected = r.partial.get(&from).map_or(0, |(_, next)| *next);
        for_incarnation == self.incarnations[self.config.id as usize] && from_slot == expected
    }
}
