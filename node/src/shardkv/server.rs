//! A kvserver: the gRPC face of one replica of a group, and the loop by
//! which the group's leader follows the shardmaster and moves shards.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::{JoinHandle, JoinSet};
use tonic::{Request, Response, Status};

use super::pool::ChannelPool;
use super::state::{
    ClientOp, Command, CommandReply, OpKind, OpReply, ShardData, SharedKvState, Source,
};
use super::Limits;
use crate::paxos::sim::SimRng;
use crate::paxos::RoleKind;
use crate::proto::kv as pb;
use crate::proto::kv::shard_kv_client::ShardKvClient;
use crate::proto::kv::shard_kv_server::{ShardKv, ShardKvServer};
use crate::replica::{Replica, ReplicaError};
use crate::shardmaster::client::ShardMasterClient;
use crate::shardmaster::service::{leader_hint, not_leader};
use crate::shardmaster::{Config, Gid};

/// Shard transfers can be large; client requests are bounded by [`Limits`].
const MESSAGE_BYTES_MAX: usize = 256 << 20;

/// Test-only fault injection: the lab's "unreliable network" at the RPC
/// layer. A dropped request is refused unexecuted; a dropped reply is
/// executed and then reported as failed, so the caller retries.
#[derive(Clone, Copy, Debug)]
pub struct Unreliable {
    pub drop_request: f64,
    pub drop_reply: f64,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct KvServerOptions {
    /// How often the leader looks for a new configuration and for shards to
    /// pull or release.
    pub poll_interval: Duration,
    /// One call to another group's replica may take this long.
    pub peer_call_timeout: Duration,
    pub limits: Limits,
    pub unreliable: Option<Unreliable>,
}

impl Default for KvServerOptions {
    fn default() -> Self {
        KvServerOptions {
            poll_interval: Duration::from_millis(100),
            peer_call_timeout: Duration::from_secs(2),
            limits: Limits::default(),
            unreliable: None,
        }
    }
}

/// One kvserver. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct KvServer {
    inner: Arc<Shared>,
}

struct Shared {
    gid: Gid,
    /// This replica of the group: every change is proposed through it.
    replica: Replica,
    /// What the replica has applied; read directly for status, the
    /// WrongGroup fast path and handing out frozen outgoing shards.
    state: SharedKvState,
    /// Where configurations come from.
    masters: ShardMasterClient,
    /// Channels to other groups' replicas.
    pool: ChannelPool,
    options: KvServerOptions,
    /// The random source for `options.unreliable`.
    faults: Mutex<SimRng>,
    /// Where operations are counted and timed, if the node exports metrics.
    metrics: Option<crate::daemon::metrics::Metrics>,
}

impl KvServer {
    pub fn new(
        gid: Gid,
        replica: Replica,
        state: SharedKvState,
        masters: ShardMasterClient,
        options: KvServerOptions,
    ) -> Self {
        let seed = options.unreliable.map(|u| u.seed).unwrap_or(0);
        KvServer {
            inner: Arc::new(Shared {
                gid,
                replica,
                state,
                masters,
                pool: ChannelPool::new(options.peer_call_timeout),
                faults: Mutex::new(SimRng::new(seed)),
                options,
                metrics: None,
            }),
        }
    }

    /// Counts and times client operations in `metrics`. Call before cloning.
    pub fn with_metrics(mut self, metrics: crate::daemon::metrics::Metrics) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = Some(metrics);
        }
        self
    }

    /// The replica this server proposes through.
    pub fn replica(&self) -> &Replica {
        &self.inner.replica
    }

    /// The state the replica has applied.
    pub fn state(&self) -> &SharedKvState {
        &self.inner.state
    }

    pub fn into_server(self) -> ShardKvServer<Self> {
        ShardKvServer::new(self)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// Runs the reconfiguration loop until `shutdown` resolves. It acts only
    /// while this replica leads its group.
    pub fn spawn_background(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let server = self.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut progress = false;
            loop {
                if !progress {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(server.inner.options.poll_interval) => {}
                    }
                }
                progress = false;
                if server.inner.replica.status().role == RoleKind::Leader {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        p = server.reconfigure_step() => progress = p,
                    }
                }
            }
        })
    }

    fn inject(&self, p: impl Fn(&Unreliable) -> f64) -> bool {
        match &self.inner.options.unreliable {
            Some(u) => self
                .inner
                .faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .chance(p(u)),
            None => false,
        }
    }

    async fn propose(&self, command: &Command) -> Result<CommandReply, Status> {
        let bytes = postcard::to_allocvec(command)
            .map_err(|e| Status::internal(format!("cannot encode command: {e}")))?;
        let reply = self
            .inner
            .replica
            .propose(Bytes::from(bytes))
            .await
            .map_err(replica_status)?;
        postcard::from_bytes(&reply)
            .map_err(|e| Status::internal(format!("undecodable reply: {e}")))
    }

    /// A Get: linearizable through a read barrier (the leader confirms it
    /// still leads and has applied everything decided before the call),
    /// then answered from the applied state, with no log entry or sync.
    async fn read(&self, key: &[u8]) -> Result<CommandReply, Status> {
        self.inner
            .replica
            .read_barrier()
            .await
            .map_err(replica_status)?;
        Ok(CommandReply::Op(self.inner.state.lock().get(key)))
    }

    /// One round of the leader's work: take the next configuration if the
    /// group is ready, pull the shards it is owed, release the shards others
    /// have taken. Returns true if anything moved on, so the caller goes
    /// again at once instead of waiting a poll interval.
    async fn reconfigure_step(&self) -> bool {
        let mut progress = false;
        let (num, ready) = {
            let s = self.inner.state.lock();
            (s.config.num, s.ready_for_next_config())
        };
        if ready {
            match self.inner.masters.query(Some(num + 1)).await {
                Ok(next) if next.num == num + 1 => {
                    tracing::info!(gid = self.inner.gid, num = next.num, "taking configuration");
                    match self.propose(&Command::Reconfigure(next)).await {
                        Ok(CommandReply::Step(took)) => progress = took,
                        Ok(other) => tracing::warn!(?other, "unexpected reply to Reconfigure"),
                        Err(e) => tracing::debug!(error = %e, "could not propose a configuration"),
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "shardmaster unavailable"),
            }
        }
        let (num, prev, pulling, deletes) = {
            let s = self.inner.state.lock();
            let pulling: Vec<u64> = s
                .owned
                .iter()
                .filter(|(_, o)| o.status == super::state::ShardStatus::Pulling)
                .map(|(shard, _)| *shard)
                .collect();
            (
                s.config.num,
                s.prev_config.clone(),
                pulling,
                s.pending_deletes.clone(),
            )
        };
        let mut tasks = JoinSet::new();
        for shard in pulling {
            let server = self.clone();
            let prev = prev.clone();
            tasks.spawn(async move {
                let result = server.pull(num, shard, &prev).await;
                if let Err(e) = &result {
                    tracing::debug!(shard, num, error = %e, "shard pull failed; will retry");
                }
                result.is_ok()
            });
        }
        for (shard, source) in deletes {
            let server = self.clone();
            tasks.spawn(async move {
                let result = server.release(shard, source).await;
                if let Err(e) = &result {
                    tracing::debug!(shard, error = %e, "delete notice failed; will retry");
                }
                result.is_ok()
            });
        }
        while let Some(done) = tasks.join_next().await {
            progress |= done.unwrap_or(false);
        }
        progress
    }

    /// Where shard `shard`, owned here from configuration `num`, lives now:
    /// with its owner in `prev`, or, if it had none, with its last owner
    /// before that. `None`: the shard never had an owner, so no data.
    async fn locate(&self, num: u64, shard: u64, prev: &Config) -> Result<Option<Source>, String> {
        let mut config = prev.clone();
        let mut first_not_owning = num;
        loop {
            let owner = config.shards.get(shard as usize).copied().unwrap_or(0);
            if owner != 0 {
                let servers = config.groups.get(&owner).cloned().unwrap_or_default();
                return Ok(Some(Source {
                    gid: owner,
                    config_num: first_not_owning,
                    servers,
                }));
            }
            if config.num <= 1 {
                return Ok(None);
            }
            first_not_owning = config.num;
            config = self
                .inner
                .masters
                .query(Some(config.num - 1))
                .await
                .map_err(|e| e.to_string())?;
        }
    }

    async fn pull(&self, num: u64, shard: u64, prev: &Config) -> Result<(), String> {
        let source = self.locate(num, shard, prev).await?;
        let data = match &source {
            None => ShardData::default(),
            Some(source) if source.gid == self.inner.gid => {
                // Our own earlier copy (the shard was unassigned in between).
                let copy = self
                    .inner
                    .state
                    .lock()
                    .outgoing
                    .get(&(source.config_num, shard))
                    .cloned();
                copy.ok_or_else(|| format!("own copy of shard {shard} is gone"))?
            }
            Some(source) => {
                let request = pb::PullShardRequest {
                    config_num: source.config_num,
                    shard,
                    gid: self.inner.gid,
                };
                let reply = self
                    .call_group(&source.servers, |mut c| async move {
                        c.pull_shard(request).await
                    })
                    .await?;
                postcard::from_bytes(&reply.data)
                    .map_err(|e| format!("undecodable shard from group {}: {e}", source.gid))?
            }
        };
        let command = Command::InstallShard {
            config_num: num,
            shard,
            data,
            source,
        };
        self.propose(&command).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Tells a shard's previous holder to drop its copy, then records that.
    async fn release(&self, shard: u64, source: Source) -> Result<(), String> {
        if source.gid == self.inner.gid {
            let command = Command::DeleteShard {
                config_num: source.config_num,
                shard,
            };
            self.propose(&command).await.map_err(|e| e.to_string())?;
        } else {
            let request = pb::DeleteShardRequest {
                config_num: source.config_num,
                shard,
                gid: self.inner.gid,
            };
            self.call_group(&source.servers, |mut c| async move {
                c.delete_shard(request).await
            })
            .await?;
        }
        self.propose(&Command::DeleteAcknowledged { shard, source })
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Calls each of a group's servers at most twice, following leader
    /// hints, until one succeeds.
    async fn call_group<T, F, Fut>(&self, servers: &[String], mut call: F) -> Result<T, String>
    where
        F: FnMut(ShardKvClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        if servers.is_empty() {
            return Err("group has no servers".into());
        }
        let mut index = 0;
        let mut last_error = String::new();
        for _ in 0..servers.len() * 2 {
            let addr = &servers[index];
            let channel = self.inner.pool.get(addr)?;
            let client = ShardKvClient::new(channel)
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX);
            match tokio::time::timeout(self.inner.options.peer_call_timeout, call(client)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => {
                    last_error = format!("{addr}: {}", status.message());
                    index = leader_hint(&status)
                        .filter(|h| *h < servers.len() && *h != index)
                        .unwrap_or((index + 1) % servers.len());
                }
                Err(_) => {
                    last_error = format!("{addr}: no answer");
                    index = (index + 1) % servers.len();
                }
            }
        }
        Err(last_error)
    }
    async fn execute_op(&self, r: pb::KvRequest) -> Result<Response<pb::KvReply>, Status> {
        let kind = op_kind(r.op)?;
        self.inner
            .options
            .limits
            .check(&r.key, &r.value)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if kind != OpKind::Get && r.seq == 0 {
            return Err(Status::invalid_argument("a write needs a sequence number"));
        }
        if self.inject(|u| u.drop_request) {
            return Err(Status::unavailable("injected fault: request dropped"));
        }
        // A leader that does not serve the shard says so without a round
        // through the log; the log decides for everything else.
        if self.inner.replica.status().role == RoleKind::Leader
            && !self.inner.state.lock().serves(&r.key)
        {
            return Ok(reply(pb::Outcome::WrongGroup, Bytes::new()));
        }
        let result = if kind == OpKind::Get {
            self.read(&r.key).await?
        } else {
            self.propose(&Command::Client(ClientOp {
                client: r.client,
                seq: r.seq,
                first_unacked: r.first_unacked,
                kind,
                key: r.key,
                value: r.value,
            }))
            .await?
        };
        if self.inject(|u| u.drop_reply) {
            return Err(Status::unavailable("injected fault: reply dropped"));
        }
        match result {
            CommandReply::Op(OpReply::Value(Some(v))) => Ok(reply(pb::Outcome::Ok, v)),
            CommandReply::Op(OpReply::Value(None)) => {
                Ok(reply(pb::Outcome::NotFound, Bytes::new()))
            }
            CommandReply::Op(OpReply::Done) => Ok(reply(pb::Outcome::Ok, Bytes::new())),
            CommandReply::Op(OpReply::WrongGroup) => {
                Ok(reply(pb::Outcome::WrongGroup, Bytes::new()))
            }
            CommandReply::Op(OpReply::Stale) => Err(Status::failed_precondition(
                "request already acknowledged by this client; not applied again",
            )),
            CommandReply::Op(OpReply::ValueTooLarge) => Err(Status::invalid_argument(format!(
                "the appended value would exceed {} bytes; nothing stored",
                super::state::STORED_VALUE_BYTES_MAX
            ))),
            CommandReply::Malformed(e) => Err(Status::internal(format!("command refused: {e}"))),
            CommandReply::Step(_) | CommandReply::NotYet => {
                Err(Status::internal("unexpected reply to a client operation"))
            }
        }
    }
}

fn op_kind(op: i32) -> Result<OpKind, Status> {
    match pb::OpKind::try_from(op) {
        Ok(pb::OpKind::Get) => Ok(OpKind::Get),
        Ok(pb::OpKind::Put) => Ok(OpKind::Put),
        Ok(pb::OpKind::Append) => Ok(OpKind::Append),
        Ok(pb::OpKind::PutHash) => Ok(OpKind::PutHash),
        Ok(pb::OpKind::Delete) => Ok(OpKind::Delete),
        Err(_) => Err(Status::invalid_argument(format!("unknown operation {op}"))),
    }
}

fn reply(outcome: pb::Outcome, value: Bytes) -> Response<pb::KvReply> {
    Response::new(pb::KvReply {
        outcome: outcome as i32,
        value,
    })
}

#[tonic::async_trait]
impl ShardKv for KvServer {
    async fn execute(
        &self,
        request: Request<pb::KvRequest>,
    ) -> Result<Response<pb::KvReply>, Status> {
        let start = std::time::Instant::now();
        let op = request.get_ref().op;
        let result = self.execute_op(request.into_inner()).await;
        if let Some(metrics) = &self.inner.metrics {
            let op = match pb::OpKind::try_from(op) {
                Ok(pb::OpKind::Get) => "get",
                Ok(pb::OpKind::Put) => "put",
                Ok(pb::OpKind::Append) => "append",
                Ok(pb::OpKind::PutHash) => "puthash",
                Ok(pb::OpKind::Delete) => "delete",
                Err(_) => "invalid",
            };
            let outcome = match &result {
                Ok(r) => match pb::Outcome::try_from(r.get_ref().outcome) {
                    Ok(pb::Outcome::Ok) => "ok",
                    Ok(pb::Outcome::NotFound) => "not_found",
                    _ => "wrong_group",
                },
                Err(s) if s.code() == tonic::Code::InvalidArgument => "invalid",
                Err(s) if s.code() == tonic::Code::Unavailable => "unavailable",
                Err(_) => "error",
            };
            metrics.observe(op, outcome, start.elapsed());
        }
        result
    }

    async fn pull_shard(
        &self,
        request: Request<pb::PullShardRequest>,
    ) -> Result<Response<pb::PullShardReply>, Status> {
        let r = request.into_inner();
        if self.inject(|u| u.drop_request) {
            return Err(Status::unavailable("injected fault: request dropped"));
        }
        // Any replica that has reached the configuration can answer: an
        // outgoing copy never changes, only disappears once installed.
        let copy = {
            let s = self.inner.state.lock();
            if s.config.num < r.config_num {
                return Err(Status::unavailable(format!(
                    "group {} is at configuration {}, not yet {}",
                    s.gid, s.config.num, r.config_num
                )));
            }
            s.outgoing.get(&(r.config_num, r.shard)).cloned()
        };
        let Some(data) = copy else {
            return Err(Status::not_found(format!(
                "no copy of shard {} from configuration {}: already handed off",
                r.shard, r.config_num
            )));
        };
        if self.inject(|u| u.drop_reply) {
            return Err(Status::unavailable("injected fault: reply dropped"));
        }
        tracing::debug!(
            shard = r.shard,
            to = r.gid,
            keys = data.kv.len(),
            "handing out shard"
        );
        Ok(Response::new(pb::PullShardReply {
            data: super::state::encode(&data),
        }))
    }

    async fn delete_shard(
        &self,
        request: Request<pb::DeleteShardRequest>,
    ) -> Result<Response<pb::DeleteShardReply>, Status> {
        let r = request.into_inner();
        if self.inject(|u| u.drop_request) {
            return Err(Status::unavailable("injected fault: request dropped"));
        }
        let command = Command::DeleteShard {
            config_num: r.config_num,
            shard: r.shard,
        };
        let result = self.propose(&command).await?;
        if self.inject(|u| u.drop_reply) {
            return Err(Status::unavailable("injected fault: reply dropped"));
        }
        match result {
            CommandReply::Step(_) => Ok(Response::new(pb::DeleteShardReply {})),
            CommandReply::NotYet => Err(Status::unavailable(format!(
                "group {} has not reached configuration {}",
                self.inner.gid, r.config_num
            ))),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn group_status(
        &self,
        _request: Request<pb::GroupStatusRequest>,
    ) -> Result<Response<pb::GroupStatusReply>, Status> {
        let replica = self.inner.replica.status();
        let s = self.inner.state.lock();
        let (serving, pulling): (Vec<_>, Vec<_>) = s
            .owned
            .iter()
            .partition(|(_, o)| o.status == super::state::ShardStatus::Serving);
        Ok(Response::new(pb::GroupStatusReply {
            gid: s.gid,
            replica: replica.id,
            leader: replica.role == RoleKind::Leader,
            config_num: s.config.num,
            serving: serving.into_iter().map(|(k, _)| *k).collect(),
            pulling: pulling.into_iter().map(|(k, _)| *k).collect(),
            outgoing: s
                .outgoing
                .keys()
                .map(|(num, shard)| pb::OutgoingShard {
                    config_num: *num,
                    shard: *shard,
                })
                .collect(),
            pending_deletes: s.pending_deletes.len() as u64,
            applied_slot: replica.applied,
            keys: s.key_count() as u64,
        }))
    }
}

/// What a client is told when the replica refuses or fails a request.
fn replica_status(e: ReplicaError) -> Status {
    match e {
        ReplicaError::NotLeader { leader } => not_leader(leader),
        ReplicaError::Busy => Status::resource_exhausted("kvserver is overloaded"),
        ReplicaError::OutcomeUnknown => Status::unavailable(
            "leader changed before the request was decided; retry with the same tag",
        ),
        ReplicaError::Stopped => Status::unavailable("kvserver is shutting down"),
        ReplicaError::Storage(e) | ReplicaError::Config(e) => {
            Status::internal(format!("replica failure: {e}"))
        }
    }
}
