//! Snapshots between the replicas of a group, streamed from one store to
//! another in bounded chunks.
//!
//! The sender reads a point-in-time view of its store on a blocking thread
//! and hands chunks to the RPC through a channel of [`CHUNKS_IN_FLIGHT`]:
//! its memory stays at a few chunks whatever the data size. The receiver
//! writes each chunk into a fresh store beside its own and switches to it
//! only once the stream's record count and CRC-32 match what the sender
//! vouched for (see [`super::store::Import`]). A transfer cut short (either
//! side killed, a peer gone) leaves a partial import that the next attempt,
//! or the next open, discards: transfers restart, they never resume from
//! bytes nobody checked.

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::Status;

use super::state::{PeerSource, Source};
use super::store::{
    checksum_parts, record_size_bytes, CopyId, CopySummary, Import, Record, RecordView, Space,
    Stager, StoreError, StoreView, StreamSummary,
};
use crate::paxos::{NodeId, Slot};
use crate::proto::kv as pb;
use crate::shardmaster::Gid;

/// Records are sent in chunks of about this many bytes (a single record
/// larger than it goes alone).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the network, at most.
pub const CHUNKS_IN_FLIGHT: usize = 4;
/// A chunk holds one record of at most a stored value's size plus its key.
pub const CHUNK_DECODE_BYTES_MAX: usize = super::state::STORED_VALUE_BYTES_MAX + (4 << 20);

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

/// The nice value of a transfer's threads (Linux's is per thread): a shard
/// copy or snapshot sent or received competes for the CPU with the reads
/// and writes of the shards that did not move, and yields to them, as
/// TiKV runs its snapshots on low-priority pools.
pub const TRANSFER_NICE: i32 = 10;

/// Starts `work` on a thread of its own at [`TRANSFER_NICE`] (or the
/// node's own nice value, if higher). Not on the
/// blocking pool: a pooled thread would keep the lower priority for the
/// unrelated work it runs next, and cannot get its priority back without
/// privileges.
pub(crate) fn spawn_transfer<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Never raised: a node already run at a higher nice keeps it.
            let me = Some(rustix::thread::gettid());
            let lowered = rustix::process::getpriority_process(me)
                .and_then(|nice| rustix::process::setpriority_process(me, nice.max(TRANSFER_NICE)));
            if let Err(e) = lowered {
                tracing::debug!(error = %e, "cannot lower a transfer thread's priority");
            }
            work()
        })
}

/// Streams `view` as chunks; the last one carries the summary.
pub fn serve(view: StoreView) -> Result<ChunkStream, Status> {
    spawn_stream(view, |view| Box::new(view.record_views()))
}

/// Streams the frozen copy `copy` of `view` as chunks.
pub fn serve_copy(view: StoreView, copy: CopyId) -> Result<ChunkStream, Status> {
    spawn_stream(view, move |view| Box::new(view.copy_views(copy)))
}

type Records<'a> = Box<dyn Iterator<Item = Result<RecordView, StoreError>> + 'a>;

/// Reads `records(view)` on a blocking thread into a channel of chunks.
fn spawn_stream(
    view: StoreView,
    records: impl for<'a> FnOnce(&'a StoreView) -> Records<'a> + Send + 'static,
) -> Result<ChunkStream, Status> {
    let applied = view
        .applied()
        .map_err(|e| Status::internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    spawn_transfer("stream-send", move || {
        let mut tally = Tally::default();
        let mut chunk = ChunkBuilder::new();
        let send = |chunk: &mut ChunkBuilder, last: Option<CopySummary>| {
            let encoded = chunk
                .finish()
                .map_err(|e| Status::internal(format!("cannot encode a snapshot chunk: {e}")))?;
            let summary = last.unwrap_or(CopySummary {
                records: 0,
                crc32: 0,
                keys: 0,
                sessions: 0,
            });
            let message = pb::SnapshotChunk {
                records: encoded,
                last: last.is_some(),
                record_count: summary.records,
                crc32: summary.crc32,
                applied_slot: applied,
                keys: summary.keys,
                sessions: summary.sessions,
            };
            // A receiver that went away ends the stream.
            tx.blocking_send(Ok(message))
                .map_err(|_| Status::cancelled("receiver gone"))
        };
        let result = (|| {
            for record in records(&view) {
                let record = record.map_err(|e| Status::internal(e.to_string()))?;
                let (key, value) = (record.key(), record.value());
                // Sent before a record would overflow it: a chunk holds at
                // most CHUNK_BYTES, or one record alone.
                if !chunk.is_empty() && chunk.bytes + record_size_bytes(key, value) > CHUNK_BYTES {
                    send(&mut chunk, None)?;
                }
                tally.add(record.space, key, value);
                chunk.push(record.space, key, value).map_err(|e| {
                    Status::internal(format!("cannot encode a snapshot chunk: {e}"))
                })?;
            }
            send(&mut chunk, Some(tally.summary()))
        })();
        if let Err(status) = result {
            let _ = tx.blocking_send(Err(status));
        }
    })
    .map_err(|e| Status::resource_exhausted(format!("cannot start a thread to stream: {e}")))?;
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Counts and checksums records as they stream.
#[derive(Default)]
struct Tally {
    hasher: crc32fast::Hasher,
    records: u64,
    keys: u64,
    sessions: u64,
}

impl Tally {
    fn add(&mut self, space: Space, key: &[u8], value: &[u8]) {
        checksum_parts(&mut self.hasher, space, key, value);
        self.records += 1;
        match space {
            Space::Data => self.keys += 1,
            Space::Sessions => self.sessions += 1,
            _ => {}
        }
    }

    fn summary(&self) -> CopySummary {
        CopySummary {
            records: self.records,
            crc32: self.hasher.clone().finalize(),
            keys: self.keys,
            sessions: self.sessions,
        }
    }
}

/// Room for the record count postcard writes before a sequence: a varint
/// of up to 10 bytes.
const COUNT_BYTES_MAX: usize = 10;

/// A chunk being encoded: each record is written in postcard's encoding as
/// it is read, straight from the engine's buffers, behind room for the
/// count that postcard puts first. The result is exactly
/// `postcard::to_allocvec(&records)`, which [`decode_chunk`] reads.
struct ChunkBuilder {
    encoded: Vec<u8>,
    records: u64,
    /// The records' [`record_size_bytes`], against [`CHUNK_BYTES`].
    bytes: usize,
}

/// A record as it is written into a chunk: the layout of [`Record`]
/// (postcard writes `Bytes` and byte strings alike).
#[derive(serde::Serialize)]
struct RecordOut<'a> {
    space: Space,
    key: ByteStr<'a>,
    value: ByteStr<'a>,
}

/// A byte slice serialized as bytes (serde's own `[u8]` is a sequence).
struct ByteStr<'a>(&'a [u8]);

impl serde::Serialize for ByteStr<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl ChunkBuilder {
    fn new() -> Self {
        // One allocation per chunk: a record encodes in fewer bytes than
        // it counts against the chunk unless its key or value is long, so
        // a sixteenth more covers any chunk but one record alone.
        let mut encoded = Vec::with_capacity(COUNT_BYTES_MAX + CHUNK_BYTES + CHUNK_BYTES / 16);
        encoded.resize(COUNT_BYTES_MAX, 0);
        ChunkBuilder {
            encoded,
            records: 0,
            bytes: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.records == 0
    }

    fn push(&mut self, space: Space, key: &[u8], value: &[u8]) -> Result<(), postcard::Error> {
        let record = RecordOut {
            space,
            key: ByteStr(key),
            value: ByteStr(value),
        };
        self.encoded = postcard::to_extend(&record, std::mem::take(&mut self.encoded))?;
        self.records += 1;
        self.bytes += record_size_bytes(key, value);
        Ok(())
    }

    /// The chunk's encoding, and a fresh builder in its place.
    fn finish(&mut self) -> Result<bytes::Bytes, postcard::Error> {
        let mut count = [0u8; COUNT_BYTES_MAX];
        let count = postcard::to_slice(&self.records, &mut count)?;
        let start = COUNT_BYTES_MAX - count.len();
        let mut encoded = std::mem::replace(self, ChunkBuilder::new()).encoded;
        encoded[start..COUNT_BYTES_MAX].copy_from_slice(count);
        Ok(bytes::Bytes::from(encoded).slice(start..))
    }
}

/// A record as it lies in a chunk (postcard writes `Bytes` and byte
/// slices alike).
#[derive(serde::Deserialize)]
struct RecordIn<'a> {
    space: Space,
    key: &'a [u8],
    value: &'a [u8],
}

/// A chunk's records, their keys and values views of the chunk itself:
/// no allocation or copy per record.
fn decode_chunk(encoded: &bytes::Bytes) -> Result<Vec<Record>, String> {
    let records: Vec<RecordIn<'_>> =
        postcard::from_bytes(encoded).map_err(|e| format!("undecodable chunk: {e}"))?;
    Ok(records
        .into_iter()
        .map(|r| Record {
            space: r.space,
            key: encoded.slice_ref(r.key),
            value: encoded.slice_ref(r.value),
        })
        .collect())
}

fn summary_of(chunk: &pb::SnapshotChunk) -> CopySummary {
    CopySummary {
        records: chunk.record_count,
        crc32: chunk.crc32,
        keys: chunk.keys,
        sessions: chunk.sessions,
    }
}

async fn connect(
    addr: &str,
    timeout: Duration,
) -> Result<pb::shard_kv_client::ShardKvClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(pb::shard_kv_client::ShardKvClient::new(channel)
        .max_decoding_message_size(CHUNK_DECODE_BYTES_MAX))
}

/// Fetches the copy of `shard` that `source` froze into `copy` of this
/// replica's store, from any of the source's servers, and marks it
/// complete. With `expected`, the copy must be exactly that one (as the
/// group logged it). Returns what was fetched.
///
/// The servers are tried from the one at `first` (mod their number): each
/// replica of the receiving group passes its own id, so they read from
/// different replicas of the source and not all from its first, often
/// its leader, which also serves the shards that did not move.
#[allow(clippy::too_many_arguments)]
pub fn fetch_copy(
    runtime: &tokio::runtime::Runtime,
    stager: &Stager,
    copy: CopyId,
    source: &Source,
    shard: u64,
    requester: Gid,
    first: usize,
    expected: Option<CopySummary>,
    timeout: Duration,
) -> Result<CopySummary, String> {
    let mut errors = Vec::new();
    let servers = source.servers.len();
    for server in (0..servers).map(|i| &source.servers[(first + i) % servers]) {
        match fetch_copy_from(
            runtime, stager, copy, server, source, shard, requester, expected, timeout,
        ) {
            Ok(summary) => return Ok(summary),
            Err(e) => errors.push(format!("{server}: {e}")),
        }
    }
    Err(format!(
        "no server of group {} gave shard {shard} of configuration {} ({})",
        source.gid,
        source.config_num,
        errors.join("; ")
    ))
}

/// One attempt at [`fetch_copy`], from one server. The stream is pulled a
/// chunk at a time on `runtime` by the store's writer, which ingests it.
#[allow(clippy::too_many_arguments)]
fn fetch_copy_from(
    runtime: &tokio::runtime::Runtime,
    stager: &Stager,
    copy: CopyId,
    server: &str,
    source: &Source,
    shard: u64,
    requester: Gid,
    expected: Option<CopySummary>,
    timeout: Duration,
) -> Result<CopySummary, String> {
    stager.clear(copy).map_err(|e| e.to_string())?;
    let request = pb::PullShardRequest {
        config_num: source.config_num,
        shard,
        gid: requester,
    };
    let mut stream = runtime.block_on(async {
        let mut client = connect(server, timeout).await?;
        tokio::time::timeout(timeout, client.pull_shard_stream(request))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|s| s.message().to_string())
            .map(|r| r.into_inner())
    })?;
    let mut tally = Tally::default();
    let mut got = None;
    stager.write_copy(copy, || {
        if got.is_some() {
            return Ok(None);
        }
        // Inside the runtime: a timeout takes the timer of the runtime it
        // is made in, and the replica thread is in none.
        let chunk = runtime
            .block_on(async { tokio::time::timeout(timeout, stream.message()).await })
            .map_err(|_| "stream stalled".to_string())?
            .map_err(|s| s.message().to_string())?
            .ok_or("stream ended before its last chunk")?;
        let records = decode_chunk(&chunk.records)?;
        for r in &records {
            tally.add(r.space, &r.key, &r.value);
        }
        if chunk.last {
            let summary = tally.summary();
            if summary != summary_of(&chunk) {
                return Err(format!(
                    "the stream does not match its summary: got {summary:?}, sender sent {:?}",
                    summary_of(&chunk)
                ));
            }
            if expected.is_some_and(|e| e != summary) {
                return Err(format!("got {summary:?}, the group logged {expected:?}"));
            }
            got = Some(summary);
        }
        Ok(Some(records))
    })?;
    let got = got.ok_or("stream ended before its last chunk")?;
    stager.mark_staged(copy, got).map_err(|e| e.to_string())?;
    Ok(got)
}

/// Fetches snapshots from the other replicas of a group over gRPC. Used by
/// the replica thread, which blocks on it: it has nothing to apply until
/// the state arrives.
pub struct GrpcSnapshotSource {
    pub gid: Gid,
    /// This replica's id: it is not asked.
    pub me: NodeId,
    /// The group's replicas, by id, as the membership has them now.
    pub peers: crate::replica::grpc::AddressBook,
    /// Give up on one peer after this long without a chunk.
    pub chunk_timeout: Duration,
    /// Rounds over every peer before the install fails (the replica then
    /// stops, and starts over when restarted).
    pub rounds: u32,
}

/// A runtime of the fetch's own: the replica thread blocks on it while
/// holding the state's lock, which the node's runtime threads may be
/// waiting for, so the fetch must not need them.
pub(crate) fn own_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for the fetch: {e}"))
}

impl PeerSource for GrpcSnapshotSource {
    fn fetch_copy(
        &self,
        stager: &Stager,
        copy: CopyId,
        source: &Source,
        shard: u64,
        expected: CopySummary,
    ) -> Result<(), String> {
        fetch_copy(
            &own_runtime()?,
            stager,
            copy,
            source,
            shard,
            self.gid,
            self.me as usize,
            Some(expected),
            self.chunk_timeout,
        )
        .map(|_| ())
    }

    fn fetch(&self, min_applied: Slot, import: &mut Import) -> Result<StreamSummary, String> {
        tracing::info!(
            gid = self.gid,
            min_applied,
            "fetching a snapshot from a peer"
        );
        let runtime = own_runtime()?;
        let mut errors = Vec::new();
        for round in 0..self.rounds {
            for (id, peer) in self.peers.all() {
                if id == self.me {
                    continue;
                }
                match runtime.block_on(self.fetch_from(&peer, min_applied, import)) {
                    Ok(summary) => return Ok(summary),
                    Err(e) => {
                        tracing::warn!(gid = self.gid, peer = %peer, round, error = %e, "snapshot fetch failed");
                        errors.push(format!("{peer}: {e}"));
                        import.reset().map_err(|e| e.to_string())?;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let last: Vec<String> = errors.into_iter().rev().take(3).collect();
        Err(format!(
            "no peer gave a snapshot at slot {min_applied} or later ({})",
            last.join("; ")
        ))
    }
}

impl GrpcSnapshotSource {
    async fn fetch_from(
        &self,
        peer: &str,
        min_applied: Slot,
        import: &mut Import,
    ) -> Result<StreamSummary, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.chunk_timeout);
        let channel = tokio::time::timeout(self.chunk_timeout, endpoint.connect())
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut client = pb::shard_kv_client::ShardKvClient::new(channel)
            .max_decoding_message_size(CHUNK_DECODE_BYTES_MAX);
        let request = pb::FetchSnapshotRequest {
            gid: self.gid,
            min_applied_slot: min_applied,
        };
        let mut stream = tokio::time::timeout(self.chunk_timeout, client.fetch_snapshot(request))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut tally = Tally::default();
        loop {
            let chunk = tokio::time::timeout(self.chunk_timeout, stream.message())
                .await
                .map_err(|_| "stream stalled".to_string())?
                .map_err(|s| s.message().to_string())?
                .ok_or("stream ended before its last chunk")?;
            let records = decode_chunk(&chunk.records)?;
            for r in &records {
                tally.add(r.space, &r.key, &r.value);
            }
            // Writing a chunk blocks on the disk, briefly: bounded by the chunk.
            import.add(&records).map_err(|e| e.to_string())?;
            if chunk.last {
                // Checked here too, so a bad transfer tries the next peer.
                let got = tally.summary();
                if (got.records, got.crc32) != (chunk.record_count, chunk.crc32) {
                    return Err(format!(
                        "the stream does not match its summary: {} records, CRC {:08x}; sender sent {}, {:08x}",
                        got.records, got.crc32, chunk.record_count, chunk.crc32
                    ));
                }
                if chunk.applied_slot < min_applied {
                    return Err(format!(
                        "peer's state reaches slot {}, not {min_applied}",
                        chunk.applied_slot
                    ));
                }
                return Ok(StreamSummary {
                    records: chunk.record_count,
                    crc32: chunk.crc32,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_chunk_is_encoded_as_postcard_encodes_its_records_and_decoded_without_copies() {
        let record = |space, key_bytes: usize, value_bytes: usize| Record {
            space,
            key: Bytes::from(vec![b'k'; key_bytes]),
            value: Bytes::from(vec![b'v'; value_bytes]),
        };
        let chunks = [
            // The last chunk of a stream may hold no record.
            vec![],
            vec![record(Space::Data, 1, 0)],
            vec![record(Space::Sessions, 1, 1); 1000],
            // The longest key, a value whose length takes 4 bytes.
            vec![record(
                Space::Data,
                super::super::store::USER_KEY_BYTES_MAX,
                3 << 20,
            )],
            vec![
                record(Space::Data, 130, 20_000),
                record(Space::Sessions, 8, 200),
            ],
        ];
        for records in chunks {
            let mut chunk = ChunkBuilder::new();
            for r in &records {
                chunk.push(r.space, &r.key, &r.value).unwrap();
            }
            let bytes: usize = records.iter().map(Record::size_bytes).sum();
            assert_eq!(chunk.bytes, bytes);
            let encoded = chunk.finish().unwrap();
            assert!(chunk.is_empty(), "a finished builder starts over");
            assert_eq!(encoded, postcard::to_allocvec(&records).unwrap());
            let decoded = decode_chunk(&encoded).unwrap();
            assert_eq!(decoded, records);
            let within = encoded.as_ptr_range();
            for r in &decoded {
                assert!(within.contains(&r.key.as_ptr()), "a key was copied");
                if !r.value.is_empty() {
                    assert!(within.contains(&r.value.as_ptr()), "a value was copied");
                }
            }
        }
        // A count that takes several bytes.
        let mut chunk = ChunkBuilder::new();
        let many: Vec<Record> = (0..70_000u32)
            .map(|i| Record {
                space: Space::Sessions,
                key: Bytes::from(i.to_be_bytes().to_vec()),
                value: Bytes::new(),
            })
            .collect();
        for r in &many {
            chunk.push(r.space, &r.key, &r.value).unwrap();
        }
        assert_eq!(
            chunk.finish().unwrap(),
            postcard::to_allocvec(&many).unwrap()
        );
        assert!(decode_chunk(&Bytes::from_static(&[3, 0])).is_err());
    }

    #[test]
    fn a_transfer_thread_runs_at_the_lower_priority_and_others_do_not() {
        let niceness = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        let before = niceness().unwrap();
        let inside = spawn_transfer("test-transfer", niceness)
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(inside, before.max(TRANSFER_NICE));
        assert_eq!(niceness().unwrap(), before, "the caller's priority changed");
    }
}
