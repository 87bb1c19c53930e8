//! The reconcile loop: observe a ReplicaGroup, its StatefulSet and the
//! shardmaster, [`decide`], carry out the one step, write the status.
//!
//! Every step is idempotent and re-derived from the world, not from memory,
//! so the operator converges after a crash at any point: a Join whose status
//! was never written is seen in the shardmaster's configuration; a Leave
//! whose drain was never watched is seen as a group absent from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, PersistentVolumeClaim, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::cluster;
use crate::crd::{
    MemberStatus, ReplicaGroup, ReplicaGroupStatus, ALLOW_DATA_LOSS_ANNOTATION, FINALIZER,
};
use crate::decide::{self, decide, merge_conditions, GroupView, Observed, Step};
use crate::master;
use crate::metrics::Metrics;
use crate::resources::{self, Settings};
use crate::scale::{MembershipView, RemoveReason, ScaleStep, REPLICAS_MAX};
use shardkv::proto::change_members_request::Change;
use shardkv::proto::AddLearner;

/// The field manager for server-side apply, and the events' reporter.
pub const MANAGER: &str = "shardkv-operator";
/// After a failed reconcile, try again this soon.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the ReplicaGroup has no namespace")]
    NoNamespace,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// A failpoint for tests: exit the process right after this step
    /// ("join", "leave", "add-learner", "promote", "remove-member",
    /// "resize") succeeds, before the status records it, to show that a
    /// restarted operator converges. Set by
    /// `SHARDKV_OPERATOR_CRASH_AFTER`; never in production.
    pub crash_after: Option<String>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance,
            },
        );
        Context {
            client,
            settings,
            recorder,
            metrics,
            crash_after: std::env::var("SHARDKV_OPERATOR_CRASH_AFTER").ok(),
        }
    }
}

/// Runs the controllers (ReplicaGroups, and the shardmaster's size) until
/// `shutdown` resolves. `shardmaster` names the shardmaster StatefulSet to
/// resize (namespace, name), if any.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shardmaster: Option<(String, String)>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (groups, statefulsets, services) = match &namespace {
        Some(ns) => (
            Api::<ReplicaGroup>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=shardkv-operator");
    let replica_groups = Controller::new(groups, watcher::Config::default())
        .owns(statefulsets, owned.clone())
        .owns(services, owned)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("reconcile failed: {e}");
            }
        });
    let Some((master_ns, master_name)) = shardmaster else {
        replica_groups.await;
        return;
    };
    // Only the one StatefulSet: another release's shardmaster is its own
    // operator's.
    let masters = Api::<StatefulSet>::namespaced(client, &master_ns);
    let only = watcher::Config::default().fields(&format!("metadata.name={master_name}"));
    let shardmaster = Controller::new(masters, only)
        .graceful_shutdown_on(shutdown)
        .run(master::reconcile, master_error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("shardmaster reconcile failed: {e}");
            }
        });
    futures::join!(replica_groups, shardmaster);
}

fn master_error_policy(_sts: Arc<StatefulSet>, _error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(RETRY_AFTER_ERROR)
}

/// The failure itself is logged once, by [`run`]'s stream.
fn error_policy(_rg: Arc<ReplicaGroup>, _error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(RETRY_AFTER_ERROR)
}

async fn reconcile(rg: Arc<ReplicaGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&rg, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.is_ok());
    result
}

async fn reconcile_inner(rg: &ReplicaGroup, ctx: &Context) -> Result<Action, Error> {
    let ns = rg.namespace().ok_or(Error::NoNamespace)?;
    let name = rg.name_any();
    let groups: Api<ReplicaGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = rg.meta().deletion_timestamp.is_some();
    let has_finalizer = rg.finalizers().iter().any(|f| f == FINALIZER);

    if !has_finalizer {
        if deleting {
            return Ok(Action::await_change()); // not ours to hold
        }
        // The finalizer goes on before anything exists that needs draining.
        // The resourceVersion makes the patch fail on a concurrent change.
        let mut finalizers = rg.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": rg.resource_version()}});
        groups
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        return Ok(Action::requeue(Duration::ZERO));
    }

    let masters = resources::master_addresses(rg, &ctx.settings);
    let (mut observed, extra) = observe(rg, ctx, deleting, &masters).await?;
    let mut decision = decide(&observed);

    // A usable spec (which apply_children requires) has valid masters.
    if let (true, Ok(masters)) = (decision.apply_children, &masters) {
        observed.pdb_api_missing =
            !apply_children(rg, ctx, &decision, &observed, &extra, masters).await?;
        decision = decide(&observed);
    }

    let old_conditions = rg
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let servers = resources::group_addresses(rg, decision.gid, decision.replicas, &ctx.settings);
    let possible = resources::group_addresses(rg, decision.gid, REPLICAS_MAX, &ctx.settings);
    // A Join names the group's voters: as its membership says, else its
    // first voters (a pod above them may not be a member yet).
    let join_servers: Vec<String> = match &observed.membership {
        Some(Ok(m)) if m.voters().next().is_some() => (m.voters())
            .filter_map(|v| possible.get(v.id as usize).cloned())
            .collect(),
        _ => servers
            .iter()
            .take(extra.initial_replicas as usize)
            .cloned()
            .collect(),
    };
    match (&decision.step, &masters) {
        (Step::Join | Step::Leave, Ok(masters)) => {
            let joining = decision.step == Step::Join;
            // The step's name in metrics and the failpoint, its event action
            // and reasons.
            let (step, action, done_reason, failed_reason) = if joining {
                ("join", "Join", "Joined", "JoinFailed")
            } else {
                ("leave", "Leave", "Left", "LeaveFailed")
            };
            let result = if joining {
                match cluster::join(masters, decision.gid, join_servers.clone()).await {
                    // A retired gid stays retired: the refusal is final. Others
                    // (a bad address from the settings, say) are tried again.
                    Err(cluster::JoinError::Refused(why)) if why.contains("is retired") => {
                        observed.join_refused = Some(why.clone());
                        Err(format!("refused: {why}"))
                    }
                    Err(cluster::JoinError::Refused(why)) => Err(format!("refused: {why}")),
                    Err(cluster::JoinError::Failed(why)) => Err(why),
                    Ok(config) => Ok(config),
                }
            } else {
                cluster::leave(masters, decision.gid).await
            };
            let gid = decision.gid;
            match result {
                Ok(config) => {
                    info!(group = %name, gid, config = config.num, "{step} done");
                    ctx.metrics.step(step);
                    crash_point(ctx, step);
                    let note = if joining {
                        format!(
                            "gid {gid} joined the shardmaster in configuration {}",
                            config.num
                        )
                    } else {
                        format!(
                            "gid {gid} left the shardmaster in configuration {}; its shards are moving",
                            config.num
                        )
                    };
                    publish(ctx, rg, EventType::Normal, done_reason, action, note).await;
                    observed.master = Ok(cluster::view_of(&config, gid, &possible));
                }
                Err(e) => {
                    let note = format!("could not {step} gid {gid}: {e}");
                    publish(ctx, rg, EventType::Warning, failed_reason, action, note).await;
                    // A refusal leaves the view of the shardmaster as it was.
                    if observed.join_refused.is_none() {
                        observed.master = Err(e);
                    }
                }
            }
            decision = decide(&observed);
        }
        (Step::ReleaseFinalizer, _) => {
            let finalizers: Vec<String> = rg
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": rg.resource_version()}});
            groups
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.metrics.step("release");
            info!(group = %name, gid = decision.gid, "drained; finalizer released");
            publish(
                ctx,
                rg,
                EventType::Normal,
                "Drained",
                "Release",
                format!(
                    "gid {} holds no shards; released the finalizer",
                    decision.gid
                ),
            )
            .await;
            return Ok(Action::await_change());
        }
        (Step::Nothing, Ok(masters)) => {
            if let Some(step) = decision.scale.clone() {
                let target = ResizeTarget {
                    ns: &ns,
                    statefulset: &name,
                    possible: &possible,
                    servers: &servers,
                    set_size: SetSize::Owned {
                        rg,
                        initial_replicas: extra.initial_replicas,
                        masters,
                    },
                    object: rg.object_ref(&()),
                    epoch: match &observed.membership {
                        Some(Ok(m)) => m.epoch,
                        _ => 0,
                    },
                };
                let resized = resize(ctx, &target, &step).await?;
                if resized {
                    // The status must show the step's result: observe again.
                    let (again, _) = observe(rg, ctx, deleting, &Ok(masters.clone())).await?;
                    observed = Observed {
                        pdb_api_missing: observed.pdb_api_missing,
                        ..again
                    };
                    decision = decide(&observed);
                }
            }
        }
        _ => {}
    }

    // An event for every condition whose reason changed: the steps a person
    // sees in `kubectl describe`, without one event per requeue.
    for c in &decision.conditions {
        let before = old_conditions.iter().find(|o| o.type_ == c.type_);
        if before.is_some_and(|b| b.reason == c.reason) || c.reason == "NotDeleted" {
            continue;
        }
        let warning = matches!(
            (c.type_, c.status),
            ("Degraded", Some(true)) | ("Joined", None) | ("Ready", Some(false))
        ) || c.reason == "LastGroupHoldsData";
        // A new group's first conditions are news only if they are problems
        // beyond "not ready yet".
        if before.is_none() && (!warning || c.reason == "ReplicasNotReady") {
            continue;
        }
        let kind = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, rg, kind, c.reason, c.type_, c.message.clone()).await;
    }

    let now = Timestamp::now().to_string();
    let members = match &observed.membership {
        Some(Ok(m)) => member_statuses(rg, m),
        // Unknown now: what the status said before stands.
        _ => rg
            .status
            .as_ref()
            .map(|s| s.members.clone())
            .unwrap_or_default(),
    };
    let status = ReplicaGroupStatus {
        observed_generation: observed.generation,
        gid: Some(decision.gid),
        replicas: decision.voters.unwrap_or(decision.replicas),
        initial_replicas: Some(extra.initial_replicas),
        selector: Some(resources::selector(rg)),
        members,
        ready_replicas: observed.ready_replicas,
        joined: decision.joined,
        config_num: decision.config_num,
        shards: decision.shards.clone(),
        conditions: merge_conditions(
            &old_conditions,
            &decision.conditions,
            observed.generation,
            &now,
        ),
    };
    let patch = json!({
        "apiVersion": "shardkv.io/v1alpha1",
        "kind": "ReplicaGroup",
        "status": status,
    });
    groups
        .patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(Action::requeue(decision.requeue))
}

/// What the reconcile needs beyond what [`decide`] looks at.
struct Extra {
    /// The group's size at creation: as the status recorded it, else as
    /// its StatefulSet tells its pods, else (a new group) the spec's.
    initial_replicas: u32,
    /// The cluster-state ConfigMap says the group exists.
    existing: bool,
}

async fn observe(
    rg: &ReplicaGroup,
    ctx: &Context,
    deleting: bool,
    masters: &Result<Vec<String>, resources::BadShardmasterRef>,
) -> Result<(Observed, Extra), Error> {
    let ns = rg.namespace().ok_or(Error::NoNamespace)?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sts = statefulsets.get_opt(&rg.name_any()).await?;
    let existing_replicas = sts
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .map(|r| r.max(0) as u32);
    let ready_replicas = sts
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
        .max(0) as u32;
    let status = rg.status.clone().unwrap_or_default();
    let recorded_gid = status.gid;
    let gid = recorded_gid.unwrap_or(rg.spec.gid);
    let invalid_spec = masters.as_ref().err().map(|e| e.to_string());
    let replicas = existing_replicas.unwrap_or(rg.spec.replicas);
    let servers = resources::group_addresses(rg, gid, replicas, &ctx.settings);
    let possible = resources::group_addresses(rg, gid, REPLICAS_MAX, &ctx.settings);
    let master = match masters {
        Ok(m) => cluster::latest_config(m)
            .await
            .map(|c| cluster::view_of(&c, gid, &possible)),
        Err(e) => Err(e.to_string()),
    };
    // The size the group was created with: as recorded, else as its
    // StatefulSet tells its pods, else (a new group) the spec's.
    let initial_replicas = (status.initial_replicas)
        .or_else(|| sts.as_ref().and_then(resources::initial_replicas_of))
        .unwrap_or(rg.spec.replicas)
        .clamp(1, REPLICAS_MAX);
    let recorded_size = status.members.iter().map(|m| m.id + 1).max();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    // Only this resource's: one of the same name deleted before may have
    // left its ConfigMap behind.
    let existing = config_maps
        .get_opt(&resources::cluster_state_name(rg))
        .await?
        .is_some_and(|cm| {
            let ours = (cm.metadata.owner_references.iter().flatten())
                .any(|o| Some(&o.uid) == rg.metadata.uid.as_ref());
            ours && resources::says_existing(&cm)
        });
    // The membership and the pods, for resizing: a live group whose pods
    // exist.
    let (membership, pods, stale_claims) = match existing_replicas {
        Some(statefulset) if !deleting => {
            let group_name = format!("kv-{gid}");
            let (membership, pods) = futures::join!(
                cluster::membership(&servers),
                cluster::identify_pods(&servers, &group_name)
            );
            let stale = stale_claims(ctx, &ns, &rg.name_any(), statefulset).await?;
            (Some(membership), pods, stale)
        }
        _ => (None, Default::default(), Vec::new()),
    };
    let joined = master.as_ref().is_ok_and(|m| m.joined);
    let last_group = master.as_ref().is_ok_and(|m| m.groups == 1);
    // A deletion needs the replicas' own account of what they hold; a live
    // group's account says whether the shardmaster refused it. Not asked:
    // a group being deleted that has not left yet, or one with no replica
    // ready to answer.
    let asked = if deleting {
        !joined || last_group
    } else {
        ready_replicas > 0
    };
    let group = if asked {
        cluster::group_view(&servers).await
    } else {
        GroupView::NotAsked
    };
    let observed = Observed {
        generation: rg.meta().generation,
        deleting,
        allow_data_loss: rg
            .annotations()
            .get(ALLOW_DATA_LOSS_ANNOTATION)
            .is_some_and(|v| v == "true"),
        spec_gid: rg.spec.gid,
        recorded_gid,
        spec_replicas: rg.spec.replicas,
        existing_replicas,
        recorded_size,
        ready_replicas,
        was_joined: status.joined,
        invalid_spec,
        master,
        group,
        pdb_api_missing: false,
        join_refused: refused_before(&status),
        membership,
        pods,
        stale_claims,
    };
    Ok((
        observed,
        Extra {
            initial_replicas,
            existing,
        },
    ))
}

/// Applies the Service, StatefulSet and PodDisruptionBudget. Returns whether
/// the API server serves policy/v1 PodDisruptionBudget.
async fn apply_children(
    rg: &ReplicaGroup,
    ctx: &Context,
    decision: &decide::Decision,
    observed: &Observed,
    extra: &Extra,
    masters: &[String],
) -> Result<bool, Error> {
    let ns = rg.namespace().ok_or(Error::NoNamespace)?;
    let name = rg.name_any();
    let params = PatchParams::apply(MANAGER).force();
    let created = observed.existing_replicas.is_none();
    // First, since the pods read it when they start: "existing" once the
    // group has had a leader, and at its first Join at the latest (before
    // it takes a write); never back to "new".
    let had_leader = matches!(&observed.membership, Some(Ok(m)) if m.leader.is_some());
    let joined = observed.was_joined || observed.master.as_ref().is_ok_and(|m| m.joined);
    let existing = extra.existing || had_leader || joined || decision.step == Step::Join;
    let cluster_state = resources::cluster_state_config_map(rg, existing);
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &resources::cluster_state_name(rg),
            &params,
            &Patch::Apply(&cluster_state),
        )
        .await?;
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &params, &Patch::Apply(&resources::service(rg)))
        .await?;
    let sts = resources::statefulset(
        rg,
        decision.replicas,
        extra.initial_replicas,
        masters,
        &ctx.settings,
    );
    Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &params, &Patch::Apply(&sts))
        .await?;
    if created {
        publish(
            ctx,
            rg,
            EventType::Normal,
            "Created",
            "Apply",
            format!(
                "created the Service and StatefulSet {name} with {} replicas",
                decision.replicas
            ),
        )
        .await;
    }
    let pdb = resources::pod_disruption_budget(rg, decision.voters.unwrap_or(decision.replicas));
    match Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &params, &Patch::Apply(&pdb))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What a resize acts on: a ReplicaGroup's StatefulSet, or the
/// shardmaster's.
pub(crate) struct ResizeTarget<'a> {
    pub ns: &'a str,
    /// The StatefulSet's name (its pods are `<name>-<ordinal>`).
    pub statefulset: &'a str,
    /// Every pod's address, by ordinal: the one a new member is added with.
    pub possible: &'a [String],
    /// The addresses of the pods there are now, to reach the group.
    pub servers: &'a [String],
    pub set_size: SetSize<'a>,
    /// Where the events go.
    pub object: ObjectReference,
    /// The membership epoch the step was planned from: a membership change
    /// is made in it or not at all.
    pub epoch: u64,
}

/// How the StatefulSet's size is changed.
pub(crate) enum SetSize<'a> {
    /// The operator owns the whole StatefulSet: applied whole, at the new
    /// size (a partial apply would drop the fields left out).
    Owned {
        rg: &'a ReplicaGroup,
        initial_replicas: u32,
        masters: &'a [String],
    },
    /// Someone else (Helm) owns the StatefulSet: only its size is patched.
    ReplicasOnly,
}

/// Carries out one resize step. Returns whether anything was changed.
/// A membership change that fails is reported in an event and tried again
/// at the next reconcile; a Kubernetes API failure fails the reconcile.
pub(crate) async fn resize(
    ctx: &Context,
    target: &ResizeTarget<'_>,
    step: &ScaleStep,
) -> Result<bool, Error> {
    let name = target.statefulset;
    let servers = target.servers;
    let address_of = |id: u32| {
        target
            .possible
            .get(id as usize)
            .cloned()
            .unwrap_or_default()
    };
    let (failpoint, reason, change, note) = match step {
        ScaleStep::AddLearner { id, incarnation } => {
            let (id, incarnation) = (*id, *incarnation);
            let change = Change::AddLearner(AddLearner {
                id,
                incarnation,
                address: address_of(id),
            });
            let done =
                move |m: &MembershipView| m.get(id).is_some_and(|m| m.incarnation == incarnation);
            let result = cluster::change_members(servers, change, target.epoch, done).await;
            (
                "add-learner",
                "MemberAdded",
                result,
                format!(
                    "added replica {id} (pod {name}-{id}) as a learner; it votes once it has \
                     caught up"
                ),
            )
        }
        ScaleStep::Promote { id } => {
            let id = *id;
            let done = move |m: &MembershipView| m.get(id).is_some_and(|m| m.voter);
            let result =
                cluster::change_members(servers, Change::Promote(id), target.epoch, done).await;
            (
                "promote",
                "MemberPromoted",
                result,
                format!("learner {id} caught up and is now a voter"),
            )
        }
        ScaleStep::Remove { id, reason } => {
            let id = *id;
            let done = move |m: &MembershipView| m.get(id).is_none();
            let result =
                cluster::change_members(servers, Change::Remove(id), target.epoch, done).await;
            let why = match reason {
                RemoveReason::Surplus => "the group is scaled down",
                RemoveReason::Stray => "a learner not needed at this size",
                RemoveReason::Replaced => "its pod came back from a blank volume and is added anew",
            };
            (
                "remove-member",
                "MemberRemoved",
                result,
                format!("removed replica {id} from the group: {why}"),
            )
        }
        ScaleStep::Resize { from, to } => {
            let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), target.ns);
            match &target.set_size {
                SetSize::Owned {
                    rg,
                    initial_replicas,
                    masters,
                } => {
                    let sts =
                        resources::statefulset(rg, *to, *initial_replicas, masters, &ctx.settings);
                    let params = PatchParams::apply(MANAGER).force();
                    statefulsets
                        .patch(name, &params, &Patch::Apply(&sts))
                        .await?;
                }
                SetSize::ReplicasOnly => {
                    let patch = json!({"spec": {"replicas": to}});
                    statefulsets
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
            }
            let why = if to > from {
                "a pod for the next member"
            } else {
                "its removed members' pods go"
            };
            (
                "resize",
                "Resized",
                Ok(()),
                format!("StatefulSet {name} from {from} to {to} pods: {why}"),
            )
        }
        ScaleStep::DeleteClaims { ordinals } => {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), target.ns);
            for &ordinal in ordinals {
                let claim = resources::claim_name_of(name, ordinal);
                match claims.delete(&claim, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            (
                "delete-claims",
                "VolumesDeleted",
                Ok(()),
                format!("deleted the volume claims of removed pods {ordinals:?}"),
            )
        }
        ScaleStep::Settled
        | ScaleStep::WaitForLeader
        | ScaleStep::WaitForPod { .. }
        | ScaleStep::WaitForCatchUp { .. } => return Ok(false),
    };
    // The recorder folds events of one action and reason into one (a
    // count, the first note): each step is its own action, so that
    // `kubectl describe` shows every step with its own words.
    let action = step_action(step);
    match change {
        Ok(()) => {
            info!(statefulset = %name, step = failpoint, "{note}");
            ctx.metrics.step(failpoint);
            crash_point(ctx, failpoint);
            publish_to(
                ctx,
                &target.object,
                EventType::Normal,
                reason,
                &action,
                note,
            )
            .await;
            Ok(true)
        }
        Err(e) => {
            let note = format!("{failpoint} failed (tried again at the next reconcile): {e}");
            warn!(statefulset = %name, "{note}");
            let reason = "ScaleStepFailed";
            publish_to(
                ctx,
                &target.object,
                EventType::Warning,
                reason,
                &action,
                note,
            )
            .await;
            Ok(false)
        }
    }
}

/// An event action naming the step and what it acts on.
fn step_action(step: &ScaleStep) -> String {
    match step {
        ScaleStep::AddLearner { id, .. } => format!("AddLearner{id}"),
        ScaleStep::Promote { id } => format!("Promote{id}"),
        ScaleStep::Remove { id, .. } => format!("Remove{id}"),
        ScaleStep::Resize { to, .. } => format!("ResizeTo{to}"),
        ScaleStep::DeleteClaims { ordinals } => {
            format!("DeleteClaimsFrom{}", ordinals.first().unwrap_or(&0))
        }
        other => format!("{other:?}").chars().take(64).collect(),
    }
}

/// The volume claims of `statefulset`'s pods at or above `size`, by
/// ordinal: those of removed pods, not deleted yet.
pub(crate) async fn stale_claims(
    ctx: &Context,
    ns: &str,
    statefulset: &str,
    size: u32,
) -> Result<Vec<u32>, Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let mut stale: Vec<u32> = claims
        .list(&ListParams::default())
        .await?
        .iter()
        .filter_map(|c| resources::claim_ordinal_of(statefulset, &c.name_any()))
        .filter(|&o| o >= size)
        .collect();
    stale.sort_unstable();
    Ok(stale)
}

/// The members as the status shows them.
fn member_statuses(rg: &ReplicaGroup, m: &MembershipView) -> Vec<MemberStatus> {
    m.members
        .iter()
        .map(|member| MemberStatus {
            id: member.id,
            pod: format!("{}-{}", rg.name_any(), member.id),
            address: member.address.clone(),
            role: if m.leader == Some(member.id) {
                "leader"
            } else if member.voter {
                "voter"
            } else {
                "learner"
            }
            .into(),
            behind_slots: member.behind_slots,
            incarnation: member.incarnation,
        })
        .collect()
}

fn crash_point(ctx: &Context, step: &str) {
    if ctx.crash_after.as_deref() == Some(step) {
        warn!("SHARDKV_OPERATOR_CRASH_AFTER={step}: exiting after the step");
        std::process::exit(86);
    }
}

async fn publish(
    ctx: &Context,
    rg: &ReplicaGroup,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    publish_to(ctx, &rg.object_ref(&()), type_, reason, action, note).await
}

pub(crate) async fn publish_to(
    ctx: &Context,
    object: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    // An event is a record for people; failing to write one must not stop
    // the reconcile, but it is logged.
    if let Err(e) = ctx.recorder.publish(&event, object).await {
        let name = object.name.as_deref().unwrap_or_default();
        warn!(object = %name, "could not publish event {reason}: {e}");
    }
}

/// The shardmaster's refusal to join, as the status recorded it: it stands,
/// since the gid cannot change.
fn refused_before(status: &crate::crd::ReplicaGroupStatus) -> Option<String> {
    let joined = status.conditions.iter().find(|c| c.type_ == "Joined")?;
    (joined.reason == "JoinRefused").then(|| {
        let message = &joined.message;
        // Recover the shardmaster's own words from the condition's message.
        let start = message.find(": ").map(|i| i + 2).unwrap_or(0);
        let end = message.find(". This ReplicaGroup").unwrap_or(message.len());
        message[start..end.max(start)].to_string()
    })
}
