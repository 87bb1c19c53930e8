//! What to do with a ReplicaGroup, given what the operator observed: the
//! Join / Leave / drain decision table and the conditions a person reads.
//! Pure: the controller gathers an [`Observed`], calls [`decide`], and
//! carries out the one [`Step`] it returns.

use std::time::Duration;

use std::collections::BTreeMap;

use crate::crd::{Condition, ALLOW_DATA_LOSS_ANNOTATION};
use crate::resources::majority;
use crate::scale::{self, MembershipView, PodIdentity, RemoveReason, ScaleInput, ScaleStep};

/// How often a group that is converging is looked at again.
pub const REQUEUE_BUSY: Duration = Duration::from_secs(2);
/// How often a settled group is looked at again: the shardmaster's
/// configuration changes without any Kubernetes event.
pub const REQUEUE_SETTLED: Duration = Duration::from_secs(15);

/// The shardmaster's latest configuration, as it concerns one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasterView {
    pub config_num: u64,
    /// The gid is in the configuration with this group's servers.
    pub joined: bool,
    /// The gid is in the configuration with other servers: another
    /// ReplicaGroup, or a manual join, uses it.
    pub foreign_servers: Option<Vec<String>>,
    /// The shards assigned to the gid.
    pub shards: Vec<u64>,
    /// How many groups the configuration has, this one included.
    pub groups: usize,
}

/// One kvserver replica's `GroupStatus` answer, reduced to what matters.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ReplicaReport {
    /// The configuration the replica has applied.
    pub config_num: u64,
    pub serving: usize,
    pub pulling: usize,
    /// Shards handed off whose new owner has not yet confirmed them.
    pub outgoing: usize,
    /// Shards installed here whose previous holder has not yet been told
    /// to drop its copy: removing the group now would leave that copy
    /// behind for good.
    pub pending_deletes: u64,
    pub keys: u64,
    /// The shardmaster's refusal of the group's claim (its replicas all
    /// lost their storage), if its leader reported one.
    pub refused: Option<String>,
}

impl ReplicaReport {
    /// The replica has taken no configuration and holds nothing.
    fn untouched(&self) -> bool {
        self.config_num == 0
            && self.serving == 0
            && self.pulling == 0
            && self.outgoing == 0
            && self.pending_deletes == 0
            && self.keys == 0
    }

    /// This replica has applied `latest` (so the Leave) and holds nothing.
    fn drained(&self, latest: u64) -> bool {
        self.config_num >= latest
            && self.serving == 0
            && self.pulling == 0
            && self.outgoing == 0
            && self.pending_deletes == 0
    }
}

/// What the group's replicas said, when the operator asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupView {
    /// Not asked: only a deleted group is asked.
    NotAsked,
    /// No replica answered; the last error.
    Unreachable(String),
    Reported(Vec<ReplicaReport>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub generation: Option<i64>,
    pub deleting: bool,
    /// The [`ALLOW_DATA_LOSS_ANNOTATION`] is "true".
    pub allow_data_loss: bool,
    pub spec_gid: u64,
    /// The gid in the status: the one the group was created with.
    pub recorded_gid: Option<u64>,
    pub spec_replicas: u32,
    /// The existing StatefulSet's size, if there is one.
    pub existing_replicas: Option<u32>,
    /// The pods the group's members are on, as the status last recorded
    /// them (the highest member's ordinal + 1): the size to make a lost
    /// StatefulSet again at, not the spec's.
    pub recorded_size: Option<u32>,
    pub ready_replicas: u32,
    /// The status said joined before: the group may have held data.
    pub was_joined: bool,
    /// A spec problem the schema could not catch.
    pub invalid_spec: Option<String>,
    pub master: Result<MasterView, String>,
    pub group: GroupView,
    /// The API server does not serve policy/v1 PodDisruptionBudget.
    pub pdb_api_missing: bool,
    /// The shardmaster refused to join this group (a retired gid, say):
    /// its words. Final: the gid cannot change, so no Join is tried again.
    pub join_refused: Option<String>,
    /// The group's membership from its leader; `None` when not asked (no
    /// StatefulSet yet, or the group is being deleted).
    pub membership: Option<Result<MembershipView, String>>,
    /// What the pods below the StatefulSet's size said of themselves.
    pub pods: BTreeMap<u32, PodIdentity>,
    /// Ordinals at or above the StatefulSet's size that keep a volume claim.
    pub stale_claims: Vec<u32>,
}

/// The one thing to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    Join,
    Leave,
    /// The group holds nothing any more: let Kubernetes delete it.
    ReleaseFinalizer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub step: Step,
    /// Apply the Service, StatefulSet and PodDisruptionBudget.
    pub apply_children: bool,
    /// The StatefulSet's size: the existing one's (a resize changes it a
    /// pod at a time, through [`Decision::scale`]), or the spec's for a new
    /// group.
    pub replicas: u32,
    /// The group's voters, when its membership is known.
    pub voters: Option<u32>,
    /// The resize step to take when there is no Join or Leave to make.
    pub scale: Option<ScaleStep>,
    /// The gid to record; a changed spec.gid does not replace it.
    pub gid: u64,
    pub joined: bool,
    pub config_num: u64,
    pub shards: Vec<u64>,
    /// Conditions without timestamps; see [`merge_conditions`].
    pub conditions: Vec<ConditionState>,
    pub requeue: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionState {
    pub type_: &'static str,
    /// Some(true) "True", Some(false) "False", None "Unknown".
    pub status: Option<bool>,
    pub reason: &'static str,
    pub message: String,
}

fn cond(
    type_: &'static str,
    status: Option<bool>,
    reason: &'static str,
    message: impl Into<String>,
) -> ConditionState {
    ConditionState {
        type_,
        status,
        reason,
        message: message.into(),
    }
}

pub fn decide(o: &Observed) -> Decision {
    let gid = o.recorded_gid.unwrap_or(o.spec_gid);
    let replicas = (o.existing_replicas)
        .or(o.recorded_size)
        .unwrap_or(o.spec_replicas);
    let mut degraded: Vec<(&'static str, String)> = Vec::new();
    if let Some(problem) = &o.invalid_spec {
        degraded.push(("InvalidSpec", problem.clone()));
    }
    if o.spec_gid != gid {
        degraded.push((
            "GidImmutable",
            format!(
                "spec.gid was changed from {gid} to {}; a group's gid cannot change. \
                 Set it back to {gid}, or create a new ReplicaGroup for gid {}",
                o.spec_gid, o.spec_gid
            ),
        ));
    }
    if o.ready_replicas < replicas {
        degraded.push((
            "ReplicasNotReady",
            format!("{} of {replicas} replicas are ready", o.ready_replicas),
        ));
    }
    if let GroupView::Reported(reports) = &o.group {
        if let Some(why) = reports.iter().find_map(|r| r.refused.as_ref()) {
            degraded.insert(0, ("GroupDataLost", why.clone()));
        }
    }
    if o.pdb_api_missing {
        degraded.push((
            "PodDisruptionBudgetUnsupported",
            "the API server does not serve policy/v1 PodDisruptionBudget (Kubernetes < 1.21): \
             node drains are not held back to keep a majority of this group up"
                .into(),
        ));
    }
    // A spec that names the wrong gid or no usable shardmaster must not
    // drive joins; a deletion still proceeds with the recorded gid.
    let spec_usable = o.invalid_spec.is_none() && o.spec_gid == gid;

    let (joined, config_num, shards) = match &o.master {
        Ok(m) => (m.joined, m.config_num, m.shards.clone()),
        Err(_) => (o.was_joined, 0, Vec::new()),
    };

    let ready = if o.ready_replicas >= replicas {
        cond(
            "Ready",
            Some(true),
            "AllReplicasReady",
            format!("{replicas} of {replicas} replicas are ready"),
        )
    } else {
        cond(
            "Ready",
            Some(false),
            "ReplicasNotReady",
            format!(
                "{} of {replicas} replicas are ready; the group serves once {} are",
                o.ready_replicas,
                majority(replicas)
            ),
        )
    };

    let mut step = Step::Nothing;
    let mut busy = false;
    let joined_cond;
    let leaving;
    match &o.master {
        Err(e) => {
            busy = true;
            joined_cond = cond(
                "Joined",
                None,
                "ShardmasterUnreachable",
                format!("cannot read the shardmaster's configuration: {e}"),
            );
        }
        Ok(m) if m.joined => {
            joined_cond = cond(
                "Joined",
                Some(true),
                "InConfiguration",
                format!(
                    "gid {gid} is in configuration {} with {} shards",
                    m.config_num,
                    m.shards.len()
                ),
            );
        }
        Ok(MasterView {
            foreign_servers: Some(servers),
            ..
        }) => {
            let message = format!(
                "gid {gid} is already in the configuration with other servers ({}): another \
                 ReplicaGroup or a manual join uses it. This group will not join; give it \
                 an unused gid",
                servers.join(",")
            );
            degraded.push(("GidInUse", message.clone()));
            joined_cond = cond("Joined", Some(false), "GidInUse", message);
        }
        Ok(_) if o.deleting => {
            joined_cond = cond(
                "Joined",
                Some(false),
                "Left",
                format!("gid {gid} has left the configuration"),
            );
        }
        Ok(_) if o.join_refused.is_some() => {
            let why = o.join_refused.clone().unwrap_or_default();
            let message = format!(
                "the shardmaster refused to join gid {gid}: {why}. This ReplicaGroup will not \
                 join; delete it and create one with an unused gid"
            );
            // First: it is why the group serves nothing.
            degraded.insert(0, ("JoinRefused", message.clone()));
            joined_cond = cond("Joined", Some(false), "JoinRefused", message);
        }
        Ok(_) => {
            busy = true;
            let need = majority(replicas);
            if !spec_usable {
                joined_cond = cond(
                    "Joined",
                    Some(false),
                    "InvalidSpec",
                    "not joining until the spec is fixed (see Degraded)",
                );
            } else if o.ready_replicas >= need {
                step = Step::Join;
                joined_cond = cond(
                    "Joined",
                    Some(false),
                    "Joining",
                    format!("asking the shardmaster to join gid {gid}"),
                );
            } else {
                joined_cond = cond(
                    "Joined",
                    Some(false),
                    "WaitingForMajority",
                    format!(
                        "joins once {need} of {replicas} replicas are ready ({} are)",
                        o.ready_replicas
                    ),
                );
            }
        }
    }

    if !o.deleting {
        leaving = cond(
            "Leaving",
            Some(false),
            "NotDeleted",
            "the ReplicaGroup is not being deleted",
        );
    } else {
        busy = true;
        step = Step::Nothing;
        // No StatefulSet was ever made and no Join recorded: nothing can
        // hold data, whatever the spec or the shardmaster say.
        let never_created = o.existing_replicas.is_none() && !o.was_joined;
        leaving = match &o.master {
            _ if never_created => {
                step = Step::ReleaseFinalizer;
                cond(
                    "Leaving",
                    Some(true),
                    "Drained",
                    "the group's pods were never created; releasing the finalizer",
                )
            }
            Err(e) => cond(
                "Leaving",
                Some(true),
                "ShardmasterUnreachable",
                format!("waiting for the shardmaster to leave gid {gid}: {e}"),
            ),
            Ok(m) if m.joined => {
                let keys = match &o.group {
                    GroupView::Reported(r) => r.iter().map(|r| r.keys).max(),
                    _ => None,
                };
                let holds_data = keys != Some(0);
                if m.groups == 1 && holds_data && !o.allow_data_loss {
                    let what = match keys {
                        Some(n) => {
                            format!("its shards hold keys (about {n}, by the store's estimate)")
                        }
                        None => "it may hold data (no replica answered)".into(),
                    };
                    cond(
                        "Leaving",
                        Some(true),
                        "LastGroupHoldsData",
                        format!(
                            "gid {gid} is the last group and {what}; leaving would lose them. \
                             Add another ReplicaGroup so the shards move there, or annotate \
                             this one {ALLOW_DATA_LOSS_ANNOTATION}=true to delete it and its data"
                        ),
                    )
                } else {
                    step = Step::Leave;
                    cond(
                        "Leaving",
                        Some(true),
                        "LeaveRequested",
                        format!("asking the shardmaster to remove gid {gid}"),
                    )
                }
            }
            Ok(m) => {
                let drained = match &o.group {
                    GroupView::Reported(r) => r.iter().any(|r| r.drained(m.config_num)),
                    _ => false,
                };
                // Never joined, and every replica that answered has taken
                // no configuration at all (a refused group): it holds nothing.
                let never_took_a_config = matches!(&o.group, GroupView::Reported(r)
                    if r.len() == replicas as usize
                        && r.iter().all(ReplicaReport::untouched));
                let never_served = !o.was_joined
                    && ((o.ready_replicas == 0 && matches!(o.group, GroupView::Unreachable(_)))
                        || never_took_a_config);
                if drained || never_served || o.allow_data_loss {
                    step = Step::ReleaseFinalizer;
                    let why = if drained {
                        "every shard has been handed off"
                    } else if never_served {
                        "the group never served"
                    } else {
                        "data loss was allowed by annotation"
                    };
                    cond(
                        "Leaving",
                        Some(true),
                        "Drained",
                        format!("{why}; releasing the finalizer"),
                    )
                } else {
                    let detail = match &o.group {
                        GroupView::Reported(r) => {
                            let best = r.iter().max_by_key(|r| r.config_num);
                            match best {
                                Some(b) => format!(
                                    "the most advanced replica has applied configuration {} \
                                     of {}, serves {}, pulls {}, still holds {} \
                                     handed-off shards and has {} old copies elsewhere to \
                                     have deleted",
                                    b.config_num,
                                    m.config_num,
                                    b.serving,
                                    b.pulling,
                                    b.outgoing,
                                    b.pending_deletes
                                ),
                                None => "no replica reported".into(),
                            }
                        }
                        GroupView::Unreachable(e) => format!("no replica answered: {e}"),
                        GroupView::NotAsked => "not asked yet".into(),
                    };
                    cond(
                        "Leaving",
                        Some(true),
                        "Draining",
                        format!(
                            "gid {gid} left the configuration; waiting for its shards to \
                             reach their new owners: {detail}"
                        ),
                    )
                }
            }
        };
    }

    // Resizing: only a live group with a usable spec whose pods exist.
    let voters = match &o.membership {
        Some(Ok(m)) => Some(m.voters().count() as u32),
        _ => None,
    };
    let (scale_step, scaled) = match (&o.membership, o.existing_replicas) {
        _ if o.deleting || !spec_usable => (None, None),
        (Some(Ok(membership)), Some(statefulset)) => {
            let step = scale::plan(&ScaleInput {
                desired: o.spec_replicas,
                statefulset,
                membership: membership.clone(),
                pods: o.pods.clone(),
                stale_claims: o.stale_claims.clone(),
            });
            let condition = scaled_condition(&step, o.spec_replicas, voters.unwrap_or(0));
            (Some(step), Some(condition))
        }
        (Some(Err(e)), Some(_)) => (
            None,
            Some(cond(
                "Scaled",
                None,
                "MembersUnknown",
                format!("cannot read the group's membership: {e}"),
            )),
        ),
        _ => (None, None),
    };
    let scaled = scaled.unwrap_or_else(|| {
        cond(
            "Scaled",
            None,
            "MembersUnknown",
            "the group's membership is not known yet",
        )
    });
    if scale_step.as_ref().is_some_and(ScaleStep::busy) {
        busy = true;
    }

    let degraded_cond = if degraded.is_empty() {
        cond("Degraded", Some(false), "Healthy", "nothing to report")
    } else {
        let message = degraded
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        cond("Degraded", Some(true), degraded[0].0, message)
    };
    if o.ready_replicas < replicas {
        busy = true;
    }

    Decision {
        step,
        apply_children: spec_usable && !o.deleting,
        replicas,
        voters,
        scale: scale_step,
        gid,
        joined,
        config_num,
        shards,
        conditions: vec![ready, joined_cond, scaled, leaving, degraded_cond],
        requeue: if busy { REQUEUE_BUSY } else { REQUEUE_SETTLED },
    }
}

/// The `Scaled` condition for a resize step: what the group is doing to
/// reach `desired` voters.
fn scaled_condition(step: &ScaleStep, desired: u32, voters: u32) -> ConditionState {
    let progress = format!("{voters} of {desired} voters");
    let (reason, message) = match step {
        ScaleStep::Settled => {
            return cond(
                "Scaled",
                Some(true),
                "AtSize",
                format!("the group has the {desired} voters asked for"),
            )
        }
        ScaleStep::WaitForLeader => (
            "WaitingForLeader",
            format!("{progress}; no leader answered, so no member can be changed"),
        ),
        ScaleStep::WaitForPod { id } => (
            "WaitingForPod",
            format!("{progress}; waiting for pod {id} to start and answer"),
        ),
        ScaleStep::AddLearner { id, .. } => (
            "AddingMember",
            format!("{progress}; adding replica {id} as a learner"),
        ),
        ScaleStep::WaitForCatchUp { id, behind_slots } => (
            "CatchingUp",
            match behind_slots {
                Some(b) => format!(
                    "{progress}; learner {id} is {b} slots behind the leader (it votes once \
                     within {})",
                    scale::PROMOTE_LAG_SLOTS_MAX
                ),
                None => format!("{progress}; learner {id} has not reported its progress yet"),
            },
        ),
        ScaleStep::Promote { id } => (
            "PromotingMember",
            format!("{progress}; learner {id} has caught up: making it a voter"),
        ),
        ScaleStep::Remove { id, reason } => (
            "RemovingMember",
            match reason {
                RemoveReason::Surplus => format!("{progress}; removing voter {id}"),
                RemoveReason::Stray => format!("{progress}; removing learner {id}, not needed"),
                RemoveReason::Replaced => format!(
                    "{progress}; replica {id} came back from a blank volume: removing the \
                     member it was, to add it anew"
                ),
            },
        ),
        ScaleStep::Resize { from, to } => (
            "ResizingStatefulSet",
            format!("{progress}; the StatefulSet goes from {from} to {to} pods"),
        ),
        ScaleStep::DeleteClaims { ordinals } => (
            "DeletingVolumes",
            format!(
                "{progress}; deleting the volume claims of removed pods {ordinals:?} before \
                 any pod could start on one again"
            ),
        ),
    };
    cond("Scaled", Some(false), reason, message)
}

/// The new conditions, keeping each one's transition time while its status
/// is unchanged.
pub fn merge_conditions(
    old: &[Condition],
    new: &[ConditionState],
    generation: Option<i64>,
    now_rfc3339: &str,
) -> Vec<Condition> {
    new.iter()
        .map(|c| {
            let status = match c.status {
                Some(true) => "True",
                Some(false) => "False",
                None => "Unknown",
            };
            let since = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == status)
                .map(|o| o.last_transition_time.clone())
                .unwrap_or_else(|| now_rfc3339.to_string());
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason.into(),
                message: c.message.clone(),
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            generation: Some(1),
            deleting: false,
            allow_data_loss: false,
            spec_gid: 7,
            recorded_gid: Some(7),
            spec_replicas: 3,
            existing_replicas: Some(3),
            recorded_size: Some(3),
            ready_replicas: 3,
            was_joined: true,
            invalid_spec: None,
            master: Ok(MasterView {
                config_num: 4,
                joined: true,
                foreign_servers: None,
                shards: vec![0, 1, 2],
                groups: 2,
            }),
            group: GroupView::NotAsked,
            pdb_api_missing: false,
            join_refused: None,
            membership: Some(Ok(MembershipView {
                epoch: 0,
                leader: Some(0),
                members: (0..3)
                    .map(|id| crate::scale::MemberView {
                        id,
                        address: format!("g-{id}:7000"),
                        incarnation: 0,
                        voter: true,
                        behind_slots: Some(0),
                    })
                    .collect(),
            })),
            pods: BTreeMap::new(),
            stale_claims: Vec::new(),
        }
    }

    fn not_joined(o: &mut Observed) {
        o.was_joined = false;
        o.master = Ok(MasterView {
            config_num: 4,
            joined: false,
            foreign_servers: None,
            shards: vec![],
            groups: 1,
        });
    }

    fn condition<'a>(d: &'a Decision, t: &str) -> &'a ConditionState {
        d.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn settled_group_does_nothing_and_is_healthy() {
        let d = decide(&observed());
        assert_eq!(d.step, Step::Nothing);
        assert!(d.apply_children);
        assert_eq!(d.requeue, REQUEUE_SETTLED);
        assert_eq!(condition(&d, "Ready").status, Some(true));
        assert_eq!(condition(&d, "Joined").status, Some(true));
        assert_eq!(condition(&d, "Leaving").status, Some(false));
        assert_eq!(condition(&d, "Degraded").status, Some(false));
        assert_eq!(d.shards, vec![0, 1, 2]);
    }

    #[test]
    fn joins_only_with_a_ready_majority() {
        for (ready, expect) in [
            (0, Step::Nothing),
            (1, Step::Nothing),
            (2, Step::Join),
            (3, Step::Join),
        ] {
            let mut o = observed();
            not_joined(&mut o);
            o.ready_replicas = ready;
            let d = decide(&o);
            assert_eq!(d.step, expect, "ready {ready}");
            assert_eq!(d.requeue, REQUEUE_BUSY);
            let reason = condition(&d, "Joined").reason;
            assert_eq!(
                reason,
                if expect == Step::Join {
                    "Joining"
                } else {
                    "WaitingForMajority"
                }
            );
        }
    }

    #[test]
    fn a_new_resource_without_a_statefulset_uses_the_spec_size() {
        let mut o = observed();
        not_joined(&mut o);
        o.recorded_gid = None;
        o.existing_replicas = None;
        o.recorded_size = None;
        o.spec_replicas = 5;
        o.ready_replicas = 0;
        let d = decide(&o);
        assert_eq!(d.replicas, 5);
        assert_eq!(d.gid, 7);
        assert!(d.apply_children);
        assert_eq!(d.step, Step::Nothing);
    }

    #[test]
    fn no_join_while_the_shardmaster_is_unreachable() {
        let mut o = observed();
        o.master = Err("connection refused".into());
        let d = decide(&o);
        assert_eq!(d.step, Step::Nothing);
        assert_eq!(condition(&d, "Joined").status, None);
        assert!(condition(&d, "Joined")
            .message
            .contains("connection refused"));
        assert!(d.joined, "keeps the last known membership");
    }

    #[test]
    fn a_changed_replica_count_is_carried_out_a_pod_at_a_time() {
        let mut o = observed();
        o.spec_replicas = 5;
        let d = decide(&o);
        assert_eq!(
            d.replicas, 3,
            "the StatefulSet grows through the scale step"
        );
        assert_eq!(d.scale, Some(ScaleStep::Resize { from: 3, to: 4 }));
        assert!(d.apply_children);
        assert_eq!(d.requeue, REQUEUE_BUSY);
        let scaled = condition(&d, "Scaled");
        assert_eq!(
            (scaled.status, scaled.reason),
            (Some(false), "ResizingStatefulSet")
        );
        assert!(
            scaled.message.contains("3 of 5 voters"),
            "{}",
            scaled.message
        );
        assert_eq!(condition(&d, "Degraded").status, Some(false));
        assert_eq!(condition(&decide(&observed()), "Scaled").reason, "AtSize");
    }

    /// A StatefulSet deleted from under a group (`--cascade=orphan`) is
    /// made again at the size its members are on, not at the spec's: the
    /// resize then goes on a pod at a time.
    #[test]
    fn a_lost_statefulset_is_made_again_at_the_members_size() {
        let mut o = observed();
        o.existing_replicas = None;
        o.recorded_size = Some(3);
        o.spec_replicas = 5;
        let d = decide(&o);
        assert_eq!(d.replicas, 3);
        assert!(d.apply_children);
    }

    #[test]
    fn no_resize_while_deleting_or_with_the_members_unknown() {
        let mut o = observed();
        o.spec_replicas = 5;
        o.deleting = true;
        assert_eq!(decide(&o).scale, None);
        let mut o = observed();
        o.spec_replicas = 5;
        o.membership = Some(Err("no replica answered".into()));
        let d = decide(&o);
        assert_eq!(d.scale, None);
        assert_eq!(condition(&d, "Scaled").reason, "MembersUnknown");
        assert!(condition(&d, "Scaled")
            .message
            .contains("no replica answered"));
    }

    #[test]
    fn a_changed_gid_is_refused_and_nothing_is_applied() {
        let mut o = observed();
        not_joined(&mut o);
        o.spec_gid = 8;
        let d = decide(&o);
        assert_eq!(d.gid, 7);
        assert!(!d.apply_children);
        assert_eq!(d.step, Step::Nothing, "never joins under a new gid");
        assert_eq!(condition(&d, "Degraded").reason, "GidImmutable");
    }

    #[test]
    fn an_invalid_spec_is_reported_and_not_joined() {
        let mut o = observed();
        not_joined(&mut o);
        o.invalid_spec = Some("spec.shardmaster: set service or addresses".into());
        let d = decide(&o);
        assert_eq!(d.step, Step::Nothing);
        assert!(!d.apply_children);
        assert_eq!(condition(&d, "Degraded").reason, "InvalidSpec");
    }

    #[test]
    fn a_missing_pdb_api_is_reported() {
        let mut o = observed();
        o.pdb_api_missing = true;
        let d = decide(&o);
        let deg = condition(&d, "Degraded");
        assert_eq!(
            (deg.status, deg.reason),
            (Some(true), "PodDisruptionBudgetUnsupported")
        );
    }

    #[test]
    fn delete_leaves_a_joined_group() {
        let mut o = observed();
        o.deleting = true;
        let d = decide(&o);
        assert_eq!(d.step, Step::Leave);
        assert!(!d.apply_children);
        assert_eq!(condition(&d, "Leaving").reason, "LeaveRequested");
    }

    #[test]
    fn the_last_group_with_data_is_not_removed_unless_allowed() {
        let mut o = observed();
        o.deleting = true;
        o.master = Ok(MasterView {
            config_num: 4,
            joined: true,
            foreign_servers: None,
            shards: vec![0, 1],
            groups: 1,
        });
        for (group, allowed, expect) in [
            (
                GroupView::Reported(vec![ReplicaReport {
                    keys: 12,
                    ..Default::default()
                }]),
                false,
                Step::Nothing,
            ),
            (
                GroupView::Unreachable("timeout".into()),
                false,
                Step::Nothing,
            ),
            (
                GroupView::Reported(vec![ReplicaReport {
                    keys: 0,
                    ..Default::default()
                }]),
                false,
                Step::Leave,
            ),
            (
                GroupView::Reported(vec![ReplicaReport {
                    keys: 12,
                    ..Default::default()
                }]),
                true,
                Step::Leave,
            ),
        ] {
            o.group = group.clone();
            o.allow_data_loss = allowed;
            let d = decide(&o);
            assert_eq!(d.step, expect, "{group:?} allowed {allowed}");
            if expect == Step::Nothing {
                let leaving = condition(&d, "Leaving");
                assert_eq!(leaving.reason, "LastGroupHoldsData");
                assert!(leaving.message.contains(ALLOW_DATA_LOSS_ANNOTATION));
            }
        }
    }

    #[test]
    fn the_finalizer_is_held_until_a_replica_has_drained() {
        let mut o = observed();
        o.deleting = true;
        o.master = Ok(MasterView {
            config_num: 9,
            joined: false,
            foreign_servers: None,
            shards: vec![],
            groups: 1,
        });
        let report = |config_num, serving, pulling, outgoing| ReplicaReport {
            config_num,
            serving,
            pulling,
            outgoing,
            pending_deletes: 0,
            keys: 5,
            refused: None,
        };
        let pending = |config_num| ReplicaReport {
            pending_deletes: 1,
            ..report(config_num, 0, 0, 0)
        };
        let cases = [
            (GroupView::NotAsked, Step::Nothing),
            (GroupView::Unreachable("refused".into()), Step::Nothing),
            // Behind the configuration: an empty old state proves nothing.
            (GroupView::Reported(vec![report(8, 0, 0, 0)]), Step::Nothing),
            (GroupView::Reported(vec![report(9, 2, 0, 0)]), Step::Nothing),
            (GroupView::Reported(vec![report(9, 0, 1, 0)]), Step::Nothing),
            (GroupView::Reported(vec![report(9, 0, 0, 3)]), Step::Nothing),
            // It must still have an old holder drop its copy: removed now,
            // that copy would stay there for good.
            (
                GroupView::Reported(vec![pending(9), pending(9)]),
                Step::Nothing,
            ),
            (
                GroupView::Reported(vec![report(9, 0, 0, 3), report(9, 0, 0, 0)]),
                Step::ReleaseFinalizer,
            ),
            (
                GroupView::Reported(vec![report(10, 0, 0, 0)]),
                Step::ReleaseFinalizer,
            ),
        ];
        for (group, expect) in cases {
            o.group = group.clone();
            let d = decide(&o);
            assert_eq!(d.step, expect, "{group:?}");
            let reason = condition(&d, "Leaving").reason;
            assert_eq!(
                reason,
                if expect == Step::Nothing {
                    "Draining"
                } else {
                    "Drained"
                }
            );
        }
    }

    #[test]
    fn a_group_whose_claim_was_refused_is_degraded_with_the_reason() {
        let mut o = observed();
        let refused = ReplicaReport {
            refused: Some("group 7's replicas all started from blank storage".into()),
            ..Default::default()
        };
        o.group = GroupView::Reported(vec![ReplicaReport::default(), refused]);
        let d = decide(&o);
        let deg = condition(&d, "Degraded");
        assert_eq!((deg.status, deg.reason), (Some(true), "GroupDataLost"));
        assert!(deg.message.contains("blank storage"));
    }

    #[test]
    fn a_refused_join_is_degraded_says_what_to_do_and_is_not_retried() {
        let mut o = observed();
        not_joined(&mut o);
        o.join_refused = Some("gid 7 left in configuration 3 and is retired".into());
        let d = decide(&o);
        assert_eq!(d.step, Step::Nothing);
        let joined = condition(&d, "Joined");
        assert_eq!((joined.status, joined.reason), (Some(false), "JoinRefused"));
        let deg = condition(&d, "Degraded");
        assert_eq!((deg.status, deg.reason), (Some(true), "JoinRefused"));
        assert!(deg.message.contains("left in configuration 3"));
        assert!(deg.message.contains("create one with an unused gid"));
        // Deleting it: its replicas took no configuration, so it goes.
        o.deleting = true;
        o.group = GroupView::Reported(vec![ReplicaReport::default(); 3]);
        assert_eq!(decide(&o).step, Step::ReleaseFinalizer);
        // A replica that took one may hold data: held.
        o.group = GroupView::Reported(vec![
            ReplicaReport::default(),
            ReplicaReport::default(),
            ReplicaReport {
                config_num: 2,
                ..Default::default()
            },
        ]);
        assert_eq!(decide(&o).step, Step::Nothing);
        // So may one that did not answer.
        o.group = GroupView::Reported(vec![ReplicaReport::default(); 2]);
        assert_eq!(decide(&o).step, Step::Nothing);
    }

    #[test]
    fn a_group_that_never_served_is_released_when_unreachable() {
        let mut o = observed();
        o.deleting = true;
        not_joined(&mut o);
        o.ready_replicas = 0;
        o.group = GroupView::Unreachable("no such host".into());
        assert_eq!(decide(&o).step, Step::ReleaseFinalizer);
        o.was_joined = true;
        assert_eq!(decide(&o).step, Step::Nothing, "it may hold shards");
        o.allow_data_loss = true;
        assert_eq!(decide(&o).step, Step::ReleaseFinalizer);
    }

    #[test]
    fn a_deleted_group_is_never_joined() {
        let mut o = observed();
        o.deleting = true;
        not_joined(&mut o);
        o.group = GroupView::Reported(vec![ReplicaReport {
            config_num: 3,
            serving: 1,
            ..Default::default()
        }]);
        assert_eq!(decide(&o).step, Step::Nothing);
    }

    #[test]
    fn a_group_never_created_is_released_even_with_a_bad_spec() {
        let mut o = observed();
        o.deleting = true;
        o.was_joined = false;
        o.existing_replicas = None;
        o.invalid_spec = Some("spec.shardmaster: set service or addresses".into());
        o.master = Err("spec.shardmaster: set service or addresses".into());
        assert_eq!(decide(&o).step, Step::ReleaseFinalizer);
        o.existing_replicas = Some(3);
        assert_eq!(decide(&o).step, Step::Nothing, "pods existed: ask first");
    }

    #[test]
    fn a_gid_joined_with_other_servers_is_never_joined_over_nor_left() {
        let mut o = observed();
        not_joined(&mut o);
        o.master = Ok(MasterView {
            config_num: 4,
            joined: false,
            foreign_servers: Some(vec!["elsewhere:7000".into()]),
            shards: vec![],
            groups: 2,
        });
        let d = decide(&o);
        assert_eq!(
            d.step,
            Step::Nothing,
            "a Join would replace the other group's servers"
        );
        assert_eq!(condition(&d, "Joined").reason, "GidInUse");
        assert_eq!(condition(&d, "Degraded").reason, "GidInUse");
        assert!(condition(&d, "Degraded").message.contains("elsewhere:7000"));
        o.deleting = true;
        o.group = GroupView::Reported(vec![ReplicaReport {
            config_num: 4,
            ..Default::default()
        }]);
        assert_eq!(
            decide(&o).step,
            Step::ReleaseFinalizer,
            "never Leave another group's gid"
        );
    }

    #[test]
    fn deleting_with_the_shardmaster_down_waits() {
        let mut o = observed();
        o.deleting = true;
        o.allow_data_loss = true;
        o.master = Err("timeout".into());
        let d = decide(&o);
        assert_eq!(d.step, Step::Nothing);
        assert_eq!(condition(&d, "Leaving").reason, "ShardmasterUnreachable");
    }

    #[test]
    fn transition_times_change_only_with_status() {
        let d = decide(&observed());
        let first = merge_conditions(&[], &d.conditions, Some(1), "2026-01-01T00:00:00Z");
        let again = merge_conditions(&first, &d.conditions, Some(2), "2026-01-02T00:00:00Z");
        assert!(again
            .iter()
            .all(|c| c.last_transition_time == "2026-01-01T00:00:00Z"));
        assert!(again.iter().all(|c| c.observed_generation == Some(2)));
        let mut o = observed();
        o.ready_replicas = 2;
        let changed = merge_conditions(
            &again,
            &decide(&o).conditions,
            Some(2),
            "2026-01-03T00:00:00Z",
        );
        let ready = changed.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_transition_time, "2026-01-03T00:00:00Z");
        let joined = changed.iter().find(|c| c.type_ == "Joined").unwrap();
        assert_eq!(joined.last_transition_time, "2026-01-01T00:00:00Z");
    }
}
