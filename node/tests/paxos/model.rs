//! Exhaustive model check of the core on a small configuration.
//!
//! Depth-first search over every interleaving of: delivering any message in
//! flight, in any order (reordering; a message never delivered is lost),
//! delivering one again later (duplication, within a budget), ticking any
//! replica (which starts elections), proposing at any leader, and crashing a
//! replica and restarting it from its storage, or with its disk lost (blank
//! storage: it must recover from its peers before it votes again).
//!
//! Each replica's effects are handled as the driver handles them: the
//! messages that may leave before the sync (`Ready::messages`) leave, then
//! the replica is blocked in its sync, and a separate step completes the
//! sync (the writes become durable, `Ready::persisted_messages` leave, the
//! decisions are applied). A replica that may still crash can crash inside
//! that window, losing the writes while its early messages are out.
//!
//! 5-replica checks start from a scripted prologue (the first steps of a
//! schedule a review found) and explore every interleaving from there:
//! exhaustive search over 5 replicas from the start is out of reach.
//!
//! States are deduplicated by a 64-bit fingerprint, so memory is 8 bytes
//! per state plus the current path. Along every path we check:
//! - agreement: no slot is ever decided with two different values, on any
//!   replica, before or after a crash;
//! - validity: every decided command was proposed;
//! - read safety: a read confirmed by `read_index` has an index at least
//!   the highest slot applied anywhere when the read began, so it cannot
//!   miss a write already acknowledged.
//!
//! The search also confirms it is not vacuous: some reachable state has every
//! proposal decided.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use bytes::Bytes;
use shardkv::paxos::types::{ids, members_below};
use shardkv::paxos::{
    Batch, Config, DurableState, Member, Members, MembershipChange, Message, NodeId, Paxos,
    PersistBatch, RoleKind, Slot,
};

/// A replica blocked in its sync: what completes when the sync does.
#[derive(Clone, Hash, PartialEq, Eq)]
struct Unsynced {
    persist: PersistBatch,
    messages: Vec<(NodeId, Vec<u8>)>,
    committed: Vec<(Slot, Batch)>,
    reads: Vec<(u64, Slot)>,
    dropped: Vec<u64>,
}

#[derive(Clone, Hash, PartialEq, Eq)]
struct State {
    nodes: Vec<Option<Paxos>>,
    storage: Vec<DurableState>,
    /// Per replica: blocked in a sync (it takes no input until done).
    unsynced: Vec<Option<Unsynced>>,
    /// Blank restarts so far: each takes a new incarnation.
    blank_restarts: u8,
    /// The prologue is over: `Bounds::cut` applies.
    searching: bool,
    /// (from, to, encoded message): a set, so duplicates collapse.
    network: BTreeSet<(NodeId, NodeId, Vec<u8>)>,
    /// Every slot decided anywhere on this path, with its value.
    decided: BTreeMap<Slot, Batch>,
    proposals_made: u8,
    /// Membership changes proposed so far (of `Bounds::changes`, in order).
    changes_made: u8,
    reads_made: u8,
    /// Reads begun and not yet confirmed or dropped, by (replica, read id):
    /// the highest slot applied anywhere when the read began.
    reads_pending: BTreeMap<(NodeId, u64), Slot>,
    /// Reads confirmed on this path (to show the check is not vacuous).
    reads_confirmed: u8,
    crashes_left: u8,
    ticks_left: u8,
    duplicates_left: u8,
}

struct Bounds {
    peers: u32,
    /// Replicas beyond the first `peers`, started as joining replicas:
    /// members only once a change in `changes` adds them.
    spares: u32,
    /// Membership changes (voters, learners) a leader may propose, in this
    /// order, at any point of the search.
    changes: &'static [(Members, Members)],
    proposals: u8,
    /// Linearizable reads begun at a leader.
    reads: u8,
    crashes: u8,
    ticks: u8,
    duplicates: u8,
    /// Start from replica 0 elected (see `elect_replica_zero`).
    pre_elected: bool,
    /// A crashed replica comes back with blank storage instead of its own.
    lose_disk: bool,
    /// Only this replica may crash (all may, if `None`).
    crash_only: Option<NodeId>,
    /// Only these replicas may tick, i.e. start an election (all may, if `None`).
    tick_only: Option<&'static [NodeId]>,
    /// Run with pre-votes and leader stickiness (see `config`).
    pre_vote: bool,
    /// Scripted first steps, run before the search (5-replica schedules).
    prologue: Option<fn(&mut State, &Bounds)>,
    /// Links that lose everything sent over them after the prologue (from,
    /// to): a scenario's topology, which keeps 5 replicas tractable.
    cut: &'static [(NodeId, NodeId)],
    /// A state the search must reach, to show it checked something (by
    /// default: every proposal decided and every read confirmed). For a
    /// scenario, the state in which the bug it is for did its damage.
    goal: Option<fn(&State) -> bool>,
}

/// What every check starts from: replica 0 elected, 2 proposals, one
/// competing election, and nothing else.
const BASE: Bounds = Bounds {
    peers: 3,
    spares: 0,
    changes: &[],
    proposals: 2,
    reads: 0,
    crashes: 0,
    ticks: 1,
    duplicates: 0,
    pre_elected: true,
    lose_disk: false,
    crash_only: None,
    tick_only: None,
    pre_vote: false,
    prologue: None,
    cut: &[],
    goal: None,
};

/// The change to `voters` and `learners`, the replicas beyond the first
/// `peers` joining as the life they start as (the config's blank
/// incarnation: the model never loses a joiner's disk).
fn change_to(voters: Members, learners: Members, bounds: &Bounds) -> MembershipChange {
    let spares = (voters | learners) & !members_below(bounds.peers);
    MembershipChange {
        voters,
        learners,
        joiners: ids(spares)
            .map(|id| {
                let member = Member {
                    incarnation: config(id, bounds).blank_incarnation,
                    address: format!("model-{id}"),
                };
                (id, member)
            })
            .collect(),
        addresses: Default::default(),
        expected_epoch: None,
    }
}

fn config(id: NodeId, bounds: &Bounds) -> Config {
    let mut c = Config::new_group(id, bounds.peers);
    c.joining = id >= bounds.peers;
    // One tick of silence starts an election; heartbeats and retries are off
    // because redelivery from the network already models them.
    c.election_timeout_min_ticks = 1;
    c.election_timeout_max_ticks = 1;
    c.heartbeat_interval_ticks = 1_000;
    c.retry_interval_ticks = 1_000;
    // Pre-votes and leader stickiness only hold elections back: every run
    // with them is a run without them in which some Prepares were lost or
    // an election began later. So checking without them covers them, and
    // with a one-tick timeout their clocks would forbid the competing
    // elections this check is for. `model_check_pre_vote` runs them.
    c.pre_vote = bounds.pre_vote;
    c.check_quorum = bounds.pre_vote;
    c
}

fn value(i: u8) -> Bytes {
    Bytes::from(vec![b'v', b'0' + i])
}

/// A 64-bit fingerprint, as stateright uses: at ten million states the odds
/// that two distinct states collide (hiding one) are about 3 in a million.
fn fingerprint(state: &State) -> u64 {
    let mut h = DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

fn encode(messages: Vec<(NodeId, Message)>) -> Result<Vec<(NodeId, Vec<u8>)>, String> {
    (messages.into_iter())
        .map(|(to, msg)| Ok((to, postcard::to_allocvec(&msg).map_err(|e| e.to_string())?)))
        .collect()
}

fn send(state: &mut State, bounds: &Bounds, from: NodeId, to: NodeId, bytes: Vec<u8>) {
    if !(state.searching && bounds.cut.contains(&(from, to))) {
        state.network.insert((from, to, bytes));
    }
}

/// Whether `id` may still crash on this path: only then is its sync a
/// separate step (without a crash, finishing the sync at once is
/// indistinguishable, as the network may delay any message).
fn may_crash(state: &State, id: NodeId, bounds: &Bounds) -> bool {
    state.searching && state.crashes_left > 0 && bounds.crash_only.is_none_or(|c| c == id)
}

/// Collects a replica's effects as the driver does: the early messages
/// leave, then the sync (a step of its own if the replica may crash in it).
fn drain(state: &mut State, id: NodeId, bounds: &Bounds) -> Result<(), String> {
    let Some(node) = state.nodes[id as usize].as_mut() else {
        return Ok(());
    };
    debug_assert!(state.unsynced[id as usize].is_none(), "input while syncing");
    let ready = node.ready();
    for (to, bytes) in encode(ready.messages)? {
        send(state, bounds, id, to, bytes);
    }
    let unsynced = Unsynced {
        persist: ready.persist,
        messages: encode(ready.persisted_messages)?,
        committed: ready.committed,
        reads: ready.reads,
        dropped: ready.dropped,
    };
    if unsynced.persist.needs_sync() && may_crash(state, id, bounds) {
        state.unsynced[id as usize] = Some(unsynced);
        return Ok(());
    }
    complete_sync(state, id, unsynced, bounds)
}

/// The sync is done: writes durable, the waiting messages sent, decisions
/// checked and applied.
fn complete_sync(
    state: &mut State,
    id: NodeId,
    unsynced: Unsynced,
    bounds: &Bounds,
) -> Result<(), String> {
    // A batch that needs no sync (a newer commit index alone) may be lost
    // in a crash: the model always loses it, the worst case.
    if unsynced.persist.needs_sync() {
        unsynced.persist.apply_to(&mut state.storage[id as usize]);
    }
    for (to, bytes) in unsynced.messages {
        send(state, bounds, id, to, bytes);
    }
    for (slot, batch) in unsynced.committed {
        for c in &batch.commands {
            let known = (0..bounds.proposals).any(|i| value(i) == c.data)
                || batch.as_stop_sign().is_some_and(|m| {
                    bounds.changes[..usize::from(state.changes_made)]
                        .contains(&(m.voters, m.learners))
                });
            if !known {
                return Err(format!(
                    "validity: slot {slot} decided unproposed {:?}",
                    c.data
                ));
            }
        }
        match state.decided.get(&slot) {
            Some(v) if *v != batch => {
                return Err(format!(
                    "agreement: slot {slot} decided as {v:?} and as {batch:?} (replica {id})"
                ));
            }
            Some(_) => {}
            None => {
                state.decided.insert(slot, batch);
            }
        }
    }
    for (read, index) in unsynced.reads {
        let needed = state.reads_pending.remove(&(id, read)).ok_or_else(|| {
            format!("replica {id} confirmed read {read}, never begun or already answered")
        })?;
        if index < needed {
            return Err(format!(
                "stale read: replica {id} confirmed a read at index {index}, \
                 but slot {needed} was applied before it began"
            ));
        }
        state.reads_confirmed += 1;
    }
    for read in unsynced.dropped {
        state.reads_pending.remove(&(id, read));
    }
    Ok(())
}

fn successors(state: &State, bounds: &Bounds) -> Result<Vec<State>, String> {
    let mut next = Vec::new();
    for key in &state.network {
        let (from, to, bytes) = key;
        if state.nodes[*to as usize].is_none() || state.unsynced[*to as usize].is_some() {
            continue;
        }
        // Deliver it; within the budget, also deliver it and keep a copy in
        // flight. Loss needs no action: a message never delivered is lost.
        for keep in [false, true] {
            if keep && state.duplicates_left == 0 {
                continue;
            }
            let mut s = state.clone();
            if keep {
                s.duplicates_left -= 1;
            } else {
                s.network.remove(key);
            }
            let msg: Message = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
            s.nodes[*to as usize].as_mut().unwrap().step(*from, msg);
            drain(&mut s, *to, bounds)?;
            next.push(s);
        }
    }
    for id in 0..bounds.peers + bounds.spares {
        let i = id as usize;
        if let Some(unsynced) = &state.unsynced[i] {
            // Blocked in its sync: it finishes, or it crashes inside it.
            let mut s = state.clone();
            s.unsynced[i] = None;
            complete_sync(&mut s, id, unsynced.clone(), bounds)?;
            next.push(s);
            if may_crash(state, id, bounds) {
                let mut s = state.clone();
                s.crashes_left -= 1;
                s.unsynced[i] = None;
                s.nodes[i] = None;
                s.reads_pending.retain(|(node, _), _| *node != id);
                next.push(s);
            }
            continue;
        }
        match &state.nodes[i] {
            Some(node) => {
                if state.ticks_left > 0 && bounds.tick_only.is_none_or(|t| t.contains(&id)) {
                    let mut s = state.clone();
                    s.ticks_left -= 1;
                    s.nodes[i].as_mut().unwrap().tick();
                    drain(&mut s, id, bounds)?;
                    next.push(s);
                }
                if node.is_leader() && state.proposals_made < bounds.proposals {
                    let mut s = state.clone();
                    let v = value(s.proposals_made);
                    s.proposals_made += 1;
                    s.nodes[i]
                        .as_mut()
                        .unwrap()
                        .propose(v)
                        .map_err(|e| e.to_string())?;
                    drain(&mut s, id, bounds)?;
                    next.push(s);
                }
                if node.is_leader() && usize::from(state.changes_made) < bounds.changes.len() {
                    let mut s = state.clone();
                    let (voters, learners) = bounds.changes[usize::from(s.changes_made)];
                    // Refused while the change before is in flight, or a
                    // learner is behind: a later state proposes it.
                    let taken = s.nodes[i]
                        .as_mut()
                        .unwrap()
                        .propose_membership(change_to(voters, learners, bounds));
                    if taken.is_ok() {
                        s.changes_made += 1;
                        drain(&mut s, id, bounds)?;
                        next.push(s);
                    }
                }
                if node.is_leader() && state.reads_made < bounds.reads {
                    let mut s = state.clone();
                    s.reads_made += 1;
                    let needed = s.decided.keys().next_back().copied().unwrap_or(0);
                    let read = s.nodes[i]
                        .as_mut()
                        .unwrap()
                        .read_index()
                        .map_err(|e| e.to_string())?;
                    s.reads_pending.insert((id, read), needed);
                    drain(&mut s, id, bounds)?;
                    next.push(s);
                }
                if state.crashes_left > 0 && bounds.crash_only.is_none_or(|c| c == id) {
                    let mut s = state.clone();
                    s.crashes_left -= 1;
                    s.nodes[i] = None;
                    s.reads_pending.retain(|(node, _), _| *node != id);
                    next.push(s);
                }
            }
            None => {
                let mut s = state.clone();
                let mut c = config(id, bounds);
                if bounds.lose_disk {
                    s.storage[i] = DurableState::default();
                    s.blank_restarts += 1;
                    c.blank_incarnation = u64::from(s.blank_restarts);
                }
                // Blank storage after a crash is a lost disk, never a new group.
                c.recover_when_empty = true;
                s.nodes[i] = Some(Paxos::new(c, s.storage[i].clone()));
                drain(&mut s, id, bounds)?;
                next.push(s);
            }
        }
    }
    Ok(next)
}

/// Deterministic prologue: replica 0 times out and every message is
/// delivered in order until the network is quiet, leaving it the leader of
/// ballot 1. Exploring the first election's interleavings adds states but no
/// interesting behaviour; competing elections are explored afterwards.
fn elect_replica_zero(state: &mut State, bounds: &Bounds) {
    elect(state, bounds, 0, None);
}

// ----- Scripted steps, for prologues -----

/// Ticks `id` once (a one-tick timeout), delivers its pre-votes if asked
/// and their answers, then its Prepares to `voters` (all, if `None`) and their answers,
/// and its takeover Accepts and their answers, until it leads.
fn elect(state: &mut State, bounds: &Bounds, id: NodeId, voters: Option<&[NodeId]>) {
    let node = state.nodes[id as usize].as_mut().unwrap();
    node.tick();
    drain(state, id, bounds).unwrap();
    let voters: Vec<NodeId> = match voters {
        Some(v) => v.to_vec(),
        None => (0..bounds.peers).filter(|p| *p != id).collect(),
    };
    // With pre-votes on, the tick asked for them first.
    for v in &voters {
        deliver(state, bounds, id, *v, |m| {
            matches!(m, Message::PreVote { .. })
        });
    }
    for v in &voters {
        deliver(state, bounds, *v, id, |m| {
            matches!(m, Message::PreVoteReply { .. })
        });
    }
    for v in &voters {
        deliver(state, bounds, id, *v, |m| {
            matches!(m, Message::Prepare { .. })
        });
    }
    for v in &voters {
        deliver(state, bounds, *v, id, |m| {
            matches!(m, Message::Promise { .. })
        });
    }
    assert!(
        state.nodes[id as usize].as_ref().unwrap().is_leader(),
        "prologue must elect replica {id}"
    );
}

/// Delivers every message in flight from `from` to `to` that `pick` selects.
fn deliver(
    state: &mut State,
    bounds: &Bounds,
    from: NodeId,
    to: NodeId,
    pick: impl Fn(&Message) -> bool,
) {
    let keys: Vec<_> = (state.network.iter())
        .filter(|(f, t, bytes)| {
            *f == from && *t == to && pick(&postcard::from_bytes(bytes).unwrap())
        })
        .cloned()
        .collect();
    for key in keys {
        state.network.remove(&key);
        let msg: Message = postcard::from_bytes(&key.2).unwrap();
        state.nodes[to as usize].as_mut().unwrap().step(from, msg);
        drain(state, to, bounds).unwrap();
    }
}

/// Removes (loses) every message in flight from `from` to `to` that `pick` selects.
fn lose(state: &mut State, from: NodeId, to: NodeId, pick: impl Fn(&Message) -> bool) {
    state.network.retain(|(f, t, bytes)| {
        !(*f == from && *t == to && pick(&postcard::from_bytes(bytes).unwrap()))
    });
}

fn propose(state: &mut State, bounds: &Bounds, id: NodeId) {
    let v = value(state.proposals_made);
    state.proposals_made += 1;
    state.nodes[id as usize]
        .as_mut()
        .unwrap()
        .propose(v)
        .expect("the scripted proposer leads");
    drain(state, id, bounds).unwrap();
}

fn any(_: &Message) -> bool {
    true
}

fn is_accept(m: &Message) -> bool {
    matches!(m, Message::Accept { .. })
}

fn explore(bounds: Bounds, state_limit: usize) -> (usize, bool) {
    let peers = (bounds.peers + bounds.spares) as usize;
    let mut init = State {
        nodes: (0..bounds.peers + bounds.spares)
            .map(|id| Some(Paxos::new(config(id, &bounds), DurableState::default())))
            .collect(),
        storage: vec![DurableState::default(); peers],
        unsynced: vec![None; peers],
        blank_restarts: 0,
        searching: false,
        network: BTreeSet::new(),
        decided: BTreeMap::new(),
        proposals_made: 0,
        changes_made: 0,
        reads_made: 0,
        reads_pending: BTreeMap::new(),
        reads_confirmed: 0,
        crashes_left: bounds.crashes,
        ticks_left: bounds.ticks,
        duplicates_left: bounds.duplicates,
    };
    for id in 0..bounds.peers + bounds.spares {
        drain(&mut init, id, &bounds).unwrap();
    }
    if bounds.pre_elected {
        elect_replica_zero(&mut init, &bounds);
    }
    if let Some(prologue) = bounds.prologue {
        prologue(&mut init, &bounds);
    }
    init.searching = true;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut stack = vec![init];
    seen.insert(fingerprint(&stack[0]));
    let mut all_decided_reachable = false;
    let started = Instant::now();
    let mut progress_at = 1_000_000;
    while let Some(state) = stack.pop() {
        let decided_commands: usize = state.decided.values().map(|b| b.commands.len()).sum();
        let goal = match bounds.goal {
            Some(goal) => goal(&state),
            None => {
                let stop_signs = (state.decided.values())
                    .filter(|b| b.as_stop_sign().is_some())
                    .count();
                decided_commands - stop_signs == bounds.proposals as usize
                    && state.reads_confirmed == bounds.reads
                    && stop_signs == bounds.changes.len()
            }
        };
        all_decided_reachable |= goal;
        let next = match successors(&state, &bounds) {
            Ok(n) => n,
            Err(violation) => panic!("model check found a violation: {violation}"),
        };
        for s in next {
            if seen.insert(fingerprint(&s)) {
                stack.push(s);
            }
        }
        assert!(
            seen.len() <= state_limit,
            "state space larger than {state_limit}: tighten the bounds"
        );
        if seen.len() >= progress_at {
            eprintln!("  ... {} states, {:?}", seen.len(), started.elapsed());
            progress_at += 1_000_000;
        }
    }
    (seen.len(), all_decided_reachable)
}

fn check(name: &str, bounds: Bounds) {
    let started = Instant::now();
    let (proposals, reads) = (bounds.proposals, bounds.reads);
    let (states, reachable) = explore(bounds, 50_000_000);
    println!(
        "model check ({name}): {states} states explored in {:?}",
        started.elapsed()
    );
    assert!(
        reachable,
        "the search never reached its goal (by default: all {proposals} proposals decided \
         and all {reads} reads confirmed): it checked nothing"
    );
}

// Each check takes 1-4 minutes on one core; the bounds below are the largest
// that keep the whole suite within its time budget. Larger ones run by hand
// with `model_check_custom` (e.g. 2 proposals with 2 more elections: over
// 10 million states).

#[test]
fn model_check_competing_ballots() {
    // Leader 0 proposes a value, which may be partly accepted when any
    // replica starts a competing election; loss, one duplication and any
    // reordering throughout. With 2 proposals it was 7.0 million states
    // before this revision's core changes and passes 10 million (380 s)
    // now, for a cause not yet found; it runs by hand:
    // `SHARDKV_MC_BOUNDS=2,1,0,1 cargo test model_check_custom`.
    check(
        "1 proposal, 1 competing election, 1 duplicate",
        Bounds {
            proposals: 1,
            duplicates: 1,
            ..BASE
        },
    );
}

#[test]
fn model_check_crash_restart() {
    // One proposal, a competing election, and any replica may crash at any
    // point, inside its sync too (a leader after its Accepts left, before
    // its own writes were durable), and restart from its storage. With 2
    // proposals, crashing only the leader passes 11 million states (by
    // hand: `model_check_custom`).
    check(
        "1 proposal, 1 competing election, 1 crash-restart",
        Bounds {
            proposals: 1,
            crashes: 1,
            ..BASE
        },
    );
}

#[test]
fn model_check_lost_disk() {
    // As above, but the crashed replica loses its disk: it must recover
    // what it promised and accepted from the others before it votes again.
    check(
        "1 proposal, 1 competing election, 1 crash losing the disk",
        Bounds {
            proposals: 1,
            crashes: 1,
            lose_disk: true,
            crash_only: Some(1),
            tick_only: Some(&[2]),
            ..BASE
        },
    );
}

#[test]
fn model_check_first_election() {
    // No prologue: every interleaving of the first election itself.
    check(
        "first election, 2 proposals, 1 duplicate",
        Bounds {
            duplicates: 1,
            pre_elected: false,
            ..BASE
        },
    );
}

#[test]
fn model_check_reads() {
    // Leader 0 writes a value and a leader serves a read while any replica
    // may start a competing election and messages are lost or reordered.
    // This covers the two ways a read goes stale: a deposed leader
    // confirming a read after the new one applied a write, and a new leader
    // reading before it has re-decided what its predecessor applied. With 2
    // proposals the space passes 30 million states.
    check(
        "1 proposal, 1 read, 1 competing election",
        Bounds {
            proposals: 1,
            reads: 1,
            ..BASE
        },
    );
}

/// Larger bounds for a long run by hand:
/// `SHARDKV_MC_BOUNDS=proposals,ticks,crashes,duplicates[,lose_disk[,crash_only[,tick_only[,reads]]]] cargo test model_check_custom -- --ignored --nocapture`
#[test]
#[ignore = "long: bounds chosen by hand"]
fn model_check_custom() {
    let spec = std::env::var("SHARDKV_MC_BOUNDS").unwrap_or_else(|_| "2,3,1,1".into());
    let v: Vec<u8> = spec
        .split(',')
        .map(|x| x.parse().expect("number"))
        .collect();
    check(
        &format!("custom {spec}"),
        Bounds {
            proposals: v[0],
            ticks: v[1],
            crashes: v[2],
            duplicates: v[3],
            lose_disk: v.get(4).is_some_and(|x| *x == 1),
            crash_only: v.get(5).map(|x| NodeId::from(*x)),
            tick_only: v.get(6).map(|x| &*Vec::leak(vec![NodeId::from(*x)])),
            reads: v.get(7).copied().unwrap_or(0),
            ..BASE
        },
    );
}

#[test]
#[ignore = "long: over 5 million states, about 3 minutes and more"]
fn model_check_pre_vote() {
    // With pre-votes and leader stickiness on, as the driver runs: leader 0
    // proposes one value while replicas 1 and 2 may tick (a tick ends a
    // follower's one-tick timeout: it asks for pre-votes, and no longer
    // counts the leader live, so it can grant the other's), with loss and
    // reordering throughout.
    check(
        "pre-vote on, 1 proposal, 2 ticks at replicas 1 and 2",
        Bounds {
            proposals: 1,
            ticks: 2,
            tick_only: Some(&[1, 2]),
            pre_vote: true,
            ..BASE
        },
    );
}

// ----- 5 replicas -----

/// Replicas A to E.
const A: NodeId = 0;
const B: NodeId = 1;
const C: NodeId = 2;
const D: NodeId = 3;
const E: NodeId = 4;

/// The first review finding, up to its branch point: B led and decided
/// v0 in slot 1 with C and D (A and E missed it); A was elected by B and E,
/// asking B to catch it up because B's commit was higher (that request is
/// in flight); A re-decided slot 1 and proposed v1 in slot 2, which only C
/// has accepted. From here the search may elect D, deliver or lose
/// anything, and let the leaders propose v2, v3 and v4 (a leader's commit
/// index travels on its next Accept: heartbeats are off in the model).
fn prologue_late_catchup(state: &mut State, bounds: &Bounds) {
    elect(state, bounds, B, None);
    for peer in [A, C, D, E] {
        deliver(state, bounds, B, peer, is_accept);
        deliver(state, bounds, peer, B, any);
    }
    propose(state, bounds, B);
    lose(state, B, A, any);
    lose(state, B, E, any);
    for peer in [C, D] {
        deliver(state, bounds, B, peer, any);
        deliver(state, bounds, peer, B, any);
    }
    assert_eq!(state.nodes[B as usize].as_ref().unwrap().commit_index(), 1);
    for peer in [C, D] {
        lose(state, A, peer, any);
    }
    elect(state, bounds, A, Some(&[B, E]));
    let asked = (state.network.iter()).any(|(f, t, bytes)| {
        *f == A
            && *t == B
            && matches!(
                postcard::from_bytes(bytes).unwrap(),
                Message::CatchUpRequest { .. }
            )
    });
    assert!(asked, "A asked B to catch it up");
    for peer in [B, C, D, E] {
        deliver(state, bounds, A, peer, is_accept);
        deliver(state, bounds, peer, A, any);
    }
    assert_eq!(state.nodes[A as usize].as_ref().unwrap().commit_index(), 1);
    propose(state, bounds, A);
    lose(state, A, B, is_accept);
    lose(state, A, D, any);
    lose(state, A, E, any);
    deliver(state, bounds, A, C, any);
    lose(state, C, A, any);
}

fn in_flight(state: &State, from: NodeId, to: NodeId, pick: impl Fn(&Message) -> bool) -> bool {
    (state.network.iter())
        .any(|(f, t, bytes)| *f == from && *t == to && pick(&postcard::from_bytes(bytes).unwrap()))
}

/// Where the bug struck: A still leads in its ballot, slot 2 is decided
/// (by D's majority), and B's catch-up reply covering it is on its way to A.
fn goal_late_catchup(state: &State) -> bool {
    let a_leads = state.nodes[A as usize]
        .as_ref()
        .is_some_and(|a| a.is_leader());
    let reply = |m: &Message| matches!(m, Message::CatchUpReply { commit, .. } if *commit >= 2);
    a_leads && state.decided.contains_key(&2) && in_flight(state, B, A, reply)
}

#[test]
fn model_check_five_replicas_late_catchup() {
    check(
        "5 replicas: a late catch-up reply at a deposed leader",
        Bounds {
            peers: 5,
            proposals: 5,
            ticks: 1,
            tick_only: Some(&[D]),
            pre_elected: false,
            prologue: Some(prologue_late_catchup),
            goal: Some(goal_late_catchup),
            // A reaches B and C; D reaches B and E; C never hears of D.
            cut: &[
                (A, D),
                (D, A),
                (A, E),
                (E, A),
                (D, C),
                (C, D),
                (C, B),
                (B, C),
                (C, E),
                (E, C),
                (B, E),
                (E, B),
            ],
            ..BASE
        },
    );
}

/// The second review finding, up to its branch point: L (replica 0) leads;
/// C (3) stood with a higher ballot and only R (1) has promised it, and
/// that promise is in flight. From here the search may crash R, losing its
/// disk, deliver or lose anything, and let the leaders propose.
fn prologue_stale_promise(state: &mut State, bounds: &Bounds) {
    const L: NodeId = 0;
    const R: NodeId = 1;
    const B: NodeId = 2;
    const C: NodeId = 3;
    const A: NodeId = 4;
    elect(state, bounds, L, None);
    for peer in [R, B, C, A] {
        deliver(state, bounds, L, peer, is_accept);
        deliver(state, bounds, peer, L, any);
    }
    let c = state.nodes[C as usize].as_mut().unwrap();
    c.tick();
    drain(state, C, bounds).unwrap();
    lose(state, C, L, any);
    lose(state, C, B, any);
    deliver(state, bounds, C, R, any);
}

/// Where the bug struck: R has recovered from a lost disk, L has decided
/// slot 1, and R's promise from before is still on its way to C.
fn goal_stale_promise(state: &State) -> bool {
    let recovered = state.blank_restarts > 0
        && state.nodes[1]
            .as_ref()
            .is_some_and(|r| r.role() == RoleKind::Follower);
    let promise = |m: &Message| matches!(m, Message::Promise { .. });
    recovered && state.decided.contains_key(&1) && in_flight(state, 1, 3, promise)
}

#[test]
fn model_check_five_replicas_stale_promise() {
    check(
        "5 replicas: a promise from before a lost disk",
        Bounds {
            peers: 5,
            proposals: 2,
            ticks: 0,
            crashes: 1,
            lose_disk: true,
            crash_only: Some(1),
            pre_elected: false,
            prologue: Some(prologue_stale_promise),
            goal: Some(goal_stale_promise),
            // C and A never reach L or B, nor they C and A.
            cut: &[
                (3, 0),
                (3, 2),
                (0, 3),
                (2, 3),
                (4, 0),
                (0, 4),
                (4, 2),
                (2, 4),
            ],
            ..BASE
        },
    );
}

/// The ids in `list`, as a set.
const fn set(list: &[NodeId]) -> Members {
    let mut set = 0;
    let mut i = 0;
    while i < list.len() {
        set |= 1 << list[i];
        i += 1;
    }
    set
}

/// Add replica 3 as a learner, then make it a voter in place of 2.
const ADD_THEN_PROMOTE: &[(Members, Members)] =
    &[(set(&[0, 1, 2]), set(&[3])), (set(&[0, 1, 3]), 0)];
/// Add replica 3 as a learner.
const ADD_LEARNER: &[(Members, Members)] = &[(set(&[0, 1, 2]), set(&[3]))];
/// Leave replica 0 the one voter, the others learners.
const ONE_VOTER: &[(Members, Members)] = &[(set(&[0]), set(&[1, 2]))];
/// Make replica 2 a learner: 2 voters.
const DEMOTE_ONE: &[(Members, Members)] = &[(set(&[0, 1]), set(&[2]))];

#[test]
fn model_check_membership_change() {
    // A group of 3 adds replica 3 as a learner: every interleaving of the
    // stop sign, the new epoch's election, the old leader telling every
    // member, and the learner's catch-up. (A second change promoting the
    // learner, or a competing election here, passes 5 million states.)
    check(
        "1 membership change (add a learner)",
        Bounds {
            spares: 1,
            changes: ADD_LEARNER,
            proposals: 0,
            ticks: 0,
            ..BASE
        },
    );
}

#[test]
fn model_check_membership_change_racing_an_election() {
    // Replica 2, about to become a learner, may stand in the old epoch at
    // any point of the change.
    check(
        "1 membership change (a voter becomes a learner), an election by that voter",
        Bounds {
            changes: DEMOTE_ONE,
            proposals: 0,
            tick_only: Some(&[2]),
            ..BASE
        },
    );
}

#[test]
fn model_check_membership_change_with_a_crash() {
    // One change (3 voters to 2 of them, the third a learner) racing a
    // proposal, with the leader crashing at any point, inside its sync
    // too (after its Accepts left, before its writes were durable), and
    // restarting from its storage. (Any replica crashing passes 6 million
    // states.)
    check(
        "1 membership change, 1 proposal, 1 crash-restart of the leader",
        Bounds {
            changes: DEMOTE_ONE,
            proposals: 1,
            crashes: 1,
            crash_only: Some(0),
            ticks: 0,
            ..BASE
        },
    );
}

#[test]
fn model_check_membership_change_to_one_voter_with_a_crash() {
    // Replica 0 becomes the one voter: its own acceptance decides, in the
    // turn it is made, so it may tell nobody of a decision before its
    // writes are durable. It crashes at any point, inside its syncs too.
    check(
        "1 membership change (to one voter), 1 crash-restart of the leader",
        Bounds {
            changes: ONE_VOTER,
            proposals: 0,
            crashes: 1,
            crash_only: Some(0),
            ticks: 0,
            ..BASE
        },
    );
}

/// By hand (over 5 million states): `cargo test -p shardkv --test paxos
/// model_check_membership_promotion -- --ignored --nocapture`.
#[test]
#[ignore = "long: two membership changes pass 5 million states"]
fn model_check_membership_promotion() {
    // Add replica 3 as a learner, then make it a voter in place of 2:
    // two stop signs, two new epochs' elections, the learner's catch-up.
    check(
        "2 membership changes (add a learner, promote it in place of a voter)",
        Bounds {
            spares: 1,
            changes: ADD_THEN_PROMOTE,
            proposals: 0,
            ticks: 0,
            ..BASE
        },
    );
}
