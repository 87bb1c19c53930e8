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
}

impl LocalNetwork {
    pub fn new(size: usize) -> Self {
        LocalNetwork {
            replicas: Arc::new(RwLock::new(vec![None; size])),
        }
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
