//! A linearizability checker for key/value histories, in the manner of
//! Porcupine (Wing & Gong's search with Lowe's memoisation).
//!
//! A history is a set of operations, each with the time it was called and
//! the time it returned. It is linearizable if every operation can be given
//! a point between its call and its return such that, taken in that order,
//! the operations are a legal sequential run of a key/value map. Keys are
//! independent, so each key's operations are checked on their own.
//!
//! The search walks a list of call and return events: at a call it tries to
//! linearize that operation now (if the model allows its result), and
//! restarts; at a return whose operation is not yet linearized it backtracks.
//! States already explored, as (set of linearized operations, value), are
//! cached. The search is exponential in the worst case, so it runs under a
//! time limit and says [`Verdict::Unknown`] rather than pass when it runs out.
//!
//! One key the search cannot decide must not hide a verdict on another, so
//! the keys take turns: each undecided key gets a slice of search steps,
//! round after round, the slice doubling each round. A key's search keeps its
//! stack and cache between slices, so no work is lost, and a key refutable in
//! S steps is refuted after at most about 2 S steps of every other key. The
//! first refuted key ends the check. Counting steps rather than time keeps
//! the order of work, and so every verdict short of `Unknown`, independent
//! of the machine's speed.
//!
//! Memory: the caches of all keys together stay within
//! [`Limits::cache_bytes_max`] ([`CACHE_BYTES_MAX_DEFAULT`] for [`check`]),
//! shared evenly among the keys still undecided. A cache that is full is
//! emptied and refilled: the cache only spares the search revisits, so
//! forgetting it costs time, never a wrong verdict. Everything else the
//! search holds is linear in the key's operations.
//!
//! An operation whose outcome is unknown (the client timed out) gets a
//! return time of `u64::MAX`: it may take effect at any point after its
//! call, including never (after everything else).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::shardkv::put_hash_value;

/// What was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Get,
    Put(Bytes),
    Append(Bytes),
    /// Stores hash(previous + value); its output is the previous value.
    PutHash(Bytes),
    Delete,
}

/// One recorded operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub client: u64,
    pub key: Bytes,
    pub input: Input,
    /// Get: the value read (`None`: not found). PutHash: the previous value.
    /// `None` for operations without output, or whose output is unknown.
    pub output: Option<Bytes>,
    /// When it was called and when it returned, on one clock (any unit).
    /// `u64::MAX` for `ret`: it never returned (outcome unknown).
    pub call: u64,
    pub ret: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No linearization exists for this key's operations.
    NotLinearizable {
        key: Bytes,
        operations: usize,
    },
    /// The time limit ran out first: no verdict. Never a pass. `keys` are
    /// the keys still undecided, which shared the time: the one whose search
    /// took the most steps first.
    Unknown {
        keys: Vec<Bytes>,
    },
}

/// A history the checker refuses, since no verdict on it would mean anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "operation {index} (client {client}, key {}) returned at {ret}, before it was called at {call}",
        String::from_utf8_lossy(.key)
    )]
    ReturnBeforeCall {
        /// Its position in the history.
        index: usize,
        client: u64,
        key: Bytes,
        call: u64,
        ret: u64,
    },
}

/// How long and how much memory a check may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// For the whole history. The check returns within a few milliseconds
    /// of it (the clock is read every [`CLOCK_CHECK_STEPS`] search steps).
    pub time: Duration,
    /// For the caches of all keys together, counting what they allocate.
    pub cache_bytes_max: usize,
}

/// The caches' memory bound that [`check`] uses.
pub const CACHE_BYTES_MAX_DEFAULT: usize = 512 << 20;

/// Search steps between readings of the clock. A step costs at most a copy
/// and a hash of one value, so with values of a few kilobytes this many
/// take well under a millisecond.
pub const CLOCK_CHECK_STEPS: u64 = 256;

/// Search steps each undecided key gets in the first round; each round
/// doubles it.
const FIRST_SLICE_STEPS: u64 = 1 << 12;

/// Checks a whole history within `limit` in all, with the default cache
/// bound.
pub fn check(history: &[Operation], limit: Duration) -> Result<Verdict, HistoryError> {
    check_within(
        history,
        Limits {
            time: limit,
            cache_bytes_max: CACHE_BYTES_MAX_DEFAULT,
        },
    )
}

/// Checks a whole history, the keys taking turns (see the module's docs).
pub fn check_within(history: &[Operation], limits: Limits) -> Result<Verdict, HistoryError> {
    // A limit too far off to represent is no limit.
    let deadline = Instant::now().checked_add(limits.time);
    let mut by_key: BTreeMap<&Bytes, Vec<&Operation>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        if op.ret < op.call {
            return Err(HistoryError::ReturnBeforeCall {
                index,
                client: op.client,
                key: op.key.clone(),
                call: op.call,
                ret: op.ret,
            });
        }
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut undecided: Vec<(&Bytes, usize, KeySearch)> = by_key
        .into_iter()
        .map(|(key, ops)| (key, ops.len(), KeySearch::new(&ops)))
        .collect();
    let mut slice_steps = FIRST_SLICE_STEPS;
    while !undecided.is_empty() {
        // Keys only ever leave, so a key's share only grows: what its cache
        // already holds stays within the bound.
        let cache_share_bytes = limits.cache_bytes_max / undecided.len();
        let mut still_undecided = Vec::with_capacity(undecided.len());
        let mut turns = undecided.into_iter();
        while let Some((key, operations, mut search)) = turns.next() {
            match search.run(slice_steps, deadline, cache_share_bytes) {
                Progress::Linearizable => {}
                Progress::NotLinearizable => {
                    return Ok(Verdict::NotLinearizable {
                        key: key.clone(),
                        operations,
                    })
                }
                Progress::Paused => still_undecided.push((key, operations, search)),
                Progress::OutOfTime => {
                    still_undecided.push((key, operations, search));
                    still_undecided.extend(turns);
                    return Ok(out_of_time(still_undecided));
                }
            }
        }
        undecided = still_undecided;
        slice_steps = slice_steps.saturating_mul(2);
    }
    Ok(Verdict::Linearizable)
}

/// The verdict when time runs out: every undecided key had its turns, so
/// all are named, including those the last round had not yet reached.
fn out_of_time(mut undecided: Vec<(&Bytes, usize, KeySearch)>) -> Verdict {
    undecided.sort_by(|a, b| b.2.steps.cmp(&a.2.steps).then(a.0.cmp(b.0)));
    Verdict::Unknown {
        keys: undecided.into_iter().map(|(key, ..)| key.clone()).collect(),
    }
}

/// The model: one key's value. Returns the next state if `op` may produce
/// its recorded output in `state`.
fn step(state: &Option<Bytes>, op: &Operation) -> Option<Option<Bytes>> {
    match &op.input {
        Input::Get => {
            // A Get's output is what it read: `None` means "not found".
            (op.output.as_ref() == state.as_ref()).then(|| state.clone())
        }
        Input::Put(v) => Some(Some(v.clone())),
        Input::Append(v) => {
            let mut joined = state.as_ref().map(|s| s.to_vec()).unwrap_or_default();
            joined.extend_from_slice(v);
            Some(Some(Bytes::from(joined)))
        }
        Input::PutHash(v) => {
            let previous = state.clone().unwrap_or_default();
            if op.ret != u64::MAX && op.output.as_ref() != Some(&previous) {
                return None;
            }
            Some(Some(put_hash_value(&previous, v)))
        }
        Input::Delete => Some(None),
    }
}

/// Where one slice of a key's search left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Linearizable,
    NotLinearizable,
    /// The slice's steps are used up; it may go on.
    Paused,
    /// The deadline passed; it may go on, but no one will wait.
    OutOfTime,
}

/// The list of events is doubly linked over `0..=events`; node 0 is its
/// head and `events + 1` ("end") its null.
const HEAD: usize = 0;

/// One key's search, resumable: everything it needs to go on is here.
struct KeySearch<'h> {
    ops: Vec<&'h Operation>,
    /// (is a return, operation), in time order; node `i + 1` is event `i`.
    events: Vec<(bool, usize)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    end: usize,
    call_node: Vec<usize>,
    return_node: Vec<usize>,
    linearized: Vec<u64>,
    cache: Cache,
    /// The linearized operations, each with the state before it.
    stack: Vec<(usize, Option<Bytes>)>,
    state: Option<Bytes>,
    /// The event the search looks at next.
    node: usize,
    /// All the steps taken, over every slice.
    steps: u64,
}

impl<'h> KeySearch<'h> {
    /// `ops` must all have `ret >= call`.
    fn new(ops: &[&'h Operation]) -> Self {
        // A Get that never returned constrains nothing.
        let ops: Vec<&Operation> = ops
            .iter()
            .copied()
            .filter(|o| !(o.input == Input::Get && o.ret == u64::MAX))
            .collect();
        let n = ops.len();
        // Calls sort before returns at equal times, so operations that
        // touch at an instant count as concurrent.
        let mut timed: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
        for (i, op) in ops.iter().enumerate() {
            timed.push((op.call, false, i));
            timed.push((op.ret, true, i));
        }
        timed.sort();
        let events: Vec<(bool, usize)> = timed.iter().map(|&(_, r, op)| (r, op)).collect();
        let end = events.len() + 1;
        let next: Vec<usize> = (1..=end).collect();
        // The head's `prev` is never read.
        let prev: Vec<usize> = (0..end).map(|i| i.saturating_sub(1)).collect();
        let mut call_node = vec![0; n];
        let mut return_node = vec![0; n];
        for (pos, &(is_return, op)) in events.iter().enumerate() {
            if is_return {
                return_node[op] = pos + 1;
            } else {
                call_node[op] = pos + 1;
            }
        }
        let bitset_words = n.div_ceil(64);
        KeySearch {
            ops,
            events,
            node: next[HEAD],
            next,
            prev,
            end,
            call_node,
            return_node,
            linearized: vec![0; bitset_words],
            cache: Cache::new(bitset_words),
            stack: Vec::new(),
            state: None,
            steps: 0,
        }
    }

    fn unlink(&mut self, node: usize) {
        let (p, nx) = (self.prev[node], self.next[node]);
        self.next[p] = nx;
        if nx != self.end {
            self.prev[nx] = p;
        }
    }

    /// Undoes `unlink(node)`; nodes must be relinked in the reverse order.
    fn relink(&mut self, node: usize) {
        let (p, nx) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if nx != self.end {
            self.prev[nx] = node;
        }
    }

    /// Searches for up to `slice_steps` steps, or until `deadline` (if any),
    /// with the cache held within `cache_bytes_max`.
    fn run(
        &mut self,
        slice_steps: u64,
        deadline: Option<Instant>,
        cache_bytes_max: usize,
    ) -> Progress {
        for done in 0..slice_steps {
            if self.next[HEAD] == self.end {
                return Progress::Linearizable;
            }
            // A cache rebuilt or emptied took a while: look at the clock.
            let rebuilt = std::mem::take(&mut self.cache.rebuilt);
            let look = done % CLOCK_CHECK_STEPS == 0 || rebuilt;
            if look && deadline.is_some_and(|d| Instant::now() >= d) {
                return Progress::OutOfTime;
            }
            self.steps += 1;
            if let Some(verdict) = self.step(cache_bytes_max) {
                return verdict;
            }
        }
        if self.next[HEAD] == self.end {
            Progress::Linearizable
        } else {
            Progress::Paused
        }
    }

    /// One step of the search: `Some` once it is decided.
    fn step(&mut self, cache_bytes_max: usize) -> Option<Progress> {
        // The live events always end with a return (each operation's comes
        // after its call), which backtracks before the walk could pass it.
        assert_ne!(self.node, self.end, "walked past the last event");
        let (is_return, op) = self.events[self.node - 1];
        let (word, bit) = (op / 64, 1u64 << (op % 64));
        if !is_return {
            if let Some(after) = step(&self.state, self.ops[op]) {
                self.linearized[word] |= bit;
                if self.cache.insert(&self.linearized, &after, cache_bytes_max) {
                    let before = std::mem::replace(&mut self.state, after);
                    self.stack.push((op, before));
                    self.unlink(self.call_node[op]);
                    self.unlink(self.return_node[op]);
                    self.node = self.next[HEAD];
                    return None;
                }
                self.linearized[word] &= !bit;
            }
            self.node = self.next[self.node];
        } else {
            // An operation returned before being linearized: undo the last.
            let Some((op, before)) = self.stack.pop() else {
                return Some(Progress::NotLinearizable);
            };
            self.state = before;
            self.linearized[op / 64] &= !(1u64 << (op % 64));
            self.relink(self.return_node[op]);
            self.relink(self.call_node[op]);
            self.node = self.next[self.call_node[op]];
        }
        None
    }
}

/// The states a key's search has explored, as (linearized set, value), in
/// a few flat arrays rather than an allocation per state: growing, emptying
/// and dropping it are then each a handful of large moves, and its size in
/// bytes is exact.
struct Cache {
    bitset_words: usize,
    /// Per state: where its value starts in `values`, its length
    /// ([`NO_VALUE`]: the key is absent), then the linearized set.
    entries: Vec<u64>,
    values: Vec<u8>,
    /// Open addressing, linear probing, at most half full: 0 is empty, else
    /// the state's hash in the high half and its index + 1 in the low half.
    slots: Vec<u64>,
    len: usize,
    /// Set when the slots were rebuilt or the cache emptied.
    rebuilt: bool,
}

const NO_VALUE: u64 = u64::MAX;
const ENTRY_HEADER_WORDS: usize = 2;
const FIRST_SLOTS: usize = 64;

impl Cache {
    fn new(bitset_words: usize) -> Self {
        Cache {
            bitset_words,
            entries: Vec::new(),
            values: Vec::new(),
            slots: Vec::new(),
            len: 0,
            rebuilt: false,
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.entries.capacity() * 8 + self.values.capacity() + self.slots.capacity() * 8
    }

    /// Adds the state; false if it was there already. A state that does not
    /// fit within `max_bytes` even in an emptied cache is reported new
    /// without being kept: searching it again is only slower.
    fn insert(&mut self, linearized: &[u64], value: &Option<Bytes>, max_bytes: usize) -> bool {
        let hash = hash_state(linearized, value);
        if self.contains(hash, linearized, value) {
            return false;
        }
        let value_len = value.as_ref().map_or(0, |v| v.len());
        if !self.make_room(value_len, max_bytes) {
            if self.len == 0 {
                return true;
            }
            self.clear();
            if !self.make_room(value_len, max_bytes) {
                return true;
            }
        }
        let start = self.values.len() as u64;
        match value {
            Some(v) => {
                self.values.extend_from_slice(v);
                self.entries.extend([start, v.len() as u64]);
            }
            None => self.entries.extend([start, NO_VALUE]),
        }
        self.entries.extend_from_slice(linearized);
        self.len += 1;
        self.place(hash, self.len as u64);
        true
    }

    fn contains(&self, hash: u64, linearized: &[u64], value: &Option<Bytes>) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let mask = self.slots.len() - 1;
        let tag = hash >> 32;
        let mut i = tag as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return false;
            }
            if slot >> 32 == tag && self.entry_is(slot as u32 as usize - 1, linearized, value) {
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    fn entry_is(&self, index: usize, linearized: &[u64], value: &Option<Bytes>) -> bool {
        let at = index * (ENTRY_HEADER_WORDS + self.bitset_words);
        let (start, len) = (self.entries[at] as usize, self.entries[at + 1]);
        let same_value = match value {
            None => len == NO_VALUE,
            Some(v) => len == v.len() as u64 && self.values[start..start + v.len()] == v[..],
        };
        same_value && self.entries[at + ENTRY_HEADER_WORDS..][..self.bitset_words] == *linearized
    }

    /// Puts entry `id` (index + 1) in the slots, which have room.
    fn place(&mut self, hash: u64, id: u64) {
        let mask = self.slots.len() - 1;
        let tag = hash >> 32;
        let mut i = tag as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = tag << 32 | id;
    }

    /// Room for one more entry, growing within `max_bytes`; false if there
    /// is none.
    fn make_room(&mut self, value_len: usize, max_bytes: usize) -> bool {
        // Ids are 32 bits, 0 meaning empty.
        if self.len + 1 >= u32::MAX as usize {
            return false;
        }
        let entry_words = ENTRY_HEADER_WORDS + self.bitset_words;
        let others = self.allocated_bytes() - self.entries.capacity() * 8;
        if !reserve_within(
            &mut self.entries,
            entry_words,
            max_bytes.saturating_sub(others),
        ) {
            return false;
        }
        let others = self.allocated_bytes() - self.values.capacity();
        if !reserve_within(
            &mut self.values,
            value_len,
            max_bytes.saturating_sub(others),
        ) {
            return false;
        }
        if (self.len + 1) * 2 > self.slots.len() {
            let grown = (self.slots.len() * 2).max(FIRST_SLOTS);
            // The old and new slots are both alive while rebuilding.
            if self.allocated_bytes() + grown * 8 > max_bytes {
                return false;
            }
            self.rebuild_slots(grown);
        }
        true
    }

    fn rebuild_slots(&mut self, count: usize) {
        let old = std::mem::replace(&mut self.slots, vec![0; count]);
        let mask = count - 1;
        for slot in old.into_iter().filter(|&s| s != 0) {
            let mut i = (slot >> 32) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
        self.rebuilt = true;
    }

    /// Forgets every state, keeping the memory for the next ones.
    fn clear(&mut self) {
        self.entries.clear();
        self.values.clear();
        self.slots.fill(0);
        self.len = 0;
        self.rebuilt = true;
    }
}

/// Makes room in `v` for `additional` more items, doubling its allocation
/// but keeping all of it within `budget_bytes`; false if it cannot.
fn reserve_within<T>(v: &mut Vec<T>, additional: usize, budget_bytes: usize) -> bool {
    let needed = v.len() + additional;
    if needed <= v.capacity() {
        return true;
    }
    let most = budget_bytes / std::mem::size_of::<T>().max(1);
    if needed > most {
        return false;
    }
    let wanted = (v.capacity() * 2).max(needed).max(64).min(most);
    v.reserve_exact(wanted - v.len());
    true
}

/// A 64-bit hash of a state, well mixed in its high half (the slots use it).
fn hash_state(linearized: &[u64], value: &Option<Bytes>) -> u64 {
    fn mix(h: u64, word: u64) -> u64 {
        (h.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95)
    }
    let mut h = linearized
        .iter()
        .fold(0x243f_6a88_85a3_08d3, |h, &w| mix(h, w));
    match value {
        None => h = mix(h, NO_VALUE),
        Some(v) => {
            h = mix(h, v.len() as u64);
            for chunk in v.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                h = mix(h, u64::from_le_bytes(word));
            }
        }
    }
    // SplitMix64's finalizer, so every input bit reaches the high half.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, input: Input, output: Option<&str>, call: u64, ret: u64) -> Operation {
        Operation {
            client,
            key: Bytes::from("x"),
            input,
            output: output.map(|s| Bytes::copy_from_slice(s.as_bytes())),
            call,
            ret,
        }
    }
    fn put(v: &str) -> Input {
        Input::Put(Bytes::copy_from_slice(v.as_bytes()))
    }
    fn append(v: &str) -> Input {
        Input::Append(Bytes::copy_from_slice(v.as_bytes()))
    }
    const LIMIT: Duration = Duration::from_secs(10);

    /// The verdict on a history the test made well formed.
    fn verdict_of(h: &[Operation], limit: Duration) -> Verdict {
        check(h, limit).expect("the test's history is well formed")
    }

    #[test]
    fn overlapping_operations_may_take_effect_in_either_order() {
        let h = vec![
            op(0, put("1"), None, 0, 10),
            op(1, Input::Get, Some("1"), 5, 15),
            op(2, Input::Get, None, 1, 4),
        ];
        assert_eq!(verdict_of(&h, LIMIT), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = vec![op(0, put("1"), None, 0, 5), op(1, Input::Get, None, 6, 10)];
        assert!(matches!(
            verdict_of(&h, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn reads_must_agree_on_the_order_of_concurrent_appends() {
        let mut h = vec![
            op(0, append("a"), None, 0, 10),
            op(1, append("b"), None, 0, 10),
            op(2, Input::Get, Some("ab"), 11, 12),
        ];
        assert_eq!(verdict_of(&h, LIMIT), Verdict::Linearizable);
        h.push(op(2, Input::Get, Some("ba"), 13, 14));
        assert!(matches!(
            verdict_of(&h, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn a_write_that_never_returned_may_or_may_not_have_happened() {
        let h = vec![
            op(0, append("a"), None, 0, u64::MAX),
            op(1, Input::Get, None, 5, 6),
            op(1, Input::Get, Some("a"), 7, 8),
        ];
        assert_eq!(verdict_of(&h, LIMIT), Verdict::Linearizable);
        // But once seen, it cannot un-happen.
        let mut h2 = h.clone();
        h2.push(op(1, Input::Get, None, 9, 10));
        assert!(matches!(
            verdict_of(&h2, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
        // And it cannot happen before it was called.
        let h3 = vec![
            op(1, Input::Get, Some("a"), 0, 3),
            op(0, append("a"), None, 5, u64::MAX),
        ];
        assert!(matches!(
            verdict_of(&h3, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn put_hash_checks_the_previous_value() {
        let ph =
            |prev: &str, call, ret| op(0, Input::PutHash(Bytes::from("a")), Some(prev), call, ret);
        let ok = vec![ph("", 0, 1), ph("3826002220", 2, 3)];
        assert_eq!(verdict_of(&ok, LIMIT), Verdict::Linearizable);
        let bad = vec![ph("", 0, 1), ph("", 2, 3)];
        assert!(matches!(
            verdict_of(&bad, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn keys_are_independent() {
        let mut other = op(1, Input::Get, Some("1"), 6, 10);
        other.key = Bytes::from("y");
        let h = vec![op(0, put("1"), None, 0, 5), other];
        assert!(matches!(
            verdict_of(&h, LIMIT),
            Verdict::NotLinearizable { key, .. } if key == "y"
        ));
    }

    #[test]
    fn an_impossible_search_runs_out_of_time_rather_than_passing() {
        // Many concurrent appends and a read that no order produces: every
        // order is a distinct state, so the search cannot finish quickly.
        let mut h: Vec<Operation> = (0..40)
            .map(|i| op(i, append(&format!("{i},")), None, 0, 100))
            .collect();
        h.push(op(99, Input::Get, Some("impossible"), 50, 60));
        assert_eq!(
            verdict_of(&h, Duration::from_millis(200)),
            Verdict::Unknown {
                keys: vec![Bytes::from("x")]
            }
        );
    }

    /// One key's history that no search decides in reasonable time: many
    /// concurrent puts of distinct values whose outcome is unknown, and a
    /// read of a value none wrote. The read refutes it, but only after every
    /// subset of the puts (and which of them came last) has been tried
    /// before it: about `writers * 2^writers` states.
    fn undecidable_key(key: &str, writers: u64) -> Vec<Operation> {
        let mut h: Vec<Operation> = (0..writers)
            .map(|i| op(i, put(&format!("{key}.{i}")), None, 0, u64::MAX))
            .collect();
        h.push(op(writers, Input::Get, Some("never written"), 50, 60));
        for o in &mut h {
            o.key = Bytes::copy_from_slice(key.as_bytes());
        }
        h
    }

    /// A key whose history is a plain sequential run of `length` puts and
    /// reads: linearizable, and decided at once.
    fn sequential_key(key: &str, length: u64) -> Vec<Operation> {
        let mut h = Vec::new();
        for i in 0..length {
            let (input, output) = if i % 2 == 0 {
                (put(&i.to_string()), None)
            } else {
                (Input::Get, Some((i - 1).to_string()))
            };
            let mut o = op(i, input, output.as_deref(), i * 10, i * 10 + 5);
            o.key = Bytes::copy_from_slice(key.as_bytes());
            h.push(o);
        }
        h
    }

    #[test]
    fn a_refuted_key_is_reported_promptly_despite_an_undecidable_one() {
        // The undecidable key sorts first, so a checker that finishes one
        // key before starting the next never reaches the refutable one.
        let mut h = undecidable_key("0", 40);
        for k in 1..9 {
            h.extend(sequential_key(&k.to_string(), 20));
        }
        let mut stale = sequential_key("9", 20);
        stale.push(Operation {
            output: Some(Bytes::from("never written")),
            ..op(99, Input::Get, None, 1000, 1010)
        });
        for o in &mut stale {
            o.key = Bytes::from("9");
        }
        h.extend(stale);
        let started = Instant::now();
        let verdict = verdict_of(&h, Duration::from_secs(60));
        let elapsed = started.elapsed();
        println!("verdict {verdict:?} after {elapsed:?}");
        assert!(
            matches!(&verdict, Verdict::NotLinearizable { key, .. } if key == "9"),
            "{verdict:?} after {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(3),
            "the refuted key took {elapsed:?} to report"
        );
    }

    /// As above, but the refutable key itself takes many rounds of slices
    /// to refute, sharing them with two undecidable keys.
    #[test]
    fn a_key_that_takes_many_slices_to_refute_is_still_reported_promptly() {
        let slow_to_refute = undecidable_key("9", 13);
        let mut alone = KeySearch::new(&slow_to_refute.iter().collect::<Vec<_>>());
        let verdict_alone = alone.run(u64::MAX, None, CACHE_BYTES_MAX_DEFAULT);
        assert_eq!(verdict_alone, Progress::NotLinearizable);
        let steps_alone = alone.steps;
        drop(alone);
        assert!(
            steps_alone > 100 * FIRST_SLICE_STEPS,
            "refuted in only {steps_alone} steps"
        );
        let mut h = undecidable_key("0", 40);
        h.extend(undecidable_key("1", 40));
        for k in 2..9 {
            h.extend(sequential_key(&k.to_string(), 20));
        }
        h.extend(slow_to_refute);
        let started = Instant::now();
        let verdict = verdict_of(&h, Duration::from_secs(60));
        let elapsed = started.elapsed();
        println!("verdict {verdict:?} after {elapsed:?} ({steps_alone} steps alone)");
        assert!(
            matches!(&verdict, Verdict::NotLinearizable { key, .. } if key == "9"),
            "{verdict:?} after {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "the refuted key took {elapsed:?} to report"
        );
    }

    /// A history made from a real sequential run of `length` operations on
    /// key "x", each operation's interval stretched randomly by up to
    /// `stretch` on either side of its linearization point; a write's
    /// outcome is unknown with chance `unknown`. Always linearizable.
    fn generated_history(
        rng: &mut crate::paxos::sim::SimRng,
        length: u64,
        stretch: u64,
        unknown: f64,
    ) -> Vec<Operation> {
        let mut state: Option<Bytes> = None;
        let mut h = Vec::new();
        for i in 0..length {
            let point = i * 10 + 5;
            let call = point - rng.below(stretch).min(point);
            let mut ret = point + rng.below(stretch);
            let input = match rng.below(3) {
                0 => Input::Get,
                1 => put(&i.to_string()),
                _ => append(&format!("{i}.")),
            };
            if input != Input::Get && rng.chance(unknown) {
                ret = u64::MAX;
            }
            let mut o = op(i, input, None, call, ret);
            if o.input == Input::Get {
                o.output = state.clone();
            }
            state = step(&state, &o).expect("a sequential run is legal");
            h.push(o);
        }
        h
    }

    /// Generated histories always pass; changing one read almost always
    /// fails.
    #[test]
    fn generated_histories_pass_and_corrupted_ones_fail() {
        let seed = crate::paxos::sim::test_seed("generated_histories_pass_and_corrupted_ones_fail");
        let mut rng = crate::paxos::sim::SimRng::new(seed);
        let mut caught = 0;
        let rounds = 200;
        for _ in 0..rounds {
            let mut h = generated_history(&mut rng, 12, 15, 0.0);
            assert_eq!(
                verdict_of(&h, LIMIT),
                Verdict::Linearizable,
                "seed {seed}: {h:?}"
            );
            if let Some(g) = h.iter_mut().find(|o| o.input == Input::Get) {
                g.output = Some(Bytes::from("never written"));
                if matches!(verdict_of(&h, LIMIT), Verdict::NotLinearizable { .. }) {
                    caught += 1;
                }
            }
        }
        assert!(
            caught > rounds / 2,
            "seed {seed}: only {caught} of {rounds} corruptions caught"
        );
    }

    #[test]
    fn the_deadline_is_kept_on_undecidable_keys() {
        let mut h = undecidable_key("a", 40);
        h.extend(sequential_key("b", 20));
        h.extend(undecidable_key("c", 40));
        let limit = Duration::from_secs(1);
        let started = Instant::now();
        let verdict = verdict_of(&h, limit);
        let elapsed = started.elapsed();
        println!(
            "verdict {verdict:?} after {elapsed:?}, {:?} past the limit",
            elapsed.saturating_sub(limit)
        );
        let Verdict::Unknown { mut keys } = verdict else {
            panic!("{verdict:?}: an undecidable key was decided");
        };
        keys.sort();
        assert_eq!(keys, [Bytes::from("a"), Bytes::from("c")]);
        // Generous for a loaded machine; it is a few milliseconds alone.
        assert!(
            elapsed < limit + Duration::from_millis(250),
            "a {limit:?} limit took {elapsed:?}"
        );
    }

    #[test]
    fn a_limit_too_far_off_to_represent_is_no_limit() {
        let h = vec![
            op(0, put("1"), None, 0, 5),
            op(1, Input::Get, Some("1"), 6, 7),
        ];
        assert_eq!(verdict_of(&h, Duration::MAX), Verdict::Linearizable);
    }

    #[test]
    fn a_return_before_its_call_is_refused() {
        let mut h = vec![
            op(0, put("1"), None, 0, 5),
            op(1, Input::Get, Some("1"), 6, 6),
            op(2, put("2"), None, 7, u64::MAX),
        ];
        assert_eq!(verdict_of(&h, LIMIT), Verdict::Linearizable);
        h.push(op(3, Input::Get, Some("1"), 9, 8));
        let refused = check(&h, LIMIT);
        assert_eq!(
            refused,
            Err(HistoryError::ReturnBeforeCall {
                index: 3,
                client: 3,
                key: Bytes::from("x"),
                call: 9,
                ret: 8,
            })
        );
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            message,
            "operation 3 (client 3, key x) returned at 8, before it was called at 9"
        );
    }

    /// Runs `search` a step at a time, for at most `max_steps`: where it got,
    /// the most its cache held, and how often the cache was emptied.
    fn run_stepwise(
        search: &mut KeySearch,
        max_steps: u64,
        cache_bytes_max: usize,
    ) -> (Progress, usize, usize) {
        let (mut most_bytes, mut emptied) = (0, 0);
        for _ in 0..max_steps {
            let before = search.cache.len;
            let progress = search.run(1, None, cache_bytes_max);
            most_bytes = most_bytes.max(search.cache.allocated_bytes());
            emptied += usize::from(search.cache.len < before);
            if progress != Progress::Paused {
                return (progress, most_bytes, emptied);
            }
        }
        (Progress::Paused, most_bytes, emptied)
    }

    /// A cache held to a small bound is emptied again and again, and stays
    /// within it; the search still finds what it finds with a large one, or
    /// with none.
    #[test]
    fn a_bounded_cache_stays_within_its_bound_and_keeps_the_verdicts() {
        let ops = undecidable_key("x", 30);
        let mut search = KeySearch::new(&ops.iter().collect::<Vec<_>>());
        let cache_bytes_max = 64 << 10;
        let (progress, most_bytes, emptied) = run_stepwise(&mut search, 200_000, cache_bytes_max);
        println!("at most {most_bytes} bytes, emptied {emptied} times");
        assert_eq!(progress, Progress::Paused);
        assert!(most_bytes <= cache_bytes_max, "{most_bytes} bytes");
        assert!(emptied > 10, "emptied only {emptied} times");

        let seed = crate::paxos::sim::test_seed(
            "a_bounded_cache_stays_within_its_bound_and_keeps_the_verdicts",
        );
        let mut rng = crate::paxos::sim::SimRng::new(seed);
        let (mut refuted, mut emptied_in_all, rounds) = (0, 0, 300);
        for _ in 0..rounds {
            let mut h = generated_history(&mut rng, 12, 30, 0.15);
            if rng.chance(0.5) {
                if let Some(g) = h.iter_mut().rev().find(|o| o.input == Input::Get) {
                    g.output = Some(Bytes::from("never written"));
                }
            }
            let roomy = verdict_of(&h, LIMIT);
            let uncached = check_within(
                &h,
                Limits {
                    time: LIMIT,
                    cache_bytes_max: 0,
                },
            );
            assert_eq!(uncached, Ok(roomy.clone()), "seed {seed}: {h:?}");
            let cache_bytes_max = 4 << 10;
            let mut small = KeySearch::new(&h.iter().collect::<Vec<_>>());
            let (progress, most_bytes, emptied) =
                run_stepwise(&mut small, 1 << 30, cache_bytes_max);
            let expected = match roomy {
                Verdict::Linearizable => Progress::Linearizable,
                Verdict::NotLinearizable { .. } => Progress::NotLinearizable,
                Verdict::Unknown { .. } => panic!("seed {seed}: undecided: {h:?}"),
            };
            assert_eq!(progress, expected, "seed {seed}: a small cache: {h:?}");
            assert!(
                most_bytes <= cache_bytes_max,
                "seed {seed}: {most_bytes} bytes"
            );
            refuted += usize::from(expected == Progress::NotLinearizable);
            emptied_in_all += emptied;
        }
        println!("{refuted} of {rounds} refuted; small caches emptied {emptied_in_all} times");
        assert!(refuted > 0, "seed {seed}: no history was refuted");
        assert!(
            emptied_in_all > 0,
            "seed {seed}: no small cache was ever full"
        );
    }

    /// A search resumed a step at a time takes exactly the steps it takes
    /// in one go, to the same verdict: nothing is lost between slices.
    #[test]
    fn a_search_resumed_slice_by_slice_loses_no_work() {
        let seed = crate::paxos::sim::test_seed("a_search_resumed_slice_by_slice_loses_no_work");
        let mut rng = crate::paxos::sim::SimRng::new(seed);
        for round in 0..50 {
            let mut h = generated_history(&mut rng, 16, 40, 0.2);
            if round % 2 == 1 {
                if let Some(g) = h.iter_mut().rev().find(|o| o.input == Input::Get) {
                    g.output = Some(Bytes::from("never written"));
                }
            }
            let ops: Vec<&Operation> = h.iter().collect();
            let mut whole = KeySearch::new(&ops);
            let in_one_go = whole.run(u64::MAX, None, CACHE_BYTES_MAX_DEFAULT);
            let mut sliced = KeySearch::new(&ops);
            let in_slices = loop {
                match sliced.run(1, None, CACHE_BYTES_MAX_DEFAULT) {
                    Progress::Paused => {}
                    decided => break decided,
                }
            };
            assert_eq!(in_slices, in_one_go, "seed {seed}: {h:?}");
            assert_eq!(sliced.steps, whole.steps, "seed {seed}: {h:?}");
        }
    }
}
