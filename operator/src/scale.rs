//! Resizing a group: the one membership step to take now, from the group's
//! membership, its pods and its volume claims. Pure: the controller
//! observes, calls [`plan`], and carries out the step.
//!
//! One member at a time, each step re-derived from the world, so a crash
//! between any two steps leaves a state this function continues from:
//! - up: grow the StatefulSet by one pod, add that pod as a learner once it
//!   answers, promote it once it has caught up, and again;
//! - down: remove the highest member, then shrink the StatefulSet to the
//!   members left, then delete the freed pods' volume claims (a claim left
//!   behind would bring a removed member's old state back at the next
//!   scale-up), and again.
//!
//! A pod whose volume was lost comes back as a new incarnation that is not
//! a member: the member it was is removed and the pod added anew (etcd's
//! "remove, then add" for a lost member).

use std::collections::BTreeMap;

/// The most replicas a group may have (the CRD's bound).
pub const REPLICAS_MAX: u32 = 7;

/// A learner is promoted once it is at most this many slots behind the
/// leader: the bound the Paxos core checks too (`promote_lag_slots_max`).
pub const PROMOTE_LAG_SLOTS_MAX: u64 = 64;

/// One member, as the group's leader reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub id: u32,
    pub address: String,
    /// 0 where the group has not recorded it (before its first change).
    pub incarnation: u64,
    pub voter: bool,
    /// Slots behind the leader, if the leader has heard from it.
    pub behind_slots: Option<u64>,
}

/// The group's membership, from the leader of its latest epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipView {
    pub epoch: u64,
    pub leader: Option<u32>,
    pub members: Vec<MemberView>,
}

impl MembershipView {
    pub fn voters(&self) -> impl DoubleEndedIterator<Item = &MemberView> {
        self.members.iter().filter(|m| m.voter)
    }

    pub fn get(&self, id: u32) -> Option<&MemberView> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// What a pod's replica said of itself.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodIdentity {
    pub incarnation: u64,
    /// It says it is not a member: a new replica waiting to be added, a
    /// new life of a member whose volume was lost, or a member removed
    /// with its volume intact (added again as it is: its acceptor state
    /// stopped at the change that removed it, so it is a slow member).
    pub waiting: bool,
}

/// Everything [`plan`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleInput {
    /// spec.replicas.
    pub desired: u32,
    /// The StatefulSet's size: pods 0..statefulset exist (or are coming).
    pub statefulset: u32,
    pub membership: MembershipView,
    /// The pods below `statefulset` that answered, by ordinal.
    pub pods: BTreeMap<u32, PodIdentity>,
    /// Ordinals at or above `statefulset` that still have a volume claim.
    pub stale_claims: Vec<u32>,
}

/// Why a member is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveReason {
    /// A voter above the desired size.
    Surplus,
    /// A learner left from an interrupted scale-up, or above the size.
    Stray,
    /// Its pod came back from a blank volume as a new incarnation.
    Replaced,
}

/// The one step to take now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleStep {
    /// The group has the size asked for; nothing to do.
    Settled,
    /// No leader answered: no change can be made.
    WaitForLeader,
    /// Pod `id` exists but has not answered (or is recovering).
    WaitForPod {
        id: u32,
    },
    /// Pod `id` answers and is not a member: add it as a learner.
    AddLearner {
        id: u32,
        incarnation: u64,
    },
    /// Learner `id` is catching up.
    WaitForCatchUp {
        id: u32,
        behind_slots: Option<u64>,
    },
    Promote {
        id: u32,
    },
    Remove {
        id: u32,
        reason: RemoveReason,
    },
    /// Set the StatefulSet's size.
    Resize {
        from: u32,
        to: u32,
    },
    /// Delete the volume claims of these ordinals (no pod uses them).
    DeleteClaims {
        ordinals: Vec<u32>,
    },
}

impl ScaleStep {
    /// Whether the step is work in progress (a reconcile soon), not rest.
    pub fn busy(&self) -> bool {
        !matches!(self, ScaleStep::Settled)
    }
}

pub fn plan(input: &ScaleInput) -> ScaleStep {
    let ScaleInput {
        desired,
        statefulset,
        membership,
        pods,
        stale_claims,
    } = input;
    debug_assert!((1..=REPLICAS_MAX).contains(desired), "{desired}");
    if membership.leader.is_none() {
        return ScaleStep::WaitForLeader;
    }
    // A member's pod missing (the StatefulSet was shrunk by someone else):
    // brought back before anything else, and its volume never taken for a
    // removed pod's.
    let above_members = membership
        .members
        .iter()
        .map(|m| m.id + 1)
        .max()
        .unwrap_or(0);
    if *statefulset < above_members {
        return ScaleStep::Resize {
            from: *statefulset,
            to: above_members,
        };
    }
    let keep = (*desired).min(*statefulset);

    // Learners that will not be promoted: left by a scale-up that was
    // reversed, or whose pod is gone.
    if let Some(m) = membership
        .members
        .iter()
        .rev()
        .find(|m| !m.voter && m.id >= keep)
    {
        return ScaleStep::Remove {
            id: m.id,
            reason: RemoveReason::Stray,
        };
    }

    // A member whose pod came back blank: the group still counts the old
    // incarnation, which will never answer again. Not before the group
    // recorded incarnations (0), and not while the pod recovers.
    if let Some(m) = membership.members.iter().find(|m| {
        m.incarnation != 0
            && pods
                .get(&m.id)
                .is_some_and(|p| p.waiting && p.incarnation != m.incarnation)
    }) {
        // The last voter is never removed: that group has lost its data.
        if !(m.voter && membership.voters().count() == 1) {
            return ScaleStep::Remove {
                id: m.id,
                reason: RemoveReason::Replaced,
            };
        }
    }

    // A learner being added: promote it once it has caught up.
    if let Some(m) = membership.members.iter().find(|m| !m.voter) {
        return match m.behind_slots {
            Some(behind) if behind <= PROMOTE_LAG_SLOTS_MAX => ScaleStep::Promote { id: m.id },
            behind_slots => ScaleStep::WaitForCatchUp {
                id: m.id,
                behind_slots,
            },
        };
    }

    // Scale down: the highest voter above the size first, while a voter
    // below it remains to hold the group.
    if membership.voters().any(|m| m.id < *desired) {
        if let Some(m) = membership.voters().rev().find(|m| m.id >= *desired) {
            return ScaleStep::Remove {
                id: m.id,
                reason: RemoveReason::Surplus,
            };
        }
    }
    // Then the pods no member is on.
    let needed = above_members.max(*desired);
    if *statefulset > needed {
        return ScaleStep::Resize {
            from: *statefulset,
            to: needed,
        };
    }
    // Then their volumes, before any pod could start on one again (never a
    // member's: every member is below the size, checked above).
    debug_assert!(stale_claims.iter().all(|o| membership.get(*o).is_none()));
    if !stale_claims.is_empty() {
        return ScaleStep::DeleteClaims {
            ordinals: stale_claims.clone(),
        };
    }

    // Scale up (or repair): every pod below the size is a member.
    for id in 0..keep {
        if membership.get(id).is_some() {
            continue;
        }
        return match pods.get(&id) {
            Some(pod) if pod.waiting => ScaleStep::AddLearner {
                id,
                incarnation: pod.incarnation,
            },
            _ => ScaleStep::WaitForPod { id },
        };
    }
    if statefulset < desired {
        return ScaleStep::Resize {
            from: *statefulset,
            to: statefulset + 1,
        };
    }
    ScaleStep::Settled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voter(id: u32) -> MemberView {
        MemberView {
            id,
            address: format!("pod-{id}:7000"),
            incarnation: 10 + id as u64,
            voter: true,
            behind_slots: Some(0),
        }
    }

    fn learner(id: u32, behind: Option<u64>) -> MemberView {
        MemberView {
            voter: false,
            behind_slots: behind,
            ..voter(id)
        }
    }

    fn input(desired: u32, statefulset: u32, members: Vec<MemberView>) -> ScaleInput {
        let pods = members
            .iter()
            .filter(|m| m.id < statefulset)
            .map(|m| {
                (
                    m.id,
                    PodIdentity {
                        incarnation: m.incarnation,
                        ..PodIdentity::default()
                    },
                )
            })
            .collect();
        ScaleInput {
            desired,
            statefulset,
            membership: MembershipView {
                epoch: 1,
                leader: Some(0),
                members,
            },
            pods,
            stale_claims: Vec::new(),
        }
    }

    fn waiting_pod(input: &mut ScaleInput, id: u32, incarnation: u64) {
        input.pods.insert(
            id,
            PodIdentity {
                incarnation,
                waiting: true,
            },
        );
    }

    #[test]
    fn a_group_of_the_size_asked_for_is_settled() {
        for n in 1..=REPLICAS_MAX {
            let at_size = input(n, n, (0..n).map(voter).collect());
            assert_eq!(plan(&at_size), ScaleStep::Settled, "size {n}");
        }
    }

    /// Applies each planned step as the group and Kubernetes would, until
    /// settled; returns the steps. A new pod answers with the incarnation
    /// 100 + its ordinal, and a learner reports its lag one step after it
    /// is added. Checks at every step that the group keeps a voter, that a
    /// member is removed while its pod still runs, and that no member's pod
    /// is dropped.
    fn carry_out(state: &mut ScaleInput, steps_max: usize) -> Vec<ScaleStep> {
        let mut steps = Vec::new();
        for _ in 0..steps_max {
            let step = plan(state);
            steps.push(step.clone());
            match step.clone() {
                ScaleStep::Settled => return steps,
                ScaleStep::Resize { from, to } => {
                    assert!(
                        state.membership.members.iter().all(|m| m.id < to),
                        "a member's pod would go: {steps:?}"
                    );
                    state.stale_claims.extend(to..from);
                    state.statefulset = to;
                }
                ScaleStep::WaitForPod { id } => waiting_pod(state, id, 100 + id as u64),
                ScaleStep::AddLearner { id, incarnation } => {
                    state.membership.members.push(MemberView {
                        incarnation,
                        ..learner(id, None)
                    });
                    state.membership.members.sort_by_key(|m| m.id);
                }
                ScaleStep::WaitForCatchUp { id, .. } => {
                    let m = state.membership.members.iter_mut().find(|m| m.id == id);
                    m.unwrap().behind_slots = Some(3);
                }
                ScaleStep::Promote { id } => {
                    let m = state.membership.members.iter_mut().find(|m| m.id == id);
                    m.unwrap().voter = true;
                    state.pods.get_mut(&id).unwrap().waiting = false;
                }
                ScaleStep::Remove { id, .. } => {
                    assert!(id < state.statefulset, "its pod still runs: {steps:?}");
                    state.membership.members.retain(|m| m.id != id);
                }
                ScaleStep::DeleteClaims { ordinals } => {
                    state.stale_claims.retain(|o| !ordinals.contains(o))
                }
                other => panic!("unexpected {other:?} after {steps:?}"),
            }
            assert!(
                state.membership.voters().count() >= 1,
                "no voter left after {steps:?}"
            );
        }
        panic!("not settled after {steps_max} steps: {steps:?}");
    }

    /// 3 → 5 step by step: a pod, then a learner, then a voter, one member
    /// at a time.
    #[test]
    fn scaling_up_adds_one_pod_then_one_learner_then_promotes_it() {
        let mut state = input(5, 3, (0..3).map(voter).collect());
        let steps = carry_out(&mut state, 20);
        use ScaleStep::*;
        let one_member = |id| {
            [
                Resize {
                    from: id,
                    to: id + 1,
                },
                WaitForPod { id },
                AddLearner {
                    id,
                    incarnation: 100 + id as u64,
                },
                WaitForCatchUp {
                    id,
                    behind_slots: None,
                },
                Promote { id },
            ]
        };
        let mut expected: Vec<ScaleStep> = one_member(3).into();
        expected.extend(one_member(4));
        expected.push(Settled);
        assert_eq!(steps, expected);
    }

    /// 5 → 3: the highest member leaves the group, then its pod goes, then
    /// its volume; never a pod before its member.
    #[test]
    fn scaling_down_removes_the_member_then_its_pod_then_its_volume() {
        let mut state = input(3, 5, (0..5).map(voter).collect());
        let steps = carry_out(&mut state, 20);
        use ScaleStep::*;
        assert_eq!(
            steps,
            [
                Remove {
                    id: 4,
                    reason: RemoveReason::Surplus
                },
                Remove {
                    id: 3,
                    reason: RemoveReason::Surplus
                },
                Resize { from: 5, to: 3 },
                DeleteClaims {
                    ordinals: vec![3, 4]
                },
                Settled
            ]
        );
    }

    /// A learner added by a scale-up that was then reversed is removed
    /// before anything else; a pod is not dropped while it is a member.
    #[test]
    fn a_reversed_scale_up_removes_its_learner_first() {
        let mut members: Vec<_> = (0..3).map(voter).collect();
        members.push(learner(3, Some(1000)));
        let state = input(3, 4, members);
        assert_eq!(
            plan(&state),
            ScaleStep::Remove {
                id: 3,
                reason: RemoveReason::Stray
            }
        );
    }

    /// 5 → 3 reversed to 5 after member 4 was removed but before its pod
    /// went: pod 4 is added again as it is, a slow member (see
    /// `a_removed_member_added_again_with_its_storage_keeps_agreement` in
    /// the Paxos tests).
    #[test]
    fn a_reversed_scale_down_adds_the_removed_member_back() {
        let mut state = input(5, 5, (0..4).map(voter).collect());
        waiting_pod(&mut state, 4, 14);
        assert_eq!(
            plan(&state),
            ScaleStep::AddLearner {
                id: 4,
                incarnation: 14
            }
        );
    }

    /// The StatefulSet shrunk by someone else below a member's pod: the pod
    /// comes back first, and the member's volume is never deleted.
    #[test]
    fn a_members_pod_taken_away_is_brought_back_first() {
        let state = input(3, 2, (0..3).map(voter).collect());
        assert_eq!(plan(&state), ScaleStep::Resize { from: 2, to: 3 });
        let mut bigger = input(5, 3, (0..5).map(voter).collect());
        bigger.stale_claims = vec![3, 4];
        assert_eq!(plan(&bigger), ScaleStep::Resize { from: 3, to: 5 });
    }

    #[test]
    fn a_learner_behind_is_waited_for_not_promoted() {
        let mut members: Vec<_> = (0..3).map(voter).collect();
        members.push(learner(3, Some(PROMOTE_LAG_SLOTS_MAX + 1)));
        let state = input(5, 4, members);
        assert_eq!(
            plan(&state),
            ScaleStep::WaitForCatchUp {
                id: 3,
                behind_slots: Some(PROMOTE_LAG_SLOTS_MAX + 1)
            }
        );
    }

    /// The volume claims of removed pods go before the group grows again:
    /// a pod started on one would bring back a removed member's state.
    #[test]
    fn stale_claims_are_deleted_before_the_group_grows() {
        let mut state = input(5, 3, (0..3).map(voter).collect());
        state.stale_claims = vec![3];
        assert_eq!(plan(&state), ScaleStep::DeleteClaims { ordinals: vec![3] });
    }

    /// A pod back from a lost volume is a new incarnation waiting to be
    /// added: the old member goes, then the pod is added anew.
    #[test]
    fn a_member_whose_pod_lost_its_volume_is_replaced() {
        let mut state = input(3, 3, (0..3).map(voter).collect());
        waiting_pod(&mut state, 1, 999);
        assert_eq!(
            plan(&state),
            ScaleStep::Remove {
                id: 1,
                reason: RemoveReason::Replaced
            }
        );
        state.membership.members.retain(|m| m.id != 1);
        assert_eq!(
            plan(&state),
            ScaleStep::AddLearner {
                id: 1,
                incarnation: 999
            }
        );
    }

    /// Before the group recorded incarnations (no change yet), a blank pod
    /// recovers its place from its peers: not replaced. Nor is the last
    /// voter, whose data is gone with it.
    #[test]
    fn no_replacement_without_a_recorded_incarnation_or_of_the_last_voter() {
        let mut unrecorded = input(3, 3, (0..3).map(voter).collect());
        for m in &mut unrecorded.membership.members {
            m.incarnation = 0;
        }
        waiting_pod(&mut unrecorded, 1, 999);
        assert_eq!(plan(&unrecorded), ScaleStep::Settled);

        let mut alone = input(1, 1, vec![voter(0)]);
        waiting_pod(&mut alone, 0, 999);
        assert_eq!(plan(&alone), ScaleStep::Settled);
    }

    #[test]
    fn nothing_is_changed_without_a_leader() {
        let mut state = input(5, 3, (0..3).map(voter).collect());
        state.membership.leader = None;
        assert_eq!(plan(&state), ScaleStep::WaitForLeader);
    }

    /// 1 → 7 → 1 by the same steps, ending at the size asked for with
    /// every step one member or one pod.
    #[test]
    fn every_size_is_reached_from_every_other() {
        for from in 1..=REPLICAS_MAX {
            for to in 1..=REPLICAS_MAX {
                let mut state = input(to, from, (0..from).map(voter).collect());
                let steps = carry_out(&mut state, 100);
                assert_eq!(plan(&state), ScaleStep::Settled, "{from} → {to}: {steps:?}");
                let voters: Vec<u32> = state.membership.voters().map(|m| m.id).collect();
                assert_eq!(voters, (0..to).collect::<Vec<_>>(), "{from} → {to}");
                assert_eq!(state.statefulset, to);
                assert!(state.stale_claims.is_empty());
            }
        }
    }
}
