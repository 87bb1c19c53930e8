//! Linearizable reads without the log (ReadIndex): a read waits for a
//! majority to echo a round of Accepts begun after it arrived.

use super::*;

impl Paxos {
    /// Begins a new round if a read is waiting for one not yet begun.
    pub(super) fn begin_read_round(&mut self) {
        if let Role::Leader(l) = &mut self.role {
            if l.reads.back().is_some_and(|r| r.round > l.read_round) {
                l.read_round += 1;
            }
        }
    }

    /// Sends the current round to every replica that has not had it: a
    /// heartbeat, unless new slots already carried it.
    pub(super) fn send_read_round(&mut self) {
        let voters: Vec<NodeId> = self.membership().voter_ids().collect();
        for peer in voters {
            let behind = matches!(&self.role, Role::Leader(l)
                if l.peers.get(&peer).is_some_and(|p| p.read_round_sent < l.read_round));
            if peer != self.config.id && behind {
                self.send_accept(peer, Vec::new());
            }
        }
    }

    /// Hands out the reads whose round a majority (this leader included)
    /// has echoed.
    pub(super) fn release_reads(&mut self) {
        let quorum = self.quorum();
        let voters = self.membership().voters;
        let me = self.config.id;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        // A read's round is confirmed once a majority, counting this
        // leader if it has begun the round, has echoed it or a later one.
        // Rounds only grow along the queue, so stop at the first unconfirmed.
        while let Some(read) = l.reads.front() {
            let echoed = (l.peers.iter())
                .filter(|&(peer, _)| voters & (1 << *peer) != 0)
                .filter(|&(peer, progress)| {
                    let round = if *peer == me {
                        l.read_round
                    } else {
                        progress.read_round_acked
                    };
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
}
