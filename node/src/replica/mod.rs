//! The driver: runs a [`Paxos`] core against real time, storage, a transport
//! and the state machine it replicates.
//!
//! Each replica runs on a dedicated OS thread: storage syncs block, and must
//! not stall an async runtime. Inputs (peer messages, proposals) arrive
//! through one bounded channel. The loop takes whatever has queued up (up to
//! `inbox_burst_max`), feeds it to the core, then handles the single `Ready`:
//! one storage sync for the whole burst (group commit), then the messages,
//! then the decided commands, applied in order to the [`StateMachine`].
//! A command's result goes back to the caller of [`Replica::propose`] on the
//! replica that proposed it.

pub mod grpc;
pub mod local;
pub mod members;

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::paxos::{
    Ballot, Config, Incarnation, MemberProgress, Membership, MembershipChange, MembershipError,
    Message, NodeId, Paxos, ProposeError, RoleKind, Slot, Storage, StorageError,
};

/// The replicated application. Called only from the replica's thread, in
/// slot order, identically on every replica.
///
/// A machine kept in memory snapshots itself whole; one kept in a store on
/// disk (see `shardkv::store`) writes each turn without fsync, syncs at a
/// checkpoint, and its snapshot is a small descriptor: a replica that must
/// install one streams the state from a peer in [`Self::restore`].
pub trait StateMachine: Send + 'static {
    /// Applies one decided command and returns its result for the proposer.
    /// A machine that already holds `slot` (it outlived the log) skips it.
    /// [`ApplyError::Failed`] means the machine cannot go on (its storage
    /// failed): the replica stops.
    fn apply(&mut self, slot: Slot, command: &[u8]) -> Result<Bytes, ApplyError>;
    /// The commands of one turn are applied: a machine on disk writes them,
    /// with the last slot, in one atomic batch (without waiting for the
    /// disk: the log is the durable record).
    fn end_turn(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Captures everything applied, for compaction: returns the slot the
    /// capture durably covers (the log may be compacted through it) and
    /// what the log keeps as its snapshot.
    fn checkpoint(&mut self, applied: Slot) -> Result<(Slot, Bytes), String> {
        Ok((applied, self.snapshot()))
    }
    /// Serialises the state (or a descriptor of it), for lagging peers.
    fn snapshot(&self) -> Bytes;
    /// Takes on the state that `snapshot`, taken through slot `index`,
    /// describes.
    fn restore(&mut self, index: Slot, snapshot: &[u8]) -> Result<(), String>;
    /// For a machine whose restore fetches the state over the network: the
    /// fetch, which the driver runs without access to the machine (its
    /// services keep reading it meanwhile), then hands to
    /// [`Self::finish_restore`]. `None`: call [`Self::restore`] instead.
    fn begin_restore(
        &mut self,
        index: Slot,
        snapshot: &[u8],
    ) -> Result<Option<RestoreJob>, String> {
        let _ = (index, snapshot);
        Ok(None)
    }
    /// After [`ApplyError::NeedsSnapshot`]: the fetch of a peer's state
    /// applied through `through` at least.
    fn begin_catch_up(&mut self, through: Slot) -> Result<RestoreJob, String> {
        Err(format!(
            "cannot fetch a peer's state through slot {through}"
        ))
    }
    /// Takes on what a [`RestoreJob`] fetched.
    fn finish_restore(&mut self, fetched: RestoreOutput) -> Result<(), String> {
        let _ = fetched;
        Err("no restore is under way".into())
    }
}

/// Why a command was not applied.
pub enum ApplyError {
    /// The machine cannot go on: the replica stops.
    Failed(String),
    /// The command needs state this machine cannot get from the log (a
    /// shard copy its holder no longer has): it must take a peer's state
    /// applied through `through`, which covers the command.
    NeedsSnapshot { through: Slot },
    /// The command needs data that may take a while to fetch (a shard copy
    /// this replica does not hold yet). Nothing was applied: the driver
    /// runs the job without the machine's lock, so the services keep
    /// reading the machine meanwhile, then applies the same command again.
    /// A machine asks at most once per command.
    NeedsFetch(FetchJob),
}

/// A fetch run outside the machine before a command is applied again (see
/// [`ApplyError::NeedsFetch`]). It reports its own failures: the machine
/// finds out on the second apply whether it has what it needs.
pub type FetchJob = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
            ApplyError::NeedsSnapshot { through } => f
                .debug_struct("NeedsSnapshot")
                .field("through", through)
                .finish(),
            ApplyError::NeedsFetch(_) => f.write_str("NeedsFetch"),
        }
    }
}

/// A fetch run outside the machine (see [`StateMachine::begin_restore`]).
pub type RestoreJob = Box<dyn FnOnce() -> Result<RestoreOutput, String> + Send>;
/// What a [`RestoreJob`] fetched, for [`StateMachine::finish_restore`].
pub type RestoreOutput = Box<dyn std::any::Any + Send>;

/// A state machine shared by the replica thread, which applies to it, and
/// the services, which read the applied state (after a read barrier, or for
/// status) without going through the log. Cheap to clone; clones share it.
pub struct SharedMachine<T> {
    inner: Arc<Mutex<T>>,
}

impl<T> Clone for SharedMachine<T> {
    fn clone(&self) -> Self {
        SharedMachine {
            inner: self.inner.clone(),
        }
    }
}

impl<T> SharedMachine<T> {
    pub fn new(machine: T) -> Self {
        SharedMachine {
            inner: Arc::new(Mutex::new(machine)),
        }
    }

    /// The state as last applied. Hold the guard briefly: the replica's
    /// apply loop waits for it.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        // A panic while applying may leave a command half-applied here;
        // the replica then stops and says so, and the node exits. Until
        // it does, reads fail at the read barrier; only status reports,
        // which take no barrier, may see that state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: StateMachine> StateMachine for SharedMachine<T> {
    fn apply(&mut self, slot: Slot, command: &[u8]) -> Result<Bytes, ApplyError> {
        self.lock().apply(slot, command)
    }

    fn end_turn(&mut self) -> Result<(), String> {
        self.lock().end_turn()
    }

    fn checkpoint(&mut self, applied: Slot) -> Result<(Slot, Bytes), String> {
        self.lock().checkpoint(applied)
    }

    fn snapshot(&self) -> Bytes {
        self.lock().snapshot()
    }

    fn restore(&mut self, index: Slot, snapshot: &[u8]) -> Result<(), String> {
        self.lock().restore(index, snapshot)
    }

    fn begin_restore(
        &mut self,
        index: Slot,
        snapshot: &[u8],
    ) -> Result<Option<RestoreJob>, String> {
        self.lock().begin_restore(index, snapshot)
    }

    fn begin_catch_up(&mut self, through: Slot) -> Result<RestoreJob, String> {
        self.lock().begin_catch_up(through)
    }

    fn finish_restore(&mut self, fetched: RestoreOutput) -> Result<(), String> {
        self.lock().finish_restore(fetched)
    }
}

/// Carries messages to peers. Must not block: drop when congested (Paxos
/// retries what matters).
pub trait Transport: Send + 'static {
    fn send(&self, to: NodeId, msg: Message);
    /// The group's membership is now `membership` (at start, and after
    /// each change): reach its members at their recorded addresses.
    fn update_members(&mut self, membership: &Membership) {
        let _ = membership;
    }
}

/// Driver settings.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// Wall-clock length of one core tick: sets heartbeat and election timing.
    pub tick: Duration,
    /// Take a snapshot and compact after this many applied slots.
    pub snapshot_every_slots: u64,
    /// Inputs queued for the replica thread, at most; past it, peer messages
    /// are dropped and proposals refused as busy.
    pub inbox_capacity: usize,
    /// Inputs handled before one `Ready`, at most (bounds a group commit).
    pub inbox_burst_max: usize,
    /// Payload bytes of the inputs handled before one `Ready`, at most: a
    /// lagging follower draining a backlog of large Accepts writes one
    /// bounded record per sync, not one the log cannot frame.
    pub inbox_burst_bytes_max: usize,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            tick: Duration::from_millis(10),
            snapshot_every_slots: 1000,
            inbox_capacity: 16384,
            inbox_burst_max: 4096,
            inbox_burst_bytes_max: 64 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("replica is overloaded; retry later")]
    Busy,
    #[error("leadership changed before the command was decided; it may or may not take effect")]
    OutcomeUnknown,
    #[error("replica has stopped")]
    Stopped,
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("membership change refused: {0}")]
    Membership(MembershipError),
}

impl From<ProposeError> for ReplicaError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader } => ReplicaError::NotLeader { leader },
            ProposeError::Busy { .. } => ReplicaError::Busy,
        }
    }
}

/// A snapshot of the replica's progress, published after every loop turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: RoleKind,
    pub leader: Option<NodeId>,
    pub ballot: Ballot,
    pub commit: Slot,
    pub applied: Slot,
    pub snapshot_index: Slot,
    pub snapshot_bytes: usize,
    pub log_len: usize,
    /// Peer messages dropped because the inbox was full.
    pub inbox_dropped: u64,
    /// Storage syncs performed.
    pub syncs: u64,
    /// Times it stood, or asked whether it could (pre-votes and elections
    /// begun): a replica cut off from its group keeps counting up.
    pub campaigns: u64,
    /// False once the replica thread has stopped (shut down or failed).
    pub running: bool,
    /// The membership in force here: who votes and who learns.
    pub membership: Membership,
    /// The life of this replica's storage, which a change records when it
    /// adds this replica.
    pub incarnation: Incarnation,
    /// As leader, each other member's progress (empty otherwise), for
    /// `member list` and for promoting a learner once it has caught up.
    pub members_progress: Vec<MemberProgress>,
}

impl Status {
    /// The leader's address, if the group's membership records it (after
    /// its first change; before, a member's address is its place in the
    /// peer list the group was created with).
    pub fn leader_address(&self) -> Option<&str> {
        let leader = self.leader?;
        let member = self.membership.members.get(&leader)?;
        Some(member.address.as_str()).filter(|a| !a.is_empty())
    }
}

enum Input {
    Message(NodeId, Message),
    Propose(Bytes, oneshot::Sender<Result<Bytes, ReplicaError>>),
    ReadBarrier(oneshot::Sender<Result<(), ReplicaError>>),
    ChangeMembership(
        MembershipChange,
        oneshot::Sender<Result<Membership, ReplicaError>>,
    ),
    Shutdown,
}

impl Input {
    /// What it may add to the next sync.
    fn payload_bytes(&self) -> usize {
        match self {
            Input::Message(_, msg) => msg.payload_bytes(),
            Input::Propose(command, _) => command.len(),
            Input::ReadBarrier(_) | Input::ChangeMembership(..) | Input::Shutdown => 0,
        }
    }
}

/// A cheap-to-clone handle to a running replica.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Shared>,
}

struct Shared {
    /// The replica thread's only input: bounded, so a flood cannot exhaust memory.
    inbox: SyncSender<Input>,
    /// Latest status; `watch` lets callers await a condition instead of polling.
    status: watch::Receiver<Status>,
    /// Counts peer messages dropped at a full inbox (for metrics).
    dropped: std::sync::atomic::AtomicU64,
}

impl Replica {
    /// Starts a replica thread. Loads durable state from `storage`; the state
    /// machine is rebuilt from the stored snapshot and decided log.
    pub fn start<S, M, T>(
        config: Config,
        mut storage: S,
        machine: M,
        transport: T,
        options: ReplicaOptions,
    ) -> Result<(Replica, JoinHandle<()>), ReplicaError>
    where
        S: Storage + 'static,
        M: StateMachine,
        T: Transport,
    {
        config.validate().map_err(ReplicaError::Config)?;
        // Proposal ids must not repeat across incarnations: a command
        // proposed before a crash may be decided after the restart, and must
        // not answer a new caller that happens to get the same id.
        let mut config = config;
        let now_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        config.proposal_id_start = config.proposal_id_start.max(now_nanos);
        // A replica that finds its storage blank takes a new incarnation,
        // above any it had before if the clock has moved on (if not, its
        // peers tell it, and it takes the next one). Two lives must never
        // take the same number, or their votes cannot be told apart: a
        // clock reading in nanoseconds is unique unless the clock is set
        // back to the very nanosecond.
        config.blank_incarnation = config.blank_incarnation.max(now_nanos);
        let durable = storage
            .load()
            .map_err(|e| ReplicaError::Storage(e.to_string()))?;
        // A sync longer than the shortest election timeout silences this
        // replica long enough for its peers to elect another leader.
        let slow_sync = options
            .tick
            .saturating_mul(u32::try_from(config.election_timeout_min_ticks).unwrap_or(u32::MAX));
        let paxos = Paxos::new(config, durable);
        if paxos.role() == RoleKind::Recovering {
            tracing::warn!(
                replica = paxos.id(),
                "storage is blank: recovering from peers before voting (a new group needs every member up once)"
            );
        }
        let (inbox, rx) = mpsc::sync_channel(options.inbox_capacity);
        let (status_tx, status_rx) = watch::channel(status_of(&paxos, 0, 0, true));
        let replica = Replica {
            inner: Arc::new(Shared {
                inbox,
                status: status_rx,
                dropped: Default::default(),
            }),
        };
        let handle = replica.clone();
        let thread = std::thread::Builder::new()
            .name(format!("paxos-{}", paxos.id()))
            .spawn(move || {
                let mut driver = Driver {
                    paxos,
                    storage,
                    machine,
                    transport,
                    options,
                    waiters: HashMap::new(),
                    read_waiters: HashMap::new(),
                    reads_applying: Vec::new(),
                    membership_waiters: Vec::new(),
                    status: status_tx,
                    handle,
                    syncs: 0,
                    last_snapshot: 0,
                    led_in: None,
                    slow_sync,
                };
                // A panic must stop the replica as visibly as an error: the
                // status says so, waiters get `Stopped`, and the node exits.
                // Unwound past `stop`, the last status said running, and a
                // node whose replica was gone kept answering with its state
                // frozen at the panic. The panic then goes on, so joining
                // the thread still reports it.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run(rx)));
                match &run {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "replica stopped on a storage failure")
                    }
                    Err(panic) => tracing::error!(
                        panic = panic_message(&**panic),
                        "replica thread panicked; the replica is stopped"
                    ),
                }
                driver.stop();
                if let Err(panic) = run {
                    std::panic::resume_unwind(panic);
                }
            })
            .map_err(|e| ReplicaError::Storage(format!("cannot start replica thread: {e}")))?;
        Ok((replica, thread))
    }

    /// Proposes a command; resolves with the state machine's result once it is
    /// decided and applied here. Only the leader accepts proposals.
    pub async fn propose(&self, command: Bytes) -> Result<Bytes, ReplicaError> {
        self.ask(|reply| Input::Propose(command, reply)).await
    }

    /// Resolves once this replica, as leader, has confirmed with a majority
    /// that it still leads, and has applied everything decided before the
    /// call (ReadIndex). State read from the state machine after that is
    /// linearizable, with no log entry and no storage sync. Only the leader
    /// answers; a leadership change first gives `NotLeader`.
    pub async fn read_barrier(&self) -> Result<(), ReplicaError> {
        self.ask(Input::ReadBarrier).await
    }

    /// Asks this replica, as leader, to change the group's membership;
    /// resolves once the change is decided and in force here (the new
    /// membership), or with why it was refused. A leadership change before
    /// then is `OutcomeUnknown`: read the membership to see.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Membership, ReplicaError> {
        self.ask(|reply| Input::ChangeMembership(change, reply))
            .await
    }

    /// Queues a request for the replica thread and awaits its answer; a
    /// full inbox is `Busy` at once rather than a wait.
    async fn ask<R>(
        &self,
        input: impl FnOnce(oneshot::Sender<Result<R, ReplicaError>>) -> Input,
    ) -> Result<R, ReplicaError> {
        let (tx, rx) = oneshot::channel();
        match self.inner.inbox.try_send(input(tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ReplicaError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(ReplicaError::Stopped),
        }
        rx.await.unwrap_or(Err(ReplicaError::Stopped))
    }

    /// Hands a message from a peer to the replica; dropped if the inbox is full.
    pub fn deliver(&self, from: NodeId, msg: Message) {
        if let Err(TrySendError::Full(_)) = self.inner.inbox.try_send(Input::Message(from, msg)) {
            self.inner
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every status change, to await conditions.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.inner.status.clone()
    }

    /// Waits until `pred` holds for the status, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> bool {
        let mut rx = self.watch();
        tokio::time::timeout(timeout, rx.wait_for(|s| pred(s)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Asks the replica thread to stop after syncing; join its handle to wait.
    pub fn shutdown(&self) {
        let _ = self.inner.inbox.send(Input::Shutdown);
    }
}

/// What a caught panic carried, for the log.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

fn status_of(paxos: &Paxos, dropped: u64, syncs: u64, running: bool) -> Status {
    Status {
        id: paxos.id(),
        role: paxos.role(),
        leader: paxos.leader_hint(),
        ballot: paxos.ballot(),
        commit: paxos.commit_index(),
        applied: paxos.applied_index(),
        snapshot_index: paxos.snapshot_index(),
        snapshot_bytes: paxos.snapshot_bytes(),
        log_len: paxos.log_len(),
        inbox_dropped: dropped,
        syncs,
        campaigns: paxos.stats().pre_votes_started + paxos.stats().elections_started,
        running,
        membership: paxos.membership().clone(),
        incarnation: paxos.incarnation(),
        members_progress: paxos.members_progress(),
    }
}

struct Driver<S, M, T> {
    paxos: Paxos,
    storage: S,
    machine: M,
    transport: T,
    options: ReplicaOptions,
    /// Callers of `propose` on this replica, by proposal id.
    waiters: HashMap<u64, oneshot::Sender<Result<Bytes, ReplicaError>>>,
    /// Callers of `read_barrier` whose read the core has not yet confirmed.
    read_waiters: HashMap<u64, oneshot::Sender<Result<(), ReplicaError>>>,
    /// Confirmed reads waiting for the state machine to reach their index
    /// (only after a new leader's takeover; otherwise it already has).
    reads_applying: Vec<(Slot, oneshot::Sender<Result<(), ReplicaError>>)>,
    /// Callers of `change_membership`, with the membership each proposed.
    membership_waiters: Vec<(
        Membership,
        oneshot::Sender<Result<Membership, ReplicaError>>,
    )>,
    status: watch::Sender<Status>,
    handle: Replica,
    syncs: u64,
    /// Slot of the last snapshot taken here, to space snapshots out.
    last_snapshot: Slot,
    /// The ballot this replica led in at the end of the last turn: when it
    /// changes, outstanding proposals lose their only witness.
    led_in: Option<Ballot>,
    /// A storage write taking longer than this is logged: it is as long as
    /// the shortest election timeout, so it costs leader changes.
    slow_sync: Duration,
}

impl<S: Storage, M: StateMachine, T: Transport> Driver<S, M, T> {
    fn run(&mut self, rx: mpsc::Receiver<Input>) -> Result<(), StorageError> {
        let mut next_tick = Instant::now() + self.options.tick;
        self.transport.update_members(self.paxos.membership());
        self.handle_ready()?;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(timeout) {
                Ok(input) => {
                    let mut bytes = input.payload_bytes();
                    if !self.handle_input(input) {
                        return Ok(());
                    }
                    // Take whatever else has queued: one sync for all of it,
                    // up to a bound in count and in bytes.
                    for _ in 1..self.options.inbox_burst_max {
                        if bytes >= self.options.inbox_burst_bytes_max {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(input) => {
                                bytes += input.payload_bytes();
                                if !self.handle_input(input) {
                                    return self.handle_ready();
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                self.paxos.tick();
                next_tick += self.options.tick;
                // After a long stall, do not replay every missed tick at once.
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.options.tick;
                }
            }
            self.handle_ready()?;
        }
    }

    /// Returns false on shutdown.
    fn handle_input(&mut self, input: Input) -> bool {
        match input {
            Input::Message(from, msg) => self.paxos.step(from, msg),
            Input::Propose(command, reply) => match self.paxos.propose(command) {
                Ok(id) => {
                    self.waiters.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Input::ReadBarrier(reply) => match self.paxos.read_index() {
                Ok(id) => {
                    self.read_waiters.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Input::ChangeMembership(change, reply) => match self.paxos.propose_membership(change) {
                Ok(next) => self.membership_waiters.push((next, reply)),
                Err(MembershipError::NotLeader { leader }) => {
                    let _ = reply.send(Err(ReplicaError::NotLeader { leader }));
                }
                Err(e) => {
                    let _ = reply.send(Err(ReplicaError::Membership(e)));
                }
            },
            Input::Shutdown => return false,
        }
        true
    }

    fn handle_ready(&mut self) -> Result<(), StorageError> {
        let ready = self.paxos.ready();
        // In the order the core asks for (see `Ready`): what may leave
        // before our sync does, so the followers' syncs overlap ours; then
        // the sync; then what vouches for our acceptor state. This loop
        // handles no input in between, so our own acceptance is counted
        // only after it is durable.
        for (to, msg) in ready.messages {
            self.transport.send(to, msg);
        }
        if !ready.persist.is_empty() {
            let started = Instant::now();
            self.storage.persist(&ready.persist)?;
            self.warn_if_slow("the log", started);
            if ready.persist.needs_sync() {
                self.syncs += 1;
            }
        }
        for (to, msg) in ready.persisted_messages {
            self.transport.send(to, msg);
        }
        if let Some(snapshot) = ready.snapshot {
            // A fetch runs here, outside the machine's lock.
            let restored = match self.machine.begin_restore(snapshot.index, &snapshot.data) {
                Ok(Some(job)) => job().and_then(|fetched| self.machine.finish_restore(fetched)),
                Ok(None) => self.machine.restore(snapshot.index, &snapshot.data),
                Err(e) => Err(e),
            };
            if let Err(e) = restored {
                // A snapshot we cannot read means our state would diverge:
                // stop rather than serve wrong data.
                return Err(StorageError::Corrupt(format!(
                    "snapshot at {}: {e}",
                    snapshot.index
                )));
            }
            self.last_snapshot = snapshot.index;
        }
        let me = self.paxos.id();
        let mut last_applied = None;
        // Callers are answered after the status is published, so whoever
        // learns that its command was applied also sees it in `status()`.
        let mut answers = Vec::new();
        for (slot, batch) in ready.committed {
            for command in &batch.commands {
                if command.origin == crate::paxos::STOP_SIGN_ORIGIN {
                    continue; // a membership change, which the core applied
                }
                let mut applied = self.machine.apply(slot, &command.data);
                if let Err(ApplyError::NeedsFetch(job)) = applied {
                    // Outside the machine's lock: readers go on meanwhile.
                    job();
                    applied = self.machine.apply(slot, &command.data);
                }
                let result = match applied {
                    Ok(result) => result,
                    Err(ApplyError::NeedsFetch(_)) => {
                        return Err(StorageError::Io(format!(
                            "state machine at slot {slot}: asked twice to fetch for one command"
                        )))
                    }
                    Err(ApplyError::Failed(e)) => {
                        return Err(StorageError::Io(format!(
                            "state machine at slot {slot}: {e}"
                        )))
                    }
                    Err(ApplyError::NeedsSnapshot { through }) => {
                        // The peer's state covers this command; the
                        // machine skips what it covers from here on.
                        let job = self.machine.begin_catch_up(through);
                        job.and_then(|job| job())
                            .and_then(|fetched| self.machine.finish_restore(fetched))
                            .map_err(|e| {
                                StorageError::Io(format!("state machine at slot {slot}: {e}"))
                            })?;
                        Bytes::new()
                    }
                };
                if command.origin == me {
                    if let Some(waiter) = self.waiters.remove(&command.id) {
                        answers.push((waiter, Ok(result)));
                    }
                }
            }
            last_applied = Some(slot);
        }
        if last_applied.is_some() {
            self.machine
                .end_turn()
                .map_err(|e| StorageError::Io(format!("state machine: {e}")))?;
        }
        let mut membership_answers = Vec::new();
        if let Some(membership) = &ready.membership {
            // After this turn's messages, which may still tell removed
            // members of their removal.
            self.transport.update_members(membership);
            let (done, waiting) = std::mem::take(&mut self.membership_waiters)
                .into_iter()
                .partition::<Vec<_>, _>(|(proposed, _)| proposed.epoch <= membership.epoch);
            self.membership_waiters = waiting;
            for (proposed, waiter) in done {
                // Another leader's change may have taken the epoch this
                // one was proposed for.
                let answer = if &proposed == membership {
                    Ok(proposed)
                } else {
                    Err(ReplicaError::OutcomeUnknown)
                };
                membership_answers.push((waiter, answer));
            }
        }
        let leader = self.paxos.leader_hint();
        let mut read_answers = Vec::new();
        for id in ready.dropped {
            if let Some(waiter) = self.waiters.remove(&id) {
                answers.push((waiter, Err(ReplicaError::NotLeader { leader })));
            }
            if let Some(waiter) = self.read_waiters.remove(&id) {
                read_answers.push((waiter, Err(ReplicaError::NotLeader { leader })));
            }
        }
        // Everything decided is applied by now: a confirmed read whose
        // index is covered is answered; the rest wait for later slots.
        for (id, index) in ready.reads {
            if let Some(waiter) = self.read_waiters.remove(&id) {
                self.reads_applying.push((index, waiter));
            }
        }
        let applied = self.paxos.applied_index();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_applying)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_applying = waiting;
        read_answers.extend(done.into_iter().map(|(_, waiter)| (waiter, Ok(()))));
        let leading = self.paxos.is_leader().then(|| self.paxos.ballot());
        if self.led_in.is_some() && self.led_in != leading {
            // Leadership was lost (or lost and regained) since the last turn.
            // Slotted but undecided commands may still be decided by another
            // leader, or not: the caller must retry with deduplication.
            for (_, waiter) in self.waiters.drain() {
                answers.push((waiter, Err(ReplicaError::OutcomeUnknown)));
            }
            for (_, waiter) in self.membership_waiters.drain(..) {
                let _ = waiter.send(Err(ReplicaError::OutcomeUnknown));
            }
        }
        self.led_in = leading;
        if let Some(applied) = last_applied {
            if applied - self.last_snapshot >= self.options.snapshot_every_slots {
                let started = Instant::now();
                let (covered, data) = self
                    .machine
                    .checkpoint(applied)
                    .map_err(|e| StorageError::Io(format!("state machine checkpoint: {e}")))?;
                self.warn_if_slow("the state machine's checkpoint", started);
                self.paxos.compact(covered, data);
                self.last_snapshot = applied;
                // The compaction's writes go out with the next Ready.
            }
        }
        let dropped = self
            .handle
            .inner
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        let status = status_of(&self.paxos, dropped, self.syncs, true);
        let (was_role, was_leader) = {
            let before = self.status.borrow();
            (before.role, before.leader)
        };
        if was_role == RoleKind::Recovering && status.role != RoleKind::Recovering {
            tracing::info!(
                replica = status.id,
                "recovered acceptor state from peers; voting again"
            );
        }
        // Leader changes are what an operator looks for first when requests
        // stall: each one is logged, with what led to it.
        if status.leader != was_leader
            || (status.role == RoleKind::Leader) != (was_role == RoleKind::Leader)
        {
            tracing::info!(
                replica = status.id,
                role = ?status.role,
                leader = ?status.leader,
                ballot = ?status.ballot,
                campaigns = status.campaigns,
                inbox_dropped = status.inbox_dropped,
                "leadership changed"
            );
        }
        self.status.send_if_modified(|s| {
            if *s != status {
                *s = status;
                true
            } else {
                false
            }
        });
        for (waiter, answer) in answers {
            let _ = waiter.send(answer);
        }
        for (waiter, answer) in read_answers {
            let _ = waiter.send(answer);
        }
        for (waiter, answer) in membership_answers {
            let _ = waiter.send(answer);
        }
        Ok(())
    }

    /// Logs a storage write (begun at `started`) that kept this thread
    /// from answering its peers for longer than the election timeout.
    fn warn_if_slow(&self, what: &str, started: Instant) {
        let took = started.elapsed();
        if took >= self.slow_sync {
            tracing::warn!(
                replica = self.paxos.id(),
                took_ms = took.as_millis() as u64,
                election_timeout_min_ms = self.slow_sync.as_millis() as u64,
                "a write to {what} took longer than the election timeout: expect leader \
                 changes (a slower disk needs a longer --tick-ms)"
            );
        }
    }

    fn stop(&mut self) {
        for (_, waiter) in self.waiters.drain() {
            let _ = waiter.send(Err(ReplicaError::Stopped));
        }
        for (_, waiter) in self.membership_waiters.drain(..) {
            let _ = waiter.send(Err(ReplicaError::Stopped));
        }
        let reads = self.read_waiters.drain().map(|(_, w)| w);
        for waiter in reads.chain(self.reads_applying.drain(..).map(|(_, w)| w)) {
            let _ = waiter.send(Err(ReplicaError::Stopped));
        }
        let dropped = self
            .handle
            .inner
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        let _ = self
            .status
            .send(status_of(&self.paxos, dropped, self.syncs, false));
    }
}
