//! An in-process transport: replicas in one process hand messages straight
//! to each other. For benchmarks and in-process service tests.

use std::sync::{Arc, RwLock};

use super::{Replica, Transport};
use crate::paxos::{Message, NodeId};

/// The replicas of one group, filled in as they start.
#[derive(Clone, Default)]
pub struct LocalNetwork {
    /// Indexed by replica id; `None` until started (or after removal).
    replicas: Arc<RwLock<Vec<Option<Replica>>>>,
    /// Replicas cut off from all others (for partition tests).
    isolated: Arc<RwLock<Vec<bool>>>,
}

impl LocalNetwork {
    pub fn new(size: usize) -> Self {
        LocalNetwork {
            replicas: Arc::new(RwLock::new(vec![None; size])),
            isolated: Arc::new(RwLock::new(vec![false; size])),
        }
    }

    /// Cuts replica `id` off from every other (or reconnects it).
    pub fn set_isolated(&self, id: NodeId, isolated: bool) {
        if let Ok(mut i) = self.isolated.write() {
            i[id as usize] = isolated;
        }
    }

    fn is_isolated(&self, id: NodeId) -> bool {
        self.isolated
            .read()
            .ok()
            .and_then(|i| i.get(id as usize).copied())
            .unwrap_or(false)
    }

    /// Makes `replica` reachable as `id`.
    pub fn register(&self, id: NodeId, replica: Replica) {
        if let Ok(mut r) = self.replicas.write() {
            r[id as usize] = Some(replica);
        }
    }

    /// A transport that sends as `from`.
    pub fn transport(&self, from: NodeId) -> LocalTransport {
        LocalTransport {
            from,
            network: self.clone(),
        }
    }
}

/// Sends as one replica over a [`LocalNetwork`].
pub struct LocalTransport {
    from: NodeId,
    network: LocalNetwork,
}

impl Transport for LocalTransport {
    fn send(&self, to: NodeId, msg: Message) {
        if self.network.is_isolated(self.from) || self.network.is_isolated(to) {
            return;
        }
        let target = self
            .network
            .replicas
            .read()
            .ok()
            .and_then(|r| r.get(to as usize).cloned().flatten());
        if let Some(replica) = target {
            replica.deliver(self.from, msg);
        }
    }
}
