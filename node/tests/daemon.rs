//! A node as the binaries run it (`run_kv`), in this process.

use shardkv::daemon::{run_kv, NodeError, NodeOptions};
use shardkv::shardkv::state::KvState;
use shardkv::shardkv::Limits;

/// A node whose metrics address is in use fails before it opens its store
/// or starts its replica: the store is free at once. It used to fail only
/// after starting the replica, which then ran on with the store open (in
/// `shardkv-node local` every node shares the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_port_is_taken_fails_before_it_starts_anything() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = free.local_addr().unwrap().to_string();
    drop(free);
    let options = NodeOptions {
        id: 0,
        peers: vec![listen],
        data_dir: dir.path().to_path_buf(),
        metrics_addr: Some(taken.local_addr().unwrap()),
        ..NodeOptions::defaults()
    };
    let failed = run_kv(
        options,
        1,
        vec!["127.0.0.1:1".into()],
        Limits::default(),
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(failed, Err(NodeError::Listen { .. })),
        "a taken metrics address gave {failed:?}"
    );
    let reopened = KvState::open(1, &dir.path().join("state"), None, Default::default());
    assert!(
        reopened.is_ok(),
        "the failed node's store is still held: {:?}",
        reopened.err()
    );
}
