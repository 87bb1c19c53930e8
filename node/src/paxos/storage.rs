//! Durable acceptor state behind a trait, so the core stays free of I/O.
//!
//! The core never writes anything itself: each `Ready` carries a
//! [`PersistBatch`] that the driver hands to [`Storage::persist`] (one sync)
//! before it sends the messages that depend on it.

use std::collections::BTreeMap;

use super::types::{Ballot, Batch, Incarnations, Membership, Slot, Snapshot};

/// Everything an acceptor must remember across a crash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DurableState {
    /// The highest ballot promised: the acceptor must never go back on it.
    pub promised: Ballot,
    /// Accepted values above the snapshot, with the ballot they were accepted in.
    pub entries: BTreeMap<Slot, (Ballot, Batch)>,
    /// Slots up to here are known decided; lets a restarted replica re-apply at once.
    pub commit: Slot,
    /// The newest snapshot; the log below it may be gone.
    pub snapshot: Option<Snapshot>,
    /// This acceptor may vote: it belongs to a new group, or it has
    /// recovered what it might have forgotten (see `Paxos` on recovery).
    pub initialized: bool,
    /// The highest incarnation known of each member, this one's own
    /// included (missing entries are 0). Durable, because a replica that
    /// answered another's recovery must never again count that replica's
    /// votes from before it.
    pub incarnations: Incarnations,
    /// The group's memberships, oldest first, from the one in force at the
    /// snapshot on (empty: only the one the group started with). Durable,
    /// because the stop signs that made them may be compacted away.
    pub memberships: Vec<Membership>,
}

impl DurableState {
    /// True if anything at all was ever persisted. An acceptor that holds
    /// anything has voted, so it counts as initialised whatever the flag says.
    pub fn is_blank(&self) -> bool {
        !self.initialized
            && self.promised == Ballot::default()
            && self.entries.is_empty()
            && self.commit == 0
            && self.snapshot.is_none()
            && self.incarnations.iter().all(|i| *i == 0)
            && self.memberships.is_empty()
    }
}

/// The writes produced by one round of `step`/`tick`/`propose`, applied atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PersistBatch {
    pub promised: Option<Ballot>,
    pub entries: Vec<(Slot, Ballot, Batch)>,
    pub commit: Option<Slot>,
    /// Replaces the stored snapshot. Applied before `truncate_through`.
    pub snapshot: Option<Snapshot>,
    /// Forget every entry at or below this slot. Applied before `entries`.
    pub truncate_through: Option<Slot>,
    /// Record that the acceptor may vote (set once, never cleared).
    pub initialized: bool,
    /// Replaces the known incarnations (rare: only when one changes).
    pub incarnations: Option<Incarnations>,
    /// Replaces the memberships (rare: only when one is learned or pruned).
    pub memberships: Option<Vec<Membership>>,
}

impl PersistBatch {
    pub fn is_empty(&self) -> bool {
        self.promised.is_none()
            && self.entries.is_empty()
            && self.commit.is_none()
            && self.snapshot.is_none()
            && self.truncate_through.is_none()
            && !self.initialized
            && self.incarnations.is_none()
            && self.memberships.is_none()
    }

    /// False when the batch only records a newer commit index. Losing that
    /// in a crash is safe (the replica learns it again from the leader),
    /// so it need not be synced: a follower answering a heartbeat, or a
    /// leader's read confirmation, then costs no fsync. Storage must still
    /// keep batches in order, so a later synced batch makes it durable too.
    pub fn needs_sync(&self) -> bool {
        self.promised.is_some()
            || !self.entries.is_empty()
            || self.snapshot.is_some()
            || self.truncate_through.is_some()
            || self.initialized
            || self.incarnations.is_some()
            || self.memberships.is_some()
    }

    /// Folds `self` into a loaded state, in the order `persist` must use.
    pub fn apply_to(&self, state: &mut DurableState) {
        if let Some(snapshot) = &self.snapshot {
            state.snapshot = Some(snapshot.clone());
        }
        if let Some(through) = self.truncate_through {
            state.entries = state.entries.split_off(&(through + 1));
        }
        for (slot, ballot, batch) in &self.entries {
            state.entries.insert(*slot, (*ballot, batch.clone()));
        }
        if let Some(promised) = self.promised {
            state.promised = promised;
        }
        if let Some(commit) = self.commit {
            state.commit = commit;
        }
        if self.initialized {
            state.initialized = true;
        }
        if let Some(incarnations) = &self.incarnations {
            state.incarnations = incarnations.clone();
        }
        if let Some(memberships) = &self.memberships {
            state.memberships = memberships.clone();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Stable storage for one acceptor.
pub trait Storage: Send {
    /// Reads back everything persisted so far (an empty state if nothing was).
    fn load(&mut self) -> Result<DurableState, StorageError>;
    /// Applies `batch` atomically and in order with earlier batches. When
    /// this returns `Ok` and `batch.needs_sync()`, the batch and every
    /// earlier one survive a crash; a batch that does not need a sync may be
    /// lost in a crash until a later synced batch follows it.
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), StorageError>;
}

/// Storage in memory, for tests and simulations: it "survives" a simulated
/// crash because the simulator keeps it while dropping the node. `load`
/// returns only what was synced, as after a crash: a commit index from a
/// batch that needed no sync is lost until a synced batch follows.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    state: DurableState,
    /// The newest commit index persisted without a sync.
    unsynced_commit: Option<Slot>,
    /// Number of successful `persist` calls: one per sync, for group-commit tests.
    pub syncs: u64,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> &DurableState {
        &self.state
    }
}

impl Storage for MemStorage {
    fn load(&mut self) -> Result<DurableState, StorageError> {
        self.unsynced_commit = None;
        Ok(self.state.clone())
    }

    fn persist(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        if !batch.needs_sync() {
            self.unsynced_commit = batch.commit.max(self.unsynced_commit);
            return Ok(());
        }
        if let Some(commit) = self.unsynced_commit.take() {
            self.state.commit = self.state.commit.max(commit);
        }
        batch.apply_to(&mut self.state);
        self.syncs += 1;
        Ok(())
    }
}
