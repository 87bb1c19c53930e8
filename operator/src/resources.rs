//! The Kubernetes objects a ReplicaGroup owns, built from its spec alone:
//! pure functions, unit-tested without an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, Probe, SecurityContext, Service, ServicePort, ServiceSpec, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::ReplicaGroup;
use crate::scale::REPLICAS_MAX;

/// The port every node serves Paxos, the client API and health on.
pub const GRPC_PORT: u16 = 7000;
/// Prometheus metrics.
pub const METRICS_PORT: u16 = 9100;
/// Where each pod's PersistentVolumeClaim is mounted.
pub const DATA_DIR: &str = "/data";
const DATA_VOLUME: &str = "data";
/// The key of the group's cluster-state ConfigMap that pods read at start.
const CLUSTER_STATE_KEY: &str = "state";
const CONTAINER: &str = "kvserver";

/// How the operator forms addresses and fills in what a spec leaves out.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How a pod's `host:port` is formed, from `{pod}`, `{service}`,
    /// `{namespace}`, `{gid}` (0 for the shardmaster), `{ordinal}` and
    /// `{port}`. In a cluster, the pod's DNS name under its headless Service;
    /// tests that run the pods as local processes use loopback addresses.
    pub pod_address_template: String,
    /// The image for groups whose spec names none.
    pub default_image: String,
}

pub const DEFAULT_POD_ADDRESS_TEMPLATE: &str = "{pod}.{service}.{namespace}.svc:{port}";

/// One pod's address, from the template.
pub fn pod_address(
    template: &str,
    service: &str,
    namespace: &str,
    gid: u64,
    ordinal: u32,
    port: u16,
) -> String {
    template
        .replace("{pod}", &format!("{service}-{ordinal}"))
        .replace("{service}", service)
        .replace("{namespace}", namespace)
        .replace("{gid}", &gid.to_string())
        .replace("{ordinal}", &ordinal.to_string())
        .replace("{port}", &port.to_string())
}

/// Why a spec's shardmaster reference cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("spec.shardmaster: {0}")]
pub struct BadShardmasterRef(pub String);

/// The shardmaster replicas' addresses.
pub fn master_addresses(
    rg: &ReplicaGroup,
    settings: &Settings,
) -> Result<Vec<String>, BadShardmasterRef> {
    let sm = &rg.spec.shardmaster;
    let namespace = rg.namespace().unwrap_or_default();
    match (&sm.service, &sm.addresses) {
        (Some(service), None) => Ok((0..sm.replicas)
            .map(|i| {
                pod_address(
                    &settings.pod_address_template,
                    service,
                    &namespace,
                    0,
                    i,
                    sm.port,
                )
            })
            .collect()),
        (None, Some(addresses)) if !addresses.is_empty() => Ok(addresses.clone()),
        (None, Some(_)) => Err(BadShardmasterRef("addresses is empty".into())),
        (Some(_), Some(_)) => Err(BadShardmasterRef(
            "set either service or addresses, not both".into(),
        )),
        (None, None) => Err(BadShardmasterRef("set service or addresses".into())),
    }
}

/// The group's replicas' addresses, in id order: the `--peers` list and what
/// the operator joins the group with. `gid` is the one the group was created
/// with, which a changed spec.gid does not move.
pub fn group_addresses(
    rg: &ReplicaGroup,
    gid: u64,
    replicas: u32,
    settings: &Settings,
) -> Vec<String> {
    let namespace = rg.namespace().unwrap_or_default();
    (0..replicas)
        .map(|i| {
            pod_address(
                &settings.pod_address_template,
                &rg.name_any(),
                &namespace,
                gid,
                i,
                GRPC_PORT,
            )
        })
        .collect()
}

/// The labels on everything a group owns; the selector uses all of them.
pub fn labels(rg: &ReplicaGroup) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "shardkv".into()),
        ("app.kubernetes.io/instance".into(), rg.name_any()),
        ("app.kubernetes.io/component".into(), "kvserver".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "shardkv-operator".into(),
        ),
        ("shardkv.io/gid".into(), rg.spec.gid.to_string()),
    ])
}

fn metadata(rg: &ReplicaGroup) -> ObjectMeta {
    ObjectMeta {
        name: Some(rg.name_any()),
        namespace: rg.namespace(),
        labels: Some(labels(rg)),
        owner_references: owner_reference(rg).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner_reference(rg: &ReplicaGroup) -> Option<OwnerReference> {
    rg.controller_owner_ref(&())
}

/// Headless: each pod gets a stable DNS name, published before it is ready,
/// because peers must reach each other to become ready at all.
pub fn service(rg: &ReplicaGroup) -> Service {
    Service {
        metadata: metadata(rg),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels(rg)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT.into(),
                    target_port: Some(IntOrString::String("grpc".into())),
                    // Explicit: server-side apply before Kubernetes 1.21
                    // requires it in list keys.
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: METRICS_PORT.into(),
                    target_port: Some(IntOrString::String("metrics".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The ConfigMap that tells a starting pod whether its group is new or
/// exists (etcd's `--initial-cluster-state`): read when a container
/// starts, so turning it to `existing` restarts no pod. `existing` once the
/// group has had a leader: from then on a pod on a blank volume is a new
/// member to add, never a new group.
pub fn cluster_state_config_map(rg: &ReplicaGroup, existing: bool) -> ConfigMap {
    let state = if existing { "existing" } else { "new" };
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(cluster_state_name(rg)),
            ..metadata(rg)
        },
        data: Some(BTreeMap::from([(CLUSTER_STATE_KEY.into(), state.into())])),
        ..ConfigMap::default()
    }
}

pub fn cluster_state_name(rg: &ReplicaGroup) -> String {
    format!("{}-cluster-state", rg.name_any())
}

/// Whether the ConfigMap says the group exists.
pub fn says_existing(cm: &ConfigMap) -> bool {
    cm.data
        .as_ref()
        .and_then(|d| d.get(CLUSTER_STATE_KEY))
        .is_some_and(|s| s == "existing")
}

/// The volume claim the StatefulSet made for pod `ordinal`.
pub fn claim_name(rg: &ReplicaGroup, ordinal: u32) -> String {
    claim_name_of(&rg.name_any(), ordinal)
}

/// The ordinal of one of this group's volume claims, from its name.
pub fn claim_ordinal(rg: &ReplicaGroup, claim: &str) -> Option<u32> {
    claim_ordinal_of(&rg.name_any(), claim)
}

/// The claim of the `data` volume of StatefulSet `statefulset`'s pod
/// `ordinal`, as the StatefulSet controller names it (the chart's
/// shardmaster names its volume `data` too).
pub fn claim_name_of(statefulset: &str, ordinal: u32) -> String {
    format!("{DATA_VOLUME}-{statefulset}-{ordinal}")
}

pub fn claim_ordinal_of(statefulset: &str, claim: &str) -> Option<u32> {
    let prefix = format!("{DATA_VOLUME}-{statefulset}-");
    let ordinal = claim.strip_prefix(&prefix)?;
    // "data-g1-4" is not a claim of "g1-4"'s... nor "data-g10-4" of "g1".
    if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ordinal.parse().ok()
}

/// The label selector of the group's pods, as the scale subresource
/// reports it.
pub fn selector(rg: &ReplicaGroup) -> String {
    labels(rg)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The group's size at creation, as an existing StatefulSet's pods are
/// told it (a StatefulSet from before resizing named only its first
/// replicas in SHARDKV_PEERS).
pub fn initial_replicas_of(sts: &StatefulSet) -> Option<u32> {
    let pod = sts.spec.as_ref()?.template.spec.as_ref()?;
    let env = pod.containers.first()?.env.as_ref()?;
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    match value("SHARDKV_INITIAL_REPLICAS") {
        Some(n) => n.parse().ok(),
        None => value("SHARDKV_PEERS").map(|p| p.split(',').count() as u32),
    }
}

/// The StatefulSet running the group's kvservers, `replicas` pods of it.
/// Its pod template does not depend on the size, so resizing restarts no
/// pod: SHARDKV_PEERS names every pod the group may grow to, and
/// `initial_replicas` (the size it was created with) says which of them
/// formed the group; the others join as new members.
pub fn statefulset(
    rg: &ReplicaGroup,
    replicas: u32,
    initial_replicas: u32,
    masters: &[String],
    settings: &Settings,
) -> StatefulSet {
    debug_assert!((1..=REPLICAS_MAX).contains(&initial_replicas));
    let peers = group_addresses(rg, rg.spec.gid, REPLICAS_MAX, settings).join(",");
    let image = rg
        .spec
        .image
        .clone()
        .unwrap_or_else(|| settings.default_image.clone());
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image),
        command: Some(vec!["shardkv-node".into(), "kv".into()]),
        env: Some(vec![
            // The node takes its id from the pod name's ordinal.
            EnvVar {
                name: "SHARDKV_ID".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            env("SHARDKV_GID", rg.spec.gid.to_string()),
            env("SHARDKV_PEERS", peers),
            env("SHARDKV_INITIAL_REPLICAS", initial_replicas.to_string()),
            EnvVar {
                name: "SHARDKV_INITIAL_CLUSTER_STATE".into(),
                value_from: Some(EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: cluster_state_name(rg),
                        key: CLUSTER_STATE_KEY.into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            env("SHARDKV_MASTERS", masters.join(",")),
            env("SHARDKV_DATA_DIR", DATA_DIR),
            env("SHARDKV_LISTEN", format!("0.0.0.0:{GRPC_PORT}")),
            env("SHARDKV_METRICS_ADDR", format!("0.0.0.0:{METRICS_PORT}")),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        // The gRPC health service says SERVING once the replica knows a
        // leader and has applied what it knows is decided. An exec probe,
        // not a `grpc` one, because that probe type needs Kubernetes 1.24.
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "shardkvctl".into(),
                    "health".into(),
                    format!("127.0.0.1:{GRPC_PORT}"),
                ]),
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(3),
            ..Probe::default()
        }),
        resources: rg.spec.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(labels(rg)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: rg.spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    Quantity(rg.spec.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: metadata(rg),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            service_name: Some(rg.name_any()),
            // All at once: a new Paxos group needs every member up once, and
            // a pod is not ready until a majority is. (A resize adds or
            // removes one pod at a time all the same: the operator steps
            // the size.)
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(labels(rg)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(rg)),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".into(), "true".into()),
                        ("prometheus.io/port".into(), METRICS_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // Let the node's SIGTERM handling finish its last sync.
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The smallest number of a group's replicas that still decides.
pub fn majority(replicas: u32) -> u32 {
    replicas / 2 + 1
}

/// How many of `voters` may be down with a majority still up.
pub fn disruptions_allowed(voters: u32) -> u32 {
    voters.saturating_sub(majority(voters))
}

/// Voluntary disruptions (drains, upgrades) keep a majority of the
/// group's voters up: `voters` is their number now, which a resize changes.
/// As the most pods that may be down, not the fewest that must be up: a
/// learner's or a new pod's readiness must not count for a voter's.
pub fn pod_disruption_budget(rg: &ReplicaGroup, voters: u32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(rg),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(disruptions_allowed(voters) as i32)),
            selector: Some(LabelSelector {
                match_labels: Some(labels(rg)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ReplicaGroupSpec, ShardmasterRef, StorageSpec};

    fn group(shardmaster: ShardmasterRef) -> ReplicaGroup {
        let mut rg = ReplicaGroup::new(
            "g1",
            ReplicaGroupSpec {
                gid: 4,
                replicas: 3,
                image: None,
                resources: None,
                storage: StorageSpec {
                    size: "5Gi".into(),
                    storage_class_name: Some("fast".into()),
                },
                shardmaster,
            },
        );
        rg.metadata.namespace = Some("db".into());
        rg.metadata.uid = Some("uid-1".into());
        rg
    }

    fn by_service() -> ShardmasterRef {
        ShardmasterRef {
            service: Some("skv-master".into()),
            replicas: 3,
            port: 7000,
            addresses: None,
        }
    }

    fn settings(template: &str) -> Settings {
        Settings {
            pod_address_template: template.into(),
            default_image: "shardkv:test".into(),
        }
    }

    fn env_of(sts: &StatefulSet) -> BTreeMap<String, String> {
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| {
                let v = e.value.clone().unwrap_or_else(|| {
                    let from = e.value_from.as_ref().unwrap();
                    match (&from.field_ref, &from.config_map_key_ref) {
                        (Some(f), _) => format!("fieldRef:{}", f.field_path),
                        (_, Some(c)) => format!("configMap:{}/{}", c.name, c.key),
                        _ => panic!("unexpected env source {from:?}"),
                    }
                });
                (e.name.clone(), v)
            })
            .collect()
    }

    #[test]
    fn addresses_follow_the_template() {
        let rg = group(by_service());
        let dns = settings(DEFAULT_POD_ADDRESS_TEMPLATE);
        assert_eq!(
            group_addresses(&rg, 4, 3, &dns),
            [
                "g1-0.g1.db.svc:7000",
                "g1-1.g1.db.svc:7000",
                "g1-2.g1.db.svc:7000"
            ]
        );
        assert_eq!(
            master_addresses(&rg, &dns).unwrap(),
            [
                "skv-master-0.skv-master.db.svc:7000",
                "skv-master-1.skv-master.db.svc:7000",
                "skv-master-2.skv-master.db.svc:7000"
            ]
        );
        let local = settings("127.60.{gid}.{ordinal}:{port}");
        assert_eq!(
            group_addresses(&rg, 4, 3, &local),
            ["127.60.4.0:7000", "127.60.4.1:7000", "127.60.4.2:7000"]
        );
        assert_eq!(master_addresses(&rg, &local).unwrap()[2], "127.60.0.2:7000");
    }

    #[test]
    fn the_shardmaster_reference_needs_exactly_one_form() {
        let s = settings(DEFAULT_POD_ADDRESS_TEMPLATE);
        let listed = |addresses: Option<Vec<String>>, service: Option<String>| {
            master_addresses(
                &group(ShardmasterRef {
                    service,
                    replicas: 3,
                    port: 7000,
                    addresses,
                }),
                &s,
            )
        };
        assert_eq!(listed(Some(vec!["m:1".into()]), None).unwrap(), ["m:1"]);
        assert!(listed(Some(vec![]), None).is_err());
        assert!(listed(None, None).is_err());
        let both = listed(Some(vec!["m:1".into()]), Some("skv-master".into())).unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
    }

    #[test]
    fn the_statefulset_runs_the_group_from_its_spec() {
        let rg = group(by_service());
        let s = settings(DEFAULT_POD_ADDRESS_TEMPLATE);
        let masters = master_addresses(&rg, &s).unwrap();
        let sts = statefulset(&rg, 3, 3, &masters, &s);
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("g1"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let env = env_of(&sts);
        assert_eq!(env["SHARDKV_ID"], "fieldRef:metadata.name");
        assert_eq!(env["SHARDKV_GID"], "4");
        assert_eq!(
            env["SHARDKV_PEERS"],
            group_addresses(&rg, 4, REPLICAS_MAX, &s).join(","),
            "every pod the group may grow to"
        );
        assert_eq!(env["SHARDKV_INITIAL_REPLICAS"], "3");
        assert_eq!(
            env["SHARDKV_INITIAL_CLUSTER_STATE"],
            "configMap:g1-cluster-state/state"
        );
        assert_eq!(initial_replicas_of(&sts), Some(3));
        // Resizing changes the size, not the pods' template: no restart.
        let resized = statefulset(&rg, 5, 3, &masters, &s);
        assert_eq!(
            resized.spec.as_ref().unwrap().template,
            sts.spec.as_ref().unwrap().template
        );
        assert_eq!(resized.spec.as_ref().unwrap().replicas, Some(5));
        assert_eq!(env["SHARDKV_MASTERS"], masters.join(","));
        assert_eq!(env["SHARDKV_DATA_DIR"], DATA_DIR);
        let pod = spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("shardkv:test"),
            "the default image"
        );
        let probe = c.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
        assert_eq!(
            probe.command.as_ref().unwrap()[..2],
            ["shardkvctl".to_string(), "health".into()]
        );
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"],
            Quantity("5Gi".into())
        );
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            spec.template.metadata.as_ref().unwrap().labels.as_ref()
        );
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("ReplicaGroup", "g1", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn a_named_image_wins_over_the_default() {
        let mut rg = group(by_service());
        rg.spec.image = Some("registry/shardkv:1.2".into());
        let s = settings(DEFAULT_POD_ADDRESS_TEMPLATE);
        let sts = statefulset(&rg, 3, 3, &["m:7000".into()], &s);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry/shardkv:1.2")
        );
    }

    #[test]
    fn the_service_is_headless_and_publishes_unready_pods() {
        let svc = service(&group(by_service())).spec.unwrap();
        assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
        assert_eq!(svc.publish_not_ready_addresses, Some(true));
    }

    #[test]
    fn an_older_statefulset_tells_its_initial_size_by_its_peers() {
        let rg = group(by_service());
        let mut sts = statefulset(&rg, 3, 5, &["m:7000".into()], &settings("{pod}:{port}"));
        assert_eq!(initial_replicas_of(&sts), Some(5));
        let env = sts
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
            .env
            .as_mut()
            .unwrap();
        env.retain(|e| e.name != "SHARDKV_INITIAL_REPLICAS");
        for e in env.iter_mut().filter(|e| e.name == "SHARDKV_PEERS") {
            e.value = Some("a:1,b:1,c:1".into());
        }
        assert_eq!(initial_replicas_of(&sts), Some(3));
    }

    #[test]
    fn claims_and_the_selector_are_named_as_kubernetes_names_them() {
        let rg = group(by_service());
        assert_eq!(claim_name(&rg, 4), "data-g1-4");
        assert_eq!(claim_ordinal(&rg, "data-g1-4"), Some(4));
        assert_eq!(claim_ordinal(&rg, "data-g10-4"), None);
        assert_eq!(claim_ordinal(&rg, "data-g1-x"), None);
        let selector = selector(&rg);
        assert!(
            selector.contains("app.kubernetes.io/instance=g1"),
            "{selector}"
        );
        assert_eq!(selector.split(',').count(), labels(&rg).len());
        assert!(says_existing(&cluster_state_config_map(&rg, true)));
        assert!(!says_existing(&cluster_state_config_map(&rg, false)));
    }

    #[test]
    fn the_disruption_budget_keeps_a_majority() {
        for (n, down) in [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (7, 3)] {
            let pdb = pod_disruption_budget(&group(by_service()), n).spec.unwrap();
            assert_eq!(pdb.min_available, None);
            assert_eq!(
                pdb.max_unavailable,
                Some(IntOrString::Int(down)),
                "{n} replicas"
            );
        }
    }
}
