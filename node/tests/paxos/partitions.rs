//! Partitions: no decision without a majority, progress inside one,
//! agreement after healing; and the long randomised partition soak.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};

fn partition_scenario(unreliable: bool, name: &str) {
    let mut sim = Sim::new(5, test_seed(name));
    if unreliable {
        sim.faults.drop_request = 0.1;
        sim.faults.drop_reply = 0.1;
    }
    await_leader(&mut sim);

    // No majority anywhere: nothing can be decided, whoever is asked.
    sim.partition(&[&[0, 2], &[1, 3], &[4]]);
    sim.run(100);
    let before = sim.chosen().len();
    for id in 0..5 {
        let _ = sim.propose(id, format!("nomajority{id}"));
    }
    sim.run(300);
    assert_eq!(
        sim.chosen().len(),
        before,
        "seed {}: decided without a majority",
        sim.seed
    );

    // A majority forms: it decides, the minority learns nothing new.
    sim.partition(&[&[0], &[1, 2, 3], &[4]]);
    propose(&mut sim, "majority");
    await_decided(&mut sim, "majority", 3);
    sim.run(50);
    assert_eq!(sim.decided_count(b"majority"), 3);
    assert!(sim.applied[0]
        .entries
        .iter()
        .all(|(_, b)| !b.commands.iter().any(|c| c.data.as_ref() == b"majority")));

    // Heal: everyone agrees on everything, old and new.
    sim.heal();
    propose(&mut sim, "healed");
    await_decided(&mut sim, "healed", 5);
    assert!(
        sim.run_until(PATIENCE_TICKS, all_caught_up),
        "seed {}",
        sim.seed
    );

    // One replica switches sides, twice; each time the side with the
    // majority decides and the values stay in their slots.
    for (i, (a, b)) in [
        (&[0u32, 1, 2][..], &[3u32, 4][..]),
        (&[0, 1][..], &[2, 3, 4][..]),
    ]
    .iter()
    .enumerate()
    {
        sim.partition(&[a, b]);
        let value = format!("switch{i}");
        propose(&mut sim, &value);
        await_decided(&mut sim, &value, 3);
    }
    sim.heal();
    assert!(
        sim.run_until(PATIENCE_TICKS, all_caught_up),
        "seed {}",
        sim.seed
    );
    for v in ["majority", "healed", "switch0", "switch1"] {
        assert_eq!(sim.decided_count(v.as_bytes()), 5, "seed {}: {v}", sim.seed);
    }
}

#[test]
fn partitions_reliable() {
    partition_scenario(false, "partitions_reliable");
}

#[test]
fn partitions_unreliable() {
    partition_scenario(true, "partitions_unreliable");
}

/// The soak's length in partitions (about 10 ms each here), not in wall
/// time: the whole run then depends only on the seed, so a failure replays
/// exactly. `SHARDKV_SOAK_ROUNDS` changes it.
fn soak_rounds() -> u64 {
    std::env::var("SHARDKV_SOAK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500)
}

#[test]
fn lots_of_requests_under_changing_random_partitions() {
    // The lab's "lots": for 20 s, clients keep proposing while partitions are
    // redrawn at random (with some links cut one way only) and the network
    // drops and delays messages. The
    // simulator checks agreement on every apply. Like real clients, the test
    // retries what has not been decided; after healing, every value must be
    // decided and every replica must hold the same log.
    let seed = test_seed("lots");
    let mut sim = Sim::new(5, seed);
    sim.faults.drop_request = 0.05;
    sim.faults.drop_reply = 0.05;
    sim.faults.delay_max_ticks = 3;
    // Now and then a replica dies inside a sync, after its early messages
    // (a leader's Accepts) left and before its own writes were durable.
    sim.faults.crash_during_sync = 0.002;
    let mut values: Vec<String> = Vec::new();
    let mut repartitions = 0u64;
    while repartitions < soak_rounds() {
        // Redraw the partition: each replica lands in one of 1-3 groups.
        let groups = 1 + sim.rng.below(3);
        let mut sides: Vec<Vec<u32>> = vec![Vec::new(); groups as usize];
        for id in 0..5 {
            let g = sim.rng.below(groups) as usize;
            sides[g].push(id);
        }
        let refs: Vec<&[u32]> = sides.iter().map(|v| v.as_slice()).collect();
        sim.heal();
        sim.partition(&refs);
        // Sometimes a link or two works in one direction only.
        for _ in 0..sim.rng.below(3) {
            let (from, to) = (sim.rng.below(5) as u32, sim.rng.below(5) as u32);
            sim.cut_one_way(from, to);
        }
        repartitions += 1;
        let ticks = 20 + sim.rng.below(80);
        for _ in 0..ticks {
            let id = sim.rng.below(5) as u32;
            let value = format!("lots{}", values.len());
            let _ = sim.propose(id, value.clone());
            values.push(value);
            sim.run(1);
        }
        // Retry a bounded number of undecided values at a random replica.
        let decided = decided_set(&sim);
        for v in values
            .iter()
            .filter(|v| !decided.contains(v.as_str()))
            .take(50)
        {
            let id = sim.rng.below(5) as u32;
            let _ = sim.propose(id, v.clone());
        }
    }
    sim.heal();
    sim.faults = Default::default();
    // Most values were offered to followers, which refuse them, so the
    // backlog grows with the soak's length; the test re-proposes it 1000 at
    // a time. Each batch gets 20 ticks, plus 50 rounds of slack in all.
    // (A fixed 100 rounds failed once a longer soak's backlog outgrew it.)
    let mut rounds = 0;
    let mut rounds_max = None;
    loop {
        let decided = decided_set(&sim);
        let missing: Vec<String> = values
            .iter()
            .filter(|v| !decided.contains(v.as_str()))
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        let limit = *rounds_max.get_or_insert(missing.len().div_ceil(RETRY_BATCH) + 50);
        rounds += 1;
        assert!(
            rounds <= limit,
            "seed {seed}: {} values never decided after healing ({limit} rounds)",
            missing.len()
        );
        for v in missing.iter().take(RETRY_BATCH) {
            propose(&mut sim, v);
        }
        sim.run(20);
    }
    assert_converged(&mut sim);
    println!(
        "lots: seed {seed}: {} ticks, {repartitions} partitions, {} crashes during a sync, \
         {} values, {} slots decided, {rounds} retry rounds after healing",
        sim.now_tick(),
        sim.crashes_during_sync,
        values.len(),
        sim.chosen().len()
    );
    assert!(
        sim.crashes_during_sync >= 10,
        "seed {seed}: the soak must reach crashes during a sync"
    );
}

/// Values re-proposed per round after healing.
const RETRY_BATCH: usize = 1000;

fn decided_set(sim: &Sim) -> std::collections::HashSet<String> {
    sim.chosen()
        .values()
        .flat_map(|b| b.commands.iter())
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}
