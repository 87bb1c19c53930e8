//! Replica-to-replica messages over gRPC (tonic).
//!
//! Each replica keeps one long-lived client stream to every peer and sends
//! its messages down it. A peer's address is resolved on every (re)connect,
//! so a pod that comes back with a new IP is found again. Messages queue in a
//! bounded channel per peer; when it is full (peer slow or down) new messages
//! are dropped, which Paxos tolerates by retrying.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{Replica, Transport};
use crate::paxos::{Membership, Message, NodeId, NODE_ID_LIMIT};
use crate::proto::paxos_peer_client::PaxosPeerClient;
use crate::proto::paxos_peer_server::{PaxosPeer, PaxosPeerServer};
use crate::proto::{DeliverAck, PeerMessage};

/// Messages queued for one peer, at most.
const PEER_QUEUE_MAX: usize = 8192;
/// Reconnect backoff bounds.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where each replica of the group is reached, by id: the peer list the
/// node started with, then the addresses its membership records. Shared by
/// the transport, which keeps it current, and the other callers of peers
/// (snapshot fetches). Cheap to clone; clones share it.
#[derive(Clone, Debug, Default)]
pub struct AddressBook {
    inner: Arc<RwLock<BTreeMap<NodeId, String>>>,
}

impl AddressBook {
    /// `peers[i]` is replica i's address.
    pub fn from_peers(peers: &[String]) -> Self {
        let book = AddressBook::default();
        for (id, addr) in peers.iter().enumerate() {
            book.set(id as NodeId, addr);
        }
        book
    }

    fn set(&self, id: NodeId, addr: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.insert(id, addr.to_string());
    }

    /// Every replica known, in id order.
    pub fn all(&self) -> Vec<(NodeId, String)> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(id, addr)| (*id, addr.clone())).collect()
    }
}

/// Sends one replica's messages to its peers over gRPC.
pub struct GrpcTransport {
    /// Names the group in every envelope, so a misrouted stream is refused.
    group: String,
    me: NodeId,
    /// One queue per peer, with the address its sender task reaches. A
    /// member removed keeps its queue (the core stops sending to it once
    /// it is told); one whose address changes gets a new task.
    queues: HashMap<NodeId, (String, mpsc::Sender<Message>)>,
    /// The runtime the sender tasks run on: a new member's task is
    /// started from the replica's own thread, which has none.
    runtime: tokio::runtime::Handle,
    /// Kept current for the group's other callers of peers.
    book: AddressBook,
}

impl GrpcTransport {
    /// Starts a sender task per peer in `book` on the current tokio
    /// runtime (the caller must be in one); `group` names the replica
    /// group. The book follows the membership from then on.
    pub fn start(group: &str, me: NodeId, book: &AddressBook) -> Self {
        let mut transport = GrpcTransport {
            group: group.to_string(),
            me,
            queues: HashMap::new(),
            runtime: tokio::runtime::Handle::current(),
            book: book.clone(),
        };
        for (id, addr) in book.all() {
            transport.reach(id, &addr);
        }
        transport
    }

    /// Sends to `id` at `addr` from now on.
    fn reach(&mut self, id: NodeId, addr: &str) {
        if id == self.me || addr.is_empty() {
            return;
        }
        if self.queues.get(&id).is_some_and(|(known, _)| known == addr) {
            return;
        }
        self.book.set(id, addr);
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        // The previous task, if any, ends when its queue closes.
        let sender = peer_sender(addr.to_string(), self.group.clone(), self.me, rx);
        self.runtime.spawn(sender);
        self.queues.insert(id, (addr.to_string(), tx));
    }
}

impl Transport for GrpcTransport {
    fn send(&self, to: NodeId, msg: Message) {
        if let Some((_, queue)) = self.queues.get(&to) {
            // Full or closed: drop; the protocol resends what it needs.
            let _ = queue.try_send(msg);
        }
    }

    fn update_members(&mut self, membership: &Membership) {
        for (id, member) in &membership.members {
            self.reach(*id, &member.address);
        }
    }
}

async fn peer_sender(addr: String, group: String, me: NodeId, mut rx: mpsc::Receiver<Message>) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        let endpoint = match crate::net::endpoint(&addr) {
            Ok(e) => e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true),
            Err(e) => {
                tracing::error!(%addr, error = %e, "invalid peer address; not sending to it");
                return;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "peer unreachable");
                // What queued while the peer was away is stale: discard it.
                while rx.try_recv().is_ok() {}
                if rx.is_closed() {
                    return; // the peer has a new address, or the node stops
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = RECONNECT_BACKOFF_MIN;
        let (stream_tx, stream_rx) = mpsc::channel::<PeerMessage>(256);
        let mut client = PaxosPeerClient::new(channel);
        let call = client.deliver(ReceiverStream::new(stream_rx));
        tokio::pin!(call);
        loop {
            tokio::select! {
                result = &mut call => {
                    if let Err(e) = result {
                        tracing::debug!(%addr, error = %e, "peer stream ended");
                    }
                    break;
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    let payload = match postcard::to_allocvec(&msg) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode a Paxos message");
                            continue;
                        }
                    };
                    let envelope = PeerMessage { group: group.clone(), from: me, payload: payload.into() };
                    if stream_tx.send(envelope).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// The receiving side: hands each message to the local replica.
#[derive(Clone)]
pub struct PaxosPeerService {
    /// Must match the sender's group: a misrouted stream is refused.
    group: String,
    replica: Replica,
}

impl PaxosPeerService {
    pub fn new(group: impl Into<String>, replica: Replica) -> Self {
        PaxosPeerService {
            group: group.into(),
            replica,
        }
    }

    pub fn into_server(self) -> PaxosPeerServer<Self> {
        // Snapshots and catch-up replies can be large.
        PaxosPeerServer::new(self).max_decoding_message_size(256 << 20)
    }
}

#[tonic::async_trait]
impl PaxosPeer for PaxosPeerService {
    async fn deliver(
        &self,
        request: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<DeliverAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(item) = stream.next().await {
            let envelope = item?;
            if envelope.group != self.group {
                return Err(Status::failed_precondition(format!(
                    "message for group {:?} reached group {:?}",
                    envelope.group, self.group
                )));
            }
            if envelope.from >= NODE_ID_LIMIT {
                // The core checks membership; this only refuses what
                // cannot be a replica id at all.
                return Err(Status::invalid_argument(format!(
                    "sender {} is not a replica id (they are below {NODE_ID_LIMIT})",
                    envelope.from
                )));
            }
            let msg: Message = postcard::from_bytes(&envelope.payload)
                .map_err(|e| Status::invalid_argument(format!("undecodable Paxos message: {e}")))?;
            self.replica.deliver(envelope.from, msg);
        }
        Ok(Response::new(DeliverAck {}))
    }
}
