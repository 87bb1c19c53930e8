//! Unreliable networks: dropped requests and replies, delays and reordering.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};

#[test]
fn many_instances_unreliable() {
    let mut sim = Sim::new(3, test_seed("many_unreliable"));
    sim.faults.drop_request = 0.2;
    sim.faults.drop_reply = 0.2;
    sim.faults.delay_max_ticks = 3;
    let values: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let mut rounds = 0;
    while values
        .iter()
        .any(|v| sim.decided_slot(v.as_bytes()).is_none())
    {
        rounds += 1;
        assert!(
            rounds < 50,
            "seed {}: values still undecided after {rounds} retries",
            sim.seed
        );
        for v in values
            .iter()
            .filter(|v| sim.decided_slot(v.as_bytes()).is_none())
            .cloned()
            .collect::<Vec<_>>()
        {
            propose(&mut sim, &v);
        }
        sim.run(50);
    }
    assert_converged(&mut sim);
}

#[test]
fn deaf_leader_is_replaced() {
    // A leader that cannot hear replies cannot decide; the group must elect
    // another and go on, and the old one must stop claiming leadership.
    let mut sim = Sim::new(3, test_seed("deaf_leader"));
    let old = await_leader(&mut sim);
    sim.set_deaf(old, true);
    let ok = sim.run_until(PATIENCE_TICKS, |s| s.leaders().iter().any(|l| *l != old));
    assert!(ok, "seed {}: no new leader", sim.seed);
    assert!(sim.run_until(PATIENCE_TICKS, |s| !s.node(old).unwrap().is_leader()));
    propose(&mut sim, "progress");
    await_decided(&mut sim, "progress", 2);
    sim.set_deaf(old, false);
    await_decided(&mut sim, "progress", 3);
}
