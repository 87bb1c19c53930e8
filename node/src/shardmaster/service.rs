//! The shardmaster's gRPC API. Join, Leave and Move go through the Paxos
//! log; a Query passes a read barrier and reads the applied state. A
//! follower forwards either to the leader (one hop), so any replica may be
//! asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Response, Status};

use super::{Config, Op, Reply, Request, SharedMasterState};
use crate::proto::shardmaster as pb;
use crate::proto::shardmaster::shard_master_client::ShardMasterClient as PbClient;
use crate::proto::shardmaster::shard_master_server::{ShardMaster, ShardMasterServer};
use crate::replica::{Replica, ReplicaError};

/// Metadata set on a forwarded request, so it is never forwarded twice.
const FORWARDED: &str = "x-shardkv-forwarded";
/// Metadata naming the leader's index when a request is refused.
pub const LEADER_HINT: &str = "x-shardkv-leader";
/// Metadata naming the leader's address when a request is refused.
pub const LEADER_ADDRESS_HINT: &str = "x-shardkv-leader-address";
/// How long a forwarded request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one shardmaster replica's client API.
#[derive(Clone)]
pub struct ShardMasterService {
    /// The local replica: requests are proposed through it.
    replica: Replica,
    /// What the replica has applied, for queries after a read barrier.
    state: SharedMasterState,
    /// The peer list the replica was started with: replica i's address
    /// until the group records its members' addresses (its first change).
    peers: Vec<String>,
    /// Client-API channels to the leaders forwarded to, by address. Lazy:
    /// connected (and the name resolved) on first use.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl ShardMasterService {
    /// `peers[i]` is replica i's client-API address (`host:port`).
    pub fn new(
        replica: Replica,
        state: SharedMasterState,
        peers: &[String],
    ) -> Result<Self, String> {
        for addr in peers {
            crate::net::endpoint(addr).map_err(|e| format!("invalid address {addr}: {e}"))?;
        }
        Ok(ShardMasterService {
            replica,
            state,
            peers: peers.to_vec(),
            channels: Default::default(),
        })
    }

    /// A channel to replica `leader`, at its recorded address or, before
    /// the group records any, its place in the peer list.
    fn channel_to(&self, leader: u32) -> Option<(String, Channel)> {
        let status = self.replica.status();
        let address = match status.membership.members.get(&leader) {
            Some(member) => member.address.clone(),
            None if status.membership.members.is_empty() => {
                self.peers.get(leader as usize)?.clone()
            }
            None => return None,
        };
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(&address) {
            return Some((address, channel.clone()));
        }
        let channel = crate::net::endpoint(&address)
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        channels.insert(address.clone(), channel.clone());
        Some((address, channel))
    }

    pub fn into_server(self) -> ShardMasterServer<Self> {
        ShardMasterServer::new(self)
    }

    async fn execute<T: Clone + Send + 'static>(
        &self,
        grpc: GrpcRequest<T>,
        tag: Option<pb::ClientTag>,
        op: Op,
        forward: impl AsyncFnOnce(
            PbClient<Channel>,
            GrpcRequest<T>,
        ) -> Result<Response<pb::Config>, Status>,
    ) -> Result<Response<pb::Config>, Status> {
        let tag = tag.ok_or_else(|| Status::invalid_argument("missing client tag"))?;
        let request = Request {
            client: tag.client,
            seq: tag.seq,
            op,
        };
        let command = postcard::to_allocvec(&request)
            .map_err(|e| Status::internal(format!("cannot encode request: {e}")))?;
        let outcome = match self.replica.propose(Bytes::from(command)).await {
            Ok(bytes) => Ok(postcard::from_bytes::<Reply>(&bytes)
                .map_err(|e| Status::internal(format!("undecodable reply: {e}")))?),
            Err(e) => Err(e),
        };
        self.answer(grpc, outcome, forward).await
    }

    /// A query: no log entry, but a read barrier (the leader confirms it
    /// still leads and has applied everything decided before the call), so
    /// it reflects every change acknowledged before it and a cut-off
    /// replica cannot answer from stale state.
    async fn read<T: Clone + Send + 'static>(
        &self,
        grpc: GrpcRequest<T>,
        num: Option<u64>,
        forward: impl AsyncFnOnce(
            PbClient<Channel>,
            GrpcRequest<T>,
        ) -> Result<Response<pb::Config>, Status>,
    ) -> Result<Response<pb::Config>, Status> {
        let outcome = match self.replica.read_barrier().await {
            Ok(()) => Ok(Ok(self.state.lock().query(num).clone())),
            Err(e) => Err(e),
        };
        self.answer(grpc, outcome, forward).await
    }

    /// Replies with what this replica did, or forwards the request to the
    /// leader it names (once: a forwarded request is not forwarded again).
    async fn answer<T: Clone + Send + 'static>(
        &self,
        grpc: GrpcRequest<T>,
        outcome: Result<Reply, ReplicaError>,
        forward: impl AsyncFnOnce(
            PbClient<Channel>,
            GrpcRequest<T>,
        ) -> Result<Response<pb::Config>, Status>,
    ) -> Result<Response<pb::Config>, Status> {
        let forwarded = grpc.metadata().contains_key(FORWARDED);
        match outcome {
            Ok(Ok(config)) => Ok(Response::new(to_proto(&config))),
            Ok(Err(e)) => Err(Status::invalid_argument(e.to_string())),
            Err(ReplicaError::NotLeader {
                leader: Some(leader),
            }) if !forwarded => {
                let Some((_, channel)) = self.channel_to(leader) else {
                    return Err(not_leader(Some(leader)));
                };
                let mut inner = GrpcRequest::new(grpc.into_inner());
                inner
                    .metadata_mut()
                    .insert(FORWARDED, MetadataValue::from_static("1"));
                inner.set_timeout(FORWARD_TIMEOUT);
                forward(PbClient::new(channel.clone()), inner).await
            }
            Err(ReplicaError::NotLeader { leader }) => {
                let address = leader.and_then(|l| self.channel_to(l)).map(|(a, _)| a);
                Err(not_leader_at(leader, address.as_deref()))
            }
            Err(ReplicaError::Busy) => Err(Status::resource_exhausted("shardmaster is overloaded")),
            Err(ReplicaError::OutcomeUnknown) => Err(Status::unavailable(
                "leader changed before the request was decided; retry with the same tag",
            )),
            Err(ReplicaError::Stopped) => Err(Status::unavailable("replica is shutting down")),
            Err(ReplicaError::Membership(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(ReplicaError::Storage(e) | ReplicaError::Config(e)) => {
                Err(Status::internal(format!("replica failure: {e}")))
            }
        }
    }
}

/// "Not the leader", naming the leader's index in the group when known.
/// Shared by every replicated service.
pub fn not_leader(leader: Option<u32>) -> Status {
    let mut status = Status::unavailable("not the leader");
    if let Some(l) = leader {
        if let Ok(v) = l.to_string().parse() {
            status.metadata_mut().insert(LEADER_HINT, v);
        }
    }
    status
}

/// "Not the leader", naming the leader's id and, where known, its address
/// (ids index a client's server list only while the group has the members
/// it was created with).
pub fn not_leader_at(leader: Option<u32>, address: Option<&str>) -> Status {
    let mut status = not_leader(leader);
    if let Some(v) = address.and_then(|a| a.parse().ok()) {
        status.metadata_mut().insert(LEADER_ADDRESS_HINT, v);
    }
    status
}

/// The leader index a refusal names, if any.
pub fn leader_hint(status: &Status) -> Option<usize> {
    status
        .metadata()
        .get(LEADER_HINT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Which of `servers` to try after `tried` refused with `status`: the
/// leader it names, by address if it gives one, else by index; the next
/// one in turn if it names none (or itself, or one not in the list).
pub fn next_server(status: &Status, servers: &[String], tried: usize) -> usize {
    let n = servers.len().max(1);
    let by_address = status
        .metadata()
        .get(LEADER_ADDRESS_HINT)
        .and_then(|v| v.to_str().ok())
        .map(|addr| servers.iter().position(|s| s == addr));
    let hinted = match by_address {
        Some(position) => position,
        None => leader_hint(status).filter(|h| *h < n),
    };
    hinted.filter(|h| *h != tried).unwrap_or((tried + 1) % n)
}

/// Converts a configuration to its wire form.
pub fn to_proto(config: &Config) -> pb::Config {
    pb::Config {
        num: config.num,
        shards: config.shards.clone(),
        groups: config
            .groups
            .iter()
            .map(|(gid, servers)| {
                (
                    *gid,
                    pb::ServerList {
                        servers: servers.clone(),
                    },
                )
            })
            .collect(),
    }
}

/// Converts a configuration from its wire form.
pub fn from_proto(config: pb::Config) -> Config {
    Config {
        num: config.num,
        shards: config.shards,
        groups: config
            .groups
            .into_iter()
            .map(|(gid, list)| (gid, list.servers))
            .collect(),
    }
}

#[tonic::async_trait]
impl ShardMaster for ShardMasterService {
    async fn join(
        &self,
        request: GrpcRequest<pb::JoinRequest>,
    ) -> Result<Response<pb::Config>, Status> {
        let r = request.get_ref().clone();
        let op = Op::JoinChecked {
            gid: r.gid,
            servers: r.servers,
        };
        self.execute(request, r.tag, op, async |mut c, req| c.join(req).await)
            .await
    }

    async fn leave(
        &self,
        request: GrpcRequest<pb::LeaveRequest>,
    ) -> Result<Response<pb::Config>, Status> {
        let r = *request.get_ref();
        let op = Op::Leave { gid: r.gid };
        self.execute(request, r.tag, op, async |mut c, req| c.leave(req).await)
            .await
    }

    async fn r#move(
        &self,
        request: GrpcRequest<pb::MoveRequest>,
    ) -> Result<Response<pb::Config>, Status> {
        let r = *request.get_ref();
        let op = Op::Move {
            shard: r.shard,
            gid: r.gid,
        };
        self.execute(request, r.tag, op, async |mut c, req| c.r#move(req).await)
            .await
    }

    async fn claim(
        &self,
        request: GrpcRequest<pb::ClaimRequest>,
    ) -> Result<Response<pb::Config>, Status> {
        let r = *request.get_ref();
        let op = Op::Claim {
            gid: r.gid,
            incarnation: r.incarnation,
        };
        self.execute(request, r.tag, op, async |mut c, req| c.claim(req).await)
            .await
    }

    async fn query(
        &self,
        request: GrpcRequest<pb::QueryRequest>,
    ) -> Result<Response<pb::Config>, Status> {
        let num = u64::try_from(request.get_ref().num).ok();
        self.read(request, num, async |mut c, req| c.query(req).await)
            .await
    }
}
