//! Message economy: in steady state a decided batch costs 2(n-1) messages,
//! and commands arriving while the pipeline is full share one slot.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};

#[test]
fn steady_state_costs_two_n_minus_one_messages_per_batch() {
    for n in [3u32, 5] {
        let mut sim = Sim::new(n, test_seed("economy"));
        let leader = await_leader(&mut sim);
        propose(&mut sim, "warmup");
        await_decided(&mut sim, "warmup", n as usize);
        // Without ticks there are no heartbeats or retries: only what the
        // proposals themselves cost.
        let sent_before = sim.messages_sent();
        let slots_before = sim.chosen().len();
        for i in 0..100 {
            sim.propose(leader, format!("v{i}")).unwrap();
            sim.settle();
        }
        let batches = (sim.chosen().len() - slots_before) as u64;
        let sent = sim.messages_sent() - sent_before;
        assert_eq!(batches, 100, "seed {}: every proposal decided", sim.seed);
        println!("economy n={n}: {sent} messages for {batches} batches");
        assert!(
            sent <= 2 * u64::from(n - 1) * batches,
            "seed {}: {sent} messages for {batches} batches, limit {}",
            sim.seed,
            2 * (n - 1) as u64 * batches
        );
    }
}

#[test]
fn commands_waiting_for_the_pipeline_share_a_slot() {
    let seed = test_seed("batching");
    let mut sim = Sim::with_config(3, seed, |c| c.pipeline_window_slots = 2);
    let leader = await_leader(&mut sim);
    // 1000 commands arrive before any reply: two slots go out at once, the
    // rest wait and leave together as the window frees up.
    for i in 0..1000 {
        sim.propose(leader, format!("c{i}")).unwrap();
    }
    assert!(
        sim.run_until(PATIENCE_TICKS, |s| s.applied[leader as usize].commands
            >= 1000)
    );
    let slots = sim.chosen().len();
    println!("batching: 1000 commands in {slots} slots");
    assert!(
        slots <= 4,
        "seed {seed}: {slots} slots for 1000 queued commands"
    );
    assert_eq!(sim.node(leader).unwrap().inflight_slots(), 0);
}

#[test]
fn one_sync_per_ready() {
    // Group commit: a follower handling several slots in one step writes them
    // in one storage transaction.
    let seed = test_seed("group_commit");
    let mut sim = Sim::with_config(3, seed, |c| c.pipeline_window_slots = 1);
    let leader = await_leader(&mut sim);
    propose(&mut sim, "warm");
    await_decided(&mut sim, "warm", 3);
    let follower = (0..3).find(|id| *id != leader).unwrap();
    let syncs_before = sim.storages[follower as usize].syncs;
    for i in 0..50 {
        sim.propose(leader, format!("g{i}")).unwrap();
    }
    assert!(
        sim.run_until(PATIENCE_TICKS, |s| s.applied[follower as usize].commands
            >= 51)
    );
    let syncs = sim.storages[follower as usize].syncs - syncs_before;
    // Window 1 forces 2 batches at most here (1 command, then 49): a few syncs.
    assert!(
        syncs <= 6,
        "seed {seed}: follower synced {syncs} times for 2 batches"
    );
}
