//! Crash and restart with durable storage: nothing decided is ever lost.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};

#[test]
fn crash_restart_of_a_majority_loses_no_decided_value() {
    let mut sim = Sim::new(5, test_seed("crash_majority"));
    for i in 0..20 {
        propose(&mut sim, &format!("pre{i}"));
    }
    for i in 0..20 {
        await_decided(&mut sim, &format!("pre{i}"), 3);
    }
    let before = sim.chosen().clone();
    // Three of five die at once, including whoever leads.
    let leader = sim.leader().unwrap();
    let mut victims = vec![leader];
    victims.extend((0..5).filter(|id| *id != leader).take(2));
    for v in &victims {
        sim.crash(*v);
    }
    sim.run(100);
    assert!(
        sim.leader().is_none(),
        "seed {}: a minority cannot lead",
        sim.seed
    );
    for v in &victims {
        sim.restart(*v);
    }
    for i in 0..20 {
        propose(&mut sim, &format!("post{i}"));
    }
    for i in 0..20 {
        await_decided(&mut sim, &format!("post{i}"), 5);
    }
    assert!(sim.run_until(PATIENCE_TICKS, all_caught_up));
    for (slot, batch) in &before {
        assert_eq!(
            sim.chosen().get(slot),
            Some(batch),
            "seed {}: slot {slot} changed",
            sim.seed
        );
    }
    // The restarted replicas re-applied the old values from their storage.
    for v in &victims {
        assert!(sim.applied[*v as usize].last_slot >= *before.keys().next_back().unwrap());
    }
}

#[test]
fn repeated_random_crashes_under_load() {
    let seed = test_seed("random_crashes");
    let mut sim = Sim::new(3, seed);
    sim.faults.delay_max_ticks = 2;
    let mut values = Vec::new();
    for round in 0..40 {
        let victim = sim.rng.below(3) as u32;
        for i in 0..10 {
            let v = format!("r{round}-{i}");
            let _ = sim.leader().map(|l| sim.propose(l, v.clone()));
            values.push(v);
            sim.run(1);
        }
        sim.crash(victim);
        let down_ticks = sim.rng.below(30);
        sim.run(down_ticks);
        sim.restart(victim);
    }
    // Everything is retried until decided, then all logs must match.
    for v in &values {
        if sim.decided_slot(v.as_bytes()).is_none() {
            propose(&mut sim, v);
        }
    }
    for v in &values {
        await_decided(&mut sim, v, 3);
    }
    assert_converged(&mut sim);
}
