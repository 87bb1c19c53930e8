//! Acceptor state on disk: a write-ahead log, and snapshot files.
//!
//! One [`PersistBatch`] costs one append and one `fdatasync` into a
//! preallocated file. Appending inside space already allocated changes no
//! file-system metadata, so the sync writes the record's few hundred bytes
//! and nothing else. (redb, used before, rewrote about ten 4 KiB B-tree
//! pages per commit: with three replicas syncing on one disk, each sync
//! took 3 times as long, and a write waits on two of them.)
//!
//! The data directory holds:
//! - `LOCK`, locked while a process has the storage open: two writers
//!   would interleave their records.
//! - `wal-<seq>.log`, the log segments. A segment opens with a checkpoint
//!   (the whole durable state but the snapshot's bytes), then one record per
//!   synced batch. Only the newest segment is read back. An older one is
//!   deleted once a newer checkpoint is durable, so the log on disk stays
//!   about one segment long whatever the history.
//! - `snap-<index>.bin`, the snapshot the log refers to by its index.
//!
//! A record is framed as: length (u32, little-endian), CRC-32 of the length
//! and the payload (u32), then the payload (postcard). A record whose length
//! runs past the segment, or whose checksum fails, ends the log. After a
//! crash, that is the write under way, which was never acknowledged. Every
//! open starts a new segment, so a torn tail is never written over, and only
//! the newest segment can end in one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::storage::{DurableState, PersistBatch, Storage, StorageError};
use super::types::{Ballot, Batch, Slot, Snapshot};

/// Settings for [`WalStorage`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Space preallocated per segment. The log rolls over to a new segment
    /// (opened by a checkpoint) when a record no longer fits. Larger means
    /// fewer roll-overs; the disk holds up to two segments per replica.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 16 << 20,
        }
    }
}

/// Record header: length, then checksum.
const HEADER_BYTES: usize = 8;
const LOCK_FILE: &str = "LOCK";

/// A replica's acceptor state in a directory of log segments and snapshots.
pub struct WalStorage {
    /// The data directory.
    dir: PathBuf,
    options: WalOptions,
    /// Holds the directory's lock for as long as the storage is open.
    _lock: File,
    /// The segment being appended to.
    segment: OpenSegment,
    /// The durable state as the log records it. The checkpoint that opens
    /// the next segment is written from it. The snapshot's bytes are shared
    /// (`Bytes`), not copied.
    state: DurableState,
    /// A newer commit index from a batch that needed no sync: held here and
    /// written with the next record, which saves a sync per decision
    /// (losing it in a crash is safe, see `PersistBatch::needs_sync`).
    unsynced_commit: Option<Slot>,
    /// Set when a write failed: what is on disk may then differ from
    /// `state`, so every later call fails too.
    failed: bool,
    /// Reused for encoding records.
    buffer: Vec<u8>,
}

/// The log segment being appended to.
struct OpenSegment {
    file: File,
    /// Its sequence number: names it, and orders segments.
    seq: u64,
    /// Where the next record goes.
    offset: u64,
    /// The preallocated length: a record must end within it.
    len: u64,
}

/// Creates segment `seq` opened by a checkpoint of `state`, and makes it
/// durable: it is written under a temporary name, synced, then renamed,
/// so a segment under its own name always opens with a whole checkpoint.
fn create_segment(
    dir: &Path,
    seq: u64,
    state: &DurableState,
    options: &WalOptions,
    buffer: &mut Vec<u8>,
) -> Result<OpenSegment, StorageError> {
    buffer.clear();
    let checkpoint = RecordRef::Checkpoint {
        promised: &state.promised,
        entries: &state.entries,
        commit: state.commit,
        snapshot: state.snapshot.as_ref().map(|s| s.index),
        initialized: state.initialized,
    };
    encode_record(&checkpoint, buffer)?;
    let record_len = buffer.len() as u64;
    // A checkpoint larger than a segment (a long backlog above the
    // snapshot) gets a segment with room to spare.
    let len = options.segment_bytes.max(record_len * 2);
    let name = segment_name(seq);
    let temporary = dir.join(format!("{name}.tmp"));
    let create = || -> std::io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&temporary)?;
        preallocate(&file, len)?;
        file.write_all_at(buffer, 0)?;
        // Also makes the length that fallocate set durable.
        file.sync_all()?;
        std::fs::rename(&temporary, dir.join(&name))?;
        sync_dir(dir)?;
        Ok(file)
    };
    let file = create()
        .map_err(|e| io_error(format!("starting log segment {}", temporary.display()), e))?;
    Ok(OpenSegment {
        file,
        seq,
        offset: record_len,
        len,
    })
}

/// What a record holds. The snapshot is named by its index; its bytes are
/// in their own file.
#[derive(Serialize, Deserialize)]
enum Record {
    Checkpoint {
        promised: Ballot,
        entries: BTreeMap<Slot, (Ballot, Batch)>,
        commit: Slot,
        snapshot: Option<Slot>,
        initialized: bool,
    },
    Batch {
        promised: Option<Ballot>,
        entries: Vec<(Slot, Ballot, Batch)>,
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
    },
}

/// [`Record`] borrowed, to encode without copying the entries. The variants
/// and fields must stay in the same order as `Record`'s.
#[derive(Serialize)]
enum RecordRef<'a> {
    Checkpoint {
        promised: &'a Ballot,
        entries: &'a BTreeMap<Slot, (Ballot, Batch)>,
        commit: Slot,
        snapshot: Option<Slot>,
        initialized: bool,
    },
    Batch {
        promised: &'a Option<Ballot>,
        entries: &'a [(Slot, Ballot, Batch)],
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
    },
}

fn io_error(what: impl std::fmt::Display, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{what}: {e}"))
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

fn snapshot_name(index: Slot) -> String {
    format!("snap-{index:020}.bin")
}

/// Parses `<prefix><number><suffix>`.
fn parse_name(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn checksum(length: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(length);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends `record`, framed, to `buffer`.
fn encode_record(record: &RecordRef<'_>, buffer: &mut Vec<u8>) -> Result<(), StorageError> {
    let start = buffer.len();
    buffer.extend_from_slice(&[0; HEADER_BYTES]);
    let mut buffer_out = std::mem::take(buffer);
    buffer_out = postcard::to_extend(record, buffer_out)
        .map_err(|e| StorageError::Corrupt(format!("cannot encode a log record: {e}")))?;
    *buffer = buffer_out;
    let payload_len = buffer.len() - start - HEADER_BYTES;
    let length = u32::try_from(payload_len)
        .map_err(|_| StorageError::Io(format!("log record of {payload_len} bytes is too large")))?
        .to_le_bytes();
    let crc = checksum(&length, &buffer[start + HEADER_BYTES..]);
    buffer[start..start + 4].copy_from_slice(&length);
    buffer[start + 4..start + HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads the records of one segment, stopping at the first that is
/// incomplete or fails its checksum.
fn read_records(path: &Path) -> Result<Vec<Record>, StorageError> {
    let file = File::open(path).map_err(|e| io_error(path.display(), e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_error(path.display(), e))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut records = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; HEADER_BYTES];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_error(path.display(), e)),
        }
        let length: [u8; 4] = header[..4].try_into().unwrap_or_default();
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
        let payload_len = u32::from_le_bytes(length) as u64;
        // Zero length: the preallocated space past the last record.
        if payload_len == 0 || offset + (HEADER_BYTES as u64) + payload_len > file_len {
            break;
        }
        let mut payload = vec![0u8; payload_len as usize];
        match reader.read_exact(&mut payload) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_error(path.display(), e)),
        }
        if checksum(&length, &payload) != crc {
            break;
        }
        let record = postcard::from_bytes(&payload).map_err(|e| {
            StorageError::Corrupt(format!(
                "{} at byte {offset}: a record with a valid checksum does not decode: {e}",
                path.display()
            ))
        })?;
        records.push(record);
        offset += HEADER_BYTES as u64 + payload_len;
    }
    Ok(records)
}

/// Snapshot file: CRC-32 of the rest (u32), the index (u64), the data.
fn write_snapshot_file(dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let name = snapshot_name(snapshot.index);
    let temporary = dir.join(format!("{name}.tmp"));
    let index = snapshot.index.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index);
    hasher.update(&snapshot.data);
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(&hasher.clone().finalize().to_le_bytes())?;
        file.write_all(&index)?;
        file.write_all(&snapshot.data)?;
        file.sync_all()?;
        std::fs::rename(&temporary, dir.join(&name))?;
        sync_dir(dir)
    };
    write().map_err(|e| io_error(format!("writing snapshot {}", dir.join(&name).display()), e))
}

fn read_snapshot_file(dir: &Path, index: Slot) -> Result<Snapshot, StorageError> {
    let path = dir.join(snapshot_name(index));
    let bytes = std::fs::read(&path).map_err(|e| {
        StorageError::Corrupt(format!(
            "the log refers to snapshot {}, which cannot be read: {e}",
            path.display()
        ))
    })?;
    let corrupt = |why: &str| StorageError::Corrupt(format!("snapshot {}: {why}", path.display()));
    if bytes.len() < 12 {
        return Err(corrupt("shorter than its header"));
    }
    let crc = u32::from_le_bytes(bytes[..4].try_into().unwrap_or_default());
    if crc32fast::hash(&bytes[4..]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let stored_index = u64::from_le_bytes(bytes[4..12].try_into().unwrap_or_default());
    if stored_index != index {
        return Err(corrupt(&format!("holds index {stored_index}")));
    }
    Ok(Snapshot {
        index,
        data: bytes::Bytes::copy_from_slice(&bytes[12..]),
    })
}

/// Makes renames and new files in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reserves `len` bytes for `file`, so appends inside them need no metadata
/// update. Falls back to a sparse file where the file system cannot.
fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => file.set_len(len),
        Err(e) => Err(e.into()),
    }
}

impl WalStorage {
    /// Opens (or creates) the storage in `dir`: reads back the newest
    /// segment, then starts a new one and deletes what it supersedes.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<Self, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io_error(dir.display(), e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error(lock_path.display(), e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                StorageError::Io(format!(
                    "{} is in use by another process (cannot lock {LOCK_FILE}: {e})",
                    dir.display()
                ))
            },
        )?;

        let mut segments = Vec::new();
        let mut snapshots = Vec::new();
        let listing = std::fs::read_dir(&dir).map_err(|e| io_error(dir.display(), e))?;
        for item in listing {
            let item = item.map_err(|e| io_error(dir.display(), e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A segment or snapshot whose creation a crash cut short.
                remove_file(&item.path());
            } else if let Some(seq) = parse_name(&name, "wal-", ".log") {
                segments.push(seq);
            } else if let Some(index) = parse_name(&name, "snap-", ".bin") {
                snapshots.push(index);
            }
        }
        segments.sort_unstable();

        let mut state = DurableState::default();
        let newest = segments.last().copied();
        if let Some(seq) = newest {
            let path = dir.join(segment_name(seq));
            let records = read_records(&path)?;
            let mut records = records.into_iter();
            // A segment is renamed into place only after its checkpoint is
            // synced: one without is damaged, and older segments may
            // already be gone, so refuse rather than start blank.
            let Some(Record::Checkpoint {
                promised,
                entries,
                commit,
                snapshot,
                initialized,
            }) = records.next()
            else {
                return Err(StorageError::Corrupt(format!(
                    "{} does not open with a valid checkpoint",
                    path.display()
                )));
            };
            state.promised = promised;
            state.entries = entries;
            state.commit = commit;
            state.initialized = initialized;
            let mut snapshot_index = snapshot;
            for record in records {
                let Record::Batch {
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                } = record
                else {
                    return Err(StorageError::Corrupt(format!(
                        "{} holds a second checkpoint",
                        path.display()
                    )));
                };
                if snapshot.is_some() {
                    snapshot_index = snapshot;
                }
                PersistBatch {
                    promised,
                    entries,
                    commit,
                    snapshot: None,
                    truncate_through,
                    initialized,
                }
                .apply_to(&mut state);
            }
            if let Some(index) = snapshot_index {
                state.snapshot = Some(read_snapshot_file(&dir, index)?);
            }
        }

        let mut buffer = Vec::new();
        let seq = newest.unwrap_or(0) + 1;
        let segment = create_segment(&dir, seq, &state, &options, &mut buffer)?;
        for old in segments {
            remove_file(&dir.join(segment_name(old)));
        }
        let kept = state.snapshot.as_ref().map(|s| s.index);
        for index in snapshots.into_iter().filter(|i| Some(*i) != kept) {
            remove_file(&dir.join(snapshot_name(index)));
        }
        let storage = WalStorage {
            dir,
            options,
            _lock: lock,
            segment,
            state,
            unsynced_commit: None,
            failed: false,
            buffer,
        };
        Ok(storage)
    }

    /// Rolls over to a new segment, opened by a checkpoint of `self.state`,
    /// and deletes the one it supersedes.
    fn start_segment(&mut self) -> Result<(), StorageError> {
        let seq = self.segment.seq + 1;
        let segment = create_segment(&self.dir, seq, &self.state, &self.options, &mut self.buffer)?;
        remove_file(&self.dir.join(segment_name(self.segment.seq)));
        self.segment = segment;
        Ok(())
    }

    fn persist_synced(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        let previous_snapshot = self.state.snapshot.as_ref().map(|s| s.index);
        if let Some(snapshot) = &batch.snapshot {
            // Durable before the record that refers to it.
            write_snapshot_file(&self.dir, snapshot)?;
        }
        // A held commit index rides along (the batch's own is never older).
        let commit = batch.commit.max(self.unsynced_commit.take());
        self.buffer.clear();
        let record = RecordRef::Batch {
            promised: &batch.promised,
            entries: &batch.entries,
            commit,
            snapshot: batch.snapshot.as_ref().map(|s| s.index),
            truncate_through: batch.truncate_through,
            initialized: batch.initialized,
        };
        encode_record(&record, &mut self.buffer)?;
        batch.apply_to(&mut self.state);
        if let Some(commit) = commit {
            self.state.commit = self.state.commit.max(commit);
        }
        let record_len = self.buffer.len() as u64;
        if self.segment.offset + record_len > self.segment.len {
            // The new segment's checkpoint already holds this batch.
            self.start_segment()?;
        } else {
            let segment = &mut self.segment;
            let write = segment
                .file
                .write_all_at(&self.buffer, segment.offset)
                .and_then(|()| segment.file.sync_data());
            write.map_err(|e| {
                let path = self.dir.join(segment_name(segment.seq));
                io_error(format!("appending to {}", path.display()), e)
            })?;
            segment.offset += record_len;
        }
        let current_snapshot = self.state.snapshot.as_ref().map(|s| s.index);
        if let Some(old) = previous_snapshot.filter(|old| Some(*old) != current_snapshot) {
            remove_file(&self.dir.join(snapshot_name(old)));
        }
        Ok(())
    }
}

/// Deletes a file that is no longer needed. Failing only wastes space (the
/// next open retries), so it is logged, not returned.
fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a superseded file");
        }
    }
}

impl Storage for WalStorage {
    fn load(&mut self) -> Result<DurableState, StorageError> {
        // What a restart would read: the held commit index is not on disk.
        self.unsynced_commit = None;
        Ok(self.state.clone())
    }

    fn persist(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        if self.failed {
            return Err(StorageError::Io(format!(
                "{}: an earlier write failed; reopen the storage",
                self.dir.display()
            )));
        }
        if !batch.needs_sync() {
            self.unsynced_commit = batch.commit.max(self.unsynced_commit);
            return Ok(());
        }
        let result = self.persist_synced(batch);
        self.failed = result.is_err();
        result
    }
}
