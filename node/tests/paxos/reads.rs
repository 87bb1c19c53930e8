//! Linearizable reads without log entries (ReadIndex): a read is confirmed
//! only after a majority has echoed a round begun after the read, and its
//! index covers every slot applied anywhere before it began. The simulator
//! checks the second on every confirmation ("STALE READ").

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim, SimRng};
use shardkv::paxos::{NodeId, ProposeError};

/// Runs until the read is confirmed or dropped; true if confirmed.
fn await_read(sim: &mut Sim, node: NodeId, read: u64) -> bool {
    let settled = sim.run_until(PATIENCE_TICKS, |s| {
        s.reads_confirmed
            .iter()
            .any(|(n, r, _)| (*n, *r) == (node, read))
            || s.reads_dropped.contains(&(node, read))
    });
    assert!(settled, "seed {}: read {read} never settled", sim.seed);
    sim.reads_confirmed
        .iter()
        .any(|(n, r, _)| (*n, *r) == (node, read))
}

#[test]
fn a_read_at_the_leader_covers_every_decided_slot() {
    let mut sim = Sim::new(3, test_seed("reads_basic"));
    await_leader(&mut sim);
    for i in 0..5 {
        propose(&mut sim, &format!("w{i}"));
        await_decided(&mut sim, &format!("w{i}"), 3);
    }
    let leader = sim.leader().expect("leader");
    let read = sim.read(leader).expect("the leader takes reads");
    assert!(await_read(&mut sim, leader, read), "seed {}", sim.seed);
    let (_, _, index) = sim.reads_confirmed[0];
    let top = sim.chosen().keys().next_back().copied().unwrap_or(0);
    assert!(index >= top, "seed {}: index {index} < {top}", sim.seed);
}

#[test]
fn a_follower_refuses_reads_with_a_hint() {
    let mut sim = Sim::new(3, test_seed("reads_follower"));
    let leader = await_leader(&mut sim);
    let follower = (leader + 1) % 3;
    assert_eq!(
        sim.read(follower),
        Err(ProposeError::NotLeader {
            leader: Some(leader)
        })
    );
}

#[test]
fn reads_in_one_burst_share_one_round() {
    let mut sim = Sim::new(3, test_seed("reads_burst"));
    let leader = await_leader(&mut sim);
    propose(&mut sim, "w");
    await_decided(&mut sim, "w", 3);
    sim.run(50);
    let before = sim.sent.get("heartbeat").copied().unwrap_or(0);
    // Ten reads arrive in one burst: one round, one heartbeat per follower.
    let reads: Vec<u64> = sim
        .reads(leader, 10)
        .into_iter()
        .map(|r| r.expect("read"))
        .collect();
    for read in &reads {
        assert!(await_read(&mut sim, leader, *read), "seed {}", sim.seed);
    }
    let heartbeats = sim.sent.get("heartbeat").copied().unwrap_or(0) - before;
    // The two followers' heartbeats, and possibly their idle ones.
    assert!(
        heartbeats <= 4,
        "seed {}: {heartbeats} heartbeats for 10 reads",
        sim.seed
    );
}

#[test]
fn a_cut_off_leader_confirms_no_read() {
    let mut sim = Sim::new(5, test_seed("reads_cut_off"));
    let old = await_leader(&mut sim);
    propose(&mut sim, "before");
    await_decided(&mut sim, "before", 5);
    // The old leader is alone; the others elect a new leader and write.
    let others: Vec<NodeId> = (0..5).filter(|n| *n != old).collect();
    sim.partition(&[&[old], &others]);
    let read = sim
        .read(old)
        .expect("the old leader still believes it leads");
    let found = sim.run_until(PATIENCE_TICKS, |s| s.leader().is_some_and(|l| l != old));
    assert!(found, "seed {}: no new leader", sim.seed);
    propose(&mut sim, "after");
    await_decided(&mut sim, "after", 4);
    // Had the old leader confirmed its read, it would have missed "after".
    assert!(
        !await_read(&mut sim, old, read),
        "seed {}: a cut-off leader confirmed a read",
        sim.seed
    );
}

/// Reads and writes at random replicas under random partitions, drops and
/// delays, with crash-restarts; every confirmation is checked for staleness.
#[test]
fn reads_under_random_partitions_and_crashes_are_never_stale() {
    let seed = test_seed("reads_soak");
    let mut sim = Sim::new(5, seed);
    sim.faults.drop_request = 0.05;
    sim.faults.drop_reply = 0.05;
    sim.faults.delay_max_ticks = 3;
    let mut rng = SimRng::new(seed ^ 0x7EAD);
    let mut writes = 0u64;
    for round in 0..2000 {
        match rng.below(10) {
            0..=2 => {
                let cut: Vec<NodeId> = (0..5).filter(|_| rng.chance(0.4)).collect();
                let rest: Vec<NodeId> = (0..5).filter(|n| !cut.contains(n)).collect();
                sim.partition(&[&cut, &rest]);
            }
            3 => sim.heal(),
            4 => {
                let n = rng.below(5) as NodeId;
                if sim.is_up(n) {
                    sim.crash(n);
                } else {
                    sim.restart(n);
                }
            }
            _ => {}
        }
        for n in 0..5 {
            if !sim.is_up(n) {
                continue;
            }
            if rng.chance(0.5) {
                writes += 1;
                let _ = sim.propose(n, format!("r{round}w{writes}"));
            }
            let _ = sim.read(n);
        }
        sim.run(1 + rng.below(20));
    }
    sim.heal();
    for n in 0..5 {
        if !sim.is_up(n) {
            sim.restart(n);
        }
    }
    sim.run(200);
    let confirmed = sim.reads_confirmed.len();
    println!(
        "seed {seed}: {confirmed} reads confirmed, {} dropped",
        sim.reads_dropped.len()
    );
    assert!(
        confirmed > 100,
        "seed {seed}: only {confirmed} reads confirmed"
    );
    assert_converged(&mut sim);
}
