//! Agreement and progress on a reliable network: the lab's basic tests.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};
use shardkv::paxos::ProposeError;

#[test]
fn single_proposer_is_decided_everywhere() {
    let mut sim = Sim::new(3, test_seed("single_proposer"));
    propose(&mut sim, "hello");
    await_decided(&mut sim, "hello", 3);
    assert_eq!(sim.decided_slot(b"hello"), Some(1));
}

#[test]
fn followers_refuse_proposals_and_name_the_leader() {
    let mut sim = Sim::new(3, test_seed("followers_refuse"));
    let leader = await_leader(&mut sim);
    sim.run(5); // let the first heartbeat name the leader
    for id in (0..3).filter(|id| *id != leader) {
        assert_eq!(
            sim.propose(id, "x"),
            Err(ProposeError::NotLeader {
                leader: Some(leader)
            }),
            "seed {}",
            sim.seed
        );
    }
}

#[test]
fn many_proposers_same_value() {
    // Every replica is offered the same value at once, as retrying clients do.
    let mut sim = Sim::new(3, test_seed("many_proposers_same"));
    await_leader(&mut sim);
    let mut taken = 0;
    for id in 0..3 {
        if sim.propose(id, "77").is_ok() {
            taken += 1;
        }
    }
    assert_eq!(taken, 1, "seed {}: exactly the leader takes it", sim.seed);
    await_decided(&mut sim, "77", 3);
}

#[test]
fn many_proposers_different_values_with_dueling_candidates() {
    // Identical election timeouts make every replica stand at once: the
    // ballots must sort it out without ever deciding two values in a slot.
    let seed = test_seed("many_proposers_different");
    let mut sim = Sim::with_config(5, seed, |c| {
        c.election_timeout_min_ticks = 10;
        c.election_timeout_max_ticks = 12;
    });
    for round in 0..20 {
        for id in 0..5 {
            let _ = sim.propose(id, format!("r{round}-p{id}"));
        }
        sim.run(1);
    }
    for round in 0..20 {
        propose(&mut sim, &format!("late{round}"));
    }
    for round in 0..20 {
        await_decided(&mut sim, &format!("late{round}"), 5);
    }
    assert!(sim.run_until(PATIENCE_TICKS, all_caught_up), "seed {seed}");
}

#[test]
fn out_of_order_delivery_still_applies_in_slot_order() {
    // Messages delayed by up to 5 ticks arrive in any order: a follower must
    // not apply slot 6 before slot 5, and every replica applies the same log.
    let mut sim = Sim::new(5, test_seed("out_of_order"));
    sim.faults.delay_max_ticks = 5;
    await_leader(&mut sim);
    for i in 0..30 {
        propose(&mut sim, &format!("v{i}"));
        if i % 3 == 0 {
            sim.run(1);
        }
    }
    for i in 0..30 {
        await_decided(&mut sim, &format!("v{i}"), 5);
    }
}

#[test]
fn deaf_minority_does_not_block_deaf_majority_does() {
    let mut sim = Sim::new(5, test_seed("deaf"));
    let leader = await_leader(&mut sim);
    propose(&mut sim, "hello");
    await_decided(&mut sim, "hello", 5);

    // Two followers stop hearing anything: the other three still decide.
    let followers: Vec<u32> = (0..5).filter(|id| *id != leader).collect();
    sim.set_deaf(followers[0], true);
    sim.set_deaf(followers[1], true);
    propose(&mut sim, "goodbye");
    await_decided(&mut sim, "goodbye", 3);
    sim.run(50);
    assert_eq!(
        sim.decided_count(b"goodbye"),
        3,
        "seed {}: deaf replicas learned",
        sim.seed
    );

    // With a third deaf follower only the leader and one other can hear: no
    // majority, so nothing more may be decided.
    sim.set_deaf(followers[2], true);
    let before = sim.chosen().len();
    let _ = sim.propose(leader, "xxx");
    sim.run(200);
    assert_eq!(
        sim.chosen().len(),
        before,
        "seed {}: decided without a majority",
        sim.seed
    );
    assert_eq!(sim.decided_count(b"xxx"), 0);

    // Hearing again, everyone catches up, including the undecided proposal
    // if a new leader recovered it from an acceptor.
    for id in 0..5 {
        sim.set_deaf(id, false);
    }
    propose(&mut sim, "after");
    await_decided(&mut sim, "after", 5);
    assert!(
        sim.run_until(PATIENCE_TICKS, all_caught_up),
        "seed {}",
        sim.seed
    );
}

#[test]
fn many_instances_reliable() {
    let mut sim = Sim::new(3, test_seed("many_reliable"));
    for i in 0..500 {
        propose(&mut sim, &format!("{i}"));
    }
    assert!(sim.run_until(PATIENCE_TICKS, |s| s
        .chosen()
        .values()
        .map(|b| b.commands.len())
        .sum::<usize>()
        == 500));
    assert_converged(&mut sim);
}

#[test]
fn minority_proposal_ignored_when_late_peers_join() {
    // The lab's "old" test: a value decided by three of five replicas must
    // survive when the two that never saw it start and one of them leads.
    let mut sim = Sim::new(5, test_seed("old_minority"));
    sim.crash(0);
    sim.crash(4);
    propose(&mut sim, "eleven");
    await_decided(&mut sim, "eleven", 3);
    let slot = sim.decided_slot(b"eleven").expect("decided");

    // Two of the three that know it go away; the late pair joins the third.
    let knowers: Vec<u32> = (1..4).collect();
    sim.crash(knowers[0]);
    sim.crash(knowers[1]);
    sim.restart(0);
    sim.restart(4);
    propose(&mut sim, "twentytwo");
    await_decided(&mut sim, "twentytwo", 3);
    assert_eq!(sim.decided_slot(b"eleven"), Some(slot));
    assert!(sim.decided_slot(b"twentytwo") > Some(slot));
    // The newcomers learned the old value too, at the same slot.
    assert!(
        sim.run_until(PATIENCE_TICKS, all_caught_up),
        "seed {}",
        sim.seed
    );
    assert_eq!(sim.decided_count(b"eleven"), 3);
}

#[test]
fn nack_reveals_higher_ballot_and_old_leader_steps_down() {
    let mut sim = Sim::new(3, test_seed("nack"));
    let old = await_leader(&mut sim);
    // Cut the leader off long enough for the others to elect a new one.
    let others: Vec<u32> = (0..3).filter(|id| *id != old).collect();
    sim.partition(&[&[old], &others]);
    assert!(sim.run_until(PATIENCE_TICKS, |s| s.leaders().iter().any(|l| *l != old)));
    assert!(
        sim.run_until(PATIENCE_TICKS, |s| !s.node(old).unwrap().is_leader()),
        "seed {}: a partitioned leader must step aside",
        sim.seed
    );
    sim.heal();
    propose(&mut sim, "new-era");
    await_decided(&mut sim, "new-era", 3);
    let leaders = sim.leaders();
    assert_eq!(leaders.len(), 1, "seed {}", sim.seed);
    let new_ballot = sim.node(leaders[0]).unwrap().ballot();
    assert!(
        sim.node(old).unwrap().promised() >= new_ballot,
        "seed {}",
        sim.seed
    );
}
