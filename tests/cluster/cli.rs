//! The `shardkvctl` contract, command by command, against real processes.

use std::io::Write;
use std::time::{Duration, Instant};

use shardkv::shardkv::key_to_shard;
use shardkv_cluster_tests::{ctl, Cluster};

const HOST: &str = "127.0.0.11";

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

/// A failure: non-zero exit and exactly one line on stderr.
fn failed(out: &std::process::Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line on stderr, got {err:?}"
    );
    err
}

fn query(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["query"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&cluster.ctl(&all, None))).expect("query prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_keeps_its_contract() {
    let cluster = Cluster::start(HOST, 2, 3).await;
    let c0 = query(&cluster, &[]);
    assert_eq!(c0["num"], 0);
    assert_eq!(c0["shards"].as_array().unwrap().len(), 64);
    assert!(c0["groups"].as_object().unwrap().is_empty());

    for gid in [1u64, 2] {
        let servers = cluster.group_addrs(gid).join(",");
        assert_eq!(
            ok(&cluster.ctl(&["join", &gid.to_string(), &servers], None)),
            ""
        );
    }
    let c2 = query(&cluster, &[]);
    assert_eq!(c2["num"], 2);
    assert_eq!(c2["groups"]["1"], serde_json::json!(cluster.group_addrs(1)));
    assert_eq!(c2["groups"]["2"], serde_json::json!(cluster.group_addrs(2)));
    assert_eq!(query(&cluster, &["1"])["num"], 1);

    assert_eq!(ok(&cluster.ctl(&["put", "greeting", "hello"], None)), "");
    assert_eq!(ok(&cluster.ctl(&["get", "greeting"], None)), "hello\n");
    assert_eq!(
        ok(&cluster.ctl(&["append", "greeting", " world"], None)),
        ""
    );
    assert_eq!(
        ok(&cluster.ctl(&["get", "greeting"], None)),
        "hello world\n"
    );
    assert_eq!(ok(&cluster.ctl(&["puthash", "h", "a"], None)), "\n");
    assert_eq!(
        ok(&cluster.ctl(&["puthash", "h", "b"], None)),
        "3826002220\n"
    );
    assert_eq!(ok(&cluster.ctl(&["delete", "greeting"], None)), "");
    let missing = cluster.ctl(&["get", "greeting"], None);
    assert_eq!(failed(&missing, 1).trim_end(), "not found");
    assert!(missing.stdout.is_empty());

    // Binary-safe values from stdin.
    let binary: Vec<u8> = (0..=255u8).chain([0, b'\n', 0xff]).collect();
    assert_eq!(ok(&cluster.ctl(&["put", "bin", "-"], Some(&binary))), "");
    let out = cluster.ctl(&["get", "bin"], None);
    assert!(out.status.success());
    assert_eq!(out.stdout[..out.stdout.len() - 1], binary[..]);

    let shard: usize = ok(&cluster.ctl(&["shard", "bin"], None))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(shard, key_to_shard(b"bin", 64));

    assert_eq!(
        ok(&cluster.ctl(&["move", &shard.to_string(), "1"], None)),
        ""
    );
    assert_eq!(query(&cluster, &[])["shards"][shard], 1);
    assert_eq!(
        ok(&cluster.ctl(&["move", &shard.to_string(), "2"], None)),
        ""
    );
    assert_eq!(query(&cluster, &[])["shards"][shard], 2);
    assert_eq!(ok(&cluster.ctl(&["leave", "2"], None)), "");
    let after = query(&cluster, &[]);
    assert!(after["shards"].as_array().unwrap().iter().all(|g| g == 1));
    // The data moved with the shards.
    let out = cluster.ctl(&["get", "bin"], None);
    assert_eq!(out.stdout[..out.stdout.len() - 1], binary[..]);
    let hashed = shardkv::shardkv::put_hash_value(b"3826002220", b"b");
    assert_eq!(
        ok(&cluster.ctl(&["get", "h"], None)).trim_end().as_bytes(),
        &hashed[..]
    );

    // Failures: one line, non-zero, nothing stored.
    failed(&cluster.ctl(&["put", "", "v"], None), 2);
    failed(&cluster.ctl(&["join", "0", "x:1"], None), 2);
    failed(&cluster.ctl(&["move", "64", "1"], None), 2);
    failed(&cluster.ctl(&["move", "0", "9"], None), 2);
    let big = vec![b'x'; (1 << 20) + 1];
    failed(&cluster.ctl(&["put", "big", "-"], Some(&big)), 2);
    let missing = cluster.ctl(&["get", "big"], None);
    failed(&missing, 1);
    failed(&ctl("", &["get", "k"], None), 2);
    let start = Instant::now();
    failed(
        &ctl("127.0.0.11:1", &["--timeout", "1", "get", "k"], None),
        2,
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "--timeout ignored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_leaves_the_node_serving() {
    let cluster = Cluster::start("127.0.0.12", 1, 3).await;
    cluster.join(1).await;
    for node in cluster.groups[0].iter().chain(cluster.masters.iter()) {
        for junk in [
            &b"\x16\x03\x01\x02\x00 not http2 at all"[..],
            &[0xffu8; 4096][..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x08\x00",
        ] {
            let mut s = std::net::TcpStream::connect(&node.addr).unwrap();
            let _ = s.write_all(junk);
        }
    }
    assert_eq!(ok(&cluster.ctl(&["put", "k", "v"], None)), "");
    assert_eq!(ok(&cluster.ctl(&["get", "k"], None)), "v\n");
    let mut cluster = cluster;
    for node in cluster.groups[0]
        .iter_mut()
        .chain(cluster.masters.iter_mut())
    {
        assert!(node.alive(), "{} died: {}", node.name, node.log_tail());
        shardkv_cluster_tests::await_serving(&node.addr).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_text() {
    let cluster = Cluster::start("127.0.0.18", 1, 3).await;
    cluster.join(1).await;
    assert_eq!(ok(&cluster.ctl(&["put", "k", "v"], None)), "");
    assert_eq!(ok(&cluster.ctl(&["get", "k"], None)), "v\n");
    let leader = cluster.await_kv_leader(1).await;
    // Gauges refresh every 200 ms: wait for the configuration to show.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let response =
            shardkv_cluster_tests::http_get(&cluster.groups[0][leader].metrics_addr, "/metrics");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let config_num = response
            .lines()
            .find(|l| l.starts_with("shardkv_config_num{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        if config_num == Some(1) {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "config number never exported: {response}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for series in [
        "shardkv_operations_total{",
        "op=\"put\",result=\"ok\"",
        "op=\"get\",result=\"ok\"",
        "shardkv_operation_latency_seconds_bucket{",
        "shardkv_is_leader{",
        "shardkv_applied_slot{",
        "shardkv_decided_slot{",
        "shardkv_ballot_round{",
        "shardkv_shards_serving{",
        "shardkv_shards_pulling{",
        "shardkv_shards_outgoing{",
        "shardkv_snapshot_bytes{",
        "shardkv_log_entries{",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    let master = shardkv_cluster_tests::http_get(&cluster.masters[0].metrics_addr, "/metrics");
    assert!(
        master.contains("shardkv_applied_slot{role=\"master\""),
        "{master}"
    );
}
