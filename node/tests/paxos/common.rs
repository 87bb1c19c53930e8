//! Helpers shared by the Paxos tests.

use shardkv::paxos::sim::Sim;
use shardkv::paxos::{NodeId, Paxos, ProposeError, Ready};

/// Ticks to wait for something that must happen: generous, since timeouts
/// are 10-20 ticks, but finite so a liveness bug fails instead of hanging.
pub const PATIENCE_TICKS: u64 = 2_000;

/// A client gives a proposal this long before offering it again.
const RETRY_TICKS: u64 = 100;

/// Runs until some replica leads and returns it.
pub fn await_leader(sim: &mut Sim) -> NodeId {
    let found = sim.run_until(PATIENCE_TICKS, |s| s.leader().is_some());
    assert!(found, "seed {}: no leader elected", sim.seed);
    sim.leader().expect("leader")
}

/// Proposes through whichever replica leads, as a client would: retrying on
/// `NotLeader` until one accepts. Returns the replica that took it.
pub fn propose(sim: &mut Sim, data: &str) -> NodeId {
    for _ in 0..PATIENCE_TICKS {
        if let Some(leader) = sim.leader() {
            match sim.propose(leader, data.to_string()) {
                Ok(_) => return leader,
                Err(ProposeError::NotLeader { .. }) => {}
                Err(e) => panic!("seed {}: propose failed: {e}", sim.seed),
            }
        }
        sim.run(1);
    }
    panic!("seed {}: nobody took proposal {data}", sim.seed);
}

/// Runs until `count` live replicas have applied `data`. Like a client, it
/// proposes again when the value is decided nowhere after a while (the
/// replica that took it may have been deposed before sending it).
pub fn await_decided(sim: &mut Sim, data: &str, count: usize) {
    let mut ok = false;
    for _ in 0..PATIENCE_TICKS / RETRY_TICKS {
        if sim.run_until(RETRY_TICKS, |s| s.decided_count(data.as_bytes()) >= count) {
            ok = true;
            break;
        }
        if sim.decided_slot(data.as_bytes()).is_none() {
            propose(sim, data);
        }
    }
    assert!(
        ok,
        "seed {}: {data} decided by {} replicas, wanted {count}",
        sim.seed,
        sim.decided_count(data.as_bytes())
    );
}

/// A leader has nothing in flight or queued, and every live replica has
/// applied everything it committed (which covers every slot decided anywhere).
pub fn all_caught_up(sim: &Sim) -> bool {
    caught_up_among(sim, &(0..sim.len()).collect::<Vec<_>>())
}

/// As `all_caught_up`, for the live replicas among `ids` (the members of
/// the membership in force, say).
pub fn caught_up_among(sim: &Sim, ids: &[NodeId]) -> bool {
    let Some(leader) = sim.leader().and_then(|l| sim.node(l)) else {
        return false;
    };
    let commit = leader.commit_index();
    let top = sim.chosen().keys().next_back().copied().unwrap_or(0);
    leader.inflight_slots() == 0
        && leader.queued_commands() == 0
        && top <= commit
        && (ids.iter())
            .filter(|id| sim.is_up(**id))
            .all(|id| sim.applied[*id as usize].last_slot >= commit)
}

/// Runs until everyone has caught up, then checks that every live replica's
/// state machine holds exactly the same commands.
pub fn assert_converged(sim: &mut Sim) {
    let all: Vec<NodeId> = (0..sim.len()).collect();
    assert_converged_among(sim, &all);
}

/// As `assert_converged`, for the live replicas among `ids`.
pub fn assert_converged_among(sim: &mut Sim, ids: &[NodeId]) {
    assert!(
        sim.run_until(PATIENCE_TICKS, |s| caught_up_among(s, ids)),
        "seed {}: replicas never caught up",
        sim.seed
    );
    let live: Vec<usize> = (ids.iter())
        .filter(|id| sim.is_up(**id))
        .map(|id| *id as usize)
        .collect();
    for id in &live[1..] {
        assert_eq!(
            sim.applied[*id].digest, sim.applied[live[0]].digest,
            "seed {}: replica {id} diverged from replica {}",
            sim.seed, live[0]
        );
    }
}

/// Delivers every message between `nodes` (ids are their positions) in
/// order until the network is quiet, with no simulator in between: for
/// tests that look at each `Ready`. `observe` sees each one first and says
/// whether that replica's messages are delivered (false: lost).
pub fn settle_nodes(nodes: &mut [Paxos], mut observe: impl FnMut(NodeId, &Ready) -> bool) {
    loop {
        let mut sent = Vec::new();
        for (id, node) in nodes.iter_mut().enumerate() {
            let ready = node.ready();
            if observe(id as NodeId, &ready) {
                for (to, msg) in ready.messages.into_iter().chain(ready.persisted_messages) {
                    sent.push((id as NodeId, to, msg));
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        for (from, to, msg) in sent {
            nodes[to as usize].step(from, msg);
        }
    }
}
