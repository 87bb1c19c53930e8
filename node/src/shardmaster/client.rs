//! The shardmaster's admin client: Join, Leave, Move and Query, retrying
//! across replicas and leader changes until an overall timeout.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

use super::service::{from_proto, next_server};
use super::{Config, Gid};
use crate::proto::shardmaster as pb;
use crate::proto::shardmaster::shard_master_client::ShardMasterClient as PbClient;

/// One attempt at one replica may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("shardmaster refused the request: {0}")]
    Rejected(String),
    #[error("no shardmaster replica answered within {0:?}: last error: {1}")]
    Timeout(Duration, String),
    #[error("invalid shardmaster address: {0}")]
    BadAddress(String),
}

/// A handle to the shardmaster group. Cheap to clone; clones share a session.
#[derive(Clone)]
pub struct ShardMasterClient {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    /// Lazily connected channels, one per replica; reconnect (and re-resolve
    /// the name) on their own after a failure.
    channels: Vec<Channel>,
    /// The replicas' addresses, as `channels`: a refusal names the leader
    /// by address.
    servers: Vec<String>,
    /// Random per client: with `seq` it makes every request unique, so a
    /// retried request is applied once.
    client_id: u64,
    seq: AtomicU64,
    /// The replica to try first: the last one that answered, or a hint.
    preferred: AtomicUsize,
    /// Give up on a request after this long.
    timeout: Duration,
    /// One request at a time per session: the shardmaster remembers only a
    /// client's latest sequence number, so a lower one must mean a retry.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl ShardMasterClient {
    /// `servers` are the replicas' client-API addresses (`host:port`).
    pub fn new(servers: &[String], timeout: Duration) -> Result<Self, ClientError> {
        if servers.is_empty() {
            return Err(ClientError::BadAddress(
                "no shardmaster addresses given".into(),
            ));
        }
        let channels = servers
            .iter()
            .map(|addr| {
                crate::net::endpoint(addr)
                    .map(|e| e.connect_timeout(ATTEMPT_TIMEOUT).connect_lazy())
                    .map_err(|e| ClientError::BadAddress(format!("{addr}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // std's RandomState is seeded from the OS: a random id, no extra crate.
        let client_id = std::hash::RandomState::new().build_hasher().finish();
        Ok(ShardMasterClient {
            inner: std::sync::Arc::new(Inner {
                preferred: AtomicUsize::new(client_id as usize % channels.len()),
                channels,
                servers: servers.to_vec(),
                client_id,
                seq: AtomicU64::new(1),
                timeout,
                one_at_a_time: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Starts at replica `index` (for tests that bind clients to replicas).
    pub fn prefer(&self, index: usize) {
        self.inner
            .preferred
            .store(index % self.inner.channels.len(), Ordering::Relaxed);
    }

    pub async fn join(&self, gid: Gid, servers: Vec<String>) -> Result<Config, ClientError> {
        self.call(|tag| Rpc::Join(pb::JoinRequest { tag, gid, servers }))
            .await
    }

    pub async fn leave(&self, gid: Gid) -> Result<Config, ClientError> {
        self.call(|tag| Rpc::Leave(pb::LeaveRequest { tag, gid }))
            .await
    }

    pub async fn r#move(&self, shard: u64, gid: Gid) -> Result<Config, ClientError> {
        self.call(|tag| Rpc::Move(pb::MoveRequest { tag, shard, gid }))
            .await
    }

    /// Records that `gid`'s data is in its life `incarnation` (see
    /// [`super::Op::Claim`]); refused if another life claimed it first.
    pub async fn claim(&self, gid: Gid, incarnation: u64) -> Result<Config, ClientError> {
        self.call(|tag| {
            Rpc::Claim(pb::ClaimRequest {
                tag,
                gid,
                incarnation,
            })
        })
        .await
    }

    /// Configuration `num`, or the latest for `None` (or a number past it).
    pub async fn query(&self, num: Option<u64>) -> Result<Config, ClientError> {
        let num = num.and_then(|n| i64::try_from(n).ok()).unwrap_or(-1);
        self.call(|tag| Rpc::Query(pb::QueryRequest { tag, num }))
            .await
    }

    fn tag(&self) -> pb::ClientTag {
        pb::ClientTag {
            client: self.inner.client_id,
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Tries replicas until one answers, following leader hints, with
    /// backoff after each full round, until the overall timeout.
    async fn call(
        &self,
        build: impl FnOnce(Option<pb::ClientTag>) -> Rpc,
    ) -> Result<Config, ClientError> {
        let _turn = self.inner.one_at_a_time.lock().await;
        // Tagged inside the turn, so sequence numbers reach the group in order.
        let rpc = build(Some(self.tag()));
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let n = self.inner.channels.len();
        let mut index = self.inner.preferred.load(Ordering::Relaxed);
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::from("no attempt made");
        let mut tried_this_round = 0;
        while tokio::time::Instant::now() < deadline {
            let client = PbClient::new(self.inner.channels[index].clone());
            let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, rpc.send(client)).await;
            match attempt {
                Ok(Ok(response)) => {
                    self.inner.preferred.store(index, Ordering::Relaxed);
                    return Ok(from_proto(response.into_inner()));
                }
                Ok(Err(status)) if status.code() == Code::InvalidArgument => {
                    return Err(ClientError::Rejected(status.message().to_string()));
                }
                Ok(Err(status)) => {
                    last_error = format!("replica {index}: {}", status.message());
                    index = next_server(&status, &self.inner.servers, index);
                }
                Err(_) => {
                    last_error = format!("replica {index}: no answer within {ATTEMPT_TIMEOUT:?}");
                    index = (index + 1) % n;
                }
            }
            // Hints count as attempts too: replicas naming each other back
            // and forth must not spin without backing off.
            tried_this_round += 1;
            if tried_this_round >= n {
                tried_this_round = 0;
                tokio::time::sleep(
                    backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                )
                .await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        Err(ClientError::Timeout(self.inner.timeout, last_error))
    }
}

/// One request, kept whole so every retry carries the same tag.
enum Rpc {
    Join(pb::JoinRequest),
    Leave(pb::LeaveRequest),
    Move(pb::MoveRequest),
    Query(pb::QueryRequest),
    Claim(pb::ClaimRequest),
}

impl Rpc {
    async fn send(
        &self,
        mut client: PbClient<Channel>,
    ) -> Result<tonic::Response<pb::Config>, Status> {
        match self {
            Rpc::Join(r) => client.join(r.clone()).await,
            Rpc::Leave(r) => client.leave(*r).await,
            Rpc::Move(r) => client.r#move(*r).await,
            Rpc::Query(r) => client.query(*r).await,
            Rpc::Claim(r) => client.claim(*r).await,
        }
    }
}
