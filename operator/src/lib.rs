//! The shardkv Kubernetes operator.
//!
//! - [`crd`]: the `ReplicaGroup` resource.
//! - [`resources`]: the objects a group owns, built from its spec (pure).
//! - [`decide`]: the Join / Leave / drain decision table (pure).
//! - [`scale`]: resizing a group one member at a time (pure).
//! - [`master`]: resizing the shardmaster's (Helm-owned) StatefulSet.
//! - [`cluster`]: calls to the shardmaster and the kvservers.
//! - [`controller`]: the reconcile loop that ties them to the API server.
//! - [`lease`]: optional leader election; [`metrics`]: `/metrics`, `/healthz`.

pub mod cluster;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod lease;
pub mod master;
pub mod metrics;
pub mod resources;
pub mod scale;
