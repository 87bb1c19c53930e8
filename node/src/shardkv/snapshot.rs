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

use super::state::SnapshotSource;
use super::store::{checksum_record, Import, Record, StoreView, StreamSummary};
use crate::paxos::{NodeId, Slot};
use crate::proto::kv as pb;
use crate::shardmaster::Gid;

/// Records are sent in chunks of about this many bytes (a single record
/// larger than it goes alone).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the network, at most.
pub const CHUNKS_IN_FLIGHT: usize = 4;
/// A chunk holds one record of at most a stored value's size plus its key.
pub const CHUNK_DECODE_BYTES_MAX: usize = super::state::STORED_VALUE_BYTES_MAX + (1 << 20);

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

/// Streams `view` as chunks; the last one carries the summary.
pub fn serve(view: StoreView) -> Result<ChunkStream, Status> {
    let applied = view
        .applied()
        .map_err(|e| Status::internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut hasher = crc32fast::Hasher::new();
        let mut count = 0u64;
        let mut chunk: Vec<Record> = Vec::new();
        let mut bytes = 0;
        let send = |records: &[Record], last: Option<(u64, u32)>| {
            let encoded = postcard::to_allocvec(records)
                .map_err(|e| Status::internal(format!("cannot encode a snapshot chunk: {e}")))?;
            let (record_count, crc32) = last.unwrap_or_default();
            let message = pb::SnapshotChunk {
                records: encoded.into(),
                last: last.is_some(),
                record_count,
                crc32,
                applied_slot: applied,
            };
            // A receiver that went away ends the stream.
            tx.blocking_send(Ok(message))
                .map_err(|_| Status::cancelled("receiver gone"))
        };
        let result = (|| {
            for record in view.records() {
                let record = record.map_err(|e| Status::internal(e.to_string()))?;
                checksum_record(&mut hasher, &record);
                count += 1;
                bytes += record.size_bytes();
                chunk.push(record);
                if bytes >= CHUNK_BYTES {
                    send(&chunk, None)?;
                    chunk.clear();
                    bytes = 0;
                }
            }
            send(&chunk, Some((count, hasher.clone().finalize())))
        })();
        if let Err(status) = result {
            let _ = tx.blocking_send(Err(status));
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Fetches snapshots from the other replicas of a group over gRPC. Used by
/// the replica thread, which blocks on it: it has nothing to apply until
/// the state arrives.
pub struct GrpcSnapshotSource {
    pub gid: Gid,
    /// This replica's id: it is not asked.
    pub me: NodeId,
    /// The group's replicas, by id.
    pub peers: Vec<String>,
    /// The runtime the fetch runs on (the replica thread is not one of its
    /// threads, so it can block on it).
    pub runtime: tokio::runtime::Handle,
    /// Give up on one peer after this long without a chunk.
    pub chunk_timeout: Duration,
    /// Rounds over every peer before the install fails (the replica then
    /// stops, and starts over when restarted).
    pub rounds: u32,
}

impl SnapshotSource for GrpcSnapshotSource {
    fn fetch(&self, min_applied: Slot, import: &mut Import) -> Result<StreamSummary, String> {
        tracing::info!(
            gid = self.gid,
            min_applied,
            "fetching a snapshot from a peer"
        );
        let mut errors = Vec::new();
        for round in 0..self.rounds {
            for (id, peer) in self.peers.iter().enumerate() {
                if id as NodeId == self.me {
                    continue;
                }
                match self
                    .runtime
                    .block_on(self.fetch_from(peer, min_applied, import))
                {
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
        loop {
            let chunk = tokio::time::timeout(self.chunk_timeout, stream.message())
                .await
                .map_err(|_| "stream stalled".to_string())?
                .map_err(|s| s.message().to_string())?
                .ok_or("stream ended before its last chunk")?;
            let records: Vec<Record> = postcard::from_bytes(&chunk.records)
                .map_err(|e| format!("undecodable chunk: {e}"))?;
            // Writing a chunk blocks on the disk, briefly: bounded by the chunk.
            import.add(&records).map_err(|e| e.to_string())?;
            if chunk.last {
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
