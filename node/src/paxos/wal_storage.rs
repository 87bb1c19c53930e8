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
//! - `wal-<seq>.log`, the log segments, read back in order. A segment opens
//!   with a header: the state's small fields (promise, commit index,
//!   snapshot, how far the log was truncated), and where the segment before
//!   it ended. One record per synced batch follows. The log rolls over to a
//!   new segment when a record no longer fits, and on every open, so a torn
//!   tail is never written over. The oldest segments are deleted once the
//!   log is truncated past every entry they hold, as in etcd.
//! - `snap-<index>.bin`, the snapshot the log refers to by its index.
//!
//! A record is framed as: length (u32, little-endian), CRC-32 of the length
//! and the payload (u32), then the payload (postcard). A record whose length
//! runs past the segment, or whose checksum fails, ends the segment if only
//! zeros follow it: that is the write a crash cut short, never
//! acknowledged. Followed by anything else it is damage, and an error (see
//! `read_records`). In an older segment, the next segment's header also
//! says where it must end, so damage there is an error, not a silently
//! shorter log. The newest segment is synced on open, before a new one
//! vouches for where it ends.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::storage::{DurableState, PersistBatch, Storage, StorageError};
use super::types::{Ballot, Batch, Incarnations, Membership, Slot, Snapshot};

/// Settings for [`WalStorage`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Space preallocated per segment. The log rolls over to a new segment
    /// when a record no longer fits. Segments are deleted as the log is
    /// truncated, so the disk holds about the untruncated log, rounded up
    /// to whole segments, plus one.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 16 << 20,
        }
    }
}

/// Record framing: length, then checksum.
const FRAME_BYTES: usize = 8;
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
    /// Every segment on disk, oldest first, the open one last: what the
    /// next truncation may delete.
    segments: VecDeque<SegmentInfo>,
    /// The small fields as the log now records them: the header of the next
    /// segment is written from them.
    meta: Meta,
    /// The known incarnations as the log now records them (also written
    /// into every header).
    incarnations: Incarnations,
    /// The memberships as the log now records them (also written into
    /// every header, once there are any).
    memberships: Vec<Membership>,
    /// What `open` read back, until `load` hands it over.
    loaded: Option<DurableState>,
    /// A newer commit index from a batch that needed no sync: held here and
    /// written with the next record, which saves a sync per decision
    /// (losing it in a crash is safe, see `PersistBatch::needs_sync`).
    unsynced_commit: Option<Slot>,
    /// Set when a write failed: the log may then end in a partial record,
    /// so every later call fails too, until the storage is reopened.
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

/// A segment on disk.
#[derive(Clone, Copy, Debug)]
struct SegmentInfo {
    seq: u64,
    /// The highest slot any of its records accepted (0 if none): once the
    /// log is truncated through it, the segment holds nothing still needed.
    slot_max: Slot,
}

/// Every field of the durable state but the log entries and the snapshot's
/// bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Meta {
    promised: Ballot,
    commit: Slot,
    /// The index of the snapshot in force; its bytes are in their own file.
    snapshot: Option<Slot>,
    /// Entries at or below it are forgotten: segments holding only those
    /// have been (or may be) deleted.
    truncated_through: Slot,
    initialized: bool,
}

/// What a record holds. Variants are only ever added at the end, so logs
/// written before stay readable. The V3 variants are written only where
/// memberships are recorded: a group whose members never changed writes
/// V2, which the binaries before memberships read.
#[derive(Deserialize)]
enum Record {
    /// A header from before incarnations were recorded (read only).
    Header { previous_end: u64, meta: Meta },
    /// A batch from before incarnations were recorded (read only).
    Batch {
        promised: Option<Ballot>,
        entries: Vec<(Slot, Ballot, Batch)>,
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
    },
    /// Opens every segment.
    HeaderV2 {
        /// Where the previous segment's last record ended (0 for none).
        previous_end: u64,
        meta: Meta,
        incarnations: Incarnations,
    },
    /// One synced [`PersistBatch`], its snapshot named by index.
    BatchV2 {
        promised: Option<Ballot>,
        entries: Vec<(Slot, Ballot, Batch)>,
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
        incarnations: Option<Incarnations>,
    },
    /// A header of a log that records memberships.
    HeaderV3 {
        previous_end: u64,
        meta: Meta,
        incarnations: Incarnations,
        memberships: Vec<Membership>,
    },
    /// A batch that replaces the memberships.
    BatchV3 {
        promised: Option<Ballot>,
        entries: Vec<(Slot, Ballot, Batch)>,
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
        incarnations: Option<Incarnations>,
        memberships: Vec<Membership>,
    },
}

/// [`Record`]'s written variants, borrowed, to encode without copying the
/// entries. The variants and fields must stay in the same order as
/// `Record`'s (the two unit variants hold the places of the old ones).
#[derive(Serialize)]
enum RecordRef<'a> {
    _Header,
    _Batch,
    HeaderV2 {
        previous_end: u64,
        meta: &'a Meta,
        incarnations: &'a Incarnations,
    },
    BatchV2 {
        promised: &'a Option<Ballot>,
        entries: &'a [(Slot, Ballot, Batch)],
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
        incarnations: &'a Option<Incarnations>,
    },
    HeaderV3 {
        previous_end: u64,
        meta: &'a Meta,
        incarnations: &'a Incarnations,
        memberships: &'a [Membership],
    },
    BatchV3 {
        promised: &'a Option<Ballot>,
        entries: &'a [(Slot, Ballot, Batch)],
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
        incarnations: &'a Option<Incarnations>,
        memberships: &'a [Membership],
    },
}

impl Meta {
    /// Folds in one batch, as `PersistBatch::apply_to` does for the state.
    fn apply(
        &mut self,
        promised: Option<Ballot>,
        commit: Option<Slot>,
        snapshot: Option<Slot>,
        truncate_through: Option<Slot>,
        initialized: bool,
    ) {
        if let Some(promised) = promised {
            self.promised = promised;
        }
        if let Some(commit) = commit {
            self.commit = commit;
        }
        if snapshot.is_some() {
            self.snapshot = snapshot;
        }
        if let Some(through) = truncate_through {
            self.truncated_through = self.truncated_through.max(through);
        }
        self.initialized |= initialized;
    }
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
    buffer.extend_from_slice(&[0; FRAME_BYTES]);
    *buffer = postcard::to_extend(record, std::mem::take(buffer))
        .map_err(|e| StorageError::Corrupt(format!("cannot encode a log record: {e}")))?;
    let payload_len = buffer.len() - start - FRAME_BYTES;
    let length = u32::try_from(payload_len)
        .map_err(|_| StorageError::Io(format!("log record of {payload_len} bytes is too large")))?
        .to_le_bytes();
    let crc = checksum(&length, &buffer[start + FRAME_BYTES..]);
    buffer[start..start + 4].copy_from_slice(&length);
    buffer[start + 4..start + FRAME_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads the records of one segment, stopping at the first that is
/// incomplete or fails its checksum. Also returns where the last good
/// record ends.
///
/// A crash can only tear the record being written, the last: it leaves a
/// mix of that record's bytes and the zeros it was written over, and only
/// zeros after it (records are appended into preallocated zeros, and a
/// reopened log never writes after a torn record). So a bad record followed
/// by anything but zeros is damage, not a crash (etcd's rule): an error,
/// since dropping it would silently drop every promise and acceptance
/// after it.
fn read_records(path: &Path) -> Result<(Vec<Record>, u64), StorageError> {
    let file = File::open(path).map_err(|e| io_error(path.display(), e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_error(path.display(), e))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut records = Vec::new();
    let mut offset = 0u64;
    let frame_bytes = FRAME_BYTES as u64;
    loop {
        let mut frame = [0u8; FRAME_BYTES];
        match reader.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_error(path.display(), e)),
        }
        let length: [u8; 4] = frame[..4].try_into().unwrap_or_default();
        let crc = u32::from_le_bytes(frame[4..].try_into().unwrap_or_default());
        let payload_len = u32::from_le_bytes(length) as u64;
        // Zero length: the preallocated space past the last record (or a
        // torn one). A length past the end: a torn frame (or damage).
        if payload_len == 0 || offset + frame_bytes + payload_len > file_len {
            expect_not_flipped(path, offset, payload_len as u32, crc, file_len)?;
            expect_zeros_after(path, offset, offset + frame_bytes)?;
            break;
        }
        let mut payload = vec![0u8; payload_len as usize];
        match reader.read_exact(&mut payload) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_error(path.display(), e)),
        }
        if checksum(&length, &payload) != crc {
            expect_not_flipped(path, offset, payload_len as u32, crc, file_len)?;
            expect_zeros_after(path, offset, offset + frame_bytes + payload_len)?;
            break;
        }
        let record = postcard::from_bytes(&payload).map_err(|e| {
            StorageError::Corrupt(format!(
                "{} at byte {offset}: a record with a valid checksum does not decode: {e}",
                path.display()
            ))
        })?;
        records.push(record);
        offset += FRAME_BYTES as u64 + payload_len;
    }
    Ok((records, offset))
}

/// A length with one bit flipped can make a damaged record look like a
/// torn last one: too long, it swallows the records after it, which then
/// pass for the torn bytes. A torn write never flips a bit of a length
/// whose payload it wrote whole, so if the record checks out with one bit
/// of its length flipped back, it is damage.
fn expect_not_flipped(
    path: &Path,
    record: u64,
    length: u32,
    crc: u32,
    file_len: u64,
) -> Result<(), StorageError> {
    let file = File::open(path).map_err(|e| io_error(path.display(), e))?;
    let frame_bytes = FRAME_BYTES as u64;
    for bit in 0..32 {
        let candidate = length ^ (1 << bit);
        let end = record + frame_bytes + u64::from(candidate);
        if candidate == 0 || end > file_len {
            continue;
        }
        let mut payload = vec![0u8; candidate as usize];
        file.read_exact_at(&mut payload, record + frame_bytes)
            .map_err(|e| io_error(path.display(), e))?;
        if checksum(&candidate.to_le_bytes(), &payload) == crc {
            return Err(StorageError::Corrupt(format!(
                "{} is damaged: the length of the record at byte {record} has a flipped \
                 bit (it checks out as {candidate} bytes, not {length}); the records \
                 after it cannot be trusted",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Checks that nothing but zeros follows `from` in the segment at `path`,
/// where the bad record at `record` ends the log (see `read_records`).
fn expect_zeros_after(path: &Path, record: u64, from: u64) -> Result<(), StorageError> {
    let file = File::open(path).map_err(|e| io_error(path.display(), e))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = from;
    loop {
        let read = file
            .read_at(&mut chunk, at)
            .map_err(|e| io_error(path.display(), e))?;
        if read == 0 {
            return Ok(());
        }
        if let Some(i) = chunk[..read].iter().position(|b| *b != 0) {
            let what = if record == 0 {
                "the segment's header".to_string()
            } else {
                format!("the record at byte {record}")
            };
            return Err(StorageError::Corrupt(format!(
                "{} is damaged: {what} fails its checksum or its length, but data \
                 follows it (at byte {}), so it is not a write cut short by a crash; \
                 the records after it cannot be trusted",
                path.display(),
                at + i as u64
            )));
        }
        at += read as u64;
    }
}

/// Snapshot file: CRC-32 of the rest (u32), the index (u64), the data.
fn write_snapshot_file(dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let name = snapshot_name(snapshot.index);
    let temporary = dir.join(format!("{name}.tmp"));
    let index = snapshot.index.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index);
    hasher.update(&snapshot.data);
    let crc = hasher.finalize().to_le_bytes();
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(&crc)?;
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
        data: bytes::Bytes::from(bytes).slice(12..),
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

/// Creates segment `seq`, opened by a header of `meta`, at least `len_min`
/// bytes long, and makes it durable. It is written under a temporary name,
/// synced, then renamed: a segment under its own name always opens with a
/// whole header.
fn create_segment(
    dir: &Path,
    seq: u64,
    previous_end: u64,
    (meta, incarnations, memberships): (&Meta, &Incarnations, &[Membership]),
    len_min: u64,
    buffer: &mut Vec<u8>,
) -> Result<OpenSegment, StorageError> {
    buffer.clear();
    let header = if memberships.is_empty() {
        RecordRef::HeaderV2 {
            previous_end,
            meta,
            incarnations,
        }
    } else {
        RecordRef::HeaderV3 {
            previous_end,
            meta,
            incarnations,
            memberships,
        }
    };
    encode_record(&header, buffer)?;
    let header_len = buffer.len() as u64;
    let len = len_min.max(header_len * 2);
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
        offset: header_len,
        len,
    })
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

/// The state the segments `seqs` (consecutive, oldest first) record, with
/// each segment's highest slot and where the newest one's records end.
fn replay(
    dir: &Path,
    seqs: &[u64],
) -> Result<(DurableState, Meta, Vec<SegmentInfo>, u64), StorageError> {
    let mut entries: BTreeMap<Slot, (Ballot, Batch)> = BTreeMap::new();
    let mut meta = Meta::default();
    let mut incarnations = Incarnations::new();
    let mut memberships = Vec::new();
    let mut infos = Vec::new();
    // The previous segment's path and where its records ended.
    let mut previous: Option<(PathBuf, u64)> = None;
    for &seq in seqs {
        let path = dir.join(segment_name(seq));
        let (records, end) = read_records(&path)?;
        let mut records = records.into_iter();
        // A segment is renamed into place only after its header is synced:
        // one without is damaged.
        let (previous_end, header, header_incarnations, header_memberships) = match records.next() {
            Some(Record::Header { previous_end, meta }) => {
                (previous_end, meta, Vec::new(), Vec::new())
            }
            Some(Record::HeaderV2 {
                previous_end,
                meta,
                incarnations,
            }) => (previous_end, meta, incarnations, Vec::new()),
            Some(Record::HeaderV3 {
                previous_end,
                meta,
                incarnations,
                memberships,
            }) => (previous_end, meta, incarnations, memberships),
            _ => {
                return Err(StorageError::Corrupt(format!(
                    "{} does not open with a valid header",
                    path.display()
                )))
            }
        };
        if let Some((previous_path, previous_read)) = &previous {
            if *previous_read != previous_end {
                return Err(StorageError::Corrupt(format!(
                    "{} is damaged: its records end at byte {previous_read}, \
                     but the next segment says they ran to byte {previous_end}",
                    previous_path.display()
                )));
            }
        }
        // Entries replayed so far are all above its truncation point: the
        // record that truncated is replayed too, or was deleted with every
        // segment before it.
        meta = header;
        incarnations = header_incarnations;
        memberships = header_memberships;
        let mut slot_max = 0;
        for record in records {
            // An old batch reads as a new one that changed no incarnation
            // and no membership.
            let (
                promised,
                accepted,
                commit,
                snapshot,
                truncate_through,
                initialized,
                known,
                members,
            ) = match record {
                Record::Batch {
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                } => (
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                    None,
                    None,
                ),
                Record::BatchV2 {
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                    incarnations,
                } => (
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                    incarnations,
                    None,
                ),
                Record::BatchV3 {
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                    incarnations,
                    memberships,
                } => (
                    promised,
                    entries,
                    commit,
                    snapshot,
                    truncate_through,
                    initialized,
                    incarnations,
                    Some(memberships),
                ),
                Record::Header { .. } | Record::HeaderV2 { .. } | Record::HeaderV3 { .. } => {
                    return Err(StorageError::Corrupt(format!(
                        "{} holds a second header",
                        path.display()
                    )))
                }
            };
            meta.apply(promised, commit, snapshot, truncate_through, initialized);
            if let Some(known) = known {
                incarnations = known;
            }
            if let Some(members) = members {
                memberships = members;
            }
            if let Some(through) = truncate_through {
                entries = entries.split_off(&(through + 1));
            }
            for (slot, ballot, batch) in accepted {
                slot_max = slot_max.max(slot);
                entries.insert(slot, (ballot, batch));
            }
        }
        infos.push(SegmentInfo { seq, slot_max });
        previous = Some((path, end));
    }
    let state = DurableState {
        promised: meta.promised,
        entries,
        commit: meta.commit,
        snapshot: match meta.snapshot {
            Some(index) => Some(read_snapshot_file(dir, index)?),
            None => None,
        },
        initialized: meta.initialized,
        incarnations,
        memberships,
    };
    Ok((state, meta, infos, previous.map_or(0, |(_, end)| end)))
}

impl WalStorage {
    /// Opens (or creates) the storage in `dir`: reads back the log, then
    /// starts a new segment and deletes what is superseded.
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

        let mut seqs = Vec::new();
        let mut snapshots = Vec::new();
        let listing = std::fs::read_dir(&dir).map_err(|e| io_error(dir.display(), e))?;
        for item in listing {
            let item = item.map_err(|e| io_error(dir.display(), e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A segment or snapshot whose creation a crash cut short.
                remove_file(&item.path());
            } else if let Some(seq) = parse_name(&name, "wal-", ".log") {
                seqs.push(seq);
            } else if let Some(index) = parse_name(&name, "snap-", ".bin") {
                snapshots.push(index);
            }
        }
        seqs.sort_unstable();
        // Segments are deleted oldest first, so those left are consecutive.
        if let Some(pair) = seqs.windows(2).find(|pair| pair[1] != pair[0] + 1) {
            return Err(StorageError::Corrupt(format!(
                "{}: log segment {} is missing",
                dir.display(),
                segment_name(pair[0] + 1)
            )));
        }
        let (state, meta, infos, end) = replay(&dir, &seqs)?;
        if let Some(newest) = seqs.last() {
            // Its last records may have been written but not yet synced
            // when the process died: the replica is about to act on them
            // (and the next header vouches for where they end), so they
            // must be durable first.
            let path = dir.join(segment_name(*newest));
            File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| io_error(format!("syncing {}", path.display()), e))?;
        }

        let mut buffer = Vec::new();
        let seq = seqs.last().map_or(1, |newest| newest + 1);
        let incarnations = state.incarnations.clone();
        let memberships = state.memberships.clone();
        let segment = create_segment(
            &dir,
            seq,
            end,
            (&meta, &incarnations, &memberships),
            options.segment_bytes,
            &mut buffer,
        )?;
        let mut segments: VecDeque<SegmentInfo> = infos.into();
        segments.push_back(SegmentInfo { seq, slot_max: 0 });
        for index in snapshots.into_iter().filter(|i| Some(*i) != meta.snapshot) {
            remove_file(&dir.join(snapshot_name(index)));
        }
        let mut storage = WalStorage {
            dir,
            options,
            _lock: lock,
            segment,
            segments,
            meta,
            incarnations,
            memberships,
            loaded: Some(state),
            unsynced_commit: None,
            failed: false,
            buffer,
        };
        storage.delete_truncated_segments();
        Ok(storage)
    }

    /// Rolls over to a new segment with room for `record_len` bytes.
    fn start_segment(&mut self, record_len: u64) -> Result<(), StorageError> {
        let seq = self.segment.seq + 1;
        let mut buffer = Vec::new();
        let segment = create_segment(
            &self.dir,
            seq,
            self.segment.offset,
            (&self.meta, &self.incarnations, &self.memberships),
            // A record larger than a segment gets one of its own, with
            // room for the header too.
            self.options.segment_bytes.max(record_len + 4096),
            &mut buffer,
        )?;
        self.segment = segment;
        self.segments.push_back(SegmentInfo { seq, slot_max: 0 });
        Ok(())
    }

    /// Deletes the oldest segments, while every entry they hold is
    /// truncated. Never the open one.
    fn delete_truncated_segments(&mut self) {
        while self.segments.len() > 1 && self.segments[0].slot_max <= self.meta.truncated_through {
            if let Some(old) = self.segments.pop_front() {
                remove_file(&self.dir.join(segment_name(old.seq)));
            }
        }
    }

    fn persist_synced(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        let snapshot = batch.snapshot.as_ref().map(|s| s.index);
        if let Some(snapshot) = &batch.snapshot {
            // Durable before the record that refers to it.
            write_snapshot_file(&self.dir, snapshot)?;
        }
        // A held commit index rides along (the batch's own is never older).
        let commit = batch.commit.max(self.unsynced_commit.take());
        self.buffer.clear();
        let record = match &batch.memberships {
            None => RecordRef::BatchV2 {
                promised: &batch.promised,
                entries: &batch.entries,
                commit,
                snapshot,
                truncate_through: batch.truncate_through,
                initialized: batch.initialized,
                incarnations: &batch.incarnations,
            },
            Some(memberships) => RecordRef::BatchV3 {
                promised: &batch.promised,
                entries: &batch.entries,
                commit,
                snapshot,
                truncate_through: batch.truncate_through,
                initialized: batch.initialized,
                incarnations: &batch.incarnations,
                memberships,
            },
        };
        encode_record(&record, &mut self.buffer)?;
        let record_len = self.buffer.len() as u64;
        if self.segment.offset + record_len > self.segment.len {
            // The header written from `meta` comes before this batch.
            self.start_segment(record_len)?;
        }
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

        let previous_snapshot = self.meta.snapshot;
        self.meta.apply(
            batch.promised,
            commit,
            snapshot,
            batch.truncate_through,
            batch.initialized,
        );
        if let Some(known) = &batch.incarnations {
            self.incarnations = known.clone();
        }
        if let Some(memberships) = &batch.memberships {
            self.memberships = memberships.clone();
        }
        if let Some(open) = self.segments.back_mut() {
            let highest = batch.entries.iter().map(|(slot, _, _)| *slot).max();
            open.slot_max = open.slot_max.max(highest.unwrap_or(0));
        }
        if let Some(old) = previous_snapshot.filter(|old| Some(*old) != self.meta.snapshot) {
            remove_file(&self.dir.join(snapshot_name(old)));
        }
        if batch.truncate_through.is_some() {
            self.delete_truncated_segments();
        }
        Ok(())
    }
}

impl Storage for WalStorage {
    fn load(&mut self) -> Result<DurableState, StorageError> {
        // What a restart would read: the held commit index is not on disk.
        self.unsynced_commit = None;
        if let Some(state) = self.loaded.take() {
            return Ok(state);
        }
        let seqs: Vec<u64> = self.segments.iter().map(|s| s.seq).collect();
        let (state, ..) = replay(&self.dir, &seqs)?;
        Ok(state)
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
        // The state handed out at open is stale from here on.
        self.loaded = None;
        let result = self.persist_synced(batch);
        self.failed = result.is_err();
        result
    }
}
