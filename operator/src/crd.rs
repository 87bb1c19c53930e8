//! The `ReplicaGroup` custom resource (`shardkv.io/v1alpha1`): one Paxos
//! replica group of kvservers, and what the operator reports about it.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The finalizer that holds a deleted group until it has handed off its shards.
pub const FINALIZER: &str = "shardkv.io/drain";

/// Set to "true" to delete the last group although it holds data: the data is lost.
pub const ALLOW_DATA_LOSS_ANNOTATION: &str = "shardkv.io/allow-data-loss";

/// One Paxos replica group of kvservers, joined to the shardmaster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shardkv.io",
    version = "v1alpha1",
    kind = "ReplicaGroup",
    namespaced,
    shortname = "rg",
    status = "ReplicaGroupStatus",
    // `kubectl scale rg NAME --replicas=N`, and autoscalers, through the
    // scale subresource.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"GID","type":"integer","jsonPath":".spec.gid"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Shards","type":"string","jsonPath":".status.shards"}"#,
    printcolumn = r#"{"name":"Joined","type":"boolean","jsonPath":".status.joined"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaGroupSpec {
    /// The group's id in the shardmaster's configurations. Immutable.
    /// The operator refuses a change with a condition. (No CEL rule: the
    /// CRD must install on Kubernetes before 1.25, whose server-side apply
    /// rejects `x-kubernetes-validations`.)
    #[schemars(range(min = 1))]
    pub gid: u64,
    /// Voting replicas in the Paxos group, 1 to 7 (odd sizes tolerate as
    /// many failures as the even size above them, with fewer votes to
    /// wait for). A change is carried out one member at a time: a new
    /// replica catches up as a learner before it votes; a removed one
    /// leaves the group before its pod and volume go.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 7))]
    pub replicas: u32,
    /// The shardkv image; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub storage: StorageSpec,
    /// Where the shardmaster is.
    pub shardmaster: ShardmasterRef,
}

fn default_replicas() -> u32 {
    3
}

/// One PersistentVolumeClaim per replica.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// The cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// The shardmaster: its StatefulSet's Service (pods `<service>-0..replicas`),
/// or explicit addresses. Exactly one of `service` and `addresses`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardmasterRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 7))]
    pub replicas: u32,
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// `host:port` of every shardmaster replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
}

pub fn default_port() -> u16 {
    7000
}

/// What the operator observed, written by server-side apply.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The gid this resource was created with: a changed `spec.gid` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u64>,
    /// The group's voting members (what `kubectl scale` compares with
    /// spec.replicas); the StatefulSet's size until the members are known.
    #[serde(default)]
    pub replicas: u32,
    /// The size the group was created with: its first voters. Kept here
    /// so a StatefulSet deleted and made again tells its pods the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_replicas: Option<u32>,
    /// The pods' label selector, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default)]
    pub ready_replicas: u32,
    /// The group's members as its leader reports them, in id order.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// The gid is in the shardmaster's latest configuration.
    #[serde(default)]
    pub joined: bool,
    /// The shardmaster's latest configuration number.
    #[serde(default)]
    pub config_num: u64,
    /// The shards the latest configuration assigns to this group.
    #[serde(default)]
    pub shards: Vec<u64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One member of the group's Paxos membership.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// The replica id: the pod's ordinal.
    pub id: u32,
    pub pod: String,
    pub address: String,
    /// "leader", "voter" or "learner".
    pub role: String,
    /// Slots it is behind the leader, when the leader has heard from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind_slots: Option<u64>,
    /// The life of its storage: a pod started again from a blank volume is
    /// a new incarnation, and a new member.
    pub incarnation: u64,
}

/// A Kubernetes-style condition: `Ready`, `Joined`, `Scaled`, `Leaving`
/// or `Degraded`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339; changes only when `status` does.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRDs as YAML documents, as `shardkv-operator crd` prints them.
pub fn crds_yaml() -> String {
    let crd = ReplicaGroup::crd();
    // A serialization failure of a derived, in-memory CRD is a programming error.
    let body = serde_yaml::to_string(&crd).expect("the CRD serializes");
    format!("---\n{body}")
}
