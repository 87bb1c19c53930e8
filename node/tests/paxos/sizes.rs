//! Every message that carries log entries is bounded in bytes, not only in
//! count: a takeover, a resend, a promise and a recovery answer each go in
//! several messages (or make the candidate catch up first) rather than one
//! that a peer's decoder refuses, which would be resent forever.

use crate::scenarios::Net;
use shardkv::paxos::{Message, RoleKind};

/// Bytes of log entries per message, and per command (about 1 KiB each).
const MESSAGE_BYTES_MAX: usize = 4096;
const COMMAND_BYTES: usize = 1000;

fn small_messages(net_size: u32) -> Net {
    Net::with_config(net_size, |c| {
        c.catchup_bytes_max = MESSAGE_BYTES_MAX;
        c.catchup_entries_max = 10_000;
        c.pipeline_window_bytes_max = WINDOW_BYTES_MAX;
    })
}

fn command(i: usize) -> String {
    format!("{i:04}{}", "x".repeat(COMMAND_BYTES - 4))
}

const WINDOW_BYTES_MAX: usize = 8 * (COMMAND_BYTES + 16);

/// One entry always fits; past it, a message stays within `bound`.
fn assert_bounded_by(net: &Net, kind: &str, bound: usize) -> usize {
    let sizes: Vec<usize> = (net.sent.iter())
        .filter(|(k, _)| *k == kind)
        .map(|(_, b)| *b)
        .collect();
    for size in &sizes {
        assert!(
            *size <= bound.max(COMMAND_BYTES + 16),
            "a {kind} of {size} bytes"
        );
    }
    sizes.len()
}

fn assert_bounded(net: &Net, kind: &str) -> usize {
    assert_bounded_by(net, kind, MESSAGE_BYTES_MAX)
}

#[test]
fn a_window_is_bounded_in_bytes_and_a_takeover_goes_in_several_accepts() {
    let mut net = small_messages(5);
    net.campaign(0);
    net.exchange(0, &[1, 2, 3, 4]);
    assert!(net.node(0).is_leader());
    // Twenty commands, each in its own burst: only what fits the window's
    // bytes gets a slot; the followers hear none of it.
    for i in 0..20 {
        net.propose(0, &command(i));
    }
    net.drop(0, &[1, 2, 3, 4]);
    let inflight = net.node(0).inflight_slots();
    assert!(
        (7..=9).contains(&inflight),
        "{inflight} slots in flight, not the window's 8 KiB"
    );
    assert_eq!(net.node(0).queued_commands(), 20 - inflight);
    // Replica 1 stands, and replica 0's promise reports the whole window:
    // the takeover re-proposes it, in Accepts of at most 4 KiB each.
    let accepts_before = assert_bounded(&net, "accept");
    net.campaign(1);
    net.exchange(1, &[0, 2]);
    assert!(net.node(1).is_leader());
    net.exchange(1, &[0, 2, 3, 4]);
    // A promise holds the decided entries a candidate lacks, within the
    // message bound (or it says "catch up first"), and the undecided ones,
    // which the proposers' windows bound.
    assert_bounded_by(&net, "promise", MESSAGE_BYTES_MAX + WINDOW_BYTES_MAX);
    let accepts = assert_bounded(&net, "accept") - accepts_before;
    assert!(accepts >= 4 * 2, "{accepts} Accepts for the takeover");
    let converged = net.run_until(50, |n| n.node(1).commit_index() >= inflight as u64);
    assert!(converged, "the takeover is decided");
}

#[test]
fn a_recovery_answer_comes_in_pages() {
    let mut net = small_messages(3);
    net.campaign(0);
    net.exchange(0, &[1, 2]);
    for i in 0..30 {
        net.propose(0, &command(i));
        net.exchange(0, &[1, 2]);
    }
    let commit = net.node(0).commit_index();
    assert_eq!(commit, 30);
    // Replica 2 loses its disk and asks the others for their state.
    net.crash(2);
    net.restart(2, true);
    assert_eq!(net.node(2).role(), RoleKind::Recovering);
    for _ in 0..100 {
        if net.node(2).role() != RoleKind::Recovering {
            break;
        }
        net.exchange(2, &[0, 1]);
    }
    assert_eq!(
        net.node(2).role(),
        RoleKind::Follower,
        "replica 2 recovered"
    );
    let pages = assert_bounded(&net, "recover_reply");
    assert!(pages >= 2 * 7, "{pages} pages for 30 KiB from two peers");
    // It holds every accepted value, as it would from one answer.
    let held = net.storages[2].state().entries.len() as u64
        + net.storages[2]
            .state()
            .snapshot
            .as_ref()
            .map_or(0, |s| s.index);
    assert_eq!(held, commit, "replica 2 adopted every slot");
    let more = net
        .held
        .iter()
        .any(|(_, to, m)| *to == 2 && matches!(m, Message::RecoverReply { more: true, .. }));
    assert!(!more, "no page is left unasked");
}
