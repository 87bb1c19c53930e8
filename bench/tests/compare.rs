//! `shardkv-bench compare` end to end, briefly: a real 3-member etcd and a
//! real shardkv group of 3, the same workload against each, every
//! operation accounted for.

use std::process::Command;

#[test]
fn compare_runs_both_systems_and_reports_every_operation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("compare.json");
    let output = Command::new(env!("CARGO_BIN_EXE_shardkv-bench"))
        .args([
            "compare",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0.2",
            "--clients",
            "4",
            "--read-ratios",
            "0.5",
            "--key-count",
            "50",
            "--systems",
            "etcd,shardkv-1",
            // This test's own loopback address: other tests use other ones.
            "--host",
            "127.0.0.70",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run shardkv-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "compare failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The table has the ratio columns for shardkv against etcd.
    assert!(
        stdout.contains("| shardkv 1x3 / etcd ops/s |"),
        "no ratio column:\n{stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("read the JSON")).expect("JSON");
    assert!(report["cores"].as_u64().unwrap_or(0) >= 1);
    let reports = report["reports"].as_array().expect("reports");
    let targets: Vec<&str> = reports
        .iter()
        .map(|r| r["target"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(targets, ["etcd", "shardkv 1x3"]);
    for r in reports {
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert_eq!(n("errors"), 0, "{r}");
        assert!(n("reads") > 0 && n("writes") > 0, "{r}");
        assert_eq!(n("operations"), n("reads") + n("writes"), "{r}");
        let l = &r["latency_us"];
        let q = |k: &str| l[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert!(
            0 < q("p50") && q("p50") <= q("p99") && q("p99") <= q("max"),
            "{r}"
        );
        let tput = r["throughput_ops_per_second"].as_f64().expect("throughput");
        let secs = r["elapsed_seconds"].as_f64().expect("elapsed");
        assert!(secs >= 1.0, "measured for {secs} s, asked for 1: {r}");
        assert!((tput * secs - n("operations") as f64).abs() < 1.0, "{r}");
    }
}
