//! The short fault-injection runs of the README's test command: half a
//! minute each with groups of 3 and of 5, of partitions (some one way
//! only), resets, crashes, pauses and reconfiguration on real processes in
//! a network namespace, then a linearizability verdict and a read-back of
//! every acknowledged write. `shardkv-faults --duration N` is the soak mode.

use std::process::Command;

/// Runs `shardkv-faults` for `duration` seconds with groups of `replicas`.
fn fault_run(replicas: usize, duration: u64) {
    let seed = std::env::var("SHARDKV_SEED").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d.as_nanos() as u64).to_string())
            .unwrap_or_else(|_| "1".into())
    });
    println!("groups of {replicas}: seed {seed} (rerun with SHARDKV_SEED={seed})");
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults");
    let status = Command::new(env!("CARGO_BIN_EXE_shardkv-faults"))
        .args(["--duration", &duration.to_string()])
        .args(["--replicas", &replicas.to_string(), "--seed", &seed])
        .arg("--out")
        .arg(&out_dir)
        .status()
        .expect("run shardkv-faults");
    assert!(
        status.success(),
        "shardkv-faults (groups of {replicas}) failed with seed {seed}: {status}; \
         the history and the schedule are in {}",
        out_dir.display()
    );
}

// One test, so the two runs never share the two cores.
#[test]
fn faults_on_real_processes_leave_a_linearizable_history() {
    fault_run(3, 30);
    fault_run(5, 30);
}
