//! Replicas that cannot win an election must not depose a leader the rest
//! of the group follows: one that can send but not receive (a one-way
//! partition), and one that returns from a partition. Both did before
//! pre-votes and leader stickiness (`Config::pre_vote`, `check_quorum`).

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};

/// Proposes `count` values through the leader, a few ticks apart, and
/// waits until each is decided by `replicas` replicas.
fn write_through(sim: &mut Sim, prefix: &str, count: usize, replicas: usize) {
    for i in 0..count {
        propose(sim, &format!("{prefix}{i}"));
        sim.run(20);
    }
    for i in 0..count {
        await_decided(sim, &format!("{prefix}{i}"), replicas);
    }
}

#[test]
fn a_replica_that_cannot_hear_does_not_depose_the_leader() {
    let mut sim = Sim::new(5, test_seed("deaf_replica"));
    let leader = await_leader(&mut sim);
    write_through(&mut sim, "before", 3, 5);
    let ballot = sim.node(leader).expect("up").ballot();
    // One follower hears nothing (its sends still arrive): its election
    // timeout runs out again and again.
    let deaf = (leader + 1) % 5;
    // What it did before (it may have stood in the first election).
    let before = sim.node(deaf).expect("up").stats().clone();
    sim.set_deaf(deaf, true);
    write_through(&mut sim, "deaf", 50, 4);
    assert_eq!(
        sim.leader(),
        Some(leader),
        "seed {}: the leader was deposed",
        sim.seed
    );
    assert_eq!(
        sim.node(leader).expect("up").ballot(),
        ballot,
        "seed {}: the leader had to win again",
        sim.seed
    );
    let stats = sim.node(deaf).expect("up").stats().clone();
    assert!(
        stats.pre_votes_started >= before.pre_votes_started + 10,
        "seed {}: {stats:?}",
        sim.seed
    );
    assert_eq!(
        stats.elections_started, before.elections_started,
        "seed {}: it stood while deaf",
        sim.seed
    );
}

#[test]
fn a_one_way_cut_from_the_leader_elects_once_and_then_holds() {
    // The leader's messages to one follower are lost, the other way works.
    // That follower may win one election (others may not have heard the
    // leader lately), but the group must settle, not keep changing.
    let mut sim = Sim::new(5, test_seed("one_way_from_leader"));
    let leader = await_leader(&mut sim);
    write_through(&mut sim, "before", 3, 5);
    let cut = (leader + 2) % 5;
    sim.cut_one_way(leader, cut);
    sim.run(500);
    let settled = sim.leader().expect("a leader");
    let ballot = sim.node(settled).expect("up").ballot();
    write_through(&mut sim, "cut", 30, 4);
    assert_eq!(
        sim.node(sim.leader().expect("a leader"))
            .expect("up")
            .ballot(),
        ballot,
        "seed {}: leadership kept changing under a one-way cut",
        sim.seed
    );
}

#[test]
fn a_replica_back_from_a_partition_does_not_depose_the_leader() {
    let mut sim = Sim::new(5, test_seed("returning_replica"));
    let leader = await_leader(&mut sim);
    write_through(&mut sim, "before", 3, 5);
    let ballot = sim.node(leader).expect("up").ballot();
    let away = (leader + 3) % 5;
    let rest: Vec<u32> = (0..5).filter(|id| *id != away).collect();
    sim.partition(&[&rest, &[away]]);
    write_through(&mut sim, "apart", 20, 4);
    sim.heal();
    write_through(&mut sim, "back", 20, 5);
    assert_eq!(
        sim.node(leader).expect("up").ballot(),
        ballot,
        "seed {}: the returning replica deposed the leader",
        sim.seed
    );
    assert_converged(&mut sim);
}
