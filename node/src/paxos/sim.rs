//! A deterministic in-process network for testing the Paxos core.
//!
//! Everything random comes from one seed: the same seed replays the same
//! schedule of drops, delays, partitions and crashes. The simulator checks
//! agreement on every applied slot as it goes (two replicas applying different
//! batches at one slot panics at once, naming the seed) and validity (only
//! proposed commands are ever decided).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::core::{Config, MembershipChange, MembershipError, Paxos, ProposeError, Ready};
use super::storage::{MemStorage, Storage};
use super::types::{Batch, Members, Membership, Message, NodeId, Slot};

/// SplitMix64: small, fast and stable across versions, so seeds stay valid.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Reads the seed from `SHARDKV_SEED` or draws one from the clock, and prints
/// it so any run can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("SHARDKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: seed {seed} (rerun with SHARDKV_SEED={seed})");
    seed
}

/// Faults applied to messages as they are sent.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability that a request (Prepare, Accept, CatchUpRequest) is lost.
    pub drop_request: f64,
    /// Probability that a reply (Promise, Accepted, Nack, CatchUpReply) is lost.
    pub drop_reply: f64,
    /// Each message is delayed by 0 to this many ticks, which also reorders.
    pub delay_max_ticks: u64,
    /// Probability that a replica crashes during a sync: the messages that
    /// may leave before it (`Ready::messages`) are out, the writes and
    /// the messages that wait for them are lost. It restarts from its
    /// storage 5 to 20 ticks later. This is the window a real driver opens
    /// by sending a leader's Accepts before its own sync.
    pub crash_during_sync: f64,
}

struct Packet {
    from: NodeId,
    to: NodeId,
    deliver_tick: u64,
    msg: Message,
}

/// One simulated replica's state machine: a log of applied commands.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// (slot, batch) in order, since the last snapshot install.
    pub entries: Vec<(Slot, Batch)>,
    pub last_slot: Slot,
    /// Rolling hash of every applied command, comparable across replicas.
    pub digest: u64,
    /// Number of commands applied (snapshot included).
    pub commands: u64,
}

impl Applied {
    fn apply(&mut self, slot: Slot, batch: &Batch) {
        for c in &batch.commands {
            for b in c.data.iter() {
                self.digest = (self.digest ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
            self.commands += 1;
        }
        self.last_slot = slot;
        self.entries.push((slot, batch.clone()));
    }

    fn snapshot(&self) -> Bytes {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.last_slot.to_le_bytes());
        v.extend_from_slice(&self.digest.to_le_bytes());
        v.extend_from_slice(&self.commands.to_le_bytes());
        Bytes::from(v)
    }

    fn install(&mut self, data: &[u8]) {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        self.last_slot = word(0);
        self.digest = word(1);
        self.commands = word(2);
        self.entries.clear();
    }
}

/// A group of replicas on a simulated network.
pub struct Sim {
    pub seed: u64,
    pub rng: SimRng,
    configs: Vec<Config>,
    nodes: Vec<Option<Paxos>>,
    pub storages: Vec<MemStorage>,
    pub applied: Vec<Applied>,
    packets: Vec<Packet>,
    now_tick: u64,
    pub faults: Faults,
    /// Replicas in different partitions cannot talk.
    partition: Vec<u32>,
    /// A deaf replica receives nothing (it still sends).
    deaf: Vec<bool>,
    /// One-way cuts: nothing sent from the first replica reaches the second,
    /// while the other way works (a half-broken link, or a firewall rule).
    one_way: BTreeSet<(NodeId, NodeId)>,
    /// The one value each slot may have: checked on every apply.
    chosen: BTreeMap<Slot, Batch>,
    proposed: BTreeSet<Bytes>,
    /// Messages handed to the network, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    restarts: u64,
    /// Replicas that crashed during a sync, and the tick they restart at.
    restart_at_tick: BTreeMap<NodeId, u64>,
    /// Crashes during a sync so far (see `Faults::crash_during_sync`).
    pub crashes_during_sync: u64,
    /// Reads begun and not yet confirmed or dropped, by (replica, read id):
    /// the highest slot any replica had applied when the read began. A
    /// confirmed read's index must reach it, or the read could miss a
    /// write already acknowledged (checked on every confirmation).
    reads_pending: BTreeMap<(NodeId, u64), Slot>,
    /// Confirmed reads: (replica, read id, read index).
    pub reads_confirmed: Vec<(NodeId, u64, Slot)>,
    /// Reads dropped unconfirmed (leadership lost): (replica, read id).
    pub reads_dropped: Vec<(NodeId, u64)>,
}

impl Sim {
    /// `n` replicas with default timing, seeded.
    pub fn new(n: u32, seed: u64) -> Self {
        Self::with_config(n, seed, |_| {})
    }

    /// `n` replicas whose config is adjusted by `tweak`.
    pub fn with_config(n: u32, seed: u64, tweak: impl Fn(&mut Config)) -> Self {
        Self::with_spares(n, 0, seed, tweak)
    }

    /// A group of `n` replicas, and `spares` more (ids `n..n + spares`)
    /// started as joining replicas: members only once a membership change
    /// adds them (see `propose_membership`).
    pub fn with_spares(n: u32, spares: u32, seed: u64, tweak: impl Fn(&mut Config)) -> Self {
        let configs: Vec<Config> = (0..n + spares)
            .map(|id| {
                let mut c = Config::new_group(id, n);
                c.joining = id >= n;
                c.seed = seed;
                tweak(&mut c);
                c
            })
            .collect();
        let n = n + spares;
        let nodes = configs
            .iter()
            .map(|c| Some(Paxos::new(c.clone(), Default::default())))
            .collect();
        let mut sim = Sim {
            seed,
            rng: SimRng::new(seed ^ 0xA5A5),
            configs,
            nodes,
            storages: vec![MemStorage::new(); n as usize],
            applied: vec![Applied::default(); n as usize],
            packets: Vec::new(),
            now_tick: 0,
            faults: Faults::default(),
            partition: vec![0; n as usize],
            deaf: vec![false; n as usize],
            one_way: BTreeSet::new(),
            chosen: BTreeMap::new(),
            proposed: BTreeSet::new(),
            sent: BTreeMap::new(),
            restarts: 0,
            restart_at_tick: BTreeMap::new(),
            crashes_during_sync: 0,
            reads_pending: BTreeMap::new(),
            reads_confirmed: Vec::new(),
            reads_dropped: Vec::new(),
        };
        for id in 0..n {
            sim.drain(id);
        }
        sim
    }

    pub fn len(&self) -> u32 {
        self.nodes.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn now_tick(&self) -> u64 {
        self.now_tick
    }

    pub fn node(&self, id: NodeId) -> Option<&Paxos> {
        self.nodes[id as usize].as_ref()
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[id as usize].is_some()
    }

    /// The current leaders among live replicas.
    pub fn leaders(&self) -> Vec<NodeId> {
        (0..self.len())
            .filter(|id| self.node(*id).is_some_and(|p| p.is_leader()))
            .collect()
    }

    /// The live leader with the highest ballot, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.leaders()
            .into_iter()
            .max_by_key(|id| self.node(*id).map(|p| p.ballot()))
    }

    /// Offers `data` to replica `id`.
    pub fn propose(&mut self, id: NodeId, data: impl Into<Bytes>) -> Result<u64, ProposeError> {
        let data = data.into();
        let node = self.nodes[id as usize]
            .as_mut()
            .ok_or(ProposeError::NotLeader { leader: None })?;
        let result = node.propose(data.clone());
        if result.is_ok() {
            self.proposed.insert(data);
        }
        self.drain(id);
        result
    }

    /// Proposes a membership change at replica `id` (see
    /// `Paxos::propose_membership`).
    pub fn propose_membership(
        &mut self,
        id: NodeId,
        voters: Members,
        learners: Members,
    ) -> Result<Membership, MembershipError> {
        // Replicas new to the proposer's membership join as they run now.
        let current = match &self.nodes[id as usize] {
            Some(node) => node.membership().clone(),
            None => return Err(MembershipError::NotLeader { leader: None }),
        };
        let joiners =
            crate::paxos::types::ids((voters | learners) & !(current.voters | current.learners))
                .filter_map(|new| {
                    let node = self.nodes[new as usize].as_ref()?;
                    Some((
                        new,
                        crate::paxos::Member {
                            incarnation: node.incarnation(),
                            address: format!("sim-{new}"),
                        },
                    ))
                })
                .collect();
        self.propose_change(
            id,
            MembershipChange {
                voters,
                learners,
                joiners,
                addresses: Default::default(),
                expected_epoch: None,
            },
        )
    }

    /// Proposes `change` at replica `id` as given (see
    /// `Paxos::propose_membership`).
    pub fn propose_change(
        &mut self,
        id: NodeId,
        change: MembershipChange,
    ) -> Result<Membership, MembershipError> {
        let node = self.nodes[id as usize]
            .as_mut()
            .ok_or(MembershipError::NotLeader { leader: None })?;
        let result = node.propose_membership(change);
        if let Ok(next) = &result {
            self.proposed
                .insert(Batch::stop_sign(next).commands[0].data.clone());
        }
        self.drain(id);
        result
    }

    /// Begins a linearizable read at replica `id` (see `Paxos::read_index`).
    pub fn read(&mut self, id: NodeId) -> Result<u64, ProposeError> {
        self.reads(id, 1).remove(0)
    }

    /// Begins `count` reads at replica `id` that arrive together (one
    /// `ready` after all of them, as a driver handles a burst of input).
    pub fn reads(&mut self, id: NodeId, count: usize) -> Vec<Result<u64, ProposeError>> {
        let Some(node) = self.nodes[id as usize].as_mut() else {
            return vec![Err(ProposeError::NotLeader { leader: None }); count];
        };
        let applied_anywhere = self.chosen.keys().next_back().copied().unwrap_or(0);
        let results: Vec<_> = (0..count).map(|_| node.read_index()).collect();
        for read in results.iter().flatten() {
            self.reads_pending.insert((id, *read), applied_anywhere);
        }
        self.drain(id);
        results
    }

    /// Puts the replicas in `groups` into separate partitions; replicas not
    /// named are isolated on their own.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        for (i, p) in self.partition.iter_mut().enumerate() {
            *p = 1000 + i as u32;
        }
        for (g, members) in groups.iter().enumerate() {
            for m in *members {
                self.partition[*m as usize] = g as u32;
            }
        }
    }

    /// Removes every partition and one-way cut.
    pub fn heal(&mut self) {
        self.partition.iter_mut().for_each(|p| *p = 0);
        self.one_way.clear();
    }

    /// From now on, nothing `from` sends reaches `to` (until `heal`).
    pub fn cut_one_way(&mut self, from: NodeId, to: NodeId) {
        self.one_way.insert((from, to));
    }

    pub fn set_deaf(&mut self, id: NodeId, deaf: bool) {
        self.deaf[id as usize] = deaf;
    }

    /// Kills a replica: it loses everything but its storage.
    pub fn crash(&mut self, id: NodeId) {
        self.nodes[id as usize] = None;
        self.reads_pending.retain(|(node, _), _| *node != id);
        self.applied[id as usize] = Applied::default();
    }

    /// Starts a crashed replica again from its storage.
    pub fn restart(&mut self, id: NodeId) {
        assert!(self.nodes[id as usize].is_none(), "replica {id} is running");
        self.restart_at_tick.remove(&id);
        self.restarts += 1;
        let mut config = self.configs[id as usize].clone();
        config.seed = self.seed ^ self.restarts.wrapping_mul(0x9E37_79B9);
        config.proposal_id_start = self.restarts << 40;
        // Unique per life: the first lives took 1.
        config.blank_incarnation = self.restarts + 1;
        let durable = self.storages[id as usize].load().expect("memory storage");
        self.nodes[id as usize] = Some(Paxos::new(config, durable));
        self.drain(id);
    }

    /// Crashes replica `id` (if up) and wipes its storage: its next
    /// `restart` starts blank, as a joiner if `rejoin` (a new member under
    /// the same id). If not, it starts as its config says: with
    /// `recover_when_empty`, recovering its votes from its peers (or, the
    /// group's only first member, as a new group's with a new incarnation);
    /// without (the simulator's default, `Config::new_group`), as a member
    /// of a new group under its old incarnation, which no real node does.
    pub fn lose_disk(&mut self, id: NodeId, rejoin: bool) {
        if self.nodes[id as usize].is_some() {
            self.crash(id);
        }
        self.storages[id as usize] = MemStorage::new();
        self.configs[id as usize].joining = rejoin;
    }

    /// Changes the configuration replica `id` starts with from its next
    /// restart on.
    pub fn reconfigure(&mut self, id: NodeId, change: impl FnOnce(&mut Config)) {
        change(&mut self.configs[id as usize]);
    }

    /// Has the state machine of `id` compact its log at what it has applied.
    pub fn compact(&mut self, id: NodeId) {
        let applied = &self.applied[id as usize];
        let (slot, data) = (applied.last_slot, applied.snapshot());
        if let Some(node) = self.nodes[id as usize].as_mut() {
            node.compact(slot, data);
        }
        self.drain(id);
    }

    /// Runs `ticks` rounds: deliver what is due, then tick every live replica.
    pub fn run(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.now_tick += 1;
            let now = self.now_tick;
            let due: Vec<NodeId> = (self.restart_at_tick.iter())
                .filter(|(_, at)| **at <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.restart_at_tick.remove(&id);
                self.restart(id);
            }
            self.deliver_due();
            for id in 0..self.len() {
                if let Some(node) = self.nodes[id as usize].as_mut() {
                    node.tick();
                    self.drain(id);
                }
            }
            self.deliver_due();
        }
    }

    /// Delivers every message already due without advancing time (messages
    /// sent while delivering are delivered too, up to a bound).
    pub fn settle(&mut self) {
        self.deliver_due();
    }

    /// Runs until `done` holds, for at most `max_ticks`; says whether it held.
    pub fn run_until(&mut self, max_ticks: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        for _ in 0..max_ticks {
            if done(self) {
                return true;
            }
            self.run(1);
        }
        done(self)
    }

    /// How many live replicas have applied a command with exactly this payload,
    /// checking they all applied it at the same slot.
    pub fn decided_count(&self, data: &[u8]) -> usize {
        let mut slot_seen: Option<Slot> = None;
        let mut count = 0;
        for id in 0..self.len() {
            if !self.is_up(id) {
                continue;
            }
            for (slot, batch) in &self.applied[id as usize].entries {
                if batch.commands.iter().any(|c| c.data.as_ref() == data) {
                    if let Some(s) = slot_seen {
                        assert_eq!(
                            s, *slot,
                            "seed {}: a command decided in two slots",
                            self.seed
                        );
                    }
                    slot_seen = Some(*slot);
                    count += 1;
                    break;
                }
            }
        }
        count
    }

    /// The slot a command with this payload was decided in, if known.
    pub fn decided_slot(&self, data: &[u8]) -> Option<Slot> {
        self.chosen
            .iter()
            .find(|(_, b)| b.commands.iter().any(|c| c.data.as_ref() == data))
            .map(|(s, _)| *s)
    }

    /// Every slot decided anywhere, with its value.
    pub fn chosen(&self) -> &BTreeMap<Slot, Batch> {
        &self.chosen
    }

    /// Messages sent in total.
    pub fn messages_sent(&self) -> u64 {
        self.sent.values().sum()
    }

    fn drain(&mut self, id: NodeId) {
        let Some(node) = self.nodes[id as usize].as_mut() else {
            return;
        };
        let ready = node.ready();
        self.handle_ready(id, ready);
    }

    fn handle_ready(&mut self, id: NodeId, ready: Ready) {
        let seed = self.seed;
        // In the driver's order: the early messages, the sync, the rest.
        self.send_all(id, ready.messages);
        if ready.persist.needs_sync() && self.rng.chance(self.faults.crash_during_sync) {
            self.crashes_during_sync += 1;
            self.crash(id);
            let down_ticks = 5 + self.rng.below(16);
            self.restart_at_tick.insert(id, self.now_tick + down_ticks);
            return;
        }
        self.storages[id as usize]
            .persist(&ready.persist)
            .expect("memory storage");
        self.send_all(id, ready.persisted_messages);
        let applied = &mut self.applied[id as usize];
        if let Some(snapshot) = ready.snapshot {
            applied.install(&snapshot.data);
            assert_eq!(
                applied.last_slot, snapshot.index,
                "seed {seed}: snapshot index"
            );
        }
        for (slot, batch) in ready.committed {
            assert_eq!(
                slot,
                applied.last_slot + 1,
                "seed {seed}: replica {id} applied slot {slot} out of order"
            );
            match self.chosen.get(&slot) {
                Some(v) => assert_eq!(
                    v, &batch,
                    "seed {seed}: AGREEMENT VIOLATED at slot {slot} on replica {id}"
                ),
                None => {
                    for c in &batch.commands {
                        assert!(
                            self.proposed.contains(&c.data),
                            "seed {seed}: VALIDITY VIOLATED: slot {slot} holds a command never proposed"
                        );
                    }
                    self.chosen.insert(slot, batch.clone());
                }
            }
            applied.apply(slot, &batch);
        }
        for (read, index) in ready.reads {
            let needed = self.reads_pending.remove(&(id, read));
            let needed = needed.unwrap_or_else(|| {
                panic!("seed {seed}: replica {id} confirmed read {read}, never begun or already answered")
            });
            assert!(
                index >= needed,
                "seed {seed}: STALE READ: replica {id} confirmed read {read} at index {index}, \
                 but slot {needed} was applied before the read began"
            );
            self.reads_confirmed.push((id, read, index));
        }
        for read in ready.dropped {
            if self.reads_pending.remove(&(id, read)).is_some() {
                self.reads_dropped.push((id, read));
            }
        }
    }

    /// Hands messages to the network, applying the faults.
    fn send_all(&mut self, id: NodeId, messages: Vec<(NodeId, Message)>) {
        for (to, msg) in messages {
            if to as usize >= self.nodes.len() {
                continue; // no such replica: a real transport drops it too
            }
            *self.sent.entry(msg.kind()).or_default() += 1;
            let is_reply = matches!(
                msg,
                Message::Promise { .. }
                    | Message::Accepted { .. }
                    | Message::Nack { .. }
                    | Message::CatchUpReply { .. }
            );
            let p = if is_reply {
                self.faults.drop_reply
            } else {
                self.faults.drop_request
            };
            if self.rng.chance(p) {
                continue;
            }
            let delay = if self.faults.delay_max_ticks > 0 {
                self.rng.below(self.faults.delay_max_ticks + 1)
            } else {
                0
            };
            self.packets.push(Packet {
                from: id,
                to,
                deliver_tick: self.now_tick + delay,
                msg,
            });
        }
    }

    fn deliver_due(&mut self) {
        // Bound the cascade so a livelock shows up as a failed test, not a hang.
        for _ in 0..10_000 {
            let due: Vec<usize> = (0..self.packets.len())
                .filter(|i| self.packets[*i].deliver_tick <= self.now_tick)
                .collect();
            if due.is_empty() {
                return;
            }
            // Deliver one due packet chosen at random: reorders within a tick.
            let pick = due[self.rng.below(due.len() as u64) as usize];
            let packet = self.packets.swap_remove(pick);
            let (from, to) = (packet.from as usize, packet.to as usize);
            if self.partition[from] != self.partition[to]
                || self.deaf[to]
                || self.one_way.contains(&(packet.from, packet.to))
            {
                continue;
            }
            if let Some(node) = self.nodes[to].as_mut() {
                node.step(packet.from, packet.msg);
                self.drain(packet.to);
            }
        }
    }
}
