//! Membership changes (stop signs and epochs) on the simulator: a group
//! grows from 3 voters to 5 through learners, shrinks to a different 3,
//! under lost, delayed and reordered messages and crashes inside syncs,
//! with clients writing throughout. The simulator checks agreement and
//! validity on every slot any replica applies.

use crate::common::*;
use shardkv::paxos::sim::{test_seed, Sim};
use shardkv::paxos::{Members, MembershipChange, MembershipError, NodeId, RoleKind};

fn set(ids: &[NodeId]) -> Members {
    ids.iter().fold(0, |set, id| set | 1 << id)
}

/// Proposes the change at whichever replica leads until one takes it (a
/// leader may refuse while a learner catches up), then runs until every
/// live member of the new membership has entered it. Returns its epoch.
fn change(sim: &mut Sim, voters: &[NodeId], learners: &[NodeId]) -> u64 {
    let (voters, learners) = (set(voters), set(learners));
    let mut last_error = None;
    for _ in 0..PATIENCE_TICKS {
        if let Some(leader) = sim.leader() {
            match sim.propose_membership(leader, voters, learners) {
                Ok(next) => {
                    let entered = sim.run_until(PATIENCE_TICKS, |s| {
                        shardkv::paxos::types::ids(voters | learners)
                            .filter(|id| s.is_up(*id))
                            .all(|id| {
                                s.node(id)
                                    .is_some_and(|n| n.membership().epoch >= next.epoch)
                            })
                    });
                    assert!(
                        entered,
                        "seed {}: the members never all entered epoch {}",
                        sim.seed, next.epoch
                    );
                    return next.epoch;
                }
                Err(e @ (MembershipError::NotALearner { .. } | MembershipError::NoVoters)) => {
                    panic!("seed {}: {e}", sim.seed)
                }
                // The change before is still in flight, or a learner is
                // still catching up: wait.
                Err(e) => last_error = Some(e),
            }
        }
        sim.run(1);
    }
    panic!(
        "seed {}: no leader took the change (last refusal: {last_error:?})",
        sim.seed
    );
}

/// Writes `count` values named `prefix-i` through the leader of the day,
/// each decided by `replicas` live replicas.
fn write(sim: &mut Sim, prefix: &str, count: usize, replicas: usize) {
    for i in 0..count {
        let value = format!("{prefix}-{i}");
        propose(sim, &value);
        await_decided(sim, &value, replicas);
    }
}

#[test]
fn a_group_grows_from_3_to_5_through_learners_and_shrinks_to_another_3() {
    let mut sim = Sim::with_spares(3, 2, test_seed("grow_and_shrink"), |_| {});
    await_leader(&mut sim);
    write(&mut sim, "before", 5, 3);
    assert_eq!(sim.node(3).map(|n| n.role()), Some(RoleKind::NotMember));

    assert_eq!(change(&mut sim, &[0, 1, 2], &[3, 4]), 1);
    assert!(sim.run_until(PATIENCE_TICKS, |s| {
        [3, 4]
            .iter()
            .all(|id| s.node(*id).map(|n| n.role()) == Some(RoleKind::Learner))
    }));
    write(&mut sim, "learners", 5, 5);

    assert_eq!(change(&mut sim, &[0, 1, 2, 3, 4], &[]), 2);
    write(&mut sim, "five", 5, 5);

    assert_eq!(change(&mut sim, &[2, 3, 4], &[]), 3);
    write(&mut sim, "three", 5, 3);
    for removed in [0, 1] {
        let told = sim.run_until(PATIENCE_TICKS, |s| {
            s.node(removed).map(|n| n.role()) == Some(RoleKind::NotMember)
        });
        assert!(
            told,
            "seed {}: replica {removed} never learned it was removed",
            sim.seed
        );
    }
    // The removed replicas decide nothing: the 3 left carry on alone.
    sim.crash(0);
    sim.crash(1);
    write(&mut sim, "after", 5, 3);
    assert_converged_among(&mut sim, &[2, 3, 4]);
}

#[test]
fn a_member_started_again_from_a_blank_disk_counts_for_nothing_until_added_anew() {
    let mut sim = Sim::with_spares(3, 1, test_seed("blank_member"), |_| {});
    await_leader(&mut sim);
    change(&mut sim, &[0, 1, 2], &[3]);
    change(&mut sim, &[0, 1, 3], &[]);
    write(&mut sim, "three", 3, 3);
    let lost_life = sim.node(3).map(|n| n.incarnation());

    // Replica 3 loses its disk and starts again as a joiner under its id.
    sim.lose_disk(3, true);
    sim.restart(3);
    assert_ne!(sim.node(3).map(|n| n.incarnation()), lost_life);
    sim.crash(2); // removed already: out of the way
    let led = sim.run_until(PATIENCE_TICKS, |s| matches!(s.leader(), Some(0 | 1)));
    assert!(led, "seed {}: neither 0 nor 1 leads", sim.seed);
    let leader = sim.leader().unwrap_or_default();
    let other = 1 - leader;
    sim.crash(other);
    // Voters `leader` and 3 of {0, 1, 3} are up, but 3 is not the life
    // the membership records: nothing can be decided.
    sim.propose(leader, "blank-vote")
        .expect("the leader takes it");
    sim.run(PATIENCE_TICKS);
    assert_eq!(
        sim.decided_count(b"blank-vote"),
        0,
        "seed {}: a replica that lost its disk voted as the member it was",
        sim.seed
    );
    assert_eq!(sim.node(3).map(|n| n.role()), Some(RoleKind::NotMember));

    // Replaced: removed as the old life, added as the new, promoted.
    sim.restart(other);
    let new_life = sim.node(3).map(|n| n.incarnation()).unwrap_or_default();
    let mut proposed = None;
    sim.run_until(PATIENCE_TICKS, |s| s.leader().is_some());
    for _ in 0..PATIENCE_TICKS {
        if let Some(leader) = sim.leader() {
            let replace = shardkv::paxos::MembershipChange {
                voters: set(&[0, 1]),
                learners: set(&[3]),
                joiners: [(
                    3,
                    shardkv::paxos::Member {
                        incarnation: new_life,
                        address: "sim-3".into(),
                    },
                )]
                .into(),
                addresses: Default::default(),
                expected_epoch: None,
            };
            if let Ok(next) = sim.propose_change(leader, replace) {
                proposed = Some(next);
                break;
            }
        }
        sim.run(1);
    }
    let replaced = proposed.expect("a leader takes the replacement");
    assert!(sim.run_until(PATIENCE_TICKS, |s| {
        s.node(3).is_some_and(|n| {
            n.membership().epoch >= replaced.epoch && n.role() == RoleKind::Learner
        })
    }));
    change(&mut sim, &[0, 1, 3], &[]);
    write(&mut sim, "replaced", 3, 3);
    sim.crash(1);
    write(&mut sim, "with-the-new-life", 3, 2);
    assert_converged_among(&mut sim, &[0, 3]);
}

/// A replica that lost its disk after the group changed its members cannot
/// recover its votes (the rule needs the voters it voted with): it starts
/// over as a new member, votes in nothing, and is replaced by a change.
#[test]
fn a_disk_lost_after_a_change_starts_over_as_a_new_member() {
    let mut sim = Sim::with_spares(3, 1, test_seed("lost_after_change"), |c| {
        c.recover_when_empty = true;
    });
    await_leader(&mut sim);
    change(&mut sim, &[0, 1, 2], &[3]);
    change(&mut sim, &[0, 1, 2, 3], &[]);
    write(&mut sim, "four", 3, 4);
    let lost = (0..3).find(|id| Some(*id) != sim.leader()).unwrap_or(1);
    sim.lose_disk(lost, false);
    sim.restart(lost);
    let out = sim.run_until(PATIENCE_TICKS, |s| {
        s.node(lost).map(|n| n.role()) == Some(RoleKind::NotMember)
    });
    assert!(
        out,
        "seed {}: replica {lost} never gave up recovering ({:?})",
        sim.seed,
        sim.node(lost).map(|n| n.role())
    );
    write(&mut sim, "without-it", 3, 3);
    let voters: Vec<NodeId> = (0..4).filter(|id| *id != lost).collect();
    let new_life = sim.node(lost).map(|n| n.incarnation()).unwrap_or_default();
    let mut replaced = None;
    for _ in 0..PATIENCE_TICKS {
        if let Some(leader) = sim.leader() {
            let replace = shardkv::paxos::MembershipChange {
                voters: set(&voters),
                learners: set(&[lost]),
                joiners: [(
                    lost,
                    shardkv::paxos::Member {
                        incarnation: new_life,
                        address: format!("sim-{lost}"),
                    },
                )]
                .into(),
                addresses: Default::default(),
                expected_epoch: None,
            };
            if let Ok(next) = sim.propose_change(leader, replace) {
                replaced = Some(next);
                break;
            }
        }
        sim.run(1);
    }
    assert!(
        replaced.is_some(),
        "seed {}: no leader took the replacement",
        sim.seed
    );
    change(&mut sim, &[0, 1, 2, 3], &[]);
    write(&mut sim, "replaced", 3, 4);
    assert_converged_among(&mut sim, &[0, 1, 2, 3]);
}

/// A group first started with 2 replicas and grown to 5: its two first
/// voters lose their disks at once. Each asks only the first voters, finds
/// the other blank, and, were the group new, would start it again: a second
/// group deciding again in slots the first decided (the agreement check
/// trips). Known to exist (`existing_group`, as the operator's pods are once
/// the group has had a leader), they start over as new members instead,
/// and the group goes on in its 3 other voters.
#[test]
fn the_first_voters_all_blank_in_an_existing_group_start_no_second_group() {
    let mut sim = Sim::with_spares(2, 3, test_seed("first_voters_blank"), |c| {
        c.recover_when_empty = true;
    });
    await_leader(&mut sim);
    change(&mut sim, &[0, 1], &[2, 3, 4]);
    change(&mut sim, &[0, 1, 2, 3, 4], &[]);
    write(&mut sim, "five", 20, 5);
    for lost in [0, 1] {
        sim.lose_disk(lost, false);
        sim.reconfigure(lost, |c| c.existing_group = true);
    }
    // Cut off from the rest, as a zone would be: were they to start a new
    // group, it would lead and decide here.
    sim.partition(&[&[0, 1], &[2, 3, 4]]);
    sim.restart(0);
    sim.restart(1);
    for i in 0..PATIENCE_TICKS / 10 {
        if let Some(&rogue) = sim.leaders().iter().find(|id| **id < 2) {
            let _ = sim.propose(rogue, format!("rogue-{i}"));
        }
        sim.run(10);
    }
    sim.heal();
    let gave_up = sim.run_until(PATIENCE_TICKS, |s| {
        [0, 1]
            .iter()
            .all(|id| s.node(*id).map(|n| n.role()) == Some(RoleKind::NotMember))
    });
    assert!(
        gave_up,
        "seed {}: the blank first voters did not wait to be added ({:?}, {:?})",
        sim.seed,
        sim.node(0).map(|n| n.role()),
        sim.node(1).map(|n| n.role())
    );
    write(&mut sim, "three-left", 10, 3);
    assert_converged_among(&mut sim, &[2, 3, 4]);
}

/// A group first started with one replica has no peers to recover a lost
/// disk from: a blank start is a new group's. Once the group has grown,
/// that start must still not vote as the member the replica was.
#[test]
fn a_replica_first_alone_and_started_again_blank_is_not_the_member_it_was() {
    // As a node starts: a blank start may be a lost disk.
    let mut sim = Sim::with_spares(1, 2, test_seed("first_alone"), |c| {
        c.recover_when_empty = true;
    });
    await_leader(&mut sim);
    change(&mut sim, &[0], &[1, 2]);
    change(&mut sim, &[0, 1, 2], &[]);
    write(&mut sim, "grown", 2, 3);
    // One of the new members leads.
    sim.crash(0);
    let led = sim.run_until(PATIENCE_TICKS, |s| matches!(s.leader(), Some(1 | 2)));
    assert!(led, "seed {}: neither 1 nor 2 leads", sim.seed);
    sim.restart(0);
    let leader = sim.leader().unwrap_or(1);
    let other = 3 - leader;
    // `v` is decided by the leader and replica 0; `other` never hears it.
    sim.cut_one_way(leader, other);
    propose(&mut sim, "v");
    await_decided(&mut sim, "v", 2);
    // The leader goes down, and replica 0 loses its disk.
    sim.crash(leader);
    sim.lose_disk(0, false);
    sim.restart(0);
    sim.heal();
    // `other` and the blank replica are two of the three voters, but the
    // blank one is not the life the membership records: they decide
    // nothing (were its vote counted, they could decide another value in
    // `v`'s slot, which the simulator's agreement check catches).
    sim.run(PATIENCE_TICKS);
    sim.restart(leader);
    write(&mut sim, "after", 2, 2);
    assert_converged_among(&mut sim, &[leader, other]);
}

#[test]
fn membership_changes_keep_agreement_under_faults() {
    let mut sim = Sim::with_spares(3, 2, test_seed("membership_faults"), |_| {});
    sim.faults.drop_request = 0.1;
    sim.faults.drop_reply = 0.1;
    sim.faults.delay_max_ticks = 3;
    sim.faults.crash_during_sync = 0.01;
    await_leader(&mut sim);
    write(&mut sim, "a", 3, 2);
    change(&mut sim, &[0, 1, 2], &[3, 4]);
    write(&mut sim, "b", 3, 2);
    change(&mut sim, &[0, 1, 2, 3, 4], &[]);
    write(&mut sim, "c", 3, 3);
    change(&mut sim, &[1, 3, 4], &[0]);
    write(&mut sim, "d", 3, 2);
    change(&mut sim, &[0, 1, 3], &[]);
    write(&mut sim, "e", 3, 2);
    sim.faults = Default::default();
    assert_converged_among(&mut sim, &[0, 1, 3]);
}

/// A member removed with its storage intact and added again later (the
/// operator does so when a scale-down is reversed before the removed pods
/// went) is a slow member, not a danger: its acceptor state stopped at
/// the stop sign that removed it, and later epochs' ballots are above its
/// promises. Under lost and delayed messages and crashes inside syncs, it
/// goes 5 → 3 → 5 twice with the same two replicas.
#[test]
fn a_removed_member_added_again_with_its_storage_keeps_agreement() {
    let mut sim = Sim::with_spares(3, 2, test_seed("removed_added_again"), |_| {});
    sim.faults.drop_request = 0.1;
    sim.faults.drop_reply = 0.1;
    sim.faults.delay_max_ticks = 3;
    sim.faults.crash_during_sync = 0.01;
    await_leader(&mut sim);
    change(&mut sim, &[0, 1, 2], &[3, 4]);
    change(&mut sim, &[0, 1, 2, 3, 4], &[]);
    for round in 0..2 {
        write(&mut sim, &format!("five-{round}"), 5, 3);
        change(&mut sim, &[0, 1, 2, 3], &[]);
        change(&mut sim, &[0, 1, 2], &[]);
        write(&mut sim, &format!("three-{round}"), 5, 2);
        change(&mut sim, &[0, 1, 2], &[3, 4]);
        write(&mut sim, &format!("learners-{round}"), 5, 2);
        change(&mut sim, &[0, 1, 2, 3, 4], &[]);
    }
    write(&mut sim, "end", 5, 3);
    sim.faults = Default::default();
    assert_converged_among(&mut sim, &[0, 1, 2, 3, 4]);
}

/// The first change records each member's incarnation as the member
/// itself reported it to the leader, not as others gossiped it: one this
/// leader has not heard from yet is not recorded on hearsay.
#[test]
fn a_first_change_waits_to_hear_each_member_itself() {
    let mut sim = Sim::with_spares(3, 1, test_seed("first_change_heard"), |_| {});
    let leader = await_leader(&mut sim);
    let silent = (0..3).find(|id| *id != leader).expect("a follower");
    sim.crash(silent);
    // A new leadership that has not heard from `silent`.
    sim.crash(leader);
    sim.restart(leader);
    let led = sim.run_until(PATIENCE_TICKS, |s| {
        s.leader()
            .is_some_and(|l| l != silent && s.node(l).is_some_and(|n| n.is_leader()))
    });
    assert!(led, "seed {}: no leader without {silent}", sim.seed);
    let new_leader = sim.leader().unwrap_or_default();
    assert_eq!(
        sim.propose_membership(new_leader, set(&[0, 1, 2]), set(&[3])),
        Err(MembershipError::NotHeardFrom { id: silent })
    );
    sim.restart(silent);
    change(&mut sim, &[0, 1, 2], &[3]);
}

#[test]
fn a_change_is_refused_with_a_reason() {
    let mut sim = Sim::with_spares(3, 1, test_seed("change_refused"), |_| {});
    let leader = await_leader(&mut sim);
    let follower = (0..3).find(|id| *id != leader).expect("a follower");
    assert!(matches!(
        sim.propose_membership(follower, set(&[0, 1]), 0),
        Err(MembershipError::NotLeader { .. })
    ));
    assert_eq!(
        sim.propose_membership(leader, 0, set(&[0, 1, 2])),
        Err(MembershipError::NoVoters)
    );
    assert_eq!(
        sim.propose_membership(leader, set(&[0, 1, 2, 3]), 0),
        Err(MembershipError::NotALearner { id: 3 })
    );
    assert_eq!(
        sim.propose_membership(leader, set(&[0, 1, 2]), 0),
        Err(MembershipError::Unchanged)
    );
    assert!(matches!(
        sim.propose_membership(leader, set(&[0, 1, 2]), set(&[2])),
        Err(MembershipError::VoterAndLearner { id: 2 })
    ));
    // One change at a time: the first is not decided before the second.
    let first = sim.propose_membership(leader, set(&[0, 1, 2]), set(&[3]));
    assert!(first.is_ok(), "{first:?}");
    assert!(matches!(
        sim.propose_membership(leader, set(&[0, 1, 2]), 0),
        Err(MembershipError::InProgress { .. })
    ));
    assert!(sim.run_until(PATIENCE_TICKS, |s| {
        s.node(3).map(|n| n.role()) == Some(RoleKind::Learner)
    }));
    write(&mut sim, "caught-up", 3, 4);
    // The learner and one voter down: a change that makes the learner a
    // voter in place of the one still up would leave no majority up.
    let leader = await_leader(&mut sim);
    let down = (0..3).find(|id| *id != leader).expect("a follower");
    sim.crash(3);
    sim.crash(down);
    sim.run(25);
    assert!(
        sim.node(leader).is_some_and(|n| n.is_leader()),
        "seed {}: the leader still hears a majority of its voters",
        sim.seed
    );
    assert_eq!(
        sim.propose_membership(leader, set(&[leader, down, 3]), 0),
        Err(MembershipError::NoQuorumUp {
            up: 1,
            voters: 3,
            needed: 2
        })
    );
}

#[test]
fn every_voter_can_be_replaced_by_learners() {
    // The old leader is in neither new set: nobody but it knows the stop
    // sign was decided, and learners never stand. It tells the members of
    // both epochs as it leaves (without that, the new voters waited
    // forever in the old epoch).
    let mut sim = Sim::with_spares(3, 3, test_seed("replace_every_voter"), |_| {});
    await_leader(&mut sim);
    write(&mut sim, "old", 3, 3);
    change(&mut sim, &[0, 1, 2], &[3, 4, 5]);
    write(&mut sim, "learners", 3, 6);
    change(&mut sim, &[3, 4, 5], &[]);
    write(&mut sim, "new", 3, 3);
    for old in 0..3 {
        sim.crash(old);
    }
    write(&mut sim, "alone", 3, 3);
    assert_converged_among(&mut sim, &[3, 4, 5]);
}

#[test]
fn a_single_voter_sends_nothing_of_its_new_ballot_before_its_promise_is_durable() {
    // Voters {0, 1, 2} become voter {0} with learners {1, 2}. Replica 0
    // decides the stop sign, enters the new epoch and wins it in one turn.
    // Its Accepts of the new ballot must wait for the sync of its promise:
    // had it crashed in that sync, a later life would stand with the same
    // ballot and propose other values, which the learners would take over
    // the first ones in the same ballot.
    use shardkv::paxos::{Config, DurableState, Message, Paxos, Ready};

    let mut nodes: Vec<Paxos> = (0..3)
        .map(|id| Paxos::new(Config::new_group(id, 3), DurableState::default()))
        .collect();
    let mut outputs = Vec::new();
    let settle = |nodes: &mut Vec<Paxos>, outputs: &mut Vec<(NodeId, Ready)>| {
        settle_nodes(nodes, |id, ready| {
            outputs.push((id, ready.clone()));
            true
        })
    };
    // Accepts of `epoch`'s ballots replica 0 sent in the part of its
    // `Ready`s that `part` picks.
    let accepts_of = |outputs: &[(NodeId, Ready)],
                      epoch: u64,
                      part: fn(&Ready) -> &Vec<(NodeId, Message)>| {
        (outputs.iter())
            .filter(|(id, _)| *id == 0)
            .flat_map(|(_, ready)| part(ready).iter())
            .filter(|(_, m)| matches!(m, Message::Accept { ballot, .. } if ballot.epoch() == epoch))
            .count()
    };
    while !nodes[0].is_leader() {
        nodes[0].tick();
        settle(&mut nodes, &mut outputs);
    }
    outputs.clear();
    let next = nodes[0]
        .propose_membership(MembershipChange {
            voters: set(&[0]),
            learners: set(&[1, 2]),
            ..Default::default()
        })
        .expect("the leader takes it");
    settle(&mut nodes, &mut outputs);
    assert_eq!(nodes[0].membership(), &next);
    assert!(nodes[0].is_leader(), "the single voter leads its epoch");
    let early_accepts_of_new_epoch = accepts_of(&outputs, next.epoch, |r| &r.messages);
    assert_eq!(
        early_accepts_of_new_epoch, 0,
        "an Accept of the new ballot left before the ballot's promise was durable"
    );
    let held_accepts = accepts_of(&outputs, next.epoch, |r| &r.persisted_messages);
    assert!(
        held_accepts > 0,
        "the learners were sent the new ballot after the sync"
    );

    // Its own acceptance decides: whatever it tells of a decision (a commit
    // index in an Accept, the stop sign of a change) waits for its sync too.
    outputs.clear();
    nodes[0].propose("alone".into()).expect("the voter leads");
    let back = nodes[0]
        .propose_membership(MembershipChange {
            voters: set(&[0, 1]),
            learners: set(&[2]),
            ..Default::default()
        })
        .expect("learner 1 has caught up");
    settle(&mut nodes, &mut outputs);
    assert_eq!(
        nodes[1].membership(),
        &back,
        "the learner heard of the change"
    );
    let early: Vec<_> = (outputs.iter())
        .filter(|(id, ready)| *id == 0 && !ready.persist.is_empty())
        .flat_map(|(_, ready)| ready.messages.iter())
        .filter(|(_, m)| matches!(m, Message::Accept { .. } | Message::CatchUpReply { .. }))
        .collect();
    assert!(
        early.is_empty(),
        "a lone voter sent {early:?} before its writes were durable"
    );
}
