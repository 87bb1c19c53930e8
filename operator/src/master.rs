//! Resizing the shardmaster: the chart's StatefulSet says the size asked
//! for in an annotation (`helm upgrade --set shardmaster.replicas=N`), and
//! this controller carries it out one member at a time, as for a
//! ReplicaGroup ([`crate::scale`]). Helm owns the StatefulSet; the operator
//! only sets its size, writes the cluster-state ConfigMap its pods read,
//! and keeps a PodDisruptionBudget at the majority of the voters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use crate::cluster;
use crate::controller::{
    publish_to, resize, stale_claims, Context, Error, ResizeTarget, SetSize, MANAGER,
};
use crate::resources::{disruptions_allowed, says_existing};
use crate::scale::{self, ScaleInput, REPLICAS_MAX};

/// The annotation with the size asked for, set by the chart.
pub const REPLICAS_ANNOTATION: &str = "shardkv.io/replicas";
/// The shardmaster's group name, as its replicas identify themselves.
const GROUP: &str = "shardmaster";

const REQUEUE_BUSY: Duration = Duration::from_secs(2);
/// Membership changes send no Kubernetes event: look again now and then.
const REQUEUE_SETTLED: Duration = Duration::from_secs(30);

/// What the StatefulSet asks for, read from it.
#[derive(Debug, PartialEq, Eq)]
pub struct Asked {
    pub desired: u32,
    /// Every pod's address (SHARDKV_PEERS), by ordinal.
    pub possible: Vec<String>,
}

/// The size asked for and the pods' addresses, or why the StatefulSet
/// cannot be resized (`Ok(None)`: it asks for nothing: not ours).
pub fn asked(sts: &StatefulSet) -> Result<Option<Asked>, String> {
    let Some(value) = sts.annotations().get(REPLICAS_ANNOTATION) else {
        return Ok(None);
    };
    let desired: u32 = value
        .parse()
        .ok()
        .filter(|n| (1..=REPLICAS_MAX).contains(n))
        .ok_or_else(|| {
            format!(
                "{REPLICAS_ANNOTATION}={value:?}: the shardmaster has 1 to {REPLICAS_MAX} replicas"
            )
        })?;
    let env = (sts.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.env.as_ref());
    let peers = env
        .and_then(|env| env.iter().find(|e| e.name == "SHARDKV_PEERS"))
        .and_then(|e| e.value.clone())
        .ok_or("the pods' SHARDKV_PEERS is not set")?;
    let possible: Vec<String> = peers.split(',').map(str::to_string).collect();
    if possible.len() < desired as usize {
        return Err(format!(
            "SHARDKV_PEERS names {} pods, fewer than the {desired} asked for: upgrade the chart",
            possible.len()
        ));
    }
    Ok(Some(Asked { desired, possible }))
}

/// The shardmaster's disruption budget: a majority of its voters. Named
/// apart from the one the chart makes without the operator, so turning
/// the operator on or off never has two owners for one object.
pub fn pod_disruption_budget(sts: &StatefulSet, voters: u32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(pdb_name(sts)),
            namespace: sts.namespace(),
            labels: sts.metadata.labels.clone(),
            owner_references: sts.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(disruptions_allowed(voters) as i32)),
            selector: sts.spec.as_ref().map(|s| LabelSelector {
                match_labels: s.selector.match_labels.clone(),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

pub fn pdb_name(sts: &StatefulSet) -> String {
    format!("{}-voters", sts.name_any())
}

/// The ConfigMap the shardmaster's pods read at start.
fn cluster_state(sts: &StatefulSet, existing: bool) -> ConfigMap {
    let state = if existing { "existing" } else { "new" };
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("{}-cluster-state", sts.name_any())),
            namespace: sts.namespace(),
            labels: sts.metadata.labels.clone(),
            owner_references: sts.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some([("state".to_string(), state.to_string())].into()),
        ..ConfigMap::default()
    }
}

pub async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&sts, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.is_ok());
    result
}

async fn reconcile_inner(sts: &StatefulSet, ctx: &Context) -> Result<Action, Error> {
    if sts.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = sts.namespace().ok_or(Error::NoNamespace)?;
    let name = sts.name_any();
    let object = sts.object_ref(&());
    let asked = match asked(sts) {
        Ok(Some(asked)) => asked,
        Ok(None) => return Ok(Action::await_change()),
        Err(why) => {
            warn!(statefulset = %name, "cannot resize: {why}");
            publish_to(
                ctx,
                &object,
                EventType::Warning,
                "CannotResize",
                "Scale",
                why,
            )
            .await;
            return Ok(Action::requeue(REQUEUE_SETTLED));
        }
    };
    let size = (sts.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .clamp(0, REPLICAS_MAX as i32) as u32;
    let servers = &asked.possible[..(size as usize).min(asked.possible.len())];
    let (membership, pods) = futures::join!(
        cluster::membership(servers),
        cluster::identify_pods(servers, GROUP)
    );
    let membership = match membership {
        Ok(m) => m,
        Err(e) => {
            warn!(statefulset = %name, "cannot read the shardmaster's membership: {e}");
            return Ok(Action::requeue(REQUEUE_BUSY));
        }
    };
    let params = PatchParams::apply(MANAGER).force();

    // Never back to "new" once the group has had a leader.
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let cm_name = format!("{name}-cluster-state");
    // Only this StatefulSet's: one of the same name deleted before may have
    // left its ConfigMap behind.
    let was_existing = (config_maps.get_opt(&cm_name).await?).is_some_and(|cm| {
        let ours = (cm.metadata.owner_references.iter().flatten())
            .any(|o| Some(&o.uid) == sts.metadata.uid.as_ref());
        ours && says_existing(&cm)
    });
    let existing = was_existing || membership.leader.is_some();
    config_maps
        .patch(
            &cm_name,
            &params,
            &Patch::Apply(&cluster_state(sts, existing)),
        )
        .await?;

    let voters = membership.voters().count() as u32;
    if voters > 0 {
        let pdb = pod_disruption_budget(sts, voters);
        match Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
            .patch(&pdb_name(sts), &params, &Patch::Apply(&pdb))
            .await
        {
            Ok(_) => {}
            // Kubernetes before 1.21 serves no policy/v1.
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }

    let stale = stale_claims(ctx, &ns, &name, size).await?;
    let epoch = membership.epoch;
    let step = scale::plan(&ScaleInput {
        desired: asked.desired,
        statefulset: size,
        membership,
        pods,
        stale_claims: stale,
    });
    let target = ResizeTarget {
        ns: &ns,
        statefulset: &name,
        possible: &asked.possible,
        servers,
        set_size: SetSize::ReplicasOnly,
        object,
        epoch,
    };
    resize(ctx, &target, &step).await?;
    Ok(Action::requeue(if step.busy() {
        REQUEUE_BUSY
    } else {
        REQUEUE_SETTLED
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetSpec;
    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
    use std::collections::BTreeMap;

    fn sts(annotation: Option<&str>, peers: usize) -> StatefulSet {
        let env = vec![EnvVar {
            name: "SHARDKV_PEERS".into(),
            value: Some(
                (0..peers)
                    .map(|i| format!("m-{i}:7000"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ..EnvVar::default()
        }];
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("skv-master".into()),
                namespace: Some("db".into()),
                annotations: annotation
                    .map(|a| BTreeMap::from([(REPLICAS_ANNOTATION.to_string(), a.to_string())])),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(3),
                template: PodTemplateSpec {
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            env: Some(env),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                    ..PodTemplateSpec::default()
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    #[test]
    fn the_size_asked_for_comes_from_the_annotation() {
        let asked_for = asked(&sts(Some("5"), 7)).unwrap().unwrap();
        assert_eq!(asked_for.desired, 5);
        assert_eq!(asked_for.possible.len(), 7);
        assert_eq!(asked(&sts(None, 7)), Ok(None), "not ours to resize");
        assert!(asked(&sts(Some("0"), 7)).unwrap_err().contains("1 to 7"));
        assert!(asked(&sts(Some("many"), 7)).is_err());
        // A StatefulSet from an older chart names only its first pods.
        let old = asked(&sts(Some("5"), 3)).unwrap_err();
        assert!(old.contains("names 3 pods"), "{old}");
    }

    #[test]
    fn the_budget_keeps_a_majority_of_the_voters() {
        for (voters, down) in [(1, 0), (3, 1), (4, 1), (5, 2), (7, 3)] {
            let pdb = pod_disruption_budget(&sts(Some("3"), 7), voters);
            assert_eq!(
                pdb.spec.unwrap().max_unavailable,
                Some(IntOrString::Int(down)),
                "{voters} voters"
            );
        }
    }
}
