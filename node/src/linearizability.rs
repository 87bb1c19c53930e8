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
//! An operation whose outcome is unknown (the client timed out) gets a
//! return time of `u64::MAX`: it may take effect at any point after its
//! call, including never (after everything else).

use std::collections::{BTreeMap, HashSet};
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
    /// The time limit ran out first: no verdict. Never a pass.
    Unknown {
        key: Bytes,
    },
}

/// Checks a whole history, key by key, within `limit` in all.
pub fn check(history: &[Operation], limit: Duration) -> Verdict {
    let deadline = Instant::now() + limit;
    let mut by_key: BTreeMap<&Bytes, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut unknown = None;
    for (key, ops) in by_key {
        match check_key(&ops, deadline) {
            Some(true) => {}
            Some(false) => {
                return Verdict::NotLinearizable {
                    key: key.clone(),
                    operations: ops.len(),
                }
            }
            None => unknown = Some(key.clone()),
        }
    }
    match unknown {
        Some(key) => Verdict::Unknown { key },
        None => Verdict::Linearizable,
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

/// Some(true): linearizable; Some(false): not; None: out of time.
fn check_key(ops: &[&Operation], deadline: Instant) -> Option<bool> {
    // A Get that never returned constrains nothing.
    let ops: Vec<&Operation> = ops
        .iter()
        .copied()
        .filter(|o| !(o.input == Input::Get && o.ret == u64::MAX))
        .collect();
    let n = ops.len();
    if n == 0 {
        return Some(true);
    }
    // Events: (time, is_return, op). Calls sort before returns at equal
    // times, so operations that touch at an instant count as concurrent.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, false, i));
        events.push((op.ret.max(op.call), true, i));
    }
    events.sort();
    // A doubly linked list over the events; node 0 is the head sentinel.
    let len = events.len() + 1;
    let mut next: Vec<usize> = (1..=len).collect();
    let mut prev: Vec<usize> = (0..len).map(|i| i.wrapping_sub(1)).collect();
    let end = len; // "null"
    next[len - 1] = end;
    let mut call_node = vec![0; n];
    let mut return_node = vec![0; n];
    for (pos, (_, is_return, op)) in events.iter().enumerate() {
        if *is_return {
            return_node[*op] = pos + 1;
        } else {
            call_node[*op] = pos + 1;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, nx) = (prev[node], next[node]);
        next[p] = nx;
        if nx != end {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, nx) = (prev[node], next[node]);
        next[p] = node;
        if nx != end {
            prev[nx] = node;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<Bytes>)> = HashSet::new();
    // The stack of (op, state before it).
    let mut stack: Vec<(usize, Option<Bytes>)> = Vec::new();
    let mut state: Option<Bytes> = None;
    let mut node = next[0];
    let mut steps: u64 = 0;
    while next[0] != end {
        steps += 1;
        if steps % 1024 == 0 && Instant::now() >= deadline {
            return None;
        }
        if node == end {
            // Cannot happen: the list ends with a return, which backtracks.
            return Some(false);
        }
        let (_, is_return, op) = events[node - 1];
        if !is_return {
            if let Some(after) = step(&state, ops[op]) {
                linearized[op / 64] |= 1 << (op % 64);
                if cache.insert((linearized.clone(), after.clone())) {
                    stack.push((op, std::mem::replace(&mut state, after)));
                    unlink(&mut next, &mut prev, call_node[op]);
                    unlink(&mut next, &mut prev, return_node[op]);
                    node = next[0];
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            node = next[node];
        } else {
            // An operation returned before being linearized: undo the last.
            let Some((op, before)) = stack.pop() else {
                return Some(false);
            };
            state = before;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, return_node[op]);
            relink(&mut next, &mut prev, call_node[op]);
            node = next[call_node[op]];
        }
    }
    Some(true)
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

    #[test]
    fn overlapping_operations_may_take_effect_in_either_order() {
        let h = vec![
            op(0, put("1"), None, 0, 10),
            op(1, Input::Get, Some("1"), 5, 15),
            op(2, Input::Get, None, 1, 4),
        ];
        assert_eq!(check(&h, LIMIT), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = vec![op(0, put("1"), None, 0, 5), op(1, Input::Get, None, 6, 10)];
        assert!(matches!(check(&h, LIMIT), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn reads_must_agree_on_the_order_of_concurrent_appends() {
        let mut h = vec![
            op(0, append("a"), None, 0, 10),
            op(1, append("b"), None, 0, 10),
            op(2, Input::Get, Some("ab"), 11, 12),
        ];
        assert_eq!(check(&h, LIMIT), Verdict::Linearizable);
        h.push(op(2, Input::Get, Some("ba"), 13, 14));
        assert!(matches!(check(&h, LIMIT), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_write_that_never_returned_may_or_may_not_have_happened() {
        let h = vec![
            op(0, append("a"), None, 0, u64::MAX),
            op(1, Input::Get, None, 5, 6),
            op(1, Input::Get, Some("a"), 7, 8),
        ];
        assert_eq!(check(&h, LIMIT), Verdict::Linearizable);
        // But once seen, it cannot un-happen.
        let mut h2 = h.clone();
        h2.push(op(1, Input::Get, None, 9, 10));
        assert!(matches!(check(&h2, LIMIT), Verdict::NotLinearizable { .. }));
        // And it cannot happen before it was called.
        let h3 = vec![
            op(1, Input::Get, Some("a"), 0, 3),
            op(0, append("a"), None, 5, u64::MAX),
        ];
        assert!(matches!(check(&h3, LIMIT), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn put_hash_checks_the_previous_value() {
        let ph =
            |prev: &str, call, ret| op(0, Input::PutHash(Bytes::from("a")), Some(prev), call, ret);
        let ok = vec![ph("", 0, 1), ph("3826002220", 2, 3)];
        assert_eq!(check(&ok, LIMIT), Verdict::Linearizable);
        let bad = vec![ph("", 0, 1), ph("", 2, 3)];
        assert!(matches!(
            check(&bad, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn keys_are_independent() {
        let mut other = op(1, Input::Get, Some("1"), 6, 10);
        other.key = Bytes::from("y");
        let h = vec![op(0, put("1"), None, 0, 5), other];
        assert!(matches!(
            check(&h, LIMIT),
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
            check(&h, Duration::from_millis(200)),
            Verdict::Unknown {
                key: Bytes::from("x")
            }
        );
    }

    /// Histories made from a real sequential run, with each operation's
    /// interval stretched randomly around its linearization point, always
    /// pass; changing one read almost always fails.
    #[test]
    fn generated_histories_pass_and_corrupted_ones_fail() {
        let seed = crate::paxos::sim::test_seed("generated_histories_pass_and_corrupted_ones_fail");
        let mut rng = crate::paxos::sim::SimRng::new(seed);
        let mut caught = 0;
        let rounds = 200;
        for _ in 0..rounds {
            let mut state: Option<Bytes> = None;
            let mut h = Vec::new();
            for i in 0..12u64 {
                let point = i * 10 + 5;
                let call = point - rng.below(15).min(point);
                let ret = point + rng.below(15);
                let input = match rng.below(3) {
                    0 => Input::Get,
                    1 => put(&i.to_string()),
                    _ => append(&format!("{i}.")),
                };
                let mut o = op(i, input, None, call, ret);
                if o.input == Input::Get {
                    o.output = state.clone();
                }
                state = step(&state, &o).expect("a sequential run is legal");
                h.push(o);
            }
            assert_eq!(
                check(&h, LIMIT),
                Verdict::Linearizable,
                "seed {seed}: {h:?}"
            );
            if let Some(g) = h.iter_mut().find(|o| o.input == Input::Get) {
                g.output = Some(Bytes::from("never written"));
                if matches!(check(&h, LIMIT), Verdict::NotLinearizable { .. }) {
                    caught += 1;
                }
            }
        }
        assert!(
            caught > rounds / 2,
            "seed {seed}: only {caught} of {rounds} corruptions caught"
        );
    }
}
