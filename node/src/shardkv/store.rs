//! The group's state on disk: an embedded, ordered store (fjall, an LSM
//! tree; `bench/engine-choice` has the figures that chose it over redb).
//!
//! Layout. Every copy of a shard a replica holds (owned, or frozen for the
//! group it moved to) has a *copy id*, `(shard, generation)`, and its keys
//! live under that 12-byte prefix: its data (user key to value) in a
//! keyspace of its own, `data-SHARD-GENERATION` (see [`Keyspaces`] for
//! why), and its sessions (client to duplicate table) and their expiry
//! order (last write time and client) in the shared keyspaces `sessions`
//! and `idle`. One shard is thus iterated, exported and dropped in time
//! proportional to it alone. `meta` holds the group's small state
//! (configurations, which copy is which) and the applied slot; `data`,
//! where every copy's data was before, holds only a fence for older
//! binaries ([`LEGACY_DATA`]).
//!
//! Writes. Commands are applied into an overlay in memory; [`Store::commit`]
//! writes the overlay together with the slot it reaches in one atomic batch,
//! without fsync: the Paxos log is the durable record, and after a crash
//! the store comes back at some earlier batch, its slot saying exactly
//! which (etcd's consistent index). [`Store::persist`] syncs it; the log is
//! compacted only through a persisted slot.
//!
//! Snapshots. [`Store::view`] is a point-in-time view; [`Store::import`]
//! builds a fresh store beside the live one from a stream of records, and
//! [`Store::switch_to_imported`] replaces the live one atomically.
//!
//! Directories. The store at `PATH` is the fjall database `PATH/gen-N`,
//! where `PATH/CURRENT` names N. An import is built in `gen-(N+1)` and
//! becomes live when `CURRENT` is replaced (write, sync, rename, sync the
//! directory): a crash leaves either generation live, never a mix. No
//! directory with open handles is ever renamed (fjall keeps absolute
//! paths); the ones not named by `CURRENT` are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use fjall::Readable;
use serde::{Deserialize, Serialize};

use crate::paxos::Slot;

/// What bounds a store's memory, whatever the data size: the engine's
/// block cache and its memtables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// The block cache, for reads.
    pub cache_bytes: u64,
    /// A keyspace's memtable is flushed to a table on disk at this size.
    /// Writes wait while four are waiting to be flushed.
    pub memtable_bytes: u64,
    /// The engine's threads for flushes and compactions. With more than
    /// one, fjall (3.1) has its first worker take every compaction request
    /// and put it back for the others, in a loop, until one of them is
    /// free to take it. With two, the only other one is the one
    /// compacting, so the first spins for the whole compaction: under
    /// 1,000,000-key writes that loop took 27% of this machine's two cores
    /// (`perf`), and the engine's threads 44%. With three, the loop ends at
    /// once (0.07%; the engine's threads 17%), and writes and 50/50 ran 9%
    /// to 14% faster. One thread costs more still: compactions then wait
    /// for each other and for flushes (at 1 GiB, a join 66 MiB/s against
    /// 86, 30% more disk, and a worse p99 during it).
    pub engine_threads: usize,
    /// The engine's journal is kept until every keyspace with writes in
    /// it has flushed them; past this size it flushes the oldest. The
    /// small keyspaces (the applied slot, sessions) rarely fill their
    /// memtables, so without a low bound the journal grew to fjall's
    /// 512 MiB default, and an open replayed all of it.
    pub journal_bytes_max: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 64 << 20,
            memtable_bytes: 16 << 20,
            engine_threads: 3,
            journal_bytes_max: 128 << 20,
        }
    }
}

impl StoreOptions {
    /// The least journal bound the engine takes (fjall panics below it).
    pub const JOURNAL_BYTES_MIN: u64 = 64 << 20;

    /// Memtables one keyspace may hold before its writes wait.
    pub const MEMTABLES_PER_KEYSPACE_MAX: u64 = 5;

    /// The active memtables of all keyspaces together, at most: past it
    /// the largest are sealed, to be flushed (see `Store::bound_memtables`).
    pub fn active_memtables_bytes_max(&self) -> u64 {
        (Self::MEMTABLES_PER_KEYSPACE_MAX - 1) * self.memtable_bytes
    }

    /// The most the cache and the memtables hold while the flushes keep
    /// up: the active memtables, and one memtable's worth being flushed.
    /// Flushes that fall behind add the sealed memtables waiting for them;
    /// the engine makes a keyspace's writes wait once it holds four.
    pub fn data_memory_bytes_max(&self) -> u64 {
        self.cache_bytes + Self::MEMTABLES_PER_KEYSPACE_MAX * self.memtable_bytes
    }
}
/// The longest key the engine takes (fjall: 65,535 bytes) less a copy's
/// prefix: the longest user key a replica can store.
pub const USER_KEY_BYTES_MAX: usize = 65_535 - 12;

/// Refuses a record the engine cannot take (it would panic on it).
fn check_key(path: &Path, key: &[u8]) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > 65_535 {
        return Err(StoreError::BadStream {
            path: path.to_path_buf(),
            message: format!("a streamed record has a key of {} bytes", key.len()),
        });
    }
    Ok(())
}

/// Keys removed per write batch when dropping a copy: a dropped shard goes
/// in bounded batches, not one batch as large as the shard.
pub const DROP_KEYS_PER_BATCH: usize = 4096;

/// Removes `copy`: its data keyspace is deleted, and its sessions and idle
/// keys (a few per client) are removed [`DROP_KEYS_PER_BATCH`] per batch,
/// each batch resuming after the last key removed (from the copy's start,
/// it would step over every deletion before it again). False if `stop`
/// was raised first.
///
/// A sync comes before the deletion, which is durable at once: the turn
/// that dropped the copy (or the removal of a cut-short copy's staged
/// marker) must reach the disk first, or after a power loss the store
/// could come back at a slot where the copy is live and its data gone.
fn remove_copy_keys(
    keyspaces: &Keyspaces,
    copy: CopyId,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<bool, StoreError> {
    let err = |e: fjall::Error| keyspaces.err(e);
    if keyspaces.copy(copy).is_some() {
        keyspaces
            .db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(err)?;
        keyspaces.delete_copy(copy)?;
    }
    let (start, end) = copy_range(copy);
    for space in [Space::Sessions, Space::Idle] {
        let keyspace = keyspaces.shared(space);
        let mut from = start.clone();
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(false);
            }
            let mut batch = keyspaces.db.batch();
            let mut removed = 0;
            let mut last = None;
            for item in keyspace
                .range(from.as_slice()..end.as_slice())
                .take(DROP_KEYS_PER_BATCH)
            {
                let key = item.key().map_err(err)?;
                batch.remove(keyspace, key.clone());
                last = Some(key);
                removed += 1;
            }
            batch.commit().map_err(err)?;
            match last {
                Some(key) if removed == DROP_KEYS_PER_BATCH => {
                    from = [&key[..], &[0][..]].concat();
                }
                _ => break,
            }
        }
    }
    Ok(true)
}

/// A dropped copy's keys being removed on a thread of its own, at the
/// transfers' low priority: on the apply thread, the sweep of a shard
/// that moved away (500,000 keys at 1 GiB) took the turns' time from the
/// shards that stayed.
struct Sweeper {
    copy: CopyId,
    /// Asks the thread to stop between batches: the store is closing.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// True once every key of `copy` is gone.
    thread: std::thread::JoinHandle<Result<bool, StoreError>>,
}

const META_APPLIED: &[u8] = b"applied";
/// The applied slot again, in each other keyspace, written by every
/// commit: after a crash all four agree unless a keyspace's table holds
/// writes its journal lost (see [`Store::open`]). Local, as the garbage
/// list is: snapshots leave it out. After every copy's range (no shard is
/// numbered 0xFFFF_FFFF) and every key under 16 bytes of 0xFF.
const APPLIED_MARKER: &[u8] =
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xffapplied";
/// Written into the one data keyspace of earlier stores before a copy's
/// tables were dropped; skipped when that keyspace is split by copy.
/// Local; after every copy's range, like [`APPLIED_MARKER`].
const SWEEP_MARKER: &[u8] =
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xffswept";
const META_STATE: &[u8] = b"state";
/// Copies being dropped (local, not replicated: nothing reads them).
const META_GARBAGE: &[u8] = b"garbage";
/// Prefix of the slot of the last commit that wrote to each copy's
/// keyspace, as that keyspace's [`APPLIED_MARKER`] holds it (local).
const META_COPY_WRITTEN: &[u8] = b"written/";

fn copy_written_key(copy: CopyId) -> Vec<u8> {
    [META_COPY_WRITTEN, &copy.prefix()[..]].concat()
}
/// Prefix of the markers of shard copies fetched from another group and
/// complete (local: each replica fetches its own).
const META_STAGED: &[u8] = b"staged/";
/// Names the live generation directory.
const CURRENT: &str = "CURRENT";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store at {path}: {message}")]
    Engine { path: PathBuf, message: String },
    /// Its checksums or its own records do not add up: nothing it holds
    /// can be trusted, so the replica stops rather than answer from it.
    #[error(
        "state store at {path} is damaged ({message}); remove the store's directory \
         (the replica's data dir/state) and restart: the replica rebuilds it from its \
         group's peers, its Paxos log and votes kept"
    )]
    Corrupt { path: PathBuf, message: String },
    /// A peer sent records this store cannot take: the transfer fails and
    /// is tried again; nothing local is damaged.
    #[error("state store at {path}: refused a streamed record: {message}")]
    BadStream { path: PathBuf, message: String },
    /// The disk is full: a write failed and nothing of it was applied.
    #[error("state store at {path}: the disk is full ({message}); free space and restart")]
    Full { path: PathBuf, message: String },
    /// Another open store holds the directory's lock: two engines on one
    /// directory would delete each other's files.
    #[error("state store at {path} is in use by another open store (its lock is held)")]
    InUse { path: PathBuf },
}

impl StoreError {
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }

    pub fn is_in_use(&self) -> bool {
        matches!(self, StoreError::InUse { .. })
    }
}

/// Which keyspace a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Space {
    Meta = 0,
    Data = 1,
    Sessions = 2,
    Idle = 3,
}

/// A copy of one shard: `gen` is the configuration in which this group
/// came to own it, so copies of the same shard never share keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CopyId {
    pub shard: u32,
    pub generation: u64,
}

impl CopyId {
    pub fn prefix(&self) -> [u8; 12] {
        let mut p = [0u8; 12];
        p[..4].copy_from_slice(&self.shard.to_be_bytes());
        p[4..].copy_from_slice(&self.generation.to_be_bytes());
        p
    }

    pub fn key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(12 + suffix.len());
        k.extend_from_slice(&self.prefix());
        k.extend_from_slice(suffix);
        k
    }
}

/// One record of a snapshot stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub space: Space,
    pub key: Bytes,
    pub value: Bytes,
}

impl Record {
    pub fn size_bytes(&self) -> usize {
        record_size_bytes(&self.key, &self.value)
    }
}

/// What a record counts against a chunk's [`super::snapshot::CHUNK_BYTES`].
pub fn record_size_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 8
}

/// A record as a scan of the store yields it, its key and value in the
/// engine's own buffers: a stream encodes them straight into its chunk.
/// As [`Record`]s, two allocations and copies a record took a quarter of
/// a sending thread's time.
pub struct RecordView {
    pub space: Space,
    /// The stored key, of which the record's starts at `key_from` (after
    /// a copy's prefix).
    key: fjall::Slice,
    key_from: usize,
    value: fjall::Slice,
}

impl RecordView {
    pub fn key(&self) -> &[u8] {
        &self.key[self.key_from..]
    }

    pub fn value(&self) -> &[u8] {
        &self.value
    }

    pub fn to_record(&self) -> Record {
        Record {
            space: self.space,
            key: Bytes::copy_from_slice(self.key()),
            value: Bytes::copy_from_slice(self.value()),
        }
    }
}

/// What a shard copy's stream holds, vouched for by its sender and logged
/// by the receiving group: every replica that fetches the copy must get
/// exactly these records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CopySummary {
    pub records: u64,
    pub crc32: u32,
    pub keys: u64,
    pub sessions: u64,
}

fn staged_key(copy: CopyId) -> Vec<u8> {
    let mut k = META_STAGED.to_vec();
    k.extend_from_slice(&copy.prefix());
    k
}

/// Writes a shard copy fetched from another group into the live store,
/// beside the replicated state: it touches only the keys of a copy that is
/// still being pulled, which nothing else reads or writes.
#[derive(Clone)]
pub struct Stager {
    keyspaces: Keyspaces,
}

impl Stager {
    /// Removes whatever a cut-short fetch left of `copy`, marker first.
    pub fn clear(&self, copy: CopyId) -> Result<(), StoreError> {
        self.keyspaces
            .meta
            .remove(staged_key(copy))
            .map_err(|e| self.err(e))?;
        let never = std::sync::atomic::AtomicBool::new(false);
        remove_copy_keys(&self.keyspaces, copy, &never)?;
        Ok(())
    }

    /// Writes a copy's records (keys without the copy prefix) chunk by
    /// chunk as `next_chunk` yields them, until it yields `None`.
    ///
    /// The data goes to the engine as an ingestion into the copy's own
    /// keyspace: straight into new tables, in key order, without the
    /// journal or a memtable. Through write batches a copy was written
    /// four times (journal, memtable flush, two compactions) and cost the
    /// receiving replicas most of a move's CPU. Sessions, a few per
    /// client, go in ordinary batches.
    ///
    /// An ingestion, once started, is always finished, even when the
    /// stream fails: its tables are then registered in the copy's
    /// keyspace like the partial batches they replace, and the next
    /// attempt clears them ([`Stager::clear`]); never left as files the
    /// engine does not know. Other batches (clears, staged markers) may
    /// lose their other keyspaces' part while the data part survives;
    /// each is redone whole, so that only repeats it.
    pub fn write_copy(
        &self,
        copy: CopyId,
        mut next_chunk: impl FnMut() -> Result<Option<Vec<Record>>, String>,
    ) -> Result<(), String> {
        let data = self
            .keyspaces
            .copy_or_create(copy)
            .map_err(|e| e.to_string())?;
        let mut ingestion = None;
        let prefix = copy.prefix();
        // Two buffers, swapped: the key being written and the data key
        // before it (empty before the first; a stored key never is). The
        // engine copies what it keeps, so a record costs no allocation
        // here.
        let mut key = Vec::new();
        let mut last_data_key = Vec::new();
        let mut write = |records: Vec<Record>, ingestion: &mut Option<_>| {
            let mut sessions = self.keyspaces.db.batch();
            for r in records {
                if r.key.is_empty() || r.key.len() > USER_KEY_BYTES_MAX {
                    return Err(self
                        .bad_stream(format!("a shard stream has a key of {} bytes", r.key.len())));
                }
                key.clear();
                key.extend_from_slice(&prefix);
                key.extend_from_slice(&r.key);
                match r.space {
                    Space::Data => {
                        // The engine panics on keys out of order: refuse
                        // them as the bad input they are.
                        if !last_data_key.is_empty() && key <= last_data_key {
                            return Err(self.bad_stream(
                                "a shard stream's data keys are not in ascending order".into(),
                            ));
                        }
                        if ingestion.is_none() {
                            *ingestion = Some(data.start_ingestion().map_err(|e| self.err(e))?);
                        }
                        if let Some(ingestion) = ingestion.as_mut() {
                            ingestion
                                .write(&key[..], &r.value[..])
                                .map_err(|e| self.err(e))?;
                        }
                        std::mem::swap(&mut key, &mut last_data_key);
                    }
                    Space::Sessions => {
                        sessions.insert(&self.keyspaces.sessions, &key[..], &r.value[..])
                    }
                    other => {
                        return Err(
                            self.bad_stream(format!("a shard stream holds a {other:?} record"))
                        )
                    }
                }
            }
            sessions.commit().map_err(|e| self.err(e))
        };
        let written = loop {
            match next_chunk() {
                Ok(Some(records)) => {
                    if let Err(e) = write(records, &mut ingestion) {
                        break Err(e.to_string());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let finished = match ingestion {
            Some(ingestion) => ingestion.finish().map_err(|e| self.err(e).to_string()),
            None => Ok(()),
        };
        match (written, finished) {
            (Err(e), Err(f)) => {
                tracing::warn!(error = %f, "cannot register a cut-short copy's tables");
                Err(e)
            }
            (written, finished) => written.and(finished),
        }
    }

    fn err(&self, e: fjall::Error) -> StoreError {
        self.keyspaces.err(e)
    }

    fn bad_stream(&self, message: String) -> StoreError {
        StoreError::BadStream {
            path: self.keyspaces.path.clone(),
            message,
        }
    }

    /// The summary of `copy`, once a fetch has completed it.
    pub fn staged(&self, copy: CopyId) -> Result<Option<CopySummary>, StoreError> {
        let bytes = self
            .keyspaces
            .meta
            .get(staged_key(copy))
            .map_err(|e| self.err(e))?;
        bytes
            .map(|bytes| {
                postcard::from_bytes(&bytes).map_err(|e| StoreError::Corrupt {
                    path: self.keyspaces.path.clone(),
                    message: format!("staged copy marker: {e}"),
                })
            })
            .transpose()
    }

    /// Records that `copy` is complete: written after its last chunk, so
    /// after a crash the marker is there only if the records are.
    pub fn mark_staged(&self, copy: CopyId, summary: CopySummary) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(&summary).map_err(|e| self.keyspaces.err(e))?;
        self.keyspaces
            .meta
            .insert(staged_key(copy), bytes)
            .map_err(|e| self.err(e))
    }
}

/// The open store and the overlay of writes not yet committed.
pub struct Store {
    /// The store's directory: generations and `CURRENT` live in it.
    base: PathBuf,
    /// The live generation, and its directory.
    generation: u64,
    path: PathBuf,
    keyspaces: Keyspaces,
    /// Writes applied since the last commit (`None`: removed). Reads look
    /// here first, so a command sees the ones before it in the same turn.
    overlay: BTreeMap<(Space, Vec<u8>), Option<Bytes>>,
    /// Copies installed since the last commit: marked written by it (see
    /// `check_applied_markers`), as if their data had been, so that one
    /// only fetched is checked too.
    installed: BTreeSet<CopyId>,
    /// Copies whose keys are still being removed (by `sweeper`).
    garbage: BTreeSet<CopyId>,
    /// Removes the store's directory on drop (tests).
    temporary: bool,
    /// Memory bounds, for this generation and the ones imported after it.
    options: StoreOptions,
    /// The removal of the first copy in `garbage` under way (after a
    /// restart it starts over, once).
    sweeper: Option<Sweeper>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Before the directory may go (a switch removes it next).
        if let Some(sweeper) = self.sweeper.take() {
            sweeper
                .stop
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = sweeper.thread.join();
        }
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// Classifies an engine, I/O or encoding failure: damage the engine's
/// checksums caught and a full disk each get their own variant.
fn engine_error<E: std::fmt::Display + 'static>(path: &Path, e: E) -> StoreError {
    let path = path.to_path_buf();
    let message = e.to_string();
    let any = &e as &dyn std::any::Any;
    let io = any.downcast_ref::<std::io::Error>().or_else(|| {
        match any.downcast_ref::<fjall::Error>()? {
            fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => Some(e),
            _ => None,
        }
    });
    if io.is_some_and(|e| e.kind() == std::io::ErrorKind::StorageFull) {
        return StoreError::Full { path, message };
    }
    if matches!(
        any.downcast_ref::<fjall::Error>(),
        Some(fjall::Error::Locked)
    ) {
        return StoreError::InUse { path };
    }
    let damaged = match any.downcast_ref::<fjall::Error>() {
        Some(fjall::Error::Storage(e)) => !matches!(e, fjall::LsmError::Io(_)),
        Some(
            fjall::Error::JournalRecovery(_)
            | fjall::Error::InvalidVersion(_)
            | fjall::Error::Decompress(_)
            | fjall::Error::InvalidTrailer
            | fjall::Error::InvalidTag(_)
            | fjall::Error::Unrecoverable,
        ) => true,
        _ => false,
    };
    if damaged {
        StoreError::Corrupt { path, message }
    } else {
        StoreError::Engine { path, message }
    }
}

/// How every keyspace of a store is made (set at creation; a store keeps
/// what it was created with).
fn keyspace_options(options: StoreOptions) -> fjall::KeyspaceCreateOptions {
    fjall::KeyspaceCreateOptions::default()
        .manual_journal_persist(true)
        .max_memtable_size(options.memtable_bytes)
        // Below L0, whose indexes and filters are pinned whole, a table's
        // index and filter come in 4 KiB partitions under a small pinned
        // top level. Whole, each point read that missed the cache read
        // and checksummed the table's entire index (hundreds of KiB): at
        // 1 GiB of data, 80% of the apply thread's time. An ingested copy
        // is written as L1 tables, so L1 is partitioned too: whole, an
        // open loaded the index of every copy.
        .index_block_partitioning_policy(fjall::config::PartitioningPolicy::new([false, true]))
        .filter_block_partitioning_policy(fjall::config::PartitioningPolicy::new([false, true]))
        // Compressed at every level: the engine's default leaves L0 and L1
        // uncompressed, and an ingested copy, written as L1 tables and
        // moved down whole, stayed so (at 1 GiB of the benchmark's values,
        // 1,021 MiB on disk against 380 compacted).
        .data_block_compression_policy(fjall::config::CompressionPolicy::all(
            fjall::CompressionType::Lz4,
        ))
}

/// The keyspace that held every copy's data before each copy had its own.
/// It stays, holding only [`LEGACY_FENCE`] as its applied slot: a binary
/// from before opens it as its data and, finding that slot different from
/// the group state's, refuses the store as damaged, instead of serving
/// every shard empty.
const LEGACY_DATA: &str = "data";

/// The applied slot the legacy data keyspace holds once split (no slot
/// ever reaches it).
const LEGACY_FENCE: u64 = u64::MAX;

/// The name of a copy's data keyspace.
fn copy_keyspace_name(copy: CopyId) -> String {
    format!("data-{}-{}", copy.shard, copy.generation)
}

fn copy_of_keyspace_name(name: &str) -> Option<CopyId> {
    let (shard, generation) = name.strip_prefix("data-")?.split_once('-')?;
    Some(CopyId {
        shard: shard.parse().ok()?,
        generation: generation.parse().ok()?,
    })
}

/// The copy a data key belongs to (its first 12 bytes).
fn copy_of_key(key: &[u8]) -> Option<CopyId> {
    Some(CopyId {
        shard: u32::from_be_bytes(key.get(..4)?.try_into().ok()?),
        generation: u64::from_be_bytes(key.get(4..12)?.try_into().ok()?),
    })
}

/// An open database's keyspaces: three that every copy shares (the group's
/// state, sessions, and their expiry order) and one for each copy's data.
///
/// A keyspace per copy, because in one LSM tree a copy fetched whole and
/// the writes to the shards around it kept meeting: writes to the shards
/// being served reach tables whose key range spans the copies still being
/// ingested, and each such ingestion was merged and rewritten instead of
/// moved down whole; a copy moved away was deleted a key at a time and
/// compacted against the rest. A join at 1 GiB made the receiving group
/// write 4.3 times what it received and the giving group 3.7 GB. In a
/// tree of its own a fetched copy is ingested once, and a copy that goes
/// is a keyspace deleted.
#[derive(Clone)]
struct Keyspaces {
    db: fjall::Database,
    meta: fjall::Keyspace,
    sessions: fjall::Keyspace,
    idle: fjall::Keyspace,
    /// Each copy's data keyspace. Shared by the store, its stager and its
    /// sweeper: a fetch creates one while the apply thread writes others.
    copies: std::sync::Arc<std::sync::Mutex<BTreeMap<CopyId, fjall::Keyspace>>>,
    options: StoreOptions,
    path: PathBuf,
}

impl Keyspaces {
    fn open(path: &Path, options: StoreOptions) -> Result<Keyspaces, StoreError> {
        let db = fjall::Database::builder(path)
            .cache_size(options.cache_bytes)
            // Applying never waits for the disk: `persist` syncs when the
            // log is to be compacted.
            .manual_journal_persist(true)
            .worker_threads(options.engine_threads)
            .max_journaling_size(
                options
                    .journal_bytes_max
                    .max(StoreOptions::JOURNAL_BYTES_MIN),
            )
            .open()
            .map_err(|e| engine_error(path, e))?;
        let open = |name: &str| {
            db.keyspace(name, || keyspace_options(options))
                .map_err(|e| engine_error(path, e))
        };
        let mut copies = BTreeMap::new();
        for name in db.list_keyspace_names() {
            if let Some(copy) = copy_of_keyspace_name(&name) {
                copies.insert(copy, open(&name)?);
            }
        }
        let keyspaces = Keyspaces {
            meta: open("meta")?,
            sessions: open("sessions")?,
            idle: open("idle")?,
            db,
            copies: std::sync::Arc::new(std::sync::Mutex::new(copies)),
            options,
            path: path.to_path_buf(),
        };
        keyspaces.split_legacy_data()?;
        Ok(keyspaces)
    }

    fn err(&self, e: impl std::fmt::Display + 'static) -> StoreError {
        engine_error(&self.path, e)
    }

    fn copies(&self) -> std::sync::MutexGuard<'_, BTreeMap<CopyId, fjall::Keyspace>> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One of the shared keyspaces (the data is in [`Self::copy`]).
    fn shared(&self, space: Space) -> &fjall::Keyspace {
        debug_assert!(space != Space::Data, "the data has a keyspace per copy");
        match space {
            Space::Meta | Space::Data => &self.meta,
            Space::Sessions => &self.sessions,
            Space::Idle => &self.idle,
        }
    }

    /// The data keyspace of `copy`, if it has one.
    fn copy(&self, copy: CopyId) -> Option<fjall::Keyspace> {
        self.copies().get(&copy).cloned()
    }

    /// The data keyspace of `copy`, made if it has none.
    ///
    /// The engine makes it with a few syncs, outside this map's lock:
    /// every read of the data takes that lock.
    fn copy_or_create(&self, copy: CopyId) -> Result<fjall::Keyspace, StoreError> {
        if let Some(keyspace) = self.copies().get(&copy) {
            return Ok(keyspace.clone());
        }
        let keyspace = self
            .db
            .keyspace(&copy_keyspace_name(copy), || keyspace_options(self.options))
            .map_err(|e| self.err(e))?;
        Ok(self.copies().entry(copy).or_insert(keyspace).clone())
    }

    /// Deletes the data keyspace of `copy` (durably, at once). Handles
    /// still open (a view's) keep reading it until they are dropped.
    ///
    /// Under the map's lock: a `copy_or_create` between taking it out of
    /// the map and deleting it would get the doomed keyspace back from the
    /// engine by name, and writes through it would be lost.
    fn delete_copy(&self, copy: CopyId) -> Result<(), StoreError> {
        let mut copies = self.copies();
        let Some(keyspace) = copies.remove(&copy) else {
            return Ok(());
        };
        self.db.delete_keyspace(keyspace).map_err(|e| self.err(e))
    }

    /// Every copy's data keyspace, in copy order.
    fn all_copies(&self) -> Vec<(CopyId, fjall::Keyspace)> {
        self.copies()
            .iter()
            .map(|(copy, keyspace)| (*copy, keyspace.clone()))
            .collect()
    }

    /// Moves the data of a store written before each copy had a keyspace
    /// (one `data` keyspace for all) into a keyspace per copy, once: each
    /// copy ingested, then the old keyspace deleted. A crash in between
    /// does it again from the start. O(data), at the first open only.
    fn split_legacy_data(&self) -> Result<(), StoreError> {
        let fence = LEGACY_FENCE.to_be_bytes();
        let legacy = self
            .db
            .keyspace(LEGACY_DATA, || keyspace_options(self.options))
            .map_err(|e| self.err(e))?;
        // Only data keys make a store to split, and the markers sort after
        // every copy's keys: the first key says.
        let first = (legacy.first_key_value().map(|guard| guard.key()))
            .transpose()
            .map_err(|e| self.err(e))?;
        let holds_data = first.is_some_and(|key| key != APPLIED_MARKER && key != SWEEP_MARKER);
        if !holds_data {
            // A new store, one split already, or one whose split ended
            // once the old keyspace was deleted: fenced, durably (a new
            // keyspace is durable at once, an insert only once synced).
            // Never taken for a split cut short: that would delete the
            // copies' keyspaces.
            let marker = legacy.get(APPLIED_MARKER).map_err(|e| self.err(e))?;
            if marker.as_deref() != Some(&fence[..]) {
                legacy
                    .insert(APPLIED_MARKER, fence)
                    .map_err(|e| self.err(e))?;
                self.db
                    .persist(fjall::PersistMode::SyncAll)
                    .map_err(|e| self.err(e))?;
            }
            return Ok(());
        }
        let marker = legacy.get(APPLIED_MARKER).map_err(|e| self.err(e))?;
        // Its commit marker must agree with the group's state, as the
        // shared keyspaces' do (see `Store::check_applied_markers`).
        let applied = self.meta.get(META_APPLIED).map_err(|e| self.err(e))?;
        if marker.is_some() && marker.as_deref() != applied.as_deref() {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                message: "its data keyspace and the group state reach different commits".into(),
            });
        }
        tracing::info!(path = %self.path.display(), "giving each shard copy a keyspace of its own (once)");
        for (_, keyspace) in self.all_copies() {
            // What a cut-short split left.
            self.db.delete_keyspace(keyspace).map_err(|e| self.err(e))?;
        }
        self.copies().clear();
        let mut items = legacy
            .iter()
            .map(|item| item.into_inner().map_err(|e| self.err(e)))
            .filter(|item| {
                !item.as_ref().is_ok_and(|(key, _)| {
                    key.as_ref() == APPLIED_MARKER || key.as_ref() == SWEEP_MARKER
                })
            })
            .peekable();
        loop {
            let copy = match items.peek() {
                None => break,
                Some(Ok((key, _))) => match copy_of_key(key) {
                    Some(copy) => copy,
                    None => {
                        // Nothing reads a key outside every copy.
                        tracing::warn!(bytes = key.len(), "dropping a data key of no copy");
                        items.next();
                        continue;
                    }
                },
                Some(Err(_)) => match items.next() {
                    Some(Err(e)) => return Err(e),
                    _ => continue,
                },
            };
            let keyspace = self.copy_or_create(copy)?;
            let mut ingestion = keyspace.start_ingestion().map_err(|e| self.err(e))?;
            while let Some(Ok((key, _))) = items.peek() {
                if copy_of_key(key) != Some(copy) {
                    break;
                }
                if let Some(Ok((key, value))) = items.next() {
                    ingestion.write(key, value).map_err(|e| self.err(e))?;
                }
            }
            ingestion.finish().map_err(|e| self.err(e))?;
        }
        drop(items);
        // Emptied, then fenced: deleted, a binary from before would make
        // it again, empty, and serve every shard so.
        self.db.delete_keyspace(legacy).map_err(|e| self.err(e))?;
        let fenced = self
            .db
            .keyspace(LEGACY_DATA, || keyspace_options(self.options))
            .map_err(|e| self.err(e))?;
        fenced
            .insert(APPLIED_MARKER, fence)
            .map_err(|e| self.err(e))?;
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| self.err(e))
    }
}

fn generation_dir(base: &Path, generation: u64) -> PathBuf {
    base.join(format!("gen-{generation}"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The live generation named by `CURRENT` (0 for a new store).
fn read_current(base: &Path) -> Result<u64, StoreError> {
    match std::fs::read_to_string(base.join(CURRENT)) {
        Ok(text) => text.trim().parse().map_err(|_| StoreError::Corrupt {
            path: base.to_path_buf(),
            message: format!("{CURRENT} holds {text:?}, not a generation number"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(engine_error(base, e)),
    }
}

/// Makes `generation` the live one: the switch's only commit point.
fn write_current(base: &Path, generation: u64) -> Result<(), StoreError> {
    let io = |e: std::io::Error| engine_error(base, e);
    let tmp = base.join(format!("{CURRENT}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(generation.to_string().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, base.join(CURRENT)).map_err(io)?;
    sync_dir(base).map_err(io)
}

/// Removes every generation directory but the live one: imports a crash
/// cut short, and generations switched away from.
fn remove_other_generations(base: &Path, live: u64) -> Result<(), StoreError> {
    let keep = format!("gen-{live}");
    for entry in std::fs::read_dir(base).map_err(|e| engine_error(base, e))? {
        let entry = entry.map_err(|e| engine_error(base, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("gen-") && name != keep {
            std::fs::remove_dir_all(entry.path()).map_err(|e| engine_error(base, e))?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens the store at `base`, creating it if absent; what a crash left
    /// of an import is removed.
    pub fn open(base: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        Self::open_with(base, false, options)
    }

    /// A store removed when dropped, for tests.
    pub fn temporary(base: &Path) -> Result<Store, StoreError> {
        Self::open_with(base, true, StoreOptions::default())
    }

    fn open_with(base: &Path, temporary: bool, options: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(base).map_err(|e| engine_error(base, e))?;
        let generation = read_current(base)?;
        remove_other_generations(base, generation)?;
        Self::open_generation(base, generation, temporary, options)
    }

    fn open_generation(
        base: &Path,
        generation: u64,
        temporary: bool,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let path = generation_dir(base, generation);
        let keyspaces = Keyspaces::open(&path, options)?;
        let mut store = Store {
            base: base.to_path_buf(),
            generation,
            path,
            keyspaces,
            overlay: BTreeMap::new(),
            installed: BTreeSet::new(),
            garbage: BTreeSet::new(),
            temporary,
            options,
            sweeper: None,
        };
        if let Some(bytes) = store.read_committed(Space::Meta, META_GARBAGE)? {
            store.garbage = postcard::from_bytes(&bytes).map_err(|e| StoreError::Corrupt {
                path: store.path.clone(),
                message: format!("garbage list: {e}"),
            })?;
        }
        store.check_applied_markers()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a store whose keyspaces reached different commits. Each
    /// keyspace is replayed from the one journal, so they agree after any
    /// `kill -9`; they disagree only when an OS crash or power loss took
    /// journal pages not yet synced while a table written from them
    /// survived. Its data is then ahead of its applied slot, or behind it,
    /// and the log's replay would apply some commands twice or miss them:
    /// the replica must be rebuilt from its peers instead.
    ///
    /// The shared keyspaces hold the slot of every commit; a copy's
    /// keyspace, the slot of the last commit that wrote to it, and the
    /// group state keeps the same slot for it ([`copy_written_key`]).
    /// (A store written before the markers has none until its first
    /// commit; a copy only fetched has none until a commit writes to it.)
    fn check_applied_markers(&self) -> Result<(), StoreError> {
        let decode = |bytes: Option<fjall::Slice>,
                      what: &str|
         -> Result<Option<Slot>, StoreError> {
            let Some(bytes) = bytes else {
                return Ok(None);
            };
            let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                path: self.path.clone(),
                message: format!("the applied slot in {what} is not 8 bytes"),
            })?;
            Ok(Some(u64::from_be_bytes(bytes)))
        };
        let ks = &self.keyspaces;
        let read =
            |keyspace: &fjall::Keyspace, key: &[u8]| keyspace.get(key).map_err(|e| ks.err(e));
        let mismatch =
            |what: String, marker: Option<Slot>, expected: Option<Slot>| StoreError::Corrupt {
                path: self.path.clone(),
                message: format!(
                    "{what} reaches slot {} but the group state says {}: writes lost from its \
                 journal in an OS crash survived in a table",
                    marker.unwrap_or(0),
                    expected.unwrap_or(0)
                ),
            };
        let applied = decode(read(&ks.meta, META_APPLIED)?, "meta")?;
        for space in [Space::Sessions, Space::Idle] {
            let marker = decode(read(ks.shared(space), APPLIED_MARKER)?, "a keyspace")?;
            if marker.is_some() && marker != applied {
                return Err(mismatch(format!("its {space:?} keyspace"), marker, applied));
            }
        }
        let copies = ks.all_copies();
        for (copy, keyspace) in &copies {
            let marker = decode(read(keyspace, APPLIED_MARKER)?, "a copy")?;
            let written = decode(read(&ks.meta, &copy_written_key(*copy))?, "meta")?;
            if marker != written {
                return Err(mismatch(
                    format!("the data of copy {copy:?}"),
                    marker,
                    written,
                ));
            }
        }
        for item in ks.meta.prefix(META_COPY_WRITTEN) {
            let key = item.key().map_err(|e| ks.err(e))?;
            let copy = copy_of_key(&key[META_COPY_WRITTEN.len()..]);
            let present = copy.is_some_and(|copy| copies.iter().any(|(c, _)| *c == copy));
            // A copy being dropped loses its keyspace before its mark.
            let dropping = copy.is_some_and(|copy| self.garbage.contains(&copy));
            if !present && !dropping {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    message: format!("the data of copy {copy:?} was written and is missing"),
                });
            }
        }
        Ok(())
    }

    fn read_committed(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let value = match space {
            Space::Data => match copy_of_key(key).and_then(|copy| self.keyspaces.copy(copy)) {
                Some(keyspace) => keyspace.get(key),
                None => return Ok(None),
            },
            _ => self.keyspaces.shared(space).get(key),
        };
        let value = value.map_err(|e| engine_error(&self.path, e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    /// The value as of the last write, committed or not.
    pub fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if let Some(pending) = self.overlay.get(&(space, key.to_vec())) {
            return Ok(pending.clone());
        }
        self.read_committed(space, key)
    }

    /// The engine's estimate of the records under `data`, in O(tables): it
    /// counts every version and deletion compaction has not yet merged.
    pub fn approximate_data_records(&self) -> u64 {
        (self.keyspaces.all_copies().iter())
            .map(|(_, keyspace)| keyspace.approximate_len() as u64)
            .sum()
    }

    pub fn put(&mut self, space: Space, key: Vec<u8>, value: Bytes) {
        self.overlay.insert((space, key), Some(value));
    }

    pub fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.overlay.insert((space, key), None);
    }

    /// Up to `limit` records with keys in `[start, end)`, in key order, the
    /// overlay included.
    pub fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Bytes>> = BTreeMap::new();
        let pending = self
            .overlay
            .range((space, start.to_vec())..(space, end.to_vec()));
        for ((_, key), value) in pending {
            merged.insert(key.clone(), value.clone());
        }
        // Enough committed records to fill `limit` after the overlay's
        // removals.
        let wanted = limit.saturating_add(merged.len());
        let keyspaces: Vec<fjall::Keyspace> = match space {
            // The copies whose keys may fall in the range, in key order.
            Space::Data => (self.keyspaces.all_copies().into_iter())
                .filter(|(copy, _)| {
                    let (first, next) = copy_range(*copy);
                    first.as_slice() < end && start < next.as_slice()
                })
                .map(|(_, keyspace)| keyspace)
                .collect(),
            _ => vec![self.keyspaces.shared(space).clone()],
        };
        let committed = (keyspaces.iter()).flat_map(|keyspace| keyspace.range(start..end));
        for item in committed.take(wanted) {
            let (key, value) = item.into_inner().map_err(|e| engine_error(&self.path, e))?;
            merged
                .entry(key.to_vec())
                .or_insert_with(|| Some(Bytes::copy_from_slice(&value)));
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .take(limit)
            .collect())
    }

    /// Every record of a copy, the overlay included: a copy's size.
    pub fn scan_copy(
        &self,
        space: Space,
        copy: CopyId,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StoreError> {
        let (start, end) = copy_range(copy);
        self.scan(space, &start, &end, usize::MAX)
    }

    /// The group's small state and the slot the committed data reaches.
    pub fn load_meta(&self) -> Result<(Slot, Option<Bytes>), StoreError> {
        let applied = match self.read_committed(Space::Meta, META_APPLIED)? {
            None => 0,
            Some(b) => {
                u64::from_be_bytes(b.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    message: "applied slot is not 8 bytes".into(),
                })?)
            }
        };
        Ok((applied, self.read_committed(Space::Meta, META_STATE)?))
    }

    /// Writes the overlay, the group's state (if changed), the copies
    /// `dropped` this turn and the applied slot in one atomic batch,
    /// without fsync.
    pub fn commit(
        &mut self,
        applied: Slot,
        state: Option<Bytes>,
        dropped: Vec<CopyId>,
    ) -> Result<(), StoreError> {
        let ks = &self.keyspaces;
        let mut batch = ks.db.batch();
        let mut written = std::mem::take(&mut self.installed);
        for ((space, key), value) in std::mem::take(&mut self.overlay) {
            let keyspace = match space {
                Space::Data => {
                    let copy = copy_of_key(&key).ok_or_else(|| {
                        engine_error(&self.path, "a data key shorter than a copy's prefix")
                    })?;
                    written.insert(copy);
                    ks.copy_or_create(copy)?
                }
                _ => ks.shared(space).clone(),
            };
            match value {
                Some(v) => batch.insert(&keyspace, key, v.to_vec()),
                None => batch.remove(&keyspace, key),
            }
        }
        if let Some(state) = state {
            batch.insert(&ks.meta, META_STATE, state.to_vec());
        }
        if !dropped.is_empty() {
            // With the turn that forgets them: after a crash a copy is in
            // the group's state or in this list, never in neither.
            self.garbage.extend(dropped);
            batch.insert(&ks.meta, META_GARBAGE, self.garbage_bytes()?);
        }
        let slot = applied.to_be_bytes();
        batch.insert(&ks.meta, META_APPLIED, slot.to_vec());
        for space in [Space::Sessions, Space::Idle] {
            batch.insert(ks.shared(space), APPLIED_MARKER, slot.to_vec());
        }
        // A copy's keyspace and the group state say which commit last
        // wrote to it (see `check_applied_markers`).
        for copy in written {
            if let Some(keyspace) = ks.copy(copy) {
                batch.insert(&keyspace, APPLIED_MARKER, slot.to_vec());
                batch.insert(&ks.meta, copy_written_key(copy), slot.to_vec());
            }
        }
        // The journal buffers its tail in the process. The engine's own
        // flushes hand that buffer to the OS first, but an ingestion
        // flushes its keyspace's memtable without: its table could then
        // hold writes a `kill -9` takes from the journal, the data ahead of
        // its applied slot. Handed to the OS here, before the batch
        // reaches a memtable (one write(2), no fsync).
        batch
            .durability(Some(fjall::PersistMode::Buffer))
            .commit()
            .map_err(|e| engine_error(&self.path, e))?;
        // Committed: a failure to seal is only reported (the next commit
        // tries again).
        if let Err(e) = self.bound_memtables() {
            tracing::warn!(error = %e, "cannot seal the largest memtables");
        }
        Ok(())
    }

    /// Keeps the active memtables of all keyspaces together within
    /// [`StoreOptions::active_memtables_bytes_max`]. The engine bounds each
    /// keyspace's memtables, but not their sum (its own bound is not
    /// implemented in fjall 3.1), and its journal bound is checked only
    /// when some memtable fills: with a keyspace per copy the writes are
    /// divided among many memtables that each fill slowly, and 64 of them
    /// could hold a gigabyte. Past the bound the largest are sealed, to
    /// be flushed, down to half of it. (Reads the engine's own memtable
    /// sizes: internals, pinned with its version.)
    fn bound_memtables(&self) -> Result<(), StoreError> {
        use fjall::AbstractTree;
        let ks = &self.keyspaces;
        let size = |keyspace: &fjall::Keyspace| keyspace.tree.active_memtable().size();
        let shared = [&ks.meta, &ks.sessions, &ks.idle];
        // Every commit: a sum under the lock, nothing copied. Not the
        // copies being dropped: their keyspaces are about to go.
        let mut active: u64 = shared.iter().map(|keyspace| size(keyspace)).sum::<u64>()
            + (ks.copies().iter())
                .filter(|(copy, _)| !self.garbage.contains(copy))
                .map(|(_, keyspace)| size(keyspace))
                .sum::<u64>();
        let budget = self.options.active_memtables_bytes_max();
        if active <= budget {
            return Ok(());
        }
        let copies = (ks.all_copies().into_iter())
            .filter(|(copy, _)| !self.garbage.contains(copy))
            .map(|(_, keyspace)| keyspace);
        let mut keyspaces: Vec<(u64, fjall::Keyspace)> = (shared.into_iter().cloned())
            .chain(copies)
            .map(|keyspace| (size(&keyspace), keyspace))
            .collect();
        keyspaces.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
        for (size, keyspace) in keyspaces {
            if active <= budget / 2 {
                break;
            }
            keyspace
                .rotate_memtable()
                .map_err(|e| engine_error(&self.path, e))?;
            active = active.saturating_sub(size);
        }
        Ok(())
    }

    /// Makes every commit so far durable.
    pub fn persist(&self) -> Result<(), StoreError> {
        self.keyspaces
            .db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| engine_error(&self.path, e))
    }

    fn garbage_bytes(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_allocvec(&self.garbage).map_err(|e| engine_error(&self.path, e))
    }

    /// True while some dropped copy still has keys on disk.
    pub fn sweeping(&self) -> bool {
        !self.garbage.is_empty()
    }

    /// Moves the removal of dropped copies on: once the thread removing
    /// one has finished, forgets the copy (the list written in a batch of
    /// its own, after every batch of the thread's), and starts the next.
    /// A crash before that write sweeps the copy again, finding nothing.
    pub fn sweep(&mut self) -> Result<(), StoreError> {
        if self
            .sweeper
            .as_ref()
            .is_some_and(|s| s.thread.is_finished())
        {
            self.finish_sweep()?;
        }
        if self.sweeper.is_some() {
            return Ok(());
        }
        let Some(&copy) = self.garbage.first() else {
            return Ok(());
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keyspaces = self.keyspaces.clone();
        let stopped = stop.clone();
        let thread = super::snapshot::spawn_transfer("shardkv-sweep", move || {
            remove_copy_keys(&keyspaces, copy, &stopped)
        })
        .map_err(|e| engine_error(&self.path, e))?;
        self.sweeper = Some(Sweeper { copy, stop, thread });
        Ok(())
    }

    /// Waits for the sweep under way, then records its copy as gone.
    fn finish_sweep(&mut self) -> Result<(), StoreError> {
        let Some(sweeper) = self.sweeper.take() else {
            return Ok(());
        };
        let swept = (sweeper.thread.join())
            .map_err(|_| engine_error(&self.path, "the sweep thread panicked"))??;
        debug_assert!(swept, "only a closing store stops its sweep");
        if swept {
            // After the keyspace's deletion, which is durable: its mark may
            // go, and the list (see `check_applied_markers`).
            self.garbage.remove(&sweeper.copy);
            let meta = &self.keyspaces.meta;
            let mut batch = self.keyspaces.db.batch();
            batch.insert(meta, META_GARBAGE, self.garbage_bytes()?);
            batch.remove(meta, copy_written_key(sweeper.copy));
            batch.commit().map_err(|e| engine_error(&self.path, e))?;
        }
        Ok(())
    }

    /// Sweeps every dropped copy to the end, waiting (tests).
    #[cfg(test)]
    pub fn sweep_to_end(&mut self) -> Result<(), StoreError> {
        while self.sweeping() {
            self.sweep()?;
            self.finish_sweep()?;
        }
        Ok(())
    }

    /// A handle for fetching shard copies into this store.
    pub fn stager(&self) -> Stager {
        Stager {
            keyspaces: self.keyspaces.clone(),
        }
    }

    /// The summary of a fetched copy, once complete.
    pub fn staged(&self, copy: CopyId) -> Result<Option<CopySummary>, StoreError> {
        match self.get(Space::Meta, &staged_key(copy))? {
            None => Ok(None),
            Some(bytes) => {
                postcard::from_bytes(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path: self.path.clone(),
                        message: format!("staged copy marker: {e}"),
                    })
            }
        }
    }

    /// Forgets a fetched copy's marker (with the turn's writes): it is
    /// installed.
    pub fn unmark_staged(&mut self, copy: CopyId) {
        self.delete(Space::Meta, staged_key(copy));
        self.installed.insert(copy);
    }

    /// Drops the writes not yet committed (before the whole store is
    /// replaced by a peer's, which holds them).
    pub fn discard_overlay(&mut self) {
        self.overlay.clear();
        self.installed.clear();
    }

    /// A point-in-time view of the committed state, for a snapshot stream
    /// or a shard copy. Cheap: it pins versions, it copies nothing.
    pub fn view(&self) -> StoreView {
        let ks = &self.keyspaces;
        let copies = ks.all_copies();
        StoreView {
            snapshot: ks.db.snapshot(),
            shared: [ks.meta.clone(), ks.sessions.clone(), ks.idle.clone()],
            copies,
            garbage: self.garbage.clone(),
            path: self.path.clone(),
        }
    }

    /// Starts building a fresh store beside this one, from a snapshot
    /// stream. A partial import left by an earlier attempt is discarded.
    pub fn import(&self) -> Result<Import, StoreError> {
        let generation = self.generation + 1;
        let path = generation_dir(&self.base, generation);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| engine_error(&path, e))?;
        }
        let keyspaces = Keyspaces::open(&path, self.options)?;
        Ok(Import {
            options: self.options,
            path,
            generation,
            keyspaces: Some(keyspaces),
            records: 0,
            checksum: crc32fast::Hasher::new(),
        })
    }

    /// Replaces this store by a finished import, atomically: a crash at any
    /// point leaves either the old store or the new one at the next open.
    /// Views of the old store still open keep reading their own directory
    /// until it is removed, and then fail; they never see the new one.
    pub fn switch_to_imported(&mut self, import: FinishedImport) -> Result<(), StoreError> {
        if !self.overlay.is_empty() {
            return Err(engine_error(
                &self.path,
                "uncommitted writes would be lost by a switch",
            ));
        }
        if import.generation != self.generation + 1 {
            return Err(engine_error(
                &self.path,
                "the import is not of the next generation",
            ));
        }
        let generation = import.generation;
        write_current(&self.base, generation)?;
        let reopened =
            Store::open_generation(&self.base, generation, self.temporary, self.options)?;
        // The old handles go first (the temporary flag must not remove the
        // base with them).
        self.temporary = false;
        *self = reopened;
        // After the switch, and not fatal: a shard fetch under way may
        // still be writing files into the old generation (its writes are
        // lost, and it is retried into this one). What is left goes at the
        // next open.
        if let Err(e) = remove_other_generations(&self.base, generation) {
            tracing::warn!(error = %e, "cannot yet remove the store's old generation");
        }
        Ok(())
    }
}

fn copy_range(copy: CopyId) -> (Vec<u8>, Vec<u8>) {
    let next = match copy.generation.checked_add(1) {
        Some(generation) => CopyId {
            shard: copy.shard,
            generation,
        },
        None => CopyId {
            shard: copy.shard.saturating_add(1),
            generation: 0,
        },
    };
    (copy.prefix().to_vec(), next.prefix().to_vec())
}

/// A point-in-time view of a store.
pub struct StoreView {
    snapshot: fjall::Snapshot,
    /// Meta, sessions and idle.
    shared: [fjall::Keyspace; 3],
    /// Each copy's data keyspace, in copy order: handles kept open, so a
    /// copy deleted since still reads as of the snapshot.
    copies: Vec<(CopyId, fjall::Keyspace)>,
    garbage: BTreeSet<CopyId>,
    path: PathBuf,
}

impl StoreView {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One of the shared keyspaces.
    fn shared(&self, space: Space) -> &fjall::Keyspace {
        debug_assert!(space != Space::Data, "the data has a keyspace per copy");
        match space {
            Space::Meta | Space::Data => &self.shared[0],
            Space::Sessions => &self.shared[1],
            Space::Idle => &self.shared[2],
        }
    }

    fn copy(&self, copy: CopyId) -> Option<&fjall::Keyspace> {
        (self.copies.binary_search_by_key(&copy, |(c, _)| *c).ok()).map(|i| &self.copies[i].1)
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let value = self
            .snapshot
            .get(self.shared(space), key)
            .map_err(|e| engine_error(&self.path, e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    /// The slot this view's state reaches.
    pub fn applied(&self) -> Result<Slot, StoreError> {
        match self.get(Space::Meta, META_APPLIED)? {
            None => Ok(0),
            Some(b) => Ok(u64::from_be_bytes(b.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt {
                    path: self.path.clone(),
                    message: "applied slot is not 8 bytes".into(),
                }
            })?)),
        }
    }

    /// Every record, keyspace by keyspace in key order, leaving out copies
    /// being dropped, the local garbage list and the commit markers: what
    /// a snapshot carries. (The store built from it has no markers until
    /// its first commit, which [`Store::check_applied_markers`] allows.)
    /// Copied out, for tests; streams use [`Self::record_views`].
    #[cfg(test)]
    pub fn records(&self) -> impl Iterator<Item = Result<Record, StoreError>> + '_ {
        self.record_views().map(|r| r.map(|r| r.to_record()))
    }

    /// [`Self::records`], as the engine's own buffers: no copy per record.
    /// The data of every copy comes after the meta keyspace, copy by copy:
    /// in key order, as when all of it was one keyspace.
    pub fn record_views(&self) -> impl Iterator<Item = Result<RecordView, StoreError>> + '_ {
        let meta = std::iter::once((Space::Meta, self.shared(Space::Meta)));
        let data = (self.copies.iter())
            .filter(|(copy, _)| !self.garbage.contains(copy))
            .map(|(_, keyspace)| (Space::Data, keyspace));
        let rest = [Space::Sessions, Space::Idle].map(|space| (space, self.shared(space)));
        meta.chain(data)
            .chain(rest)
            .flat_map(move |(space, keyspace)| {
                self.snapshot
                    .iter(keyspace)
                    .map(move |item| {
                        let (key, value) =
                            item.into_inner().map_err(|e| engine_error(&self.path, e))?;
                        Ok(RecordView {
                            space,
                            key,
                            key_from: 0,
                            value,
                        })
                    })
                    .filter(move |r| match r {
                        Ok(r) => !self.excluded(r.space, r.key()),
                        Err(_) => true,
                    })
            })
    }

    fn excluded(&self, space: Space, key: &[u8]) -> bool {
        match space {
            Space::Meta => key == META_GARBAGE || key.starts_with(META_COPY_WRITTEN),
            _ if key == APPLIED_MARKER => true,
            _ => {
                key.len() >= 12 && {
                    let shard = u32::from_be_bytes(key[..4].try_into().unwrap_or_default());
                    let generation = u64::from_be_bytes(key[4..12].try_into().unwrap_or_default());
                    self.garbage.contains(&CopyId { shard, generation })
                }
            }
        }
    }

    /// A copy as it travels to another group: its data, then its sessions,
    /// keys without the copy prefix, in key order. The copy is frozen, so
    /// every replica of the holder sends the same records. Copied out, for
    /// tests; streams use [`Self::copy_views`].
    #[cfg(test)]
    pub fn copy_stream(
        &self,
        copy: CopyId,
    ) -> impl Iterator<Item = Result<Record, StoreError>> + '_ {
        self.copy_views(copy).map(|r| r.map(|r| r.to_record()))
    }

    /// [`Self::copy_stream`], as the engine's own buffers: no copy per
    /// record.
    pub fn copy_views(
        &self,
        copy: CopyId,
    ) -> impl Iterator<Item = Result<RecordView, StoreError>> + '_ {
        [Space::Data, Space::Sessions]
            .into_iter()
            .flat_map(move |space| self.copy_record_views(space, copy))
    }

    /// Whether a copy holds any key: one seek (past the deletions of its
    /// keys that compaction has not yet dropped).
    pub fn copy_has_keys(&self, copy: CopyId) -> Result<bool, StoreError> {
        match self.copy_record_views(Space::Data, copy).next() {
            None => Ok(false),
            Some(record) => record.map(|_| true),
        }
    }

    /// The number of keys a copy holds: a scan, O(its keys).
    pub fn count_copy_keys(&self, copy: CopyId) -> Result<u64, StoreError> {
        let mut keys = 0;
        for record in self.copy_record_views(Space::Data, copy) {
            record?;
            keys += 1;
        }
        Ok(keys)
    }

    /// The records of one copy in one keyspace, in key order.
    pub fn copy_records(
        &self,
        space: Space,
        copy: CopyId,
    ) -> impl Iterator<Item = Result<(Bytes, Bytes), StoreError>> + '_ {
        self.copy_record_views(space, copy).map(|r| {
            r.map(|r| {
                (
                    Bytes::copy_from_slice(r.key()),
                    Bytes::copy_from_slice(r.value()),
                )
            })
        })
    }

    fn copy_record_views(
        &self,
        space: Space,
        copy: CopyId,
    ) -> impl Iterator<Item = Result<RecordView, StoreError>> + '_ {
        let prefix = copy.prefix();
        let keyspace = match space {
            Space::Data => self.copy(copy),
            _ => Some(self.shared(space)),
        };
        (keyspace.into_iter())
            .flat_map(move |keyspace| self.snapshot.prefix(keyspace, prefix))
            .map(move |item| {
                let (key, value) = item.into_inner().map_err(|e| engine_error(&self.path, e))?;
                debug_assert!(key.starts_with(&prefix), "a prefix scan left its prefix");
                Ok(RecordView {
                    space,
                    key,
                    key_from: prefix.len(),
                    value,
                })
            })
    }
}

/// A store being built from a snapshot stream.
pub struct Import {
    options: StoreOptions,
    path: PathBuf,
    generation: u64,
    /// `None` once finished.
    keyspaces: Option<Keyspaces>,
    records: u64,
    checksum: crc32fast::Hasher,
}

/// An import that is complete and durable, ready to switch to.
pub struct FinishedImport {
    generation: u64,
}

/// What a snapshot stream's sender vouches for at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    pub records: u64,
    pub crc32: u32,
}

/// The checksum of a stream: each record's keyspace, key and value.
pub fn checksum_record(hasher: &mut crc32fast::Hasher, r: &Record) {
    checksum_parts(hasher, r.space, &r.key, &r.value);
}

/// [`checksum_record`] of a record given by its parts.
pub fn checksum_parts(hasher: &mut crc32fast::Hasher, space: Space, key: &[u8], value: &[u8]) {
    hasher.update(&[space as u8]);
    hasher.update(&(key.len() as u32).to_be_bytes());
    hasher.update(key);
    hasher.update(&(value.len() as u32).to_be_bytes());
    hasher.update(value);
}

impl Import {
    /// Discards what was added, to start the stream over.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        drop(self.keyspaces.take());
        std::fs::remove_dir_all(&self.path).map_err(|e| engine_error(&self.path, e))?;
        self.keyspaces = Some(Keyspaces::open(&self.path, self.options)?);
        self.records = 0;
        self.checksum = crc32fast::Hasher::new();
        Ok(())
    }

    /// Adds a chunk of records (one batch, no fsync).
    pub fn add(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let Some(ks) = &self.keyspaces else {
            return Err(engine_error(&self.path, "import already finished"));
        };
        let mut batch = ks.db.batch();
        for r in records {
            check_key(&self.path, &r.key)?;
            checksum_record(&mut self.checksum, r);
            let keyspace = match r.space {
                Space::Data => {
                    let copy = copy_of_key(&r.key).ok_or_else(|| StoreError::BadStream {
                        path: self.path.clone(),
                        message: format!("a data key of {} bytes belongs to no copy", r.key.len()),
                    })?;
                    ks.copy_or_create(copy)?
                }
                space => ks.shared(space).clone(),
            };
            batch.insert(&keyspace, r.key.to_vec(), r.value.to_vec());
        }
        self.records += records.len() as u64;
        batch.commit().map_err(|e| engine_error(&self.path, e))
    }

    /// Checks the stream against what its sender vouched for, syncs, and
    /// marks the import complete.
    pub fn finish(mut self, summary: StreamSummary) -> Result<FinishedImport, StoreError> {
        let crc32 = std::mem::take(&mut self.checksum).finalize();
        if summary.records != self.records || summary.crc32 != crc32 {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                message: format!(
                    "snapshot stream: got {} records with checksum {crc32:08x}, sender sent {} with {:08x}",
                    self.records, summary.records, summary.crc32
                ),
            });
        }
        let Some(ks) = self.keyspaces.take() else {
            return Err(engine_error(&self.path, "import already finished"));
        };
        ks.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| engine_error(&self.path, e))?;
        drop(ks);
        Ok(FinishedImport {
            generation: self.generation,
        })
    }
}

#[cfg(test)]
impl Store {
    /// Every keyspace, each copy's included.
    fn all_keyspaces(&self) -> Vec<fjall::Keyspace> {
        let ks = &self.keyspaces;
        let copies = ks.all_copies().into_iter().map(|(_, keyspace)| keyspace);
        [ks.meta.clone(), ks.sessions.clone(), ks.idle.clone()]
            .into_iter()
            .chain(copies)
            .collect()
    }

    /// Data keys committed in `range`, read past the views' filters.
    fn data_keys_in(&self, range: std::ops::Range<Vec<u8>>) -> usize {
        (self.keyspaces.all_copies().iter())
            .map(|(_, keyspace)| keyspace.range(range.clone()).count())
            .sum()
    }
}

#[cfg(test)]
mod crash {
    //! The store after a `kill -9`: what a commit wrote is all there or not
    //! at all, across keyspaces, even when a memtable was flushed.
    use super::*;

    const CHILD: &str = "SHARDKV_STORE_CRASH_CHILD";

    fn data_key() -> Vec<u8> {
        CopyId {
            shard: 1,
            generation: 1,
        }
        .key(b"k")
    }

    /// Runs this test again in a child process, with `CHILD` set to the
    /// store's path: the child writes, then dies without a destructor.
    fn run_child(test: &str, base: &Path) {
        let name = format!(
            "{}::{test}",
            module_path!().split_once("::").map_or("", |(_, m)| m)
        );
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--test-threads=1", "--nocapture"])
            .env(CHILD, base)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child was meant to abort");
    }

    #[test]
    fn a_copy_whose_keyspace_was_deleted_does_not_come_back_from_the_journal_after_a_kill() {
        let copy = CopyId {
            shard: 3,
            generation: 1,
        };
        let (start, end) = copy_range(copy);
        if let Some(base) = std::env::var_os(CHILD) {
            let mut store = Store::open(Path::new(&base), StoreOptions::default()).unwrap();
            // A peer's snapshot: the copy's records go through the new
            // store's journal, and the group state (in the meta keyspace,
            // never flushed here) keeps that journal.
            let mut import = store.import().unwrap();
            let mut records: Vec<Record> = (0..100u32)
                .map(|i| Record {
                    space: Space::Data,
                    key: Bytes::from(copy.key(format!("k{i:03}").as_bytes())),
                    value: Bytes::from_static(b"v"),
                })
                .collect();
            records.push(Record {
                space: Space::Meta,
                key: Bytes::from_static(META_STATE),
                value: Bytes::from_static(b"state"),
            });
            import.add(&records).unwrap();
            let mut hasher = crc32fast::Hasher::new();
            records.iter().for_each(|r| checksum_record(&mut hasher, r));
            let summary = StreamSummary {
                records: records.len() as u64,
                crc32: hasher.finalize(),
            };
            store
                .switch_to_imported(import.finish(summary).unwrap())
                .unwrap();
            // The copy's records reach a table; its journal entries stay.
            let data = store.keyspaces.copy(copy).unwrap();
            data.rotate_memtable_and_wait().unwrap();
            store.commit(1, None, vec![copy]).unwrap();
            store.sweep_to_end().unwrap();
            assert_eq!(store.data_keys_in(start.clone()..end.clone()), 0);
            // The list without the copy reaches the disk.
            store.persist().unwrap();
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        run_child(
            "a_copy_whose_keyspace_was_deleted_does_not_come_back_from_the_journal_after_a_kill",
            &base,
        );
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        assert!(!store.sweeping(), "the copy was swept and forgotten");
        assert_eq!(
            store.data_keys_in(start..end),
            0,
            "keys of a forgotten copy came back from the journal"
        );
    }

    #[test]
    fn a_commit_flushed_by_an_ingestion_survives_a_kill_with_its_applied_slot() {
        if let Some(base) = std::env::var_os(CHILD) {
            let mut store = Store::open(Path::new(&base), StoreOptions::default()).unwrap();
            store.put(Space::Data, data_key(), Bytes::from_static(b"v"));
            store.commit(7, None, vec![]).unwrap();
            // A copy's ingestion flushes the data memtable to a table,
            // and unlike the engine's own flushes it does not first hand
            // the journal's buffer to the OS.
            let incoming = CopyId {
                shard: 2,
                generation: 3,
            };
            let record = Record {
                space: Space::Data,
                key: Bytes::from_static(b"x"),
                value: Bytes::from_static(b"y"),
            };
            let mut chunk = Some(vec![record]);
            store
                .stager()
                .write_copy(incoming, || Ok(chunk.take()))
                .unwrap();
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        run_child(
            "a_commit_flushed_by_an_ingestion_survives_a_kill_with_its_applied_slot",
            &base,
        );
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        assert_eq!(store.load_meta().unwrap().0, 7);
        assert_eq!(
            store.get(Space::Data, &data_key()).unwrap(),
            Some(Bytes::from_static(b"v"))
        );
    }

    #[test]
    fn a_store_open_elsewhere_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let first = Store::open(&base, StoreOptions::default()).unwrap();
        let second = Store::open(&base, StoreOptions::default());
        assert!(
            matches!(&second, Err(e) if e.is_in_use()),
            "{:?}",
            second.err()
        );
        drop(first);
        Store::open(&base, StoreOptions::default()).expect("free once the first is closed");
    }

    #[test]
    fn a_store_whose_keyspaces_reach_different_commits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        {
            let mut store = Store::open(&base, StoreOptions::default()).unwrap();
            store.put(Space::Data, data_key(), Bytes::from_static(b"v"));
            store.commit(5, None, vec![]).unwrap();
            // What an OS crash can leave: a table of a copy's keyspace
            // with a later commit than the journal kept for the others.
            let data = store.keyspaces.copy(copy_of_key(&data_key()).unwrap());
            data.unwrap()
                .insert(APPLIED_MARKER, 9u64.to_be_bytes())
                .unwrap();
            store.persist().unwrap();
        }
        match Store::open(&base, StoreOptions::default()) {
            Err(e) => {
                assert!(e.is_corrupt(), "{e}");
                assert!(
                    e.to_string()
                        .contains("reaches slot 9 but the group state says 5"),
                    "{e}"
                );
            }
            Ok(_) => panic!("a store whose keyspaces disagree opened"),
        }
    }

    #[test]
    fn a_store_written_before_the_markers_opens() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        {
            let store = Store::open(&base, StoreOptions::default()).unwrap();
            store
                .keyspaces
                .meta
                .insert(META_APPLIED, 5u64.to_be_bytes())
                .unwrap();
            store.persist().unwrap();
        }
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        assert_eq!(store.load_meta().unwrap().0, 5);
    }
}

#[cfg(test)]
mod ingest {
    //! A shard copy written by [`Stager::write_copy`].
    use super::*;

    const COPY: CopyId = CopyId {
        shard: 4,
        generation: 2,
    };

    fn data(i: u32) -> Record {
        Record {
            space: Space::Data,
            key: Bytes::from(format!("key-{i:06}")),
            value: Bytes::from(vec![i as u8; 1000]),
        }
    }

    fn session(client: u8) -> Record {
        Record {
            space: Space::Sessions,
            key: Bytes::from(vec![client]),
            value: Bytes::from_static(b"dup"),
        }
    }

    fn copy_of(store: &Store) -> Vec<Record> {
        store
            .view()
            .copy_stream(COPY)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_copy_is_written_whole_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), StoreOptions::default()).unwrap();
        let mut expected: Vec<Record> = (0..3000).map(data).collect();
        expected.extend([session(1), session(2)]);
        let mut chunks = expected.chunks(700).map(<[Record]>::to_vec);
        store
            .stager()
            .write_copy(COPY, || Ok(chunks.next()))
            .unwrap();
        assert_eq!(copy_of(&store), expected);
    }

    /// Every key of a dropped copy under the copy's prefix, read past the
    /// view's filter of the garbage list.
    fn keys_left(store: &Store) -> usize {
        let (start, end) = copy_range(COPY);
        let shared = [Space::Sessions, Space::Idle].map(|space| {
            let keyspace = store.keyspaces.shared(space);
            keyspace.range(start.clone()..end.clone()).count()
        });
        store.data_keys_in(start..end) + shared.iter().sum::<usize>()
    }

    #[test]
    fn a_dropped_copy_is_swept_by_its_own_thread_and_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let mut store = Store::open(&base, StoreOptions::default()).unwrap();
        let written = 2 * DROP_KEYS_PER_BATCH as u32 + 7;
        let mut records: Vec<Record> = (0..written).map(data).collect();
        records.extend([session(1), session(2)]);
        let mut chunks = records.chunks(1000).map(<[Record]>::to_vec);
        store
            .stager()
            .write_copy(COPY, || Ok(chunks.next()))
            .unwrap();
        store.commit(1, None, vec![COPY]).unwrap();
        assert_eq!(keys_left(&store), records.len());
        // Closed with the sweep under way: the copy stays listed, and the
        // next open sweeps it again.
        store.sweep().unwrap();
        assert!(store.sweeper.is_some(), "the keys go on another thread");
        drop(store);
        let mut store = Store::open(&base, StoreOptions::default()).unwrap();
        assert!(store.sweeping());
        store.sweep_to_end().unwrap();
        assert_eq!(keys_left(&store), 0);
        drop(store);
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        assert!(
            !store.sweeping(),
            "the list is written once the copy is gone"
        );
        assert_eq!(keys_left(&store), 0);
    }

    #[test]
    fn a_dropped_copy_s_own_tables_go_whole_and_a_view_opened_before_still_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state"), StoreOptions::default()).unwrap();
        let records: Vec<Record> = (0..3 * DROP_KEYS_PER_BATCH as u32).map(data).collect();
        let mut chunks = records.chunks(1000).map(<[Record]>::to_vec);
        store
            .stager()
            .write_copy(COPY, || Ok(chunks.next()))
            .unwrap();
        store.commit(1, None, vec![]).unwrap();
        let before = store.view();
        store.commit(2, None, vec![COPY]).unwrap();
        store.sweep_to_end().unwrap();
        assert_eq!(keys_left(&store), 0);
        // The engine's count includes deletions not yet compacted away: a
        // tombstone per key would leave it above the copy's size (as it did
        // when all copies shared one keyspace).
        let entries = store.approximate_data_records();
        assert!(
            entries < 10,
            "{entries} entries left in the data keyspace after dropping a copy of {}: \
             its keys were deleted one by one",
            records.len()
        );
        let read: Vec<Record> = before.copy_stream(COPY).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            read, records,
            "a view from before the drop reads the copy whole"
        );
    }

    /// What a binary from before the keyspace per copy reads as its data:
    /// nothing but an applied slot no group state has, which it refuses.
    fn assert_fenced(store: &Store) {
        let legacy = (store.keyspaces.db)
            .keyspace(LEGACY_DATA, Default::default)
            .unwrap();
        assert_eq!(
            legacy.len().unwrap(),
            1,
            "the old data keyspace holds only its fence"
        );
        let marker = legacy.get(APPLIED_MARKER).unwrap();
        assert_eq!(marker.as_deref(), Some(&LEGACY_FENCE.to_be_bytes()[..]));
        assert_ne!(store.load_meta().unwrap().0, LEGACY_FENCE);
    }

    #[test]
    fn a_store_split_already_whose_fence_was_lost_keeps_its_copies() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let fetched = CopyId {
            shard: 9,
            generation: 1,
        };
        {
            let mut store = Store::open(&base, StoreOptions::default()).unwrap();
            store.put(Space::Data, COPY.key(b"k"), Bytes::from_static(b"v"));
            store.commit(1, None, vec![]).unwrap();
            let mut chunk = Some(vec![data(1)]);
            store
                .stager()
                .write_copy(fetched, || Ok(chunk.take()))
                .unwrap();
            // What a crash can leave: the old keyspace made again (durable
            // at once) and its fence not yet synced.
            let legacy = (store.keyspaces.db)
                .keyspace(LEGACY_DATA, Default::default)
                .unwrap();
            legacy.remove(APPLIED_MARKER).unwrap();
            store.persist().unwrap();
        }
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        assert_fenced(&store);
        assert_eq!(
            store.get(Space::Data, &COPY.key(b"k")).unwrap().as_deref(),
            Some(&b"v"[..])
        );
        let expected = data(1);
        assert_eq!(
            store.get(Space::Data, &fetched.key(&expected.key)).unwrap(),
            Some(expected.value)
        );
    }

    #[test]
    fn a_new_store_is_fenced_from_binaries_before_the_keyspace_per_copy() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        for _ in 0..2 {
            let mut store = Store::open(&base, StoreOptions::default()).unwrap();
            assert_fenced(&store);
            store.commit(1, None, vec![]).unwrap();
            store.persist().unwrap();
        }
    }

    #[test]
    fn a_store_with_one_data_keyspace_is_split_by_copy_at_its_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let other = CopyId {
            shard: 9,
            generation: 1,
        };
        let keys: Vec<Vec<u8>> = (0..500u32)
            .flat_map(|i| [COPY.key(&i.to_be_bytes()), other.key(&i.to_be_bytes())])
            .collect();
        {
            // As stores were written before: every copy in `data`.
            let db = fjall::Database::builder(generation_dir(&base, 0))
                .open()
                .unwrap();
            let open = |name: &str| db.keyspace(name, || keyspace_options(StoreOptions::default()));
            let (meta, data) = (open("meta").unwrap(), open(LEGACY_DATA).unwrap());
            open("sessions")
                .unwrap()
                .insert(APPLIED_MARKER, 5u64.to_be_bytes())
                .unwrap();
            open("idle").unwrap();
            meta.insert(META_APPLIED, 5u64.to_be_bytes()).unwrap();
            data.insert(APPLIED_MARKER, 5u64.to_be_bytes()).unwrap();
            for key in &keys {
                data.insert(key, &key[..]).unwrap();
            }
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        for _ in 0..2 {
            let store = Store::open(&base, StoreOptions::default()).unwrap();
            assert_fenced(&store);
            let copies: Vec<CopyId> = store
                .keyspaces
                .all_copies()
                .iter()
                .map(|(c, _)| *c)
                .collect();
            assert_eq!(copies, vec![COPY, other]);
            for key in &keys {
                assert_eq!(
                    store.get(Space::Data, key).unwrap().as_deref(),
                    Some(&key[..])
                );
            }
            assert_eq!(store.load_meta().unwrap().0, 5);
        }
    }

    /// A store that `written` leaves holding `COPY` in its state, then
    /// loses that copy's keyspace (outside a drop) is refused at open.
    fn assert_missing_copy_refused(written: impl FnOnce(&mut Store)) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        {
            let mut store = Store::open(&base, StoreOptions::default()).unwrap();
            written(&mut store);
            store.commit(3, None, vec![]).unwrap();
            store.keyspaces.delete_copy(COPY).unwrap();
            store.persist().unwrap();
        }
        match Store::open(&base, StoreOptions::default()) {
            Err(e) => assert!(
                e.is_corrupt() && e.to_string().contains("is missing"),
                "{e}"
            ),
            Ok(_) => panic!("a store missing a copy it holds opened"),
        }
    }

    #[test]
    fn a_copy_installed_and_never_written_since_is_checked_at_open() {
        assert_missing_copy_refused(|store| {
            let mut chunk = Some(vec![data(1)]);
            store
                .stager()
                .write_copy(COPY, || Ok(chunk.take()))
                .unwrap();
            store.unmark_staged(COPY);
        });
    }

    #[test]
    fn a_copy_written_and_missing_is_refused_at_open() {
        assert_missing_copy_refused(|store| {
            store.put(Space::Data, COPY.key(b"k"), Bytes::from_static(b"v"));
        });
    }

    #[test]
    fn the_memtables_of_many_copies_stay_within_their_bound_together() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            memtable_bytes: 4 << 20,
            ..Default::default()
        };
        let mut store = Store::open(&dir.path().join("state"), options).unwrap();
        // 40 copies of 1 MiB each: no memtable fills on its own.
        for (slot, shard) in (1..=40u32).enumerate() {
            let copy = CopyId {
                shard,
                generation: 1,
            };
            for i in 0..64u32 {
                store.put(
                    Space::Data,
                    copy.key(&i.to_be_bytes()),
                    Bytes::from(vec![7u8; 16 << 10]),
                );
            }
            store.commit(slot as Slot + 1, None, vec![]).unwrap();
        }
        use fjall::AbstractTree;
        let active: u64 = (store.all_keyspaces().iter())
            .map(|keyspace| keyspace.tree.active_memtable().size())
            .sum();
        assert!(
            active <= options.active_memtables_bytes_max(),
            "{active} bytes in active memtables, more than {}",
            options.active_memtables_bytes_max()
        );
    }

    #[test]
    fn a_cut_short_copy_is_cleared_and_written_again_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        let stager = store.stager();
        let expected: Vec<Record> = (0..2000).map(data).collect();
        let mut chunks = expected[..1500].chunks(500).map(<[Record]>::to_vec);
        let cut = stager.write_copy(COPY, || match chunks.next() {
            Some(chunk) => Ok(Some(chunk)),
            None => Err("the source went away".into()),
        });
        assert_eq!(cut, Err("the source went away".to_string()));
        // The attempt's tables are registered, not orphaned: its records
        // are visible until the next attempt clears them.
        assert_eq!(copy_of(&store).len(), 1500);
        stager.clear(COPY).unwrap();
        assert!(copy_of(&store).is_empty());
        let mut chunks = expected.chunks(500).map(<[Record]>::to_vec);
        stager.write_copy(COPY, || Ok(chunks.next())).unwrap();
        assert_eq!(copy_of(&store), expected);
        drop((stager, store));
        let store = Store::open(&base, StoreOptions::default()).unwrap();
        assert_eq!(copy_of(&store), expected);
    }

    #[test]
    fn data_keys_out_of_order_are_refused_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), StoreOptions::default()).unwrap();
        for records in [vec![data(2), data(1)], vec![data(1), data(1)]] {
            let mut chunk = Some(records);
            let e = store
                .stager()
                .write_copy(COPY, || Ok(chunk.take()))
                .unwrap_err();
            assert!(e.contains("not in ascending order"), "{e}");
            store.stager().clear(COPY).unwrap();
        }
        let mut chunk = Some(vec![Record {
            space: Space::Meta,
            key: Bytes::from_static(b"applied"),
            value: Bytes::from_static(b"x"),
        }]);
        let e = store
            .stager()
            .write_copy(COPY, || Ok(chunk.take()))
            .unwrap_err();
        assert!(e.contains("holds a Meta record"), "{e}");
    }
}

#[cfg(test)]
mod damage {
    //! A store damaged on disk: the engine's checksums catch it at open or
    //! at the read, and it never hands back a wrong value.
    use super::*;

    const KEYS: u32 = 20_000;

    /// Incompressible, so 20 MB of values make tables of about that size.
    fn value(i: u32) -> Vec<u8> {
        let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Writes `KEYS` values and flushes them into table files.
    fn written() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let mut store = Store::open(&base, StoreOptions::default()).unwrap();
        for i in 0..KEYS {
            store.put(
                Space::Data,
                COPY.key(&i.to_be_bytes()),
                Bytes::from(value(i)),
            );
            if i % 1000 == 999 {
                store.commit(Slot::from(i), None, vec![]).unwrap();
            }
        }
        store.persist().unwrap();
        for keyspace in store.all_keyspaces() {
            keyspace.rotate_memtable_and_wait().unwrap();
        }
        (dir, base)
    }

    const COPY: CopyId = CopyId {
        shard: 1,
        generation: 1,
    };

    /// The table files of the copy's keyspace (the large ones).
    fn data_tables(base: &Path) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(p).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.parent().is_some_and(|d| d.ends_with("tables"))
                    && std::fs::metadata(&path).unwrap().len() > 1 << 20
                {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(base, &mut out);
        assert!(!out.is_empty(), "no table file was written");
        out
    }

    fn flip(path: &Path, at: impl Fn(usize) -> std::ops::Range<usize>) {
        let mut bytes = std::fs::read(path).unwrap();
        let range = at(bytes.len());
        for b in &mut bytes[range] {
            *b ^= 0xa5;
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_table_whose_trailer_is_damaged_is_refused_at_open() {
        let (_dir, base) = written();
        for table in data_tables(&base) {
            flip(&table, |n| n - 64..n);
        }
        match Store::open(&base, StoreOptions::default()) {
            Err(e) => {
                assert!(e.is_corrupt(), "{e}");
                assert!(e.to_string().contains("rebuilds it from"), "{e}");
            }
            Ok(_) => panic!("a store with damaged tables opened"),
        }
    }

    #[test]
    fn a_truncated_table_is_refused_at_open() {
        let (_dir, base) = written();
        let table = &data_tables(&base)[0];
        let len = std::fs::metadata(table).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(table)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let e = Store::open(&base, StoreOptions::default())
            .err()
            .expect("a truncated table opened");
        assert!(e.is_corrupt(), "{e}");
    }

    #[test]
    fn damage_inside_a_data_block_fails_its_reads_and_never_returns_a_wrong_value() {
        let (_dir, base) = written();
        for table in data_tables(&base) {
            flip(&table, |n| n / 2..n / 2 + 16);
        }
        let store = match Store::open(&base, StoreOptions::default()) {
            Ok(store) => store,
            Err(e) => {
                assert!(e.is_corrupt(), "{e}");
                return;
            }
        };
        let mut refused = 0;
        for i in 0..KEYS {
            match store.get(Space::Data, &COPY.key(&i.to_be_bytes())) {
                Ok(Some(v)) => assert_eq!(v[..], value(i)[..], "key {i} read back wrong"),
                Ok(None) => panic!("key {i} vanished"),
                Err(e) => {
                    assert!(e.is_corrupt(), "{e}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "no read met the damage");
    }
}

#[cfg(test)]
mod threads {
    //! The engine's background threads are as many as configured: with
    //! more than one, fjall's first worker spins while the others compact.
    use super::*;

    const CHILD: &str = "SHARDKV_STORE_THREADS_CHILD";

    /// In a child process of its own, so no other test's store is counted:
    /// opens a store with `engine_threads` and exits with the number of
    /// fjall worker threads it has.
    fn workers_of_a_store_with(engine_threads: usize) -> i32 {
        let name = format!(
            "{}::the_engine_runs_as_many_threads_as_configured",
            module_path!().split_once("::").map_or("", |(_, m)| m)
        );
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--test-threads=1"])
            .env(CHILD, engine_threads.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        status.code().expect("the child exits with a count")
    }

    #[test]
    fn the_engine_runs_as_many_threads_as_configured() {
        if let Some(threads) = std::env::var_os(CHILD) {
            let engine_threads = threads.to_str().unwrap().parse().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let options = StoreOptions {
                engine_threads,
                ..Default::default()
            };
            let _store = Store::open(&dir.path().join("state"), options).unwrap();
            let workers = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter(|task| {
                    let comm = task.as_ref().unwrap().path().join("comm");
                    std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == "fjall:worker")
                })
                .count();
            std::process::exit(100 + workers as i32);
        }
        assert_eq!(workers_of_a_store_with(1), 101);
        assert_eq!(workers_of_a_store_with(2), 102);
        let default = StoreOptions::default().engine_threads;
        assert_eq!(workers_of_a_store_with(default), 100 + default as i32);
    }
}

#[cfg(test)]
mod journal {
    //! The journal an open replays stays within its bound, however much is
    //! written: the small keyspaces' writes, in every batch, would keep it.
    use super::*;

    #[test]
    fn the_journal_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            journal_bytes_max: StoreOptions::JOURNAL_BYTES_MIN,
            ..Default::default()
        };
        let mut store = Store::open(&dir.path().join("state"), options).unwrap();
        let copy = CopyId {
            shard: 1,
            generation: 1,
        };
        let value = Bytes::from(vec![7u8; 1024]);
        let written_bytes: u64 = 4 * options.journal_bytes_max;
        let batches = written_bytes / (256 * 1024);
        for batch in 0..batches {
            for i in 0..256 {
                let key = copy.key(format!("key-{batch:08}-{i:03}").as_bytes());
                store.put(Space::Data, key, value.clone());
            }
            store.commit(batch + 1, None, Vec::new()).unwrap();
        }
        // The engine bounds it from its own threads: wait, within a bound.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let journal_bytes = store.keyspaces.db.journal_disk_space().unwrap();
            if journal_bytes <= 2 * options.journal_bytes_max {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the journal holds {journal_bytes} bytes after {written_bytes} written"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
