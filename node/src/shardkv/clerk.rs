//! The client library. A [`Clerk`] finds the group serving a key from a
//! cached configuration, tags every write with its client id and a sequence
//! number so that a retry is applied once, and retries (other replicas, a
//! refreshed configuration, backoff) until an overall timeout.
//!
//! A Clerk may be used by many tasks at once: each write has its own
//! sequence number, and every request carries the lowest sequence number
//! still awaiting a reply, so servers forget only replies the client has.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tonic::Code;

use super::pool::ChannelPool;
use super::state::SESSION_REPLIES_MAX;
use super::{key_to_shard, InvalidRequest, Limits};
use crate::proto::kv as pb;
use crate::proto::kv::shard_kv_client::ShardKvClient;
use crate::shardmaster::client::{ClientError, ShardMasterClient};
use crate::shardmaster::service::next_server;
use crate::shardmaster::{Config, Gid};

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// The longest [`ClerkOptions::timeout`]: a write is re-sent for no longer,
/// well inside [`crate::shardkv::state::WRITE_AGE_MS_MAX`], so no copy of
/// it can be applied after its session ends.
pub const CLERK_TIMEOUT_MAX: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct ClerkOptions {
    /// Give up on an operation after this long. Its outcome is then
    /// unknown for a write: it may or may not have been applied (once).
    pub timeout: Duration,
    /// One attempt at one server may take this long.
    pub attempt_timeout: Duration,
    /// Checked before sending; should match the servers'.
    pub limits: Limits,
    /// Operations in flight at once on this Clerk; more wait their turn.
    /// At most [`crate::shardkv::state::SESSION_REPLIES_MAX`], the replies
    /// a shard keeps per client.
    pub in_flight_max: usize,
}

impl Default for ClerkOptions {
    fn default() -> Self {
        ClerkOptions {
            timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(2),
            limits: Limits::default(),
            in_flight_max: 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClerkError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("server refused the request: {0}")]
    Rejected(String),
    #[error(
        "no answer within {after:?} (the operation may or may not have taken effect): {last_error}"
    )]
    Timeout { after: Duration, last_error: String },
    #[error("shardmaster: {0}")]
    Master(#[from] ClientError),
    #[error("invalid client options: {0}")]
    Options(String),
    /// The write was applied (once), but its reply was too large to keep
    /// for this retry.
    #[error("{0}")]
    AppliedReplyLost(String),
}

/// A key/value client. Cheap to clone; clones share one session.
#[derive(Clone)]
pub struct Clerk {
    inner: Arc<Inner>,
}

struct Inner {
    masters: ShardMasterClient,
    /// The latest configuration seen; refreshed when a group refuses a key.
    config: RwLock<Config>,
    pool: ChannelPool,
    /// The replica index that answered last, per group.
    leaders: Mutex<HashMap<Gid, usize>>,
    /// Random per Clerk; with a sequence number names each write uniquely.
    client_id: u64,
    /// Sequence numbers handed out, and those still awaiting a reply.
    seqs: Mutex<SeqTracker>,
    /// Bounds the operations in flight, hence `outstanding`.
    in_flight: Semaphore,
    options: ClerkOptions,
}

/// What an operation returned.
#[derive(Debug)]
struct Answer {
    outcome: pb::Outcome,
    value: Bytes,
}

impl Clerk {
    /// `masters` are the shardmaster replicas' addresses (`host:port`).
    pub fn new(masters: &[String], options: ClerkOptions) -> Result<Self, ClerkError> {
        if options.timeout > CLERK_TIMEOUT_MAX {
            return Err(ClerkError::Options(format!(
                "timeout {:?} is longer than {CLERK_TIMEOUT_MAX:?}: past it, a retried write \
                 could outlive its session",
                options.timeout
            )));
        }
        if options.in_flight_max > SESSION_REPLIES_MAX {
            return Err(ClerkError::Options(format!(
                "{} operations in flight; a shard keeps replies for at most {SESSION_REPLIES_MAX}",
                options.in_flight_max
            )));
        }
        let masters = ShardMasterClient::new(masters, options.timeout)?;
        let client_id = std::hash::RandomState::new().build_hasher().finish();
        Ok(Clerk {
            inner: Arc::new(Inner {
                masters,
                config: RwLock::new(Config::initial(0)),
                pool: ChannelPool::new(options.attempt_timeout),
                leaders: Mutex::new(HashMap::new()),
                client_id,
                seqs: Mutex::new(SeqTracker::default()),
                in_flight: Semaphore::new(options.in_flight_max.max(1)),
                options,
            }),
        })
    }

    /// The shardmaster client this Clerk uses (for admin commands).
    pub fn masters(&self) -> &ShardMasterClient {
        &self.inner.masters
    }

    /// The configuration this Clerk routes by (refreshing it if it has none).
    pub async fn config(&self) -> Result<Config, ClerkError> {
        if self.cached().num == 0 {
            self.refresh(0).await?;
        }
        Ok(self.cached())
    }

    /// The value of `key`, or `None` if it does not exist.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClerkError> {
        let a = self
            .execute(pb::OpKind::Get, key.into(), Bytes::new())
            .await?;
        Ok((a.outcome == pb::Outcome::Ok).then_some(a.value))
    }

    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClerkError> {
        self.execute(pb::OpKind::Put, key.into(), value.into())
            .await?;
        Ok(())
    }

    pub async fn append(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClerkError> {
        self.execute(pb::OpKind::Append, key.into(), value.into())
            .await?;
        Ok(())
    }

    /// Stores hash(previous + value); returns the previous value (empty if none).
    pub async fn put_hash(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<Bytes, ClerkError> {
        let a = self
            .execute(pb::OpKind::PutHash, key.into(), value.into())
            .await?;
        Ok(a.value)
    }

    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<(), ClerkError> {
        self.execute(pb::OpKind::Delete, key.into(), Bytes::new())
            .await?;
        Ok(())
    }

    fn cached(&self) -> Config {
        self.inner
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fetches the latest configuration, unless one newer than `seen` has
    /// arrived meanwhile (many tasks refusing at once refresh once).
    async fn refresh(&self, seen: u64) -> Result<(), ClerkError> {
        if self.cached().num > seen {
            return Ok(());
        }
        let latest = self.inner.masters.query(None).await?;
        let mut config = self.inner.config.write().unwrap_or_else(|e| e.into_inner());
        if latest.num > config.num {
            *config = latest;
        }
        Ok(())
    }

    fn seqs(&self) -> std::sync::MutexGuard<'_, SeqTracker> {
        self.inner.seqs.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn execute(
        &self,
        kind: pb::OpKind,
        key: Bytes,
        value: Bytes,
    ) -> Result<Answer, ClerkError> {
        self.inner.options.limits.check(&key, &value)?;
        // Closed never: the semaphore lives as long as the Clerk.
        let _permit = self.inner.in_flight.acquire().await;
        let seq = if kind == pb::OpKind::Get {
            0
        } else {
            self.seqs().begin()
        };
        // However the attempt ends, the seq stops being outstanding: an
        // answered write is acknowledged; an abandoned one must never apply
        // later, and servers refuse seqs below the watermark.
        let _done = Outstanding {
            inner: &self.inner,
            seq,
        };
        let deadline = tokio::time::Instant::now() + self.inner.options.timeout;
        let mut backoff = BACKOFF_MIN;
        if self.cached().num == 0 {
            // A new Clerk: no routes yet. Errors surface through the loop.
            let _ = tokio::time::timeout(self.inner.options.timeout, self.refresh(0)).await;
        }
        loop {
            let mut last_error;
            let config = self.cached();
            let shards = config.shards.len();
            let gid = if shards == 0 {
                0
            } else {
                config.shards[key_to_shard(&key, shards)]
            };
            if let Some(servers) = config.groups.get(&gid).filter(|_| gid != 0) {
                match self
                    .try_group(gid, servers, kind, seq, &key, &value, deadline)
                    .await
                {
                    GroupAttempt::Done(answer) => return Ok(answer),
                    GroupAttempt::Failed(e) => return Err(e),
                    GroupAttempt::Retry(e) => last_error = e,
                }
            } else {
                last_error = format!(
                    "configuration {} assigns the key's shard to no group",
                    config.num
                );
            }
            tokio::time::sleep(
                backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(remaining, self.refresh(config.num)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => last_error = format!("{last_error}; then {e}"),
                Err(_) => last_error = format!("{last_error}; then the shardmaster did not answer"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClerkError::Timeout {
                    after: self.inner.options.timeout,
                    last_error,
                });
            }
        }
    }

    /// One round over a group's servers, starting at its last known leader.
    #[allow(clippy::too_many_arguments)]
    async fn try_group(
        &self,
        gid: Gid,
        servers: &[String],
        kind: pb::OpKind,
        seq: u64,
        key: &Bytes,
        value: &Bytes,
        deadline: tokio::time::Instant,
    ) -> GroupAttempt {
        let n = servers.len();
        let mut index = self
            .inner
            .leaders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&gid)
            .copied()
            .unwrap_or(0)
            % n;
        let mut last_error = String::new();
        for _ in 0..n {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let addr = &servers[index];
            let channel = match self.inner.pool.get(addr) {
                Ok(c) => c,
                Err(e) => {
                    last_error = e;
                    index = (index + 1) % n;
                    continue;
                }
            };
            let request = pb::KvRequest {
                client: self.inner.client_id,
                seq,
                first_unacked: self.seqs().first_unacked(seq),
                op: kind as i32,
                key: key.clone(),
                value: value.clone(),
            };
            let attempt = self.inner.options.attempt_timeout.min(deadline - now);
            let call = async move { ShardKvClient::new(channel).execute(request).await };
            match tokio::time::timeout(attempt, call).await {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    let outcome =
                        pb::Outcome::try_from(reply.outcome).unwrap_or(pb::Outcome::WrongGroup);
                    if outcome == pb::Outcome::WrongGroup {
                        return GroupAttempt::Retry(format!(
                            "{addr}: group {gid} does not serve the key (yet)"
                        ));
                    }
                    self.inner
                        .leaders
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(gid, index);
                    return GroupAttempt::Done(Answer {
                        outcome,
                        value: reply.value,
                    });
                }
                Ok(Err(status)) if status.code() == Code::AlreadyExists => {
                    return GroupAttempt::Failed(ClerkError::AppliedReplyLost(
                        status.message().to_string(),
                    ));
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        Code::InvalidArgument | Code::FailedPrecondition
                    ) =>
                {
                    return GroupAttempt::Failed(ClerkError::Rejected(
                        status.message().to_string(),
                    ));
                }
                Ok(Err(status)) => {
                    last_error = format!("{addr}: {}", status.message());
                    index = next_server(&status, servers, index);
                }
                Err(_) => {
                    last_error = format!("{addr}: no answer within {attempt:?}");
                    index = (index + 1) % n;
                }
            }
        }
        GroupAttempt::Retry(last_error)
    }
}

enum GroupAttempt {
    Done(Answer),
    /// Permanent: retrying would not help.
    Failed(ClerkError),
    Retry(String),
}

/// Removes a write's seq from the outstanding set when the call ends.
struct Outstanding<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if self.seq != 0 {
            self.inner
                .seqs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .end(self.seq);
        }
    }
}

/// A Clerk's sequence numbers. A number is outstanding from the instant it
/// is handed out: were it taken first and recorded after, another task could
/// compute a watermark above it in between, and a server would then drop
/// the reply of a write still in flight (its retry answered `Stale` though
/// it was applied).
#[derive(Debug)]
pub(crate) struct SeqTracker {
    next: u64,
    /// Writes sent and not yet answered (or abandoned).
    outstanding: BTreeSet<u64>,
}

impl Default for SeqTracker {
    fn default() -> Self {
        // 0 means "not a write".
        SeqTracker {
            next: 1,
            outstanding: BTreeSet::new(),
        }
    }
}

impl SeqTracker {
    /// A new write's sequence number, outstanding until [`SeqTracker::end`].
    pub(crate) fn begin(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.outstanding.insert(seq);
        seq
    }

    /// The watermark to send with `seq`: every write below it is answered
    /// or abandoned, so servers may forget their replies.
    pub(crate) fn first_unacked(&self, seq: u64) -> u64 {
        self.outstanding.first().copied().unwrap_or(seq).min(seq)
    }

    pub(crate) fn end(&mut self, seq: u64) {
        self.outstanding.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::SeqTracker;
    use crate::shardkv::state::{ClientOp, Command, CommandReply, KvState, OpKind, OpReply};
    use crate::shardmaster::Config;

    fn append(state: &mut KvState, seq: u64, first_unacked: u64) -> CommandReply {
        state.apply_command(Command::Client(ClientOp {
            client: 7,
            seq,
            first_unacked,
            kind: OpKind::Append,
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"x"),
        }))
    }

    /// Task A takes a number; task B takes the next, computes its
    /// watermark, and reaches the shard first; then A's write arrives. It
    /// must be applied, not refused as `Stale`. Before sequence numbers
    /// were taken and recorded in one step, B's watermark passed A's number
    /// (A's had been taken but not yet recorded).
    #[test]
    fn a_watermark_never_passes_a_write_still_in_flight() {
        let dir = std::env::temp_dir().join(format!("shardkv-clerk-test-{}", std::process::id()));
        let mut state = KvState::temporary(1, &dir).unwrap();
        state.apply_command(Command::Reconfigure(Config {
            num: 1,
            shards: vec![1],
            groups: [(1, vec!["a:1".to_string()])].into(),
        }));
        let mut seqs = SeqTracker::default();
        let a = seqs.begin();
        let b = seqs.begin();
        let b_watermark = seqs.first_unacked(b);
        assert_eq!(
            append(&mut state, b, b_watermark),
            CommandReply::Op(OpReply::Done)
        );
        seqs.end(b);
        let a_watermark = seqs.first_unacked(a);
        assert_eq!(
            append(&mut state, a, a_watermark),
            CommandReply::Op(OpReply::Done),
            "A's first attempt"
        );
        seqs.end(a);
        assert_eq!(seqs.first_unacked(seqs.next), seqs.next);
    }
}
