//! `crds/` and the chart's copy must be exactly what the code generates, so a
//! changed spec type cannot ship with stale CRDs.

use std::path::Path;

#[test]
fn committed_crds_match_the_code() {
    let generated = shardkv_operator::crd::crds_yaml();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for path in [
        "crds/replicagroups.shardkv.io.yaml",
        "charts/shardkv/crds/replicagroups.shardkv.io.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        assert!(
            committed == generated,
            "{path} differs from the code's CRD; regenerate with:\n  \
             cargo run -p shardkv-operator -- crd > {path}"
        );
    }
}
