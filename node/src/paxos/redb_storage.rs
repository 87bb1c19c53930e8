//! Acceptor state on disk, in redb.
//!
//! redb is a pure-Rust embedded B-tree store with ACID transactions and an
//! explicit durability level: a transaction committed with
//! `Durability::Immediate` is fsynced before `commit` returns. Each
//! [`PersistBatch`] becomes exactly one such transaction, so a `Ready` costs
//! one sync however many promises and entries it carries (group commit).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use super::storage::{DurableState, PersistBatch, Storage, StorageError};
use super::types::{Ballot, Batch, Slot, Snapshot};

/// Small records: the promise, the commit index, the snapshot.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("paxos_meta");
/// Accepted values by slot: postcard-encoded (ballot, batch).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("paxos_log");

const PROMISED: &str = "promised";
const COMMIT: &str = "commit";
const SNAPSHOT: &str = "snapshot";
const INITIALIZED: &str = "initialized";

/// A replica's acceptor state in one redb file.
pub struct RedbStorage {
    /// The open database; redb allows one writer, which is all a replica needs.
    db: Database,
    /// A newer commit index from a batch that needed no sync: held here
    /// and written with the next synced batch, which saves a transaction
    /// per decision (losing it in a crash is safe, see `needs_sync`).
    unsynced_commit: Option<Slot>,
}

impl RedbStorage {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let db = Database::create(path.as_ref()).map_err(io)?;
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(META).map_err(io)?;
        tx.open_table(LOG).map_err(io)?;
        tx.commit().map_err(io)?;
        Ok(RedbStorage {
            db,
            unsynced_commit: None,
        })
    }
}

fn io(e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(e.to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(value).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

impl Storage for RedbStorage {
    fn load(&mut self) -> Result<DurableState, StorageError> {
        let tx = self.db.begin_read().map_err(io)?;
        let meta = tx.open_table(META).map_err(io)?;
        let log = tx.open_table(LOG).map_err(io)?;
        let mut state = DurableState::default();
        if let Some(v) = meta.get(PROMISED).map_err(io)? {
            state.promised = decode(v.value(), "promised ballot")?;
        }
        if let Some(v) = meta.get(COMMIT).map_err(io)? {
            state.commit = decode(v.value(), "commit index")?;
        }
        if let Some(v) = meta.get(SNAPSHOT).map_err(io)? {
            state.snapshot = Some(decode::<Snapshot>(v.value(), "snapshot")?);
        }
        state.initialized = meta.get(INITIALIZED).map_err(io)?.is_some();
        for item in log.iter().map_err(io)? {
            let (slot, value) = item.map_err(io)?;
            let entry: (Ballot, Batch) = decode(value.value(), "log entry")?;
            state.entries.insert(slot.value(), entry);
        }
        Ok(state)
    }

    fn persist(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        if !batch.needs_sync() {
            self.unsynced_commit = batch.commit.max(self.unsynced_commit);
            return Ok(());
        }
        // A held commit index rides along (the batch's own is never older).
        let commit = batch.commit.or(self.unsynced_commit.take());
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut meta = tx.open_table(META).map_err(io)?;
            let mut log = tx.open_table(LOG).map_err(io)?;
            if let Some(snapshot) = &batch.snapshot {
                meta.insert(SNAPSHOT, encode(snapshot)?.as_slice())
                    .map_err(io)?;
            }
            if let Some(through) = batch.truncate_through {
                log.retain_in(..=through, |_, _| false).map_err(io)?;
            }
            for (slot, ballot, entry) in &batch.entries {
                log.insert(*slot, encode(&(ballot, entry))?.as_slice())
                    .map_err(io)?;
            }
            if let Some(promised) = &batch.promised {
                meta.insert(PROMISED, encode(promised)?.as_slice())
                    .map_err(io)?;
            }
            if let Some(commit) = &commit {
                meta.insert(COMMIT, encode(commit)?.as_slice())
                    .map_err(io)?;
            }
            if batch.initialized {
                meta.insert(INITIALIZED, [1u8].as_slice()).map_err(io)?;
            }
        }
        // Durability::Immediate is redb's default: commit returns after fsync.
        tx.commit().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::types::Command;
    use bytes::Bytes;

    fn batch(data: &str) -> Batch {
        Batch {
            commands: vec![Command {
                origin: 0,
                id: 1,
                data: Bytes::from(data.to_string()),
            }],
        }
    }

    #[test]
    fn persisted_state_survives_reopen_and_matches_memory_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paxos.redb");
        let mut expected = DurableState::default();
        let batches = vec![
            PersistBatch {
                promised: Some(Ballot::new(1, 0)),
                initialized: true,
                entries: (1..=5)
                    .map(|s| (s, Ballot::new(1, 0), batch(&format!("v{s}"))))
                    .collect(),
                commit: Some(3),
                ..Default::default()
            },
            PersistBatch {
                snapshot: Some(Snapshot {
                    index: 3,
                    data: Bytes::from_static(b"state@3"),
                }),
                truncate_through: Some(3),
                entries: vec![(6, Ballot::new(2, 1), batch("v6"))],
                promised: Some(Ballot::new(2, 1)),
                commit: Some(5),
                initialized: false,
            },
        ];
        {
            let mut storage = RedbStorage::open(&path).unwrap();
            assert_eq!(storage.load().unwrap(), DurableState::default());
            for b in &batches {
                storage.persist(b).unwrap();
                b.apply_to(&mut expected);
            }
        }
        let mut reopened = RedbStorage::open(&path).unwrap();
        let loaded = reopened.load().unwrap();
        assert_eq!(loaded, expected);
        assert_eq!(
            loaded.entries.keys().copied().collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        assert_eq!(loaded.promised, Ballot::new(2, 1));
        assert!(loaded.initialized);
    }
}
