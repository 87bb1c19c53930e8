//! The operator, the CRDs and the Helm chart against a real kube-apiserver
//! and etcd (`tests/envtest/`), with the real node binaries.
//!
//! There is no kubelet: this test stands in for it. It starts the processes
//! each StatefulSet describes, on loopback addresses formed by the same
//! pod-address template the operator and the chart are given, and patches
//! the StatefulSet's status with the replicas that report SERVING. As the
//! StatefulSet controller would, it makes a volume claim per pod (a data
//! directory), stops the pods above the StatefulSet's size, and removes a
//! volume once its claim is deleted. There is no garbage collector, so owned
//! objects are checked for their owner references, not for their cascading
//! deletion.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, PersistentVolumeClaim, Service, ServiceAccount,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use shardkv_cluster_tests::{bin, ctl};
use shardkv_operator::crd::{ReplicaGroup, ALLOW_DATA_LOSS_ANNOTATION, FINALIZER};

const NS: &str = "default";
const RELEASE: &str = "skv";
/// Every pod's address; the shardmaster's pods have gid 0.
const TEMPLATE: &str = "127.60.{gid}.{ordinal}:{port}";
const OPERATOR_METRICS: &str = "127.0.0.19:18080";
const WAIT: Duration = Duration::from_secs(90);
const KEYS: usize = 40;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn log(msg: &str) {
    eprintln!("[operator test] {msg}");
}

/// Where `tests/envtest/install.sh` put the API server, etcd and Helm.
fn envtest_dir() -> PathBuf {
    std::env::var("ENVTEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/shardkv-envtest")
        })
}

/// etcd and kube-apiserver, started by `tests/envtest/up.sh`.
struct Envtest {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Envtest {
    fn up() -> Envtest {
        let envtest = envtest_dir();
        assert!(
            envtest.join("bin/kube-apiserver").exists() && envtest.join("venv/bin/python").exists(),
            "no envtest in {}: run tests/envtest/install.sh (the README's test command does)",
            envtest.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(repo().join("tests/envtest/up.sh"))
            .arg(dir.path().join("api"))
            .output()
            .expect("run up.sh");
        assert!(
            out.status.success(),
            "up.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kubeconfig = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Envtest { dir, kubeconfig }
    }

    fn helm(&self, args: &[&str]) -> std::process::Output {
        let envtest = envtest_dir();
        Command::new(envtest.join("venv/bin/python"))
            .arg(repo().join("tests/envtest/helm.py"))
            .args(args)
            .output()
            .expect("run helm.py")
    }

    async fn client(&self, kubeconfig: &Path) -> Client {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kubeconfig).expect("kubeconfig"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("client config");
        Client::try_from(config).expect("client")
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("tests/envtest/down.sh"))
            .arg(self.dir.path().join("api"))
            .status();
    }
}

/// One pod's process.
struct Pod {
    child: Child,
    addr: String,
    paused: bool,
    /// How it was started, to start it again.
    command: Vec<String>,
    env: BTreeMap<String, String>,
    log: PathBuf,
}

fn spawn_pod(command: &[String], env: &BTreeMap<String, String>, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin(&command[0]))
        .args(&command[1..])
        .envs(env)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pod")
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = signal_quiet(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_quiet(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The kubelet stand-in: runs the pods of every shardkv StatefulSet.
#[derive(Clone)]
struct Kubelet {
    pods: Arc<Mutex<HashMap<String, Vec<Pod>>>>,
    dir: PathBuf,
}

impl Kubelet {
    /// The StatefulSet's pods as processes: the container's command with
    /// its environment, the pod's address where it would bind 0.0.0.0, and
    /// a data directory of its own where the volume would be mounted.
    /// `config_maps` resolves environment taken from ConfigMaps, as the
    /// kubelet does when a container starts. Pods above the size stop.
    fn start_pods(&self, sts: &StatefulSet, config_maps: &BTreeMap<String, ConfigMap>) {
        let name = sts.name_any();
        let spec = sts.spec.as_ref().expect("spec");
        let replicas = spec.replicas.unwrap_or(1) as usize;
        let mut pods = self.pods.lock().unwrap();
        let running = pods.entry(name.clone()).or_default();
        // Highest ordinal first, as the StatefulSet controller scales down.
        running.truncate(replicas);
        let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
        let command = container.command.clone().expect("command");
        for ordinal in running.len()..replicas {
            let pod = format!("{name}-{ordinal}");
            let mut env = BTreeMap::new();
            for e in container.env.iter().flatten() {
                let value = match (&e.value, &e.value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(from)) => match (&from.field_ref, &from.config_map_key_ref) {
                        (Some(field), _) => {
                            assert_eq!(field.field_path, "metadata.name");
                            pod.clone()
                        }
                        (_, Some(key)) => {
                            let value = config_maps
                                .get(&key.name)
                                .and_then(|cm| cm.data.as_ref()?.get(&key.key).cloned());
                            match value {
                                Some(value) => value,
                                // Optional: the variable is left unset.
                                None if key.optional == Some(true) => continue,
                                // The kubelet would not start the container:
                                // try again at the next round.
                                None => return,
                            }
                        }
                        _ => panic!("unexpected env source {from:?}"),
                    },
                    (None, None) => String::new(),
                };
                env.insert(e.name.clone(), value);
            }
            let peers: Vec<&str> = env["SHARDKV_PEERS"].split(',').collect();
            let addr = peers[ordinal].to_string();
            let ip = addr.rsplit_once(':').unwrap().0.to_string();
            for v in env.values_mut() {
                *v = v.replace("0.0.0.0", &ip);
            }
            let data = self.dir.join(&pod);
            std::fs::create_dir_all(&data).unwrap();
            env.insert("SHARDKV_DATA_DIR".into(), data.display().to_string());
            let log = self.dir.join(format!("{pod}.log"));
            let child = spawn_pod(&command, &env, &log);
            running.push(Pod {
                child,
                addr,
                paused: false,
                command: command.clone(),
                env,
                log,
            });
        }
    }

    /// Pod `ordinal` loses its volume: killed, its data directory wiped,
    /// and started again on the blank directory, as a pod rescheduled onto
    /// a new empty volume would be.
    fn lose_volume(&self, sts: &str, ordinal: usize) {
        let mut pods = self.pods.lock().unwrap();
        let pod = &mut pods.get_mut(sts).expect("no such StatefulSet's pods")[ordinal];
        let _ = pod.child.kill();
        let _ = pod.child.wait();
        let data = PathBuf::from(&pod.env["SHARDKV_DATA_DIR"]);
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        pod.child = spawn_pod(&pod.command, &pod.env, &pod.log);
    }

    fn addrs(&self, sts: &str) -> Vec<(String, bool)> {
        let pods = self.pods.lock().unwrap();
        pods.get(sts)
            .map(|p| p.iter().map(|p| (p.addr.clone(), p.paused)).collect())
            .unwrap_or_default()
    }

    fn set_paused(&self, sts: &str, paused: bool) {
        let mut pods = self.pods.lock().unwrap();
        for p in pods.get_mut(sts).expect("no such StatefulSet's pods") {
            assert!(signal_quiet(
                p.child.id(),
                if paused { "STOP" } else { "CONT" }
            ));
            p.paused = paused;
        }
    }

    fn stop(&self, sts: &str) {
        self.pods.lock().unwrap().remove(sts);
    }

    /// Makes each pod's volume claim, as the StatefulSet controller does,
    /// and removes the volume (the data directory) of a claim deleted while
    /// no pod uses it, as the PVC-protection controller and the volume's
    /// reclaim policy would.
    async fn volumes(&self, claims: &Api<PersistentVolumeClaim>, sts: &StatefulSet) {
        let name = sts.name_any();
        let spec = sts.spec.as_ref().expect("spec");
        let Some(template) = spec.volume_claim_templates.as_ref().and_then(|t| t.first()) else {
            return;
        };
        let running = self.addrs(&name).len();
        for ordinal in 0..running {
            let claim_name = format!("{}-{name}-{ordinal}", template.name_any());
            if matches!(claims.get_opt(&claim_name).await, Ok(None)) {
                let mut claim = template.clone();
                claim.metadata.name = Some(claim_name);
                claim.metadata.namespace = Some(NS.into());
                let _ = claims.create(&PostParams::default(), &claim).await;
            }
        }
        // By name: the chart's claims carry no labels.
        let Ok(list) = claims.list(&ListParams::default()).await else {
            return;
        };
        let prefix = format!("{}-{name}-", template.name_any());
        let mut kept = std::collections::BTreeSet::new();
        for claim in list {
            let Some(ordinal) =
                (claim.name_any().strip_prefix(&prefix)).and_then(|o| o.parse::<usize>().ok())
            else {
                continue;
            };
            if claim.metadata.deletion_timestamp.is_none() || ordinal < running {
                kept.insert(ordinal);
            } else {
                let patch = json!({"metadata": {"finalizers": null}});
                let _ = claims
                    .patch(
                        &claim.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
        }
        // A volume whose claim is gone goes with it.
        for ordinal in running..16 {
            if !kept.contains(&ordinal) {
                let _ = std::fs::remove_dir_all(self.dir.join(format!("{name}-{ordinal}")));
            }
        }
    }

    /// Starts pods and reports readiness until the test ends.
    async fn run(self, client: Client) {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let api: Api<StatefulSet> = Api::namespaced(client, NS);
        let params = ListParams::default().labels("app.kubernetes.io/name=shardkv");
        loop {
            let maps: BTreeMap<String, ConfigMap> =
                match config_maps.list(&ListParams::default()).await {
                    Ok(list) => list.into_iter().map(|cm| (cm.name_any(), cm)).collect(),
                    Err(_) => BTreeMap::new(),
                };
            if let Ok(list) = api.list(&params).await {
                for sts in list {
                    self.start_pods(&sts, &maps);
                    self.volumes(&claims, &sts).await;
                    let mut ready = 0;
                    for (addr, paused) in self.addrs(&sts.name_any()) {
                        if !paused && serving(&addr).await {
                            ready += 1;
                        }
                    }
                    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let status = json!({"status": {
                        "replicas": replicas, "readyReplicas": ready, "currentReplicas": replicas,
                        "updatedReplicas": replicas, "observedGeneration": sts.metadata.generation,
                    }});
                    let _ = api
                        .patch_status(
                            &sts.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&status),
                        )
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One SERVING health check, bounded.
async fn serving(addr: &str) -> bool {
    shardkv::daemon::probe::check_serving(addr, Duration::from_secs(1))
        .await
        .is_ok()
}

/// The operator process.
struct Operator {
    child: Option<Child>,
    kubeconfig: PathBuf,
    log: PathBuf,
}

impl Operator {
    fn start(&mut self, crash_after: Option<&str>) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin("shardkv-operator"));
        cmd.args([
            "run",
            "--pod-address-template",
            TEMPLATE,
            "--metrics-addr",
            OPERATOR_METRICS,
        ])
        // The default 15 s lease: a shorter one can lapse on a loaded CI
        // machine, and the operator would rightly stop leading.
        .args(["--leader-elect", "--lease-namespace", NS])
        // As the chart's Deployment names it.
        .args(["--shardmaster", &format!("{NS}/{RELEASE}-master")])
        .args([
            "--identity",
            "operator-test",
            "--default-image",
            "shardkv:test",
        ])
        .env("KUBECONFIG", &self.kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(log);
        if let Some(step) = crash_after {
            cmd.env("SHARDKV_OPERATOR_CRASH_AFTER", step);
        }
        self.child = Some(cmd.spawn().expect("start operator"));
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the operator to exit at its failpoint.
    fn await_crash(&mut self) {
        let deadline = Instant::now() + WAIT;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert_eq!(status.code(), Some(86), "operator exit: {}", self.tail());
                self.child = None;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "operator never reached its failpoint:\n{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .map(|l| l.chars().take(400).collect())
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `probe` until it returns Some, or fails with `what`.
async fn until<T, F, Fut>(what: &str, op: &Operator, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; operator log:\n{}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn group(name: &str, gid: u64) -> serde_json::Value {
    json!({
        "apiVersion": "shardkv.io/v1alpha1",
        "kind": "ReplicaGroup",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"gid": gid, "replicas": 3, "shardmaster": {"service": format!("{RELEASE}-master"), "replicas": 3}},
    })
}

fn condition(rg: &ReplicaGroup, type_: &str) -> Option<(String, String, String)> {
    rg.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn masters() -> String {
    (0..3)
        .map(|i| format!("127.60.0.{i}:7000"))
        .collect::<Vec<_>>()
        .join(",")
}

fn config() -> serde_json::Value {
    let out = ctl(&masters(), &["query"], None);
    assert!(
        out.status.success(),
        "query: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("config json")
}

fn in_config(gid: u64) -> bool {
    config()["groups"].get(gid.to_string()).is_some()
}

/// The notes of `object`'s events with `reason`, oldest first.
async fn event_notes(client: &Client, object: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), NS);
    let list = api.list(&ListParams::default()).await.expect("events");
    let mut events: Vec<&Event> = (list.items.iter())
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(object) && e.reason.as_deref() == Some(reason)
        })
        .collect();
    events.sort_by_key(|e| e.metadata.creation_timestamp.clone());
    events
        .iter()
        .map(|e| e.message.clone().unwrap_or_default())
        .collect()
}

async fn events_with_reason(client: &Client, object: &str, reason: &str) -> usize {
    let api: Api<Event> = Api::namespaced(client.clone(), NS);
    let list = api.list(&ListParams::default()).await.expect("events");
    list.items
        .iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(object) && e.reason.as_deref() == Some(reason)
        })
        .count()
}

/// Writes `{prefix}{i}` = `v{i}` for each `i`, each acknowledged.
fn put_keys(prefix: &str, indices: impl IntoIterator<Item = usize>) {
    for i in indices {
        let out = ctl(
            &masters(),
            &["put", &format!("{prefix}{i}"), &format!("v{i}")],
            None,
        );
        assert!(
            out.status.success(),
            "put {prefix}{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Reads back `{prefix}{i}` = `v{i}` for each `i`.
fn read_back(prefix: &str, indices: impl IntoIterator<Item = usize>) {
    for i in indices {
        let out = ctl(&masters(), &["get", &format!("{prefix}{i}")], None);
        assert!(
            out.status.success(),
            "{prefix}{i} lost: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("v{i}"));
    }
}

/// Pod `id` of group `name` loses its volume; waits until the status
/// shows member `id` as a voter of another incarnation, the group at its
/// size.
async fn lose_volume_and_await_replacement(
    kubelet: &Kubelet,
    groups: &Api<ReplicaGroup>,
    op: &Operator,
    name: &str,
    id: u32,
) {
    let before = groups
        .get(name)
        .await
        .expect("the group")
        .status
        .expect("status");
    let old_life = (before.members.iter().find(|m| m.id == id))
        .unwrap_or_else(|| panic!("{name} has no member {id}"))
        .incarnation;
    kubelet.lose_volume(name, id as usize);
    until(
        &format!("{name}'s member {id} replaced by its blank pod"),
        op,
        || async {
            let g = groups.get(name).await.ok()?;
            let status = g.status.as_ref()?;
            let member = status.members.iter().find(|m| m.id == id)?;
            let settled = condition(&g, "Scaled")?.1 == "AtSize";
            (settled && member.role != "learner" && member.incarnation != old_life).then_some(())
        },
    )
    .await;
}

/// Writes keys `w0`, `w1`, ... one after another through `shardkvctl`
/// until stopped; returns the keys whose write was acknowledged and the
/// number of writes that failed.
fn writer(
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<usize>, usize)> {
    std::thread::spawn(move || {
        let (mut acked, mut failed) = (Vec::new(), 0);
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let out = ctl(
                &masters(),
                &["put", &format!("w{i}"), &format!("v{i}")],
                None,
            );
            if out.status.success() {
                acked.push(i);
            } else {
                failed += 1;
                eprintln!(
                    "[operator test] put w{i} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            i += 1;
        }
        (acked, failed)
    })
}

/// `kubectl scale` semantics: a patch of the scale subresource.
async fn scale(groups: &Api<ReplicaGroup>, name: &str, replicas: u32) {
    let patch = json!({"spec": {"replicas": replicas}});
    groups
        .patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("scale {name} to {replicas}: {e}"));
}

/// The voters' ids in the status, once it shows `replicas` voters and the
/// group settled at that size (Scaled: AtSize, the StatefulSet resized).
async fn await_scaled(
    groups: &Api<ReplicaGroup>,
    statefulsets: &Api<StatefulSet>,
    op: &Operator,
    name: &str,
    replicas: u32,
) -> Vec<u32> {
    until(&format!("{name} scaled to {replicas}"), op, || async {
        let g = groups.get(name).await.ok()?;
        let status = g.status.as_ref()?;
        let settled = condition(&g, "Scaled")?.1 == "AtSize";
        let sts = statefulsets.get(name).await.ok()?;
        let pods = sts.spec.as_ref()?.replicas? as u32;
        let voters: Vec<u32> = (status.members.iter())
            .filter(|m| m.role != "learner")
            .map(|m| m.id)
            .collect();
        (settled
            && status.replicas == replicas
            && pods == replicas
            && voters.len() == replicas as usize)
            .then_some(voters)
    })
    .await
}

/// g2 goes 3 → 5 → 3 through the scale subresource while a client writes,
/// with the operator crashed right after adding a learner on the way up
/// and right after removing a member on the way down; then one pod loses
/// its volume and the operator replaces the member it was. Every
/// acknowledged write reads back; the removed pods' volume claims are
/// deleted; the scale subresource reports the size and the pods' selector.
async fn scale_a_group_under_writes(
    kubelet: &Kubelet,
    admin: &Client,
    groups: &Api<ReplicaGroup>,
    op: &mut Operator,
    started: &Instant,
) {
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NS);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = writer(stop.clone());

    op.kill9();
    op.start(Some("add-learner"));
    scale(groups, "g2", 5).await;
    op.await_crash();
    log("operator crashed right after adding a learner; restarting");
    op.start(None);
    let voters = await_scaled(groups, &statefulsets, op, "g2", 5).await;
    assert_eq!(voters, [0, 1, 2, 3, 4]);
    // The group's leader reports its new voters to the shardmaster, so
    // clients and other groups find them.
    let servers = |n: usize| {
        (0..n)
            .map(|i| format!("127.60.2.{i}:7000"))
            .collect::<Vec<_>>()
    };
    until("the shardmaster lists g2's 5 voters", op, || async {
        (config()["groups"]["2"] == json!(servers(5))).then_some(())
    })
    .await;
    log(&format!("g2 scaled to 5 ({:?})", started.elapsed()));

    op.kill9();
    op.start(Some("remove-member"));
    scale(groups, "g2", 3).await;
    op.await_crash();
    log("operator crashed right after removing a member; restarting");
    op.start(None);
    let voters = await_scaled(groups, &statefulsets, op, "g2", 3).await;
    assert_eq!(voters, [0, 1, 2]);
    until("the shardmaster lists g2's 3 voters", op, || async {
        (config()["groups"]["2"] == json!(servers(3))).then_some(())
    })
    .await;
    until("the removed pods' volume claims deleted", op, || async {
        let left: Vec<String> = claims
            .list(&ListParams::default().labels("app.kubernetes.io/instance=g2"))
            .await
            .ok()?
            .iter()
            .map(|c| c.name_any())
            .collect();
        (left == ["data-g2-0", "data-g2-1", "data-g2-2"]).then_some(())
    })
    .await;
    log(&format!("g2 scaled back to 3 ({:?})", started.elapsed()));

    let scale_now = groups.get_scale("g2").await.expect("the scale subresource");
    assert_eq!(scale_now.spec.and_then(|s| s.replicas), Some(3));
    let scale_status = scale_now.status.expect("scale status");
    assert_eq!(scale_status.replicas, 3);
    assert!(
        (scale_status.selector.as_deref())
            .is_some_and(|s| s.contains("app.kubernetes.io/instance=g2")),
        "{scale_status:?}"
    );
    // The steps as `kubectl describe rg g2` shows them.
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let mut steps: Vec<Event> = (events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items)
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("g2"))
        .collect();
    steps.sort_by_key(|e| e.metadata.creation_timestamp.clone());
    for e in &steps {
        log(&format!(
            "  g2 event {}: {}",
            e.reason.as_deref().unwrap_or(""),
            e.message.as_deref().unwrap_or("")
        ));
    }
    for reason in [
        "MemberAdded",
        "MemberPromoted",
        "MemberRemoved",
        "Resized",
        "VolumesDeleted",
    ] {
        assert!(
            events_with_reason(admin, "g2", reason).await > 0,
            "no {reason} event"
        );
    }
    // A pod loses its volume: the operator removes the member it was and
    // adds the blank pod anew, a new incarnation.
    let replaced = Instant::now();
    lose_volume_and_await_replacement(kubelet, groups, op, "g2", 1).await;
    let notes = event_notes(admin, "g2", "MemberRemoved").await;
    assert!(
        notes.iter().any(|n| n.contains("blank volume")),
        "{notes:?}"
    );
    log(&format!(
        "g2's pod 1 lost its volume: replaced in {:.1} s",
        replaced.elapsed().as_secs_f64()
    ));
    let members = shardkv_cluster_tests::ctl(&masters(), &["member", "list", "2"], None);
    assert!(
        members.status.success(),
        "{}",
        String::from_utf8_lossy(&members.stderr)
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writes.join().expect("the writer");
    assert!(
        acked.len() >= 10,
        "only {} writes acknowledged",
        acked.len()
    );
    read_back("w", acked.iter().copied());
    log(&format!(
        "{} writes acknowledged during the resizes, all read back; {failed} failed",
        acked.len()
    ));
}

/// The shardmaster's voters, by id, as its leader reports them.
async fn master_voters() -> Option<Vec<u32>> {
    let addresses: Vec<String> = masters().split(',').map(str::to_string).collect();
    let admin = shardkv::replica::members::MembersAdmin::new(addresses, Duration::from_secs(2));
    let members = admin.list().await.ok()?;
    let leads = members.has_leader && members.leader == members.answered_by;
    leads.then(|| {
        members
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    })
}

/// `helm upgrade --set shardmaster.replicas=5`, then back to 3, while a
/// client writes: the operator resizes the shardmaster one member at a
/// time, Helm leaves the StatefulSet's size to it, and the removed pods'
/// volume claims go.
async fn resize_the_shardmaster_by_helm_upgrade(
    env: &Envtest,
    admin: &Client,
    op: &Operator,
    started: &Instant,
) {
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NS);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let master = format!("{RELEASE}-master");
    let chart = repo().join("charts/shardkv");
    let kubeconfig = env.kubeconfig.to_str().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = writer(stop.clone());
    for (replicas, voters) in [(5u32, vec![0, 1, 2, 3, 4]), (3, vec![0, 1, 2])] {
        let asked = Instant::now();
        let values = json!({"podAddressTemplate": TEMPLATE, "shardmaster": {"replicas": replicas}});
        let out = env.helm(&[
            "upgrade",
            kubeconfig,
            chart.to_str().unwrap(),
            RELEASE,
            NS,
            &values.to_string(),
        ]);
        assert!(
            out.status.success(),
            "helm upgrade: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        until(
            &format!("the shardmaster resized to {replicas}"),
            op,
            || async {
                let sts = statefulsets.get(&master).await.ok()?;
                let pods = sts.spec.as_ref()?.replicas? as u32;
                let now = master_voters().await?;
                (pods == replicas && now == voters).then_some(())
            },
        )
        .await;
        log(&format!(
            "shardmaster resized to {replicas} by helm upgrade in {:.1} s ({:?})",
            asked.elapsed().as_secs_f64(),
            started.elapsed()
        ));
    }
    until(
        "the removed shardmaster pods' volume claims deleted",
        op,
        || async {
            let left: Vec<String> = (claims.list(&ListParams::default()).await.ok()?.iter())
                .map(|c| c.name_any())
                .filter(|n| n.starts_with(&format!("data-{master}-")))
                .collect();
            (left.len() == 3 && !left.iter().any(|n| n.ends_with("-3") || n.ends_with("-4")))
                .then_some(())
        },
    )
    .await;
    for reason in [
        "MemberAdded",
        "MemberPromoted",
        "MemberRemoved",
        "Resized",
        "VolumesDeleted",
    ] {
        assert!(
            events_with_reason(admin, &master, reason).await > 0,
            "no {reason} event on {master}"
        );
    }
    // The operator set the size (3 → 4 → 5, then 5 → 3), not Helm.
    let resized = event_notes(admin, &master, "Resized").await;
    for note in &resized {
        log(&format!("  {master} Resized: {note}"));
    }
    assert!(resized.len() >= 3, "{resized:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writes.join().expect("the writer");
    read_back("w", acked.iter().copied());
    log(&format!(
        "{} writes acknowledged during the shardmaster's resizes, all read back; {failed} failed",
        acked.len()
    ));
}

/// A group created with one replica is scaled to 3; then its first pod
/// loses its volume, and the operator replaces the member it was. The
/// group's cluster-state ConfigMap says `existing` once it has joined, so
/// the blank pod waits to be added rather than starting a group of one
/// (the daemon test `a_blank_replica_of_an_existing_group_first_started_
/// alone_waits_to_be_added` shows that step; here a group of one would be
/// stopped later too, by its new incarnation and the shardmaster's claim
/// check, so this test checks the outcome: replaced, nothing lost). Then
/// the group is deleted (its shards go back).
async fn grow_a_group_first_started_alone(
    kubelet: &Kubelet,
    admin: &Client,
    groups: &Api<ReplicaGroup>,
    op: &Operator,
    started: &Instant,
) {
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NS);
    let mut alone = group("g4", 4);
    alone["spec"]["replicas"] = json!(1);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(alone).unwrap(),
        )
        .await
        .expect("create g4");
    until("g4 joined with its one replica", op, || async {
        let g = groups.get("g4").await.ok()?;
        let s = g.status.as_ref()?;
        (s.joined && !s.shards.is_empty() && condition(&g, "Scaled")?.1 == "AtSize").then_some(())
    })
    .await;
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let state = config_maps
        .get("g4-cluster-state")
        .await
        .expect("g4's ConfigMap");
    assert_eq!(
        state
            .data
            .as_ref()
            .and_then(|d| d.get("state"))
            .map(String::as_str),
        Some("existing"),
        "a joined group exists"
    );
    put_keys("a", 0..KEYS);
    scale(groups, "g4", 3).await;
    let voters = await_scaled(groups, &statefulsets, op, "g4", 3).await;
    assert_eq!(voters, [0, 1, 2]);
    log(&format!("g4 grew from 1 to 3 ({:?})", started.elapsed()));

    lose_volume_and_await_replacement(kubelet, groups, op, "g4", 0).await;
    read_back("a", 0..KEYS);
    log(&format!(
        "g4's first pod lost its volume: replaced, every key readable ({:?})",
        started.elapsed()
    ));

    groups
        .delete("g4", &DeleteParams::default())
        .await
        .expect("delete g4");
    until("g4 drained and released", op, || async {
        groups.get_opt("g4").await.ok()?.is_none().then_some(())
    })
    .await;
    kubelet.stop("g4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_on_a_real_api_server() {
    let started = Instant::now();
    let env = Envtest::up();
    let work = env.dir.path().to_path_buf();
    let admin = env.client(&env.kubeconfig).await;
    log(&format!("envtest up in {:?}", started.elapsed()));

    // The chart lints clean and installs; its CRD is served.
    let chart = repo().join("charts/shardkv");
    let chart = chart.to_str().unwrap();
    let values = json!({"podAddressTemplate": TEMPLATE}).to_string();
    // Lint renders the initial-groups template too; the install leaves
    // groups to the test.
    let with_groups =
        json!({"podAddressTemplate": TEMPLATE, "replicaGroups": [{"name": "g9", "gid": 9}]});
    let out = env.helm(&["lint", chart, &with_groups.to_string()]);
    assert!(
        out.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kubeconfig = env.kubeconfig.to_str().unwrap();
    let out = env.helm(&["install", kubeconfig, chart, RELEASE, NS, &values]);
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd = crds
        .get("replicagroups.shardkv.io")
        .await
        .expect("the chart installed the CRD");
    let established = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"),
        "{established:?}"
    );
    log("chart linted and installed");

    let kubelet = Kubelet {
        pods: Arc::default(),
        dir: work.join("pods"),
    };
    std::fs::create_dir_all(&kubelet.dir).unwrap();
    let kubelet_task = tokio::spawn(kubelet.clone().run(admin.clone()));

    // The operator runs as the chart's ServiceAccount, so the chart's RBAC
    // is what lets it work.
    let sa: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["https://kubernetes.default.svc".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let token: TokenRequest = sa
        .create_subresource(
            "token",
            &format!("{RELEASE}-operator"),
            &PostParams::default(),
            &request,
        )
        .await
        .expect("a token for the chart's ServiceAccount");
    let token = token.status.expect("token status").token;
    let admin_config = std::fs::read_to_string(&env.kubeconfig).unwrap();
    let sa_kubeconfig = work.join("operator.kubeconfig");
    std::fs::write(
        &sa_kubeconfig,
        admin_config.replace("token: admin-token", &format!("token: {token}")),
    )
    .unwrap();
    let mut op = Operator {
        child: None,
        kubeconfig: sa_kubeconfig,
        log: work.join("operator.log"),
    };

    // Group 1: the operator crashes right after its Join, before any status
    // says so; restarted, it converges.
    op.start(Some("join"));
    let groups: Api<ReplicaGroup> = Api::namespaced(admin.clone(), NS);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("g1", 1)).unwrap(),
        )
        .await
        .expect("create g1");
    op.await_crash();
    assert!(in_config(1), "the Join happened");
    let g1 = groups.get("g1").await.unwrap();
    assert!(
        !g1.status.as_ref().is_some_and(|s| s.joined),
        "status written before the crash: {:?}",
        g1.status
    );
    assert!(g1.finalizers().iter().any(|f| f == FINALIZER));
    log("operator crashed after Join; restarting");

    // What it created, with its owner.
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NS);
    let sts = statefulsets.get("g1").await.expect("StatefulSet g1");
    let owner = &sts.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ReplicaGroup", g1.uid().unwrap().as_str())
    );
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let env_vars: BTreeMap<String, String> = spec.template.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    // Every pod the group may grow to; the first 3 formed it.
    let every_pod: Vec<String> = (0..7).map(|i| format!("127.60.1.{i}:7000")).collect();
    assert_eq!(env_vars["SHARDKV_PEERS"], every_pod.join(","));
    assert_eq!(env_vars["SHARDKV_INITIAL_REPLICAS"], "3");
    assert_eq!(env_vars["SHARDKV_MASTERS"], masters());
    let svc: Api<Service> = Api::namespaced(admin.clone(), NS);
    let svc = svc.get("g1").await.expect("Service g1");
    assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        svc.metadata.owner_references.unwrap()[0].uid,
        g1.uid().unwrap()
    );

    op.start(None);
    let g1 = until("g1 joined and ready", &op, || async {
        let g = groups.get("g1").await.ok()?;
        let s = g.status.as_ref()?;
        (s.joined && s.ready_replicas == 3 && s.shards.len() == 10).then_some(g)
    })
    .await;
    assert_eq!(condition(&g1, "Ready").unwrap().0, "True");
    assert_eq!(condition(&g1, "Joined").unwrap().1, "InConfiguration");
    // Kubernetes 1.20 has no policy/v1 PodDisruptionBudget: said, not fatal.
    let degraded = condition(&g1, "Degraded").unwrap();
    assert_eq!(
        (degraded.0.as_str(), degraded.1.as_str()),
        ("True", "PodDisruptionBudgetUnsupported"),
        "{degraded:?}"
    );
    assert!(events_with_reason(&admin, "g1", "PodDisruptionBudgetUnsupported").await > 0);
    let metrics = shardkv_cluster_tests::http_get(OPERATOR_METRICS, "/metrics");
    assert!(
        metrics.contains("shardkv_operator_reconciles_total"),
        "{metrics}"
    );
    assert!(shardkv_cluster_tests::http_get(OPERATOR_METRICS, "/healthz").contains("ok"));
    log(&format!(
        "g1 joined after restart ({:?})",
        started.elapsed()
    ));

    put_keys("k", 0..KEYS);

    // Group 2: the shards split.
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("g2", 2)).unwrap(),
        )
        .await
        .expect("create g2");
    until("the shards split between g1 and g2", &op, || async {
        let a = groups.get("g1").await.ok()?.status?;
        let b = groups.get("g2").await.ok()?.status?;
        (b.joined && a.shards.len() == 5 && b.shards.len() == 5).then_some(())
    })
    .await;
    log(&format!("shards split ({:?})", started.elapsed()));

    scale_a_group_under_writes(&kubelet, &admin, &groups, &mut op, &started).await;
    resize_the_shardmaster_by_helm_upgrade(&env, &admin, &op, &started).await;
    grow_a_group_first_started_alone(&kubelet, &admin, &groups, &op, &started).await;

    // Invalid resources: the schema rejects some, the operator reports the
    // rest and keeps running.
    for (bad, field) in [
        (json!({"gid": 0}), "gid"),
        (json!({"replicas": 8}), "replicas"),
    ] {
        let mut rg = group("bad", 9);
        for (k, v) in bad.as_object().unwrap() {
            rg["spec"][k] = v.clone();
        }
        let err = groups
            .create(&PostParams::default(), &serde_json::from_value(rg).unwrap())
            .await
            .expect_err("the schema rejects it");
        assert!(err.to_string().contains(field), "{err}");
    }
    let mut both = group("g3", 3);
    both["spec"]["shardmaster"]["addresses"] = json!(["127.60.0.0:7000"]);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(both).unwrap(),
        )
        .await
        .expect("create g3");
    until("g3 reported invalid", &op, || async {
        let g = groups.get("g3").await.ok()?;
        let d = condition(&g, "Degraded")?;
        (d.1 == "InvalidSpec" && d.2.contains("not both")).then_some(())
    })
    .await;
    assert!(!in_config(3));
    // Kubernetes 1.20 drops the CEL rule, so a changed gid is accepted by
    // the API and refused by the operator.
    let patch = json!({"spec": {"gid": 7}});
    groups
        .patch("g2", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch gid");
    until("g2's gid change refused", &op, || async {
        let g = groups.get("g2").await.ok()?;
        (condition(&g, "Degraded")?.1 == "GidImmutable").then_some(())
    })
    .await;
    assert!(!in_config(7) && in_config(2));
    let patch = json!({"spec": {"gid": 2}});
    groups
        .patch("g2", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch gid back");
    groups
        .delete("g3", &DeleteParams::default())
        .await
        .expect("delete g3");
    until("g3, which never served, released", &op, || async {
        groups.get_opt("g3").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(op.alive(), "the operator kept running");
    log(&format!(
        "invalid resources handled ({:?})",
        started.elapsed()
    ));

    // Delete g1 while g2 cannot take its shards, and crash the operator
    // right after the Leave. The finalizer holds until the shards move.
    op.kill9();
    op.start(Some("leave"));
    kubelet.set_paused("g2", true);
    groups
        .delete("g1", &DeleteParams::default())
        .await
        .expect("delete g1");
    op.await_crash();
    assert!(!in_config(1), "the Leave happened");
    op.start(None);
    until("g1 draining", &op, || async {
        let g = groups.get_opt("g1").await.ok()?;
        let g = g.unwrap_or_else(|| panic!("g1 released while its shards could not move"));
        (condition(&g, "Leaving")?.1 == "Draining").then_some(())
    })
    .await;
    // Several reconciles (2 s apart while draining) must all hold it.
    let held_until = Instant::now() + Duration::from_secs(8);
    let mut last_message = String::new();
    while Instant::now() < held_until {
        let g = groups.get_opt("g1").await.unwrap();
        let g = g.unwrap_or_else(|| {
            panic!(
                "g1 released while its shards could not move:\n{}",
                op.tail()
            )
        });
        let leaving = condition(&g, "Leaving").unwrap();
        assert_eq!(leaving.1, "Draining");
        last_message = leaving.2;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    log(&format!("g1 held: {last_message}"));
    kubelet.set_paused("g2", false);
    until("g1 drained and released", &op, || async {
        groups.get_opt("g1").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(events_with_reason(&admin, "g1", "Left").await > 0);
    assert!(events_with_reason(&admin, "g1", "Drained").await > 0);
    // No garbage collector here: stop g1's pods as it would, then read back.
    kubelet.stop("g1");
    read_back("k", 0..KEYS);
    log(&format!(
        "g1 removed, every key readable ({:?})",
        started.elapsed()
    ));

    // Re-created under its retired gid: refused, and told what to do.
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("g1", 1)).unwrap(),
        )
        .await
        .expect("re-create g1");
    until("the re-created g1 refused", &op, || async {
        let g = groups.get("g1").await.ok()?;
        let d = condition(&g, "Degraded")?;
        (d.1 == "JoinRefused" && d.2.contains("retired") && d.2.contains("unused gid"))
            .then_some(())
    })
    .await;
    // Still refused on later reconciles, and never joined.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let g = groups.get("g1").await.unwrap();
    assert_eq!(condition(&g, "Joined").unwrap().1, "JoinRefused");
    assert!(!in_config(1));
    groups
        .delete("g1", &DeleteParams::default())
        .await
        .expect("delete the re-created g1");
    until(
        "the re-created g1, which held nothing, released",
        &op,
        || async { groups.get_opt("g1").await.ok()?.is_none().then_some(()) },
    )
    .await;
    kubelet.stop("g1");
    log(&format!(
        "a retired gid refused and released ({:?})",
        started.elapsed()
    ));

    // The last group holds data: refused until deliberately overridden.
    groups
        .delete("g2", &DeleteParams::default())
        .await
        .expect("delete g2");
    until("g2's removal refused", &op, || async {
        let g = groups.get_opt("g2").await.ok()??;
        let l = condition(&g, "Leaving")?;
        (l.1 == "LastGroupHoldsData" && l.2.contains(ALLOW_DATA_LOSS_ANNOTATION)).then_some(())
    })
    .await;
    assert!(in_config(2));
    let patch = json!({"metadata": {"annotations": {ALLOW_DATA_LOSS_ANNOTATION: "true"}}});
    groups
        .patch("g2", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
    until("g2 released after the override", &op, || async {
        groups.get_opt("g2").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!in_config(2));
    assert!(op.alive());
    log(&format!(
        "last group removed on override ({:?})",
        started.elapsed()
    ));

    kubelet_task.abort();
    let out = env.helm(&["uninstall", kubeconfig, RELEASE, NS]);
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
