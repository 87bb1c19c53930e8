//! Forgetting: the low-water mark (the lab's Done/Min), bounded memory, and
//! catch-up by snapshot once the log a laggard needs is gone.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};

#[test]
fn min_advances_only_after_every_replica_is_done() {
    let mut sim = Sim::new(6, test_seed("forget"));
    for i in 0..6 {
        propose(&mut sim, &format!("v{i}"));
    }
    assert!(
        sim.run_until(PATIENCE_TICKS, all_caught_up),
        "seed {}",
        sim.seed
    );
    for id in 0..6 {
        assert_eq!(sim.node(id).unwrap().min_slot(), 1, "nobody is done yet");
    }
    let full_log = sim.node(0).unwrap().log_len();
    assert!(full_log >= 6);

    // All but one replica are done: Min must not move anywhere.
    for id in 0..5 {
        sim.compact(id);
    }
    sim.run(50);
    for id in 0..6 {
        assert_eq!(
            sim.node(id).unwrap().min_slot(),
            1,
            "seed {}: Min moved too early",
            sim.seed
        );
        assert_eq!(
            sim.node(id).unwrap().log_len(),
            full_log,
            "seed {}: forgot too early",
            sim.seed
        );
    }

    // The last one is done: Min advances on every replica and memory is freed.
    sim.compact(5);
    let top = *sim.chosen().keys().next_back().unwrap();
    let ok = sim.run_until(PATIENCE_TICKS, |s| {
        (0..6).all(|id| s.node(id).unwrap().min_slot() == top + 1)
    });
    assert!(ok, "seed {}: Min did not advance everywhere", sim.seed);
    for id in 0..6 {
        let node = sim.node(id).unwrap();
        assert_eq!(node.compacted_through(), top);
        assert_eq!(
            node.log_len(),
            0,
            "seed {}: replica {id} still holds entries",
            sim.seed
        );
    }
    // Forgotten slots stay decided: new proposals continue above them.
    propose(&mut sim, "after");
    await_decided(&mut sim, "after", 6);
    assert_eq!(sim.decided_slot(b"after"), Some(top + 1));
}

#[test]
fn memory_stays_bounded_over_a_long_run() {
    let mut sim = Sim::new(3, test_seed("bounded_memory"));
    let mut peak_log = 0;
    for i in 0..3000 {
        propose(&mut sim, &format!("value-{i}"));
        sim.run(1);
        if i % 100 == 99 {
            for id in 0..3 {
                sim.compact(id);
            }
        }
        for id in 0..3 {
            peak_log = peak_log.max(sim.node(id).unwrap().log_len());
        }
    }
    assert!(sim.run_until(PATIENCE_TICKS, all_caught_up));
    println!("bounded_memory: peak log length {peak_log} entries over 3000 proposals");
    assert!(
        peak_log < 300,
        "seed {}: the log grew to {peak_log} entries",
        sim.seed
    );
    // Storage holds no more than memory does.
    for id in 0..3 {
        let stored = sim.storages[id].state().entries.len();
        assert!(
            stored <= sim.node(id as u32).unwrap().log_len() + 1,
            "replica {id} stores {stored}"
        );
    }
}

#[test]
fn laggard_catches_up_by_snapshot_after_the_log_is_gone() {
    let seed = test_seed("snapshot_catchup");
    let mut sim = Sim::with_config(3, seed, |c| c.log_retain_slots_max = 20);
    await_leader(&mut sim);
    propose(&mut sim, "before");
    await_decided(&mut sim, "before", 3);
    let laggard = (0..3).find(|id| Some(*id) != sim.leader()).unwrap();
    sim.crash(laggard);
    for i in 0..200 {
        propose(&mut sim, &format!("while-down-{i}"));
        sim.run(1);
    }
    assert!(sim.run_until(PATIENCE_TICKS, all_caught_up));
    for id in (0..3).filter(|id| *id != laggard) {
        sim.compact(id);
    }
    // The survivors keep only `log_retain_slots_max` entries past their
    // snapshot: the slots the laggard needs are gone.
    let survivor = (0..3).find(|id| *id != laggard).unwrap();
    assert!(
        sim.node(survivor).unwrap().compacted_through() > 100,
        "seed {seed}"
    );

    sim.restart(laggard);
    propose(&mut sim, "after");
    await_decided(&mut sim, "after", 3);
    assert!(sim.run_until(PATIENCE_TICKS, all_caught_up), "seed {seed}");
    assert!(
        sim.node(laggard).unwrap().stats().snapshots_installed >= 1,
        "seed {seed}"
    );
    assert_eq!(
        sim.applied[laggard as usize].digest,
        sim.applied[survivor as usize].digest
    );
    assert_eq!(
        sim.applied[laggard as usize].commands,
        sim.applied[survivor as usize].commands
    );
}

/// A catch-up reply a leader asked for as a follower may arrive after it
/// has been elected, with a snapshot past its in-flight slots. The leader
/// must not take it: its commit index would then cover slots it proposed
/// in its own ballot without a majority, and followers holding those would
/// apply them (`scenarios::deposed_leader_learning_a_snapshot_by_catchup_*`).
/// Its window stays, and every slot in it is still decided and answered.
#[test]
fn a_leader_ignores_a_late_snapshot_and_still_decides_its_window() {
    use shardkv::paxos::{Config, DurableState, Message, Paxos, Snapshot};

    let mut nodes: Vec<Paxos> = (0..3)
        .map(|id| Paxos::new(Config::new_group(id, 3), DurableState::default()))
        .collect();
    // Everything delivered in order, or the leader's messages lost.
    let settle = |nodes: &mut Vec<Paxos>, drop_from_leader: bool| {
        settle_nodes(nodes, |id, _| !(drop_from_leader && id == 0))
    };
    while !nodes[0].is_leader() {
        nodes[0].tick();
        settle(&mut nodes, false);
    }
    // Three slots the followers never hear of.
    for i in 0..3 {
        nodes[0]
            .propose(format!("lost{i}").into())
            .expect("leader takes it");
        settle(&mut nodes, true);
    }
    assert_eq!(nodes[0].inflight_slots(), 3);
    let commit = nodes[0].commit_index();

    // The late catch-up reply: a snapshot past all three.
    let index = commit + 10;
    let snapshot = Snapshot {
        index,
        data: "state".into(),
    };
    nodes[0].step(
        1,
        Message::CatchUpReply {
            snapshot: Some(snapshot),
            entries: Vec::new(),
            commit: index,
            memberships: Vec::new(),
        },
    );
    assert!(nodes[0].is_leader());
    assert_eq!(
        nodes[0].commit_index(),
        commit,
        "the commit index did not jump"
    );
    assert_eq!(nodes[0].inflight_slots(), 3, "the window is untouched");
    assert!(nodes[0].ready().snapshot.is_none(), "nothing was installed");
    // The network heals: the leader resends its window and decides it.
    for _ in 0..20 {
        nodes[0].tick();
        settle(&mut nodes, false);
    }
    assert_eq!(nodes[0].inflight_slots(), 0);
    assert_eq!(nodes[0].commit_index(), commit + 3);
}
