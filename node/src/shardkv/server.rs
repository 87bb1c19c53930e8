//! A kvserver: the gRPC face of one replica of a group, and the loop by
//! which the group's leader follows the shardmaster and moves shards.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::task::{JoinHandle, JoinSet};
use tonic::{Request, Response, Status};

use super::pool::ChannelPool;
use super::state::{
    ClientOp, Command, CommandReply, OpKind, OpReply, ShardData, SharedKvState, Source,
};
use super::Limits;
use crate::paxos::sim::SimRng;
use crate::paxos::{RoleKind, Slot};
use crate::proto::kv as pb;
use crate::proto::kv::shard_kv_server::{ShardKv, ShardKvServer};
use crate::replica::{Replica, ReplicaError};
use crate::shardmaster::client::{ClientError, ShardMasterClient};
use crate::shardmaster::service::{not_leader, not_leader_at};
use crate::shardmaster::{Config, Gid};

/// Shard transfers can be large; client requests are bounded by [`Limits`].
pub(crate) const MESSAGE_BYTES_MAX: usize = 256 << 20;

/// Shard copies one replica fetches at once. Each holds a few chunks in
/// memory (see `snapshot::CHUNKS_IN_FLIGHT`) and one blocking thread.
const FETCHES_IN_FLIGHT: usize = 2;

/// Test-only fault injection: the lab's "unreliable network" at the RPC
/// layer. A dropped request is refused unexecuted; a dropped reply is
/// executed and then reported as failed, so the caller retries.
#[derive(Clone, Copy, Debug)]
pub struct Unreliable {
    pub drop_request: f64,
    pub drop_reply: f64,
    pub seed: u64,
    /// Every DeleteShard is refused unexecuted: a holder that never hears
    /// that its copies may go.
    pub refuse_deletes: bool,
    /// Every stream of this shard's copy waits this long before it starts:
    /// a slow source, which must hold up only that shard's install.
    pub stall_copy_stream: Option<(u64, Duration)>,
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
    /// How often the leader moves the group's logged time forward, which
    /// ends idle sessions and refuses writes decided too late.
    pub clock_interval: Duration,
    /// A shard's previous holder that has left the configuration and has
    /// not answered for this long is taken to be gone with its copy (the
    /// operator removes a group only once it holds none), so the new owner
    /// stops telling it to delete.
    pub departed_holder_grace: Duration,
    /// How long the previous holder keeps a copy after the install, while
    /// a replica of this group may still need it: one that had not fetched
    /// it when a majority had would otherwise have to take a whole
    /// snapshot from a peer instead of one shard.
    pub straggler_grace: Duration,
}

impl Default for KvServerOptions {
    fn default() -> Self {
        KvServerOptions {
            poll_interval: Duration::from_millis(100),
            peer_call_timeout: Duration::from_secs(2),
            limits: Limits::default(),
            unreliable: None,
            clock_interval: Duration::from_secs(2),
            departed_holder_grace: Duration::from_secs(30),
            straggler_grace: Duration::from_secs(10),
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
    /// The incarnation this process has claimed at the shardmaster; the
    /// group takes no configuration before its leader has claimed.
    claimed: Mutex<Option<u64>>,
    /// The shardmaster's refusal of the claim, reported by GroupStatus.
    refused: Mutex<Option<String>>,
    /// When each pending delete to a holder no longer in the latest
    /// configuration first failed (see `departed_holder_grace`).
    departed_failing: Mutex<BTreeMap<(u64, Source), tokio::time::Instant>>,
    /// Each pending delete this leader has tried, until it is acknowledged
    /// (so retries keep the first deadline).
    releasing: Mutex<BTreeMap<(u64, Source), Release>>,
    /// When this departing holder first saw each of its outgoing copies
    /// (by configuration and shard) installed by the new owner: it keeps
    /// the copy for the owner's stragglers up to `straggler_grace` longer,
    /// and whether the last look found one still lacking it.
    installed_seen: Mutex<BTreeMap<(u64, u64), (tokio::time::Instant, bool)>>,
    /// The server list this replica last reported for the group (see
    /// `report_members`), and the configuration the shardmaster answered
    /// with (its number if it took it, or the group's at a refusal): not
    /// reported again until the group has taken a later one.
    members_reported: Mutex<Option<(Vec<String>, u64)>>,
    /// When this process last proposed a Clock: the pace of logged time.
    last_clock: Mutex<Option<tokio::time::Instant>>,
}

/// The statuses of this group's replicas, asked at most once in a round of
/// the leader's work and shared by its pulls and releases: asked for each
/// shard, a move of 32 shards cost about a hundred status calls a round
/// (each reading every shard's fetch marker under the state's lock).
/// Within a round they are as fresh as a reply to a call of one's own.
#[derive(Default)]
struct RoundStatuses(tokio::sync::OnceCell<(Vec<String>, Vec<Option<pb::GroupStatusReply>>)>);

/// A delete to a shard's previous holder, held while a replica of this
/// group may still need the copy (see `straggler_grace`).
#[derive(Clone, Copy)]
struct Release {
    /// The slot this leader's state had applied when it first tried (past
    /// the install): a replica that has applied it has passed the install.
    bar: Slot,
    /// When it first tried.
    since: tokio::time::Instant,
    /// The last check found a replica lacking the copy.
    waiting: bool,
    /// The grace ran out: the delete goes ahead (logged once).
    gave_up: bool,
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
                claimed: Mutex::new(None),
                refused: Mutex::new(None),
                departed_failing: Mutex::new(BTreeMap::new()),
                releasing: Mutex::new(BTreeMap::new()),
                installed_seen: Mutex::new(BTreeMap::new()),
                members_reported: Mutex::new(None),
                last_clock: Mutex::new(None),
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

    /// Runs the reconfiguration loop until `shutdown` resolves (it acts
    /// only while this replica leads its group), and beside it every
    /// replica's fetching of the copies its group pulls.
    ///
    /// Two loops, not one: when the leader fetched before each round of
    /// installs, it installed nothing until it had fetched every shard of
    /// a move, and the shards that moved first were not served for the
    /// whole move (at 1 GiB, 6.4 to 11.5 s over seven runs, past the
    /// clients' 10 s timeout in two).
    pub fn spawn_background(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        use futures::FutureExt;
        let shutdown = shutdown.shared();
        let stager = self.clone();
        let stopped = shutdown.clone();
        let staging = tokio::spawn(async move {
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = stager.stage_step() => {}
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(stager.inner.options.poll_interval) => {}
                }
            }
        });
        let server = self.clone();
        tokio::spawn(async move {
            let reconfiguring = async {
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
                    if server.inner.replica.status().role != RoleKind::Leader {
                        // A grace counts silence seen by one leader, unbroken.
                        lock(&server.inner.departed_failing).clear();
                        // And a straggler wait: the next leader starts its own.
                        lock(&server.inner.releasing).clear();
                        lock(&server.inner.installed_seen).clear();
                        continue;
                    }
                    tokio::select! {
                        _ = &mut shutdown => return,
                        p = server.reconfigure_step() => progress = p,
                    }
                }
            };
            reconfiguring.await;
            if let Err(e) = staging.await {
                tracing::error!(error = %e, "the shard fetching task failed");
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
            .map_err(|e| self.replica_error(e))?;
        postcard::from_bytes(&reply)
            .map_err(|e| Status::internal(format!("undecodable reply: {e}")))
    }

    /// A replica's refusal as the client sees it: "not the leader" names
    /// the leader by id and, once the group records it, by address.
    fn replica_error(&self, e: ReplicaError) -> Status {
        match e {
            ReplicaError::NotLeader { leader } => {
                let status = self.inner.replica.status();
                not_leader_at(
                    leader,
                    status.leader_address().filter(|_| status.leader == leader),
                )
            }
            e => replica_status(e),
        }
    }

    /// A Get: linearizable through a read barrier (the leader confirms it
    /// still leads and has applied everything decided before the call),
    /// then answered from the applied state, with no log entry or sync.
    async fn read(&self, key: &[u8]) -> Result<CommandReply, Status> {
        self.inner
            .replica
            .read_barrier()
            .await
            .map_err(|e| self.replica_error(e))?;
        let reply = self.inner.state.lock().get(key);
        reply.map(CommandReply::Op).map_err(|e| {
            if e.is_corrupt() {
                // Damage the checksums caught on a read: this replica
                // stops, so its peers serve, instead of failing every
                // read of these keys as leader.
                tracing::error!(error = %e, "stopping: the state store is damaged");
                self.inner.replica.shutdown();
            }
            store_status(e)
        })
    }

    /// After the group changes its members, has the shardmaster record its
    /// voters as the group's servers (a Join of the gid with the new list:
    /// a logged step there, as the change is in the group's own log), so
    /// clerks and other groups find them. Any leader of the group does it,
    /// from the membership it has applied; once per list.
    async fn report_members(&self) {
        let status = self.inner.replica.status();
        let membership = &status.membership;
        if membership.members.is_empty() {
            return; // never changed: the servers the group joined with
        }
        let servers: Vec<String> = membership
            .voter_ids()
            .filter_map(|id| membership.members.get(&id))
            .map(|m| m.address.clone())
            .collect();
        let (recorded, num) = {
            let s = self.inner.state.lock();
            match s.config.groups.get(&self.inner.gid) {
                Some(recorded) => (recorded.clone(), s.config.num),
                // Not joined, or left: a Join would add it.
                None => return,
            }
        };
        if recorded == servers {
            return;
        }
        // Reported already, and the group has not yet taken the answer (or
        // a later configuration: one that still names other servers, a
        // late report of an earlier leader's, is corrected).
        let reported = lock(&self.inner.members_reported).clone();
        if reported.is_some_and(|(list, answer)| list == servers && num < answer) {
            return;
        }
        let gid = self.inner.gid;
        match self.inner.masters.join(gid, servers.clone()).await {
            Ok(config) => {
                tracing::info!(
                    gid,
                    epoch = membership.epoch,
                    ?servers,
                    config = config.num,
                    "the shardmaster records the group's new members"
                );
                *lock(&self.inner.members_reported) = Some((servers, config.num.max(num + 1)));
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not report the group's members");
                if matches!(e, crate::shardmaster::client::ClientError::Rejected(_)) {
                    // Refused (a gid that left): not again before the
                    // group takes another configuration.
                    *lock(&self.inner.members_reported) = Some((servers, num + 1));
                }
            }
        }
    }

    /// One round of the leader's work: take the next configuration if the
    /// group is ready, pull the shards it is owed, release the shards others
    /// have taken. Returns true if anything moved on, so the caller goes
    /// again at once instead of waiting a poll interval.
    async fn reconfigure_step(&self) -> bool {
        let mut progress = false;
        let claimed = match self.claim().await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::debug!(error = %e, "could not claim this group's incarnation");
                false
            }
        };
        self.advance_clock().await;
        self.report_members().await;
        let (num, ready) = {
            let s = self.inner.state.lock();
            (s.config.num, s.ready_for_next_config())
        };
        let mut latest = None;
        if ready && claimed {
            match self.inner.masters.query(Some(num + 1)).await {
                Ok(next) if next.num == num + 1 => {
                    tracing::info!(gid = self.inner.gid, num = next.num, "taking configuration");
                    match self.propose(&Command::Reconfigure(next)).await {
                        Ok(CommandReply::Step(took)) => progress = took,
                        Ok(other) => tracing::warn!(?other, "unexpected reply to Reconfigure"),
                        Err(e) => tracing::debug!(error = %e, "could not propose a configuration"),
                    }
                }
                Ok(other) => latest = Some(other),
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
        let holds_copies = !self.inner.state.lock().outgoing.is_empty();
        if latest.is_none() && (holds_copies || !(pulling.is_empty() && deletes.is_empty())) {
            // Pulls and deletes dial groups where they are now.
            latest = self.inner.masters.query(None).await.ok();
        }
        let latest = latest.unwrap_or_else(|| prev.clone());
        let mut tasks = JoinSet::new();
        let round = Arc::new(RoundStatuses::default());
        let outgoing: Vec<(u64, u64)> = self.inner.state.lock().outgoing.keys().copied().collect();
        // Every round: a holder that has rejoined keeps none of these.
        lock(&self.inner.installed_seen).retain(|key, _| outgoing.contains(key));
        if !latest.groups.contains_key(&self.inner.gid) {
            for (config_num, shard) in outgoing {
                let server = self.clone();
                tasks.spawn(async move {
                    let result = server.drop_if_installed(config_num, shard).await;
                    if let Err(e) = &result {
                        tracing::debug!(shard, config_num, error = %e, "outgoing copy still needed");
                    }
                    result.unwrap_or(false)
                });
            }
        }
        for shard in pulling {
            let server = self.clone();
            let prev = prev.clone();
            let latest = latest.clone();
            let round = round.clone();
            tasks.spawn(async move {
                let result = server.pull(num, shard, &prev, &latest, &round).await;
                if let Err(e) = &result {
                    tracing::debug!(shard, num, error = %e, "shard pull failed; will retry");
                }
                result.is_ok()
            });
        }
        // Entries for deletes another leader has since done.
        lock(&self.inner.releasing).retain(|key, _| deletes.contains(key));
        for (shard, source) in deletes {
            let server = self.clone();
            let latest = latest.clone();
            let round = round.clone();
            tasks.spawn(async move {
                let result = server.release(shard, source, &latest, &round).await;
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

    /// How many replicas of this group hold a complete copy of `shard`
    /// for configuration `num`, by their own status.
    async fn replicas_holding(
        &self,
        num: u64,
        shard: u64,
        servers: &[String],
        round: &RoundStatuses,
    ) -> usize {
        let holders: std::collections::BTreeSet<u32> = (self.own_statuses(servers, round).await)
            .into_iter()
            .flatten()
            .filter(|reply| {
                reply.config_num == num
                    && (reply.staged.iter()).any(|s| s.config_num == num && s.shard == shard)
            })
            .map(|reply| reply.replica)
            .collect();
        holders.len()
    }

    /// The status of each of `servers`, this group's replicas, asked once
    /// per round (see [`RoundStatuses`]).
    async fn own_statuses(
        &self,
        servers: &[String],
        round: &RoundStatuses,
    ) -> Vec<Option<pb::GroupStatusReply>> {
        let (asked, statuses) = round
            .0
            .get_or_init(|| async {
                let statuses = self.peer_statuses(self.inner.gid, servers).await;
                (servers.to_vec(), statuses)
            })
            .await;
        if asked.as_slice() == servers {
            return statuses.clone();
        }
        // Another set of servers (the group as of another configuration).
        self.peer_statuses(self.inner.gid, servers).await
    }

    /// The status of each of `servers`, a replica of group `gid`, in order;
    /// `None` for one that did not answer in time or is not of that group.
    async fn peer_statuses(
        &self,
        gid: Gid,
        servers: &[String],
    ) -> Vec<Option<pb::GroupStatusReply>> {
        let calls = servers.iter().map(|server| {
            let pool = &self.inner.pool;
            async move {
                let channel = pool.get(server).ok()?;
                let mut client = pb::shard_kv_client::ShardKvClient::new(channel);
                let call = client.group_status(pb::GroupStatusRequest {});
                let reply = tokio::time::timeout(self.inner.options.peer_call_timeout, call)
                    .await
                    .ok()?
                    .ok()?
                    .into_inner();
                (reply.gid == gid).then_some(reply)
            }
        });
        futures::future::join_all(calls).await
    }

    /// Whether the previous holder of `shard` may drop its copy as far as
    /// this group's replicas go: each has applied past the install (the
    /// slot this leader had applied when it first asked), is past the
    /// install's configuration or already serves the shard, or holds the
    /// fetched copy. Otherwise, it waits until `straggler_grace` has passed
    /// since the first ask: a replica that is down or far behind then
    /// catches up from a peer's snapshot instead.
    async fn stragglers_served(
        &self,
        shard: u64,
        source: &Source,
        round: &RoundStatuses,
    ) -> Result<(), String> {
        let key = (shard, source.clone());
        // The state's own applied slot, not the replica's published one
        // (published only after a whole turn, so it may be short of the
        // install): the delete is pending, so the install is applied here.
        let applied = self.inner.state.lock().applied();
        let release = *lock(&self.inner.releasing)
            .entry(key.clone())
            .or_insert(Release {
                bar: applied,
                since: tokio::time::Instant::now(),
                waiting: false,
                gave_up: false,
            });
        if release.gave_up {
            return Ok(());
        }
        let bar = release.bar;
        let (servers, installed_in) = {
            let s = self.inner.state.lock();
            // As of the install: a group that has left since has no entry
            // in its current configuration.
            let servers = (s.config.groups.get(&self.inner.gid))
                .or_else(|| s.prev_config.groups.get(&self.inner.gid))
                .cloned()
                .unwrap_or_default();
            // The configuration that installed the shard names its copy
            // (none if it has moved on again: then only `bar` counts).
            let installed_in = (s.owned.get(&shard)).map(|o| o.copy.generation);
            (servers, installed_in)
        };
        let statuses = self.own_statuses(&servers, round).await;
        let lagging: Vec<&String> = (servers.iter().zip(&statuses))
            .filter(|(_, status)| {
                !status.as_ref().is_some_and(|reply| {
                    let installed = installed_in.is_some_and(|n| {
                        // Past the install, serving it, or holding the
                        // fetched copy the install's step names.
                        reply.config_num > n
                            || (reply.config_num == n
                                && (reply.serving.contains(&shard)
                                    || (reply.staged.iter())
                                        .any(|s| s.config_num == n && s.shard == shard)))
                    });
                    installed || reply.applied_slot >= bar
                })
            })
            .map(|(server, _)| server)
            .collect();
        let waited = release.since.elapsed();
        let gave_up = !lagging.is_empty() && waited >= self.inner.options.straggler_grace;
        if let Some(entry) = lock(&self.inner.releasing).get_mut(&key) {
            entry.waiting = !lagging.is_empty() && !gave_up;
            entry.gave_up = gave_up;
        }
        if lagging.is_empty() {
            return Ok(());
        }
        if !gave_up {
            return Err(format!(
                "replicas {lagging:?} have neither fetched shard {shard} nor applied slot {bar}"
            ));
        }
        tracing::warn!(
            shard,
            holder = source.gid,
            ?lagging,
            ?waited,
            "replicas still lack the shard; releasing its previous holder anyway (they will take \
             a snapshot from a peer)"
        );
        Ok(())
    }

    /// Every replica's background work: fetch the copies of the shards the
    /// group is pulling from other groups into this replica's store, so
    /// that their install (one small logged step) finds them here.
    async fn stage_step(&self) {
        let (num, prev, pulling) = {
            let s = self.inner.state.lock();
            let pulling: Vec<(u64, super::store::CopyId)> = (s.owned.keys())
                .filter_map(|&shard| match s.pulling_copy(shard) {
                    Ok(Some((copy, false))) => Some((shard, copy)),
                    _ => None,
                })
                .collect();
            (s.config.num, s.prev_config.clone(), pulling)
        };
        if pulling.is_empty() {
            return;
        }
        let Ok(latest) = self.inner.masters.query(None).await else {
            return;
        };
        // A few at once: a copy's fetch waits on round trips, the
        // source's reads and the ingestion's final sync, which overlap.
        futures::stream::iter(pulling)
            .for_each_concurrent(FETCHES_IN_FLIGHT, |(shard, copy)| {
                self.stage_one(num, shard, copy, &prev, &latest)
            })
            .await;
    }

    /// Fetches one copy the group is pulling, unless another fetch holds or
    /// has completed it.
    async fn stage_one(
        &self,
        num: u64,
        shard: u64,
        copy: super::store::CopyId,
        prev: &Config,
        latest: &Config,
    ) {
        let source = match self.locate(num, shard, prev, latest).await {
            Ok(Some(source)) if source.gid != self.inner.gid => source,
            // Nothing to fetch: the leader installs it from the log.
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(shard, error = %e, "cannot locate a shard to fetch");
                return;
            }
        };
        let (stager, board) = self.inner.state.lock().stager();
        // Skipped if the install has closed the copy, a fetch holds it,
        // or one has completed it since it was listed.
        let Some(claim) = board.claim_unfetched(copy, &stager) else {
            return;
        };
        let requester = self.inner.gid;
        let timeout = self
            .inner
            .options
            .peer_call_timeout
            .max(Duration::from_secs(10));
        let job_source = source.clone();
        let me = self.inner.replica.status().id as usize;
        // On a runtime of its own, on a thread of its own: the replica
        // thread may wait for this claim while holding the state's lock,
        // and this runtime's threads may be waiting for that lock. At a
        // lower priority, so the shards being served go first.
        let (done, fetched) = tokio::sync::oneshot::channel();
        let started = super::snapshot::spawn_transfer("copy-fetch", move || {
            let result = super::snapshot::own_runtime().and_then(|runtime| {
                super::snapshot::fetch_copy(
                    &runtime,
                    &stager,
                    copy,
                    &job_source,
                    shard,
                    requester,
                    me,
                    None,
                    timeout,
                )
            });
            drop(claim);
            let _ = done.send(result);
        });
        let fetch = async {
            started.map_err(|e| format!("cannot start a fetch thread: {e}"))?;
            fetched
                .await
                .map_err(|_| "the fetch thread ended without a result".to_string())?
        };
        match fetch.await {
            Ok(summary) => tracing::info!(
                shard,
                num,
                from = source.gid,
                keys = summary.keys,
                "fetched a shard copy"
            ),
            Err(e) => tracing::debug!(shard, num, error = %e, "shard fetch failed; will retry"),
        }
    }

    /// Makes sure the group has an incarnation and that this process has
    /// claimed it at the shardmaster. True once claimed.
    async fn claim(&self) -> Result<bool, String> {
        let incarnation = self.inner.state.lock().incarnation;
        let incarnation = match incarnation {
            Some(i) => i,
            None => {
                // Random: a group wiped and started again must not draw
                // the same one. The first Begin applied wins.
                let drawn = std::hash::RandomState::new().build_hasher().finish();
                self.propose(&Command::Begin { incarnation: drawn })
                    .await
                    .map_err(|e| e.to_string())?;
                match self.inner.state.lock().incarnation {
                    Some(i) => i,
                    None => return Ok(false),
                }
            }
        };
        if *lock(&self.inner.claimed) == Some(incarnation) {
            return Ok(true);
        }
        match self.inner.masters.claim(self.inner.gid, incarnation).await {
            Ok(_) => {
                *lock(&self.inner.claimed) = Some(incarnation);
                *lock(&self.inner.refused) = None;
                Ok(true)
            }
            Err(ClientError::Rejected(why)) => {
                if lock(&self.inner.refused).as_deref() != Some(why.as_str()) {
                    tracing::error!(gid = self.inner.gid, "{why}");
                }
                *lock(&self.inner.refused) = Some(why.clone());
                Err(why)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Moves the group's logged time forward, once per `clock_interval`,
    /// whether or not it owns shards: a group that receives one must not
    /// stamp its first writes with a time long past.
    async fn advance_clock(&self) {
        let clock_ms = self.inner.state.lock().clock_ms;
        let now_ms = wall_clock_ms();
        let interval = self.inner.options.clock_interval;
        let interval_ms = interval.as_millis() as u64;
        // Paced by this leader's own timer, not only by the logged time:
        // catching up after an outage, each clock moves the time one step
        // (`CLOCK_STEP_MS_MAX`), and no faster than one per interval.
        let paced = lock(&self.inner.last_clock).is_none_or(|at| at.elapsed() >= interval);
        if paced && now_ms >= clock_ms.saturating_add(interval_ms) {
            *lock(&self.inner.last_clock) = Some(tokio::time::Instant::now());
            if let Err(e) = self.propose(&Command::Clock { now_ms }).await {
                tracing::debug!(error = %e, "could not advance the group's clock");
            }
        }
    }

    /// Where shard `shard`, owned here from configuration `num`, lives now:
    /// with its owner in `prev`, or, if it had none, with its last owner
    /// before that. `None`: the shard never had an owner, so no data.
    /// The servers are the owner's in `latest`, where it may have moved,
    /// or, if it has left, the last ones known.
    async fn locate(
        &self,
        num: u64,
        shard: u64,
        prev: &Config,
        latest: &Config,
    ) -> Result<Option<Source>, String> {
        let mut config = prev.clone();
        let mut first_not_owning = num;
        loop {
            let owner = config.shards.get(shard as usize).copied().unwrap_or(0);
            if owner != 0 {
                let servers = (latest.groups.get(&owner))
                    .or_else(|| config.groups.get(&owner))
                    .cloned()
                    .unwrap_or_default();
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

    async fn pull(
        &self,
        num: u64,
        shard: u64,
        prev: &Config,
        latest: &Config,
        round: &RoundStatuses,
    ) -> Result<(), String> {
        let source = self.locate(num, shard, prev, latest).await?;
        let data = match &source {
            None => ShardData::default(),
            Some(source) if source.gid == self.inner.gid => {
                // Our own earlier copy (the shard was unassigned in between).
                let view = self
                    .inner
                    .state
                    .lock()
                    .outgoing_view(source.config_num, shard);
                let (view, copy) =
                    view.ok_or_else(|| format!("own copy of shard {shard} is gone"))?;
                export_copy_blocking(view, copy).await?
            }
            Some(source) if source.gid != self.inner.gid => {
                // Each replica fetches the copy itself (`stage_step`); the
                // log takes only its summary, once a majority holds it, so
                // the install stalls no majority.
                let summary = self.inner.state.lock().staged_summary(shard);
                let summary = summary
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("shard {shard} is not fetched yet"))?;
                // This group's replicas as of the configuration being
                // installed (it may have left the latest one).
                let servers = (self.inner.state.lock().config.groups)
                    .get(&self.inner.gid)
                    .cloned()
                    .unwrap_or_default();
                let staged = self.replicas_holding(num, shard, &servers, round).await;
                let servers = servers.len().max(1);
                if staged <= servers / 2 {
                    return Err(format!(
                        "shard {shard} is fetched by {staged} of {servers} replicas, not yet a majority"
                    ));
                }
                let command = Command::InstallShardStreamed {
                    config_num: num,
                    shard,
                    source: source.clone(),
                    summary,
                };
                self.propose(&command).await.map_err(|e| e.to_string())?;
                return Ok(());
            }
            Some(source) => {
                let request = pb::PullShardRequest {
                    config_num: source.config_num,
                    shard,
                    gid: self.inner.gid,
                };
                let reply = self
                    .inner
                    .pool
                    .call_group(
                        &source.servers,
                        self.inner.options.peer_call_timeout,
                        |mut c| async move { c.pull_shard(request).await },
                    )
                    .await?;
                super::state::decode_shard(&reply.data)
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

    /// A group that has left holds a copy nobody may tell it to delete: the
    /// new owner can give up on a silent holder (see `release`). So it
    /// asks the owner itself, and drops the copy once the owner has
    /// installed it (a configuration past it, or serving the shard in it),
    /// since nothing will pull it again. True if it dropped it.
    async fn drop_if_installed(&self, config_num: u64, shard: u64) -> Result<bool, String> {
        let config =
            (self.inner.masters.query(Some(config_num)).await).map_err(|e| e.to_string())?;
        let owner = config.shards.get(shard as usize).copied().unwrap_or(0);
        if owner == 0 || owner == self.inner.gid || config.num != config_num {
            // Unassigned there: whoever takes it later pulls it and says so.
            return Ok(false);
        }
        let latest = self
            .inner
            .masters
            .query(None)
            .await
            .map_err(|e| e.to_string())?;
        let Some(servers) = latest
            .groups
            .get(&owner)
            .or_else(|| config.groups.get(&owner))
        else {
            return Err(format!(
                "shard {shard}'s owner in configuration {config_num} is unknown"
            ));
        };
        let timeout = self.inner.options.peer_call_timeout;
        let status = (self.inner.pool)
            .call_group(servers, timeout, |mut c| async move {
                c.group_status(pb::GroupStatusRequest {}).await
            })
            .await?;
        let installed = |status: &pb::GroupStatusReply| {
            status.config_num > config_num
                || (status.config_num == config_num && status.serving.contains(&shard))
        };
        if !installed(&status) {
            return Ok(false);
        }
        // As the owner would (`stragglers_served`): a replica of it that has
        // not installed the shard yet still fetches it from here, for up to
        // `straggler_grace` after the install was first seen.
        let key = (config_num, shard);
        let (since, _) = *lock(&self.inner.installed_seen)
            .entry(key)
            .or_insert((tokio::time::Instant::now(), false));
        let statuses = self.peer_statuses(owner, servers).await;
        let all_installed = statuses.iter().all(|s| s.as_ref().is_some_and(installed));
        if !all_installed && since.elapsed() < self.inner.options.straggler_grace {
            if let Some((_, waiting)) = lock(&self.inner.installed_seen).get_mut(&key) {
                *waiting = true;
            }
            return Ok(false);
        }
        lock(&self.inner.installed_seen).remove(&key);
        tracing::info!(
            shard,
            config_num,
            owner,
            "the new owner has the shard; dropping the copy"
        );
        let command = Command::DeleteShard { config_num, shard };
        match self.propose(&command).await.map_err(|e| e.to_string())? {
            CommandReply::Step(dropped) => Ok(dropped),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    /// Tells a shard's previous holder to drop its copy, then records that.
    /// The holder is dialled where `latest` says it is; one that has left
    /// and stays silent past `departed_holder_grace` is taken to be gone.
    async fn release(
        &self,
        shard: u64,
        source: Source,
        latest: &Config,
        round: &RoundStatuses,
    ) -> Result<(), String> {
        if source.gid == self.inner.gid {
            let command = Command::DeleteShard {
                config_num: source.config_num,
                shard,
            };
            self.propose(&command).await.map_err(|e| e.to_string())?;
        } else {
            self.stragglers_served(shard, &source, round).await?;
            let request = pb::DeleteShardRequest {
                config_num: source.config_num,
                shard,
                gid: self.inner.gid,
            };
            let servers = latest.groups.get(&source.gid).unwrap_or(&source.servers);
            let timeout = self.inner.options.peer_call_timeout;
            let called = (self.inner.pool)
                .call_group(servers, timeout, |mut c| async move {
                    c.delete_shard(request).await
                })
                .await;
            let key = (shard, source.clone());
            match called {
                Ok(_) => {
                    lock(&self.inner.departed_failing).remove(&key);
                }
                Err(e) if latest.groups.contains_key(&source.gid) => return Err(e),
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    let since = *lock(&self.inner.departed_failing)
                        .entry(key.clone())
                        .or_insert(now);
                    if now.duration_since(since) < self.inner.options.departed_holder_grace {
                        return Err(e);
                    }
                    tracing::warn!(
                        shard,
                        holder = source.gid,
                        silent_for = ?now.duration_since(since),
                        "the shard's previous holder has left the configuration and does not \
                         answer; taking its copy as gone with it: {e}"
                    );
                    lock(&self.inner.departed_failing).remove(&key);
                }
            }
        }
        self.propose(&Command::DeleteAcknowledged { shard, source })
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
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
            let proposed_ms = self.inner.state.lock().clock_ms;
            // Before the group's first clock, which sets the time outright,
            // a write stamped 0 would be refused as too old right after it.
            if proposed_ms == 0 {
                return Err(Status::unavailable(
                    "the group's logged time has not started yet; retry",
                ));
            }
            let op = ClientOp {
                client: r.client,
                seq: r.seq,
                first_unacked: r.first_unacked,
                kind,
                key: r.key,
                value: r.value,
            };
            self.propose(&Command::ClientAt { op, proposed_ms }).await?
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
            CommandReply::Op(OpReply::TooOld) => Err(Status::failed_precondition(format!(
                "the write was decided more than {} s after it was proposed; not applied, \
                 and it never will be",
                super::state::WRITE_AGE_MS_MAX / 1000
            ))),
            CommandReply::Op(OpReply::TooManyPending) => Err(Status::failed_precondition(format!(
                "this client has {} writes awaiting acknowledgement in the shard; not applied",
                super::state::SESSION_REPLIES_MAX
            ))),
            CommandReply::Op(OpReply::AppliedReplyNotKept { bytes }) => {
                Err(Status::already_exists(format!(
                    "applied once already; its reply ({bytes} bytes) was too large to keep for \
                     a retry"
                )))
            }
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
            if s.committed_config_num() < r.config_num {
                return Err(Status::unavailable(format!(
                    "group {} is at configuration {}, not yet {}",
                    s.gid,
                    s.committed_config_num(),
                    r.config_num
                )));
            }
            s.outgoing_view(r.config_num, r.shard)
        };
        let Some((view, copy)) = copy else {
            return Err(Status::not_found(format!(
                "no copy of shard {} from configuration {}: already handed off",
                r.shard, r.config_num
            )));
        };
        // Read outside the state's lock: the copy is frozen, and the view
        // holds it even if it is dropped meanwhile.
        let data = export_copy_blocking(view, copy)
            .await
            .map_err(Status::internal)?;
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
            data: super::state::encode_versioned(&data),
        }))
    }

    async fn delete_shard(
        &self,
        request: Request<pb::DeleteShardRequest>,
    ) -> Result<Response<pb::DeleteShardReply>, Status> {
        let r = request.into_inner();
        let refused = self
            .inner
            .options
            .unreliable
            .is_some_and(|u| u.refuse_deletes);
        if refused || self.inject(|u| u.drop_request) {
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

    type FetchSnapshotStream = super::snapshot::ChunkStream;
    type PullShardStreamStream = super::snapshot::ChunkStream;

    async fn pull_shard_stream(
        &self,
        request: Request<pb::PullShardRequest>,
    ) -> Result<Response<Self::PullShardStreamStream>, Status> {
        let r = request.into_inner();
        if self.inject(|u| u.drop_request) {
            return Err(Status::unavailable("injected fault: request dropped"));
        }
        // Any replica that has reached the configuration can answer: an
        // outgoing copy never changes, only disappears once installed.
        let copy = {
            let s = self.inner.state.lock();
            if s.committed_config_num() < r.config_num {
                return Err(Status::unavailable(format!(
                    "group {} is at configuration {}, not yet {}",
                    s.gid,
                    s.committed_config_num(),
                    r.config_num
                )));
            }
            s.outgoing_view(r.config_num, r.shard)
        };
        let Some((view, copy)) = copy else {
            return Err(Status::not_found(format!(
                "no copy of shard {} from configuration {}: already handed off",
                r.shard, r.config_num
            )));
        };
        if let Some((shard, stall)) = self
            .inner
            .options
            .unreliable
            .and_then(|u| u.stall_copy_stream)
        {
            if shard == r.shard {
                tokio::time::sleep(stall).await;
            }
        }
        tracing::info!(shard = r.shard, to = r.gid, "streaming a shard copy");
        Ok(Response::new(super::snapshot::serve_copy(view, copy)?))
    }

    async fn fetch_snapshot(
        &self,
        request: Request<pb::FetchSnapshotRequest>,
    ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
        let r = request.into_inner();
        let view = {
            let s = self.inner.state.lock();
            if r.gid != s.gid {
                return Err(Status::invalid_argument(format!(
                    "this is group {}, not {}",
                    s.gid, r.gid
                )));
            }
            s.view()
        };
        let applied = view.applied().map_err(store_status)?;
        if applied < r.min_applied_slot {
            return Err(Status::failed_precondition(format!(
                "this replica has applied through slot {applied}, not yet {}",
                r.min_applied_slot
            )));
        }
        tracing::info!(gid = r.gid, applied, "streaming a snapshot to a peer");
        Ok(Response::new(super::snapshot::serve(view)?))
    }

    async fn group_status(
        &self,
        _request: Request<pb::GroupStatusRequest>,
    ) -> Result<Response<pb::GroupStatusReply>, Status> {
        let replica = self.inner.replica.status();
        let (mut reply, census) = {
            let s = self.inner.state.lock();
            let (serving, pulling): (Vec<_>, Vec<_>) = s
                .owned
                .iter()
                .partition(|(_, o)| o.status == super::state::ShardStatus::Serving);
            let reply = pb::GroupStatusReply {
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
                staged: (s.owned.keys())
                    .filter(|&&shard| matches!(s.pulling_copy(shard), Ok(Some((_, true)))))
                    .map(|&shard| pb::StagedShard {
                        config_num: s.config.num,
                        shard,
                    })
                    .collect(),
                keys: 0,
                refused: lock(&self.inner.refused).clone().unwrap_or_default(),
                sessions: s.session_count(),
                snapshots_installed: s.snapshots_installed,
                releases_waiting: (lock(&self.inner.releasing).values())
                    .filter(|r| r.waiting)
                    .count() as u64
                    + (lock(&self.inner.installed_seen).values())
                        .filter(|(_, waiting)| *waiting)
                        .count() as u64,
            };
            (reply, s.key_census())
        };
        // Its seeks step past deletions compaction has not yet dropped:
        // never under the state's lock, nor on the runtime's threads.
        let keys = tokio::task::spawn_blocking(move || census.reported())
            .await
            .map_err(|e| Status::internal(format!("key census: {e}")))?;
        reply.keys = keys.map_err(store_status)?;
        Ok(Response::new(reply))
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a client is told when the replica refuses or fails a request.
/// A store failure as the caller sees it: this replica cannot answer.
fn store_status(e: super::store::StoreError) -> Status {
    Status::unavailable(format!("storage failed: {e}"))
}

/// Reads a frozen copy out of a view on a blocking thread.
async fn export_copy_blocking(
    view: super::store::StoreView,
    copy: super::store::CopyId,
) -> Result<ShardData, String> {
    tokio::task::spawn_blocking(move || super::state::export_copy(&view, copy))
        .await
        .map_err(|e| format!("shard export failed: {e}"))?
        .map_err(|e| e.to_string())
}

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
        ReplicaError::Membership(e) => Status::failed_precondition(e.to_string()),
    }
}
