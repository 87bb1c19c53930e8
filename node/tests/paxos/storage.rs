//! The write-ahead-log storage: what it acknowledged survives a reopen,
//! exactly as the in-memory model (`MemStorage`) says; a write cut short by
//! a crash is dropped; damage is refused, not read as an empty state; and
//! the files on disk stay bounded.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use shardkv::paxos::sim::{test_seed, SimRng};
use shardkv::paxos::{
    Ballot, Batch, Command, MemStorage, PersistBatch, Slot, Snapshot, Storage, StorageError,
    WalOptions, WalStorage,
};

/// Small segments, so the random workload rolls over many times.
fn small_segments() -> WalOptions {
    WalOptions {
        segment_bytes: 4 << 10,
    }
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    found.sort();
    found
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// Random batches in the shapes the core produces: promises, accepted
/// values (new slots and re-accepted ones), a commit index that only grows,
/// commit-only batches (not synced), and snapshots that truncate the log.
struct Workload {
    rng: SimRng,
    round: u64,
    next_slot: Slot,
    commit: Slot,
    snapshot_index: Slot,
    next_id: u64,
}

impl Workload {
    fn new(seed: u64) -> Self {
        Workload {
            rng: SimRng::new(seed),
            round: 1,
            next_slot: 1,
            commit: 0,
            snapshot_index: 0,
            next_id: 1,
        }
    }

    fn command_batch(&mut self) -> Batch {
        let count = 1 + self.rng.below(3) as usize;
        let commands = (0..count)
            .map(|_| {
                self.next_id += 1;
                let len = 50 + self.rng.below(500) as usize;
                Command {
                    origin: self.rng.below(3) as u32,
                    id: self.next_id,
                    data: Bytes::from(vec![(self.next_id % 251) as u8; len]),
                }
            })
            .collect();
        Batch { commands }
    }

    fn next(&mut self) -> PersistBatch {
        let mut batch = PersistBatch::default();
        if self.rng.chance(0.25) {
            // Only a newer commit index: the kind that needs no sync.
            self.commit = (self.commit + 1 + self.rng.below(3)).min(self.next_slot - 1);
            batch.commit = Some(self.commit);
            return batch;
        }
        if self.rng.chance(0.1) {
            self.round += 1;
            batch.promised = Some(Ballot::new(self.round, self.rng.below(3) as u32));
        }
        let ballot = Ballot::new(self.round, 0);
        for _ in 0..self.rng.below(4) {
            let slot = if self.rng.chance(0.2) && self.next_slot > self.snapshot_index + 1 {
                // Re-accept a slot above the snapshot, as a new leader does.
                self.snapshot_index + 1 + self.rng.below(self.next_slot - self.snapshot_index - 1)
            } else {
                self.next_slot += 1;
                self.next_slot - 1
            };
            let value = self.command_batch();
            batch.entries.push((slot, ballot, value));
        }
        if self.rng.chance(0.3) {
            self.commit = (self.commit + self.rng.below(4)).min(self.next_slot - 1);
            batch.commit = Some(self.commit);
        }
        if self.rng.chance(0.07) && self.commit > self.snapshot_index {
            // Compaction, or a snapshot installed from a peer (sometimes the
            // same index again).
            let index = self.snapshot_index + self.rng.below(self.commit - self.snapshot_index + 1);
            self.snapshot_index = index;
            let data = format!("state through {index}, {}", self.rng.next_u64());
            batch.snapshot = Some(Snapshot {
                index,
                data: Bytes::from(data.repeat(1 + self.rng.below(200) as usize)),
            });
            batch.truncate_through = Some(index);
            // Entries in the same batch land above the truncation.
            batch.entries.retain(|(slot, _, _)| *slot > index);
        }
        if self.rng.chance(0.05) {
            batch.initialized = true;
        }
        if self.rng.chance(0.05) {
            // A peer's recovery recorded (rare, so some segments' headers
            // carry the vector and some records change it).
            let len = self.rng.below(6) as usize;
            batch.incarnations = Some((0..len).map(|_| self.rng.below(1 << 40)).collect());
        }
        batch
    }
}

#[test]
fn random_batches_survive_reopens_as_the_memory_model_says() {
    let seed = test_seed("wal_random_batches");
    let dir = tempfile::tempdir().unwrap();
    let mut workload = Workload::new(seed);
    let mut model = MemStorage::new();
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let mut reopens = 0;
    for step in 0..600 {
        let batch = workload.next();
        wal.persist(&batch).unwrap();
        model.persist(&batch).unwrap();
        assert!(
            files(dir.path(), "snap-").len() <= 1,
            "seed {seed}, step {step}: superseded snapshots are deleted"
        );
        if workload.rng.chance(0.08) {
            drop(wal);
            wal = WalStorage::open(dir.path(), small_segments()).unwrap();
            reopens += 1;
            assert_eq!(
                wal.load().unwrap(),
                model.load().unwrap(),
                "seed {seed}, step {step}: reopened state differs from the model"
            );
        }
    }
    drop(wal);
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let loaded = wal.load().unwrap();
    assert_eq!(loaded, model.load().unwrap(), "seed {seed}: final state");
    // The workload must have reached the cases it is for.
    assert!(reopens >= 20, "seed {seed}: only {reopens} reopens");
    assert!(loaded.snapshot.is_some(), "seed {seed}: no snapshot taken");
    assert!(
        !loaded.entries.is_empty(),
        "seed {seed}: log empty at the end"
    );
}

/// The state written by two batches, with the segment's bytes after each.
struct TwoWrites {
    dir: tempfile::TempDir,
    segment: PathBuf,
    after_first: Vec<u8>,
    after_second: Vec<u8>,
    first: PersistBatch,
    second: PersistBatch,
}

fn two_writes(second: PersistBatch) -> TwoWrites {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: 64 << 10,
    };
    let mut wal = WalStorage::open(dir.path(), options).unwrap();
    let first = PersistBatch {
        promised: Some(Ballot::new(3, 1)),
        entries: vec![(1, Ballot::new(3, 1), Workload::new(1).command_batch())],
        commit: Some(1),
        initialized: true,
        ..Default::default()
    };
    wal.persist(&first).unwrap();
    let segment = files(dir.path(), "wal-").pop().unwrap();
    let after_first = std::fs::read(&segment).unwrap();
    wal.persist(&second).unwrap();
    let after_second = std::fs::read(&segment).unwrap();
    drop(wal);
    TwoWrites {
        dir,
        segment,
        after_first,
        after_second,
        first,
        second,
    }
}

impl TwoWrites {
    /// A copy of the directory, with the segment's bytes replaced.
    fn copy_with_segment(&self, bytes: &[u8]) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(self.dir.path(), copy.path());
        std::fs::write(copy.path().join(self.segment.file_name().unwrap()), bytes).unwrap();
        copy
    }
}

fn state_of(batches: &[&PersistBatch]) -> shardkv::paxos::DurableState {
    let mut model = MemStorage::new();
    for b in batches {
        model.persist(b).unwrap();
    }
    model.load().unwrap()
}

#[test]
fn a_record_cut_short_by_a_crash_is_dropped() {
    let seed = test_seed("wal_torn_record");
    let mut rng = SimRng::new(seed);
    let second = PersistBatch {
        entries: vec![(2, Ballot::new(3, 1), Workload::new(2).command_batch())],
        commit: Some(2),
        ..Default::default()
    };
    let w = two_writes(second);
    let differs = |i: &usize| w.after_first[*i] != w.after_second[*i];
    let start = (0..w.after_first.len()).find(differs).unwrap();
    let end = (0..w.after_first.len()).rev().find(differs).unwrap();
    let only_first = state_of(&[&w.first]);
    let both = state_of(&[&w.first, &w.second]);
    assert_ne!(only_first, both);
    // Every prefix of the second record, followed by the zeros of the
    // preallocated space, reads back as the first alone; so does the
    // record with garbage in its body (a torn write that left its frame).
    for cut in start..=end {
        for garbage in [false, true] {
            if garbage && cut < start + 8 {
                continue;
            }
            let mut bytes = w.after_second.clone();
            for byte in &mut bytes[cut..=end] {
                *byte = if garbage { rng.next_u64() as u8 } else { 0 };
            }
            let copy = w.copy_with_segment(&bytes);
            let mut wal = WalStorage::open(copy.path(), WalOptions::default()).unwrap();
            assert_eq!(
                wal.load().unwrap(),
                only_first,
                "seed {seed}: cut at byte {cut} (record at {start}..={end}), garbage {garbage}"
            );
        }
    }
    let mut wal = WalStorage::open(w.dir.path(), WalOptions::default()).unwrap();
    assert_eq!(wal.load().unwrap(), both, "the whole record reads back");
}

/// Damage inside the newest segment, with records after it, is not a torn
/// tail: reading it as one would forget the promises and acceptances
/// after it. Before, any bad record ended the log silently.
#[test]
fn a_bad_record_followed_by_data_is_damage_not_a_torn_tail() {
    let seed = test_seed("wal_damage_before_data");
    let mut rng = SimRng::new(seed);
    let second = PersistBatch {
        entries: vec![(2, Ballot::new(3, 1), Workload::new(2).command_batch())],
        commit: Some(2),
        ..Default::default()
    };
    let w = two_writes(second);
    // The header and the first record end at the last byte written before
    // the second (the second's first bytes may be zeros, like the space it
    // went into, so this is safer than where the two files first differ).
    let first_end = w.after_first.iter().rposition(|b| *b != 0).unwrap() + 1;
    // Every bit of the first record's length: a longer length could make
    // it swallow the second record and pass for a torn last one.
    let header_len = 8 + u32::from_le_bytes(w.after_first[..4].try_into().unwrap()) as usize;
    let length_bits = (0..32).map(|bit| header_len * 8 + bit);
    // And a flipped bit anywhere in the header or the first record, with
    // the second record after it.
    let random_bits: Vec<usize> = (0..50)
        .map(|_| rng.below(first_end as u64 * 8) as usize)
        .collect();
    for bit in length_bits.chain(random_bits) {
        let mut bytes = w.after_second.clone();
        let at = bit / 8;
        bytes[at] ^= 1 << (bit % 8);
        let copy = w.copy_with_segment(&bytes);
        let message = open_error(copy.path());
        assert!(
            message.contains("damaged") || message.contains("header"),
            "seed {seed}: flipped byte {at}: {message}"
        );
    }
}

#[test]
fn a_snapshot_whose_record_was_not_written_is_ignored() {
    let w = two_writes(compaction(1, 1));
    // The crash came after the snapshot file was renamed into place, before
    // its record was appended.
    let copy = w.copy_with_segment(&w.after_first);
    assert_eq!(files(copy.path(), "snap-").len(), 1);
    let mut wal = WalStorage::open(copy.path(), WalOptions::default()).unwrap();
    assert_eq!(wal.load().unwrap(), state_of(&[&w.first]));
    assert!(
        files(copy.path(), "snap-").is_empty(),
        "the unreferenced snapshot is deleted"
    );
    let mut wal = WalStorage::open(w.dir.path(), WalOptions::default()).unwrap();
    let loaded = wal.load().unwrap();
    assert_eq!(loaded, state_of(&[&w.first, &w.second]));
    assert!(loaded.entries.is_empty(), "the snapshot truncated slot 1");
}

fn open_error(dir: &Path) -> String {
    match WalStorage::open(dir, WalOptions::default()) {
        Ok(_) => panic!("damaged storage at {} opened", dir.display()),
        Err(e @ StorageError::Corrupt(_)) => e.to_string(),
        Err(e) => panic!("expected Corrupt, got {e}"),
    }
}

#[test]
fn a_damaged_header_or_snapshot_is_refused() {
    let w = two_writes(compaction(1, 1));
    // A flipped bit in the header that opens the segment: reading it as an
    // empty log would forget promises, so opening must fail.
    let mut bytes = w.after_second.clone();
    bytes[10] ^= 0x40;
    let copy = w.copy_with_segment(&bytes);
    let message = open_error(copy.path());
    assert!(message.contains("header"), "{message}");

    let copy = tempfile::tempdir().unwrap();
    copy_dir(w.dir.path(), copy.path());
    let snapshot = files(copy.path(), "snap-").pop().unwrap();
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&snapshot, &bytes).unwrap();
    let message = open_error(copy.path());
    assert!(message.contains("checksum"), "{message}");

    let copy = tempfile::tempdir().unwrap();
    copy_dir(w.dir.path(), copy.path());
    std::fs::remove_file(files(copy.path(), "snap-").pop().unwrap()).unwrap();
    let message = open_error(copy.path());
    assert!(message.contains("cannot be read"), "{message}");
}

#[test]
fn a_second_open_of_one_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = WalStorage::open(dir.path(), WalOptions::default()).unwrap();
    let message = match WalStorage::open(dir.path(), WalOptions::default()) {
        Ok(_) => panic!("two storages opened one directory"),
        Err(e) => e.to_string(),
    };
    assert!(message.contains("in use"), "{message}");
    drop(first);
    WalStorage::open(dir.path(), WalOptions::default()).expect("free again once closed");
}

#[test]
fn an_unsynced_commit_index_is_durable_only_with_a_later_record() {
    let dir = tempfile::tempdir().unwrap();
    let accept = |slots: &[Slot]| PersistBatch {
        entries: slots
            .iter()
            .map(|&slot| (slot, Ballot::new(1, 0), Workload::new(slot).command_batch()))
            .collect(),
        ..Default::default()
    };
    let commit = PersistBatch {
        commit: Some(2),
        ..Default::default()
    };
    let reopened_commit = |batches: &[&PersistBatch]| {
        let mut wal = WalStorage::open(dir.path(), WalOptions::default()).unwrap();
        for batch in batches {
            wal.persist(batch).unwrap();
        }
        drop(wal);
        let mut wal = WalStorage::open(dir.path(), WalOptions::default()).unwrap();
        wal.load().unwrap().commit
    };
    assert_eq!(
        reopened_commit(&[&accept(&[1, 2]), &commit]),
        0,
        "a commit alone is not synced"
    );
    assert_eq!(
        reopened_commit(&[&commit, &accept(&[3])]),
        2,
        "it rode with the next record"
    );
}

/// Writes `slots` entries of about 500 bytes each, one per batch.
fn fill(wal: &mut WalStorage, model: &mut MemStorage, slots: std::ops::RangeInclusive<Slot>) {
    let mut workload = Workload::new(*slots.start());
    for slot in slots {
        let batch = PersistBatch {
            entries: vec![(slot, Ballot::new(1, 0), workload.command_batch())],
            commit: Some(slot.saturating_sub(1)),
            ..Default::default()
        };
        wal.persist(&batch).unwrap();
        model.persist(&batch).unwrap();
    }
}

fn compaction(index: Slot, truncate_through: Slot) -> PersistBatch {
    PersistBatch {
        snapshot: Some(Snapshot {
            index,
            data: Bytes::from(format!("state through {index}")),
        }),
        truncate_through: Some(truncate_through),
        ..Default::default()
    }
}

#[test]
fn segments_are_deleted_once_the_log_is_truncated_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let mut model = MemStorage::new();
    fill(&mut wal, &mut model, 1..=100);
    let written = files(dir.path(), "wal-").len();
    assert!(
        written >= 8,
        "100 entries of ~500 bytes span {written} segments"
    );
    // A snapshot at 80 that keeps the log from 51 up (for lagging peers):
    // only segments wholly at or below 50 go.
    let batch = compaction(80, 50);
    wal.persist(&batch).unwrap();
    model.persist(&batch).unwrap();
    let kept = files(dir.path(), "wal-").len();
    assert!(
        kept < written && kept > 1,
        "{written} segments, {kept} after truncating half"
    );
    drop(wal);
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    assert_eq!(wal.load().unwrap(), model.load().unwrap());
    let batch = compaction(100, 100);
    wal.persist(&batch).unwrap();
    model.persist(&batch).unwrap();
    assert_eq!(
        files(dir.path(), "wal-").len(),
        1,
        "only the open segment is left"
    );
    assert_eq!(
        files(dir.path(), "snap-").len(),
        1,
        "only the newest snapshot is left"
    );
    drop(wal);
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let loaded = wal.load().unwrap();
    assert_eq!(loaded, model.load().unwrap());
    assert!(loaded.entries.is_empty());
    assert_eq!(loaded.snapshot.map(|s| s.index), Some(100));
}

#[test]
fn damage_inside_an_older_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let mut model = MemStorage::new();
    fill(&mut wal, &mut model, 1..=30);
    drop(wal);
    let segments = files(dir.path(), "wal-");
    assert!(segments.len() >= 3, "{} segments", segments.len());
    // The first segment loses its last records: in the newest segment that
    // would be a torn tail, but the next header says where it must end.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let first = copy.path().join(segments[0].file_name().unwrap());
    let mut bytes = std::fs::read(&first).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).unwrap();
    bytes[end - 100] ^= 0x10;
    std::fs::write(&first, &bytes).unwrap();
    let message = open_error(copy.path());
    assert!(message.contains("is damaged"), "{message}");
    // A segment missing from the middle.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    std::fs::remove_file(copy.path().join(segments[1].file_name().unwrap())).unwrap();
    let message = open_error(copy.path());
    assert!(message.contains("missing"), "{message}");
    // Untouched, it reads back whole.
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    assert_eq!(wal.load().unwrap(), model.load().unwrap());
}

/// A log written before incarnations were recorded (the first header and
/// batch record variants) still opens, with every field read back.
#[test]
fn a_log_from_before_incarnations_still_opens() {
    use serde::Serialize;

    // The old records' shapes, field for field (postcard is not
    // self-describing: the order is the format).
    #[derive(Serialize)]
    struct OldMeta {
        promised: Ballot,
        commit: u64,
        snapshot: Option<u64>,
        truncated_through: u64,
        initialized: bool,
    }
    #[derive(Serialize)]
    enum OldRecord {
        Header {
            previous_end: u64,
            meta: OldMeta,
        },
        Batch {
            promised: Option<Ballot>,
            entries: Vec<(u64, Ballot, shardkv::paxos::Batch)>,
            commit: Option<u64>,
            snapshot: Option<u64>,
            truncate_through: Option<u64>,
            initialized: bool,
        },
    }
    fn frame(record: &OldRecord, out: &mut Vec<u8>) {
        let payload = postcard::to_allocvec(record).unwrap();
        let length = (payload.len() as u32).to_le_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&length);
        hasher.update(&payload);
        out.extend_from_slice(&length);
        out.extend_from_slice(&hasher.finalize().to_le_bytes());
        out.extend_from_slice(&payload);
    }
    let ballot = Ballot::new(4, 2);
    let batch = Workload::new(3).command_batch();
    let mut bytes = Vec::new();
    let header = OldRecord::Header {
        previous_end: 0,
        meta: OldMeta {
            promised: Ballot::new(3, 1),
            commit: 0,
            snapshot: None,
            truncated_through: 0,
            initialized: true,
        },
    };
    frame(&header, &mut bytes);
    let record = OldRecord::Batch {
        promised: Some(ballot),
        entries: vec![(1, ballot, batch.clone())],
        commit: Some(1),
        snapshot: None,
        truncate_through: None,
        initialized: false,
    };
    frame(&record, &mut bytes);
    bytes.resize(bytes.len() + 4096, 0); // the preallocated space
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("wal-{:020}.log", 1)), &bytes).unwrap();
    let mut wal = WalStorage::open(dir.path(), WalOptions::default()).unwrap();
    let state = wal.load().unwrap();
    assert_eq!(state.promised, ballot);
    assert_eq!(state.commit, 1);
    assert!(state.initialized);
    assert_eq!(state.entries.get(&1), Some(&(ballot, batch)));
    assert!(state.incarnations.is_empty(), "no incarnation recorded yet");
}

#[test]
fn memberships_survive_reopens_and_the_deletion_of_the_segment_that_recorded_them() {
    use shardkv::paxos::Membership;
    let dir = tempfile::tempdir().unwrap();
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let mut model = MemStorage::new();
    fill(&mut wal, &mut model, 1..=10);
    let changed = PersistBatch {
        memberships: Some(vec![
            Membership::initial(3),
            Membership {
                epoch: 1,
                first_slot: 11,
                voters: 0b111,
                learners: 0b1000,
                members: (0..4)
                    .map(|id| {
                        let member = shardkv::paxos::Member {
                            incarnation: 100 + u64::from(id),
                            address: format!("node-{id}.example:7000"),
                        };
                        (id, member)
                    })
                    .collect(),
            },
        ]),
        ..Default::default()
    };
    wal.persist(&changed).unwrap();
    model.persist(&changed).unwrap();
    drop(wal);
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    assert_eq!(wal.load().unwrap(), model.load().unwrap());
    // Later segments carry them in their headers: the one with the batch
    // that recorded them is deleted once the log is truncated past it.
    fill(&mut wal, &mut model, 11..=60);
    let batch = compaction(60, 60);
    wal.persist(&batch).unwrap();
    model.persist(&batch).unwrap();
    drop(wal);
    let mut wal = WalStorage::open(dir.path(), small_segments()).unwrap();
    let loaded = wal.load().unwrap();
    assert_eq!(loaded, model.load().unwrap());
    assert_eq!(loaded.memberships.len(), 2, "{:?}", loaded.memberships);
}
