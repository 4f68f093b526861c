//! Provisioning benchmark: the manager's controllers take 1,000 LibvirtMachines (with their
//! Machines and cloud-config bootstrap Secrets) on the in-process test driver from create to
//! `status.initialization.provisioned`, against the bed's real etcd + kube-apiserver and the real
//! Cluster API core manager.
//!
//! `cargo bench --bench provision [-- <machines>]` prints: start-to-ready (spawn → `/readyz` 200),
//! the manager's resident memory idle (ready, no objects) and peak (VmHWM), the time to create the
//! objects (parallel, bounded in flight; Secrets and Machines first, untimed against the
//! manager), the wall time from the first LibvirtMachine create to all provisioned, reconciles/s
//! (the manager's `capl_reconcile_total`), and the API server's write requests (its
//! `apiserver_request_total` before/after) by resource, subresource and verb, per machine.
//!
//! The manager: the test driver keeps its state inside the process that opened it, and it holds
//! no volume a root disk could be backed by (nor can it receive one: it stores no volume
//! content). So the manager runs as a child of this binary (`--manager-child`): it opens
//! `test:///default`, creates an empty base volume in `default-pool` and keeps that connection
//! (the driver's default state is shared by the process's connections), then runs the real
//! `capl::manager::run` with the command line the `manager` binary would get.
//!
//! Machines carry `spec.failureDomain: a`: one host, so that every machine takes the same path
//! (placement by free memory is covered by the controller tests).
//!
//! `cargo test --all-targets` builds and runs this binary too (without `--bench`): it then only
//! prints a line and exits.

#[path = "../support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use support::apiserver::free_port;
use support::capi_objects::{capi, namespace};

use capl::api::{LibvirtCluster, LibvirtMachine};

const NAMESPACE: &str = "bench";
const CLUSTER: &str = "bench";
const POOL: &str = "default-pool";
const BASE: &str = "golden.qcow2";
/// Root-disk pools on the test driver, and machines per pool.
const POOLS: usize = 12;
const PER_POOL: usize = 90;
/// Creates in flight at once.
const IN_FLIGHT: usize = 64;
/// Client pacing and concurrency the manager runs with (its defaults, 20 qps, would need ~7 min
/// for the ~8,000 requests of 1,000 machines).
const MANAGER_FLAGS: &[&str] = &[
    "--kube-api-qps=1000",
    "--kube-api-burst=1000",
    "--libvirtmachine-concurrency=32",
];
/// How long the machines may take before the bench gives up (and shows the stragglers).
const WAIT: Duration = Duration::from_secs(180);
/// Where the manager's log is copied before the bed is removed.
const LOG_COPY: &str = "/tmp/capl-bench-provision-manager.log";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--manager-child") {
        manager_child(&args[2..]);
        return;
    }
    if args.get(1).map(String::as_str) == Some("--test-driver-state") {
        test_driver_state(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000));
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    if !args.iter().any(|arg| arg == "--bench") {
        println!("provisioning benchmark: run it with `cargo bench --bench provision`");
        return;
    }
    let machines: usize = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    assert!(
        machines <= POOLS * PER_POOL,
        "at most {} machines",
        POOLS * PER_POOL
    );
    bench(machines);
}

/// The manager, in this process: a base volume on the test driver, then `capl::manager::run`.
fn manager_child(args: &[String]) {
    use clap::Parser;
    let cli = capl::config::Cli::parse_from(
        std::iter::once("manager".to_owned()).chain(args.iter().cloned()),
    );
    capl::telemetry::init(cli.run.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let uri = capl::libvirt::uri::HostUri::parse(
        "test:///default",
        capl::libvirt::uri::UriPolicy {
            allow_test_driver: true,
        },
    )
    .expect("test driver URI");
    // Kept open for the process's life: the test driver's state lives while a connection does.
    let host = capl::libvirt::Host::open(&uri).expect("opening the test driver");
    let base = capl::libvirt::xml::VolumePlan {
        name: BASE.into(),
        capacity_gib: 1,
        format: "qcow2".into(),
        backing: None,
    }
    .to_xml()
    .expect("volume XML");
    host.ensure_volume(POOL, BASE, &base)
        .expect("the base volume");
    // Every test-driver pool holds 100 GiB and a volume without `<allocation>` counts in full:
    // root disks go to enough pools of their own.
    for k in 0..POOLS {
        let xml = format!(
            "<pool type='dir'><name>{}</name><target><path>/{}</path></target></pool>",
            pool_name(k),
            pool_name(k)
        );
        host.connection()
            .create_storage_pool_xml(&xml, 0)
            .expect("a root disk pool");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(error) = runtime.block_on(capl::manager::run(cli.run)) {
        eprintln!("manager: {error:#}");
        std::process::exit(1);
    }
    drop(host);
}

/// The test driver's share of the manager's memory: this process's RSS growth while the
/// provider's own provisioning code makes `n` machines (root volume, domain) on the in-process
/// test driver, one after the other. Prints the KiB.
fn test_driver_state(n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let uri = support::host_uri("test:///default");
        let hosts = Arc::new(capl::libvirt::hosts::Hosts::new(4));
        let images = capl::libvirt::image::ImageCache::new(hosts.clone()).expect("image cache");
        hosts
            .run(&uri, |host| {
                let base = capl::libvirt::xml::VolumePlan {
                    name: BASE.into(),
                    capacity_gib: 1,
                    format: "qcow2".into(),
                    backing: None,
                }
                .to_xml()
                .map_err(|e| capl::libvirt::Error::Xml(e.to_string()))?;
                host.ensure_volume(POOL, BASE, &base)?;
                for k in 0..POOLS {
                    let xml = format!(
                        "<pool type='dir'><name>{}</name><target><path>/{}</path></target></pool>",
                        pool_name(k),
                        pool_name(k)
                    );
                    host.connection()
                        .create_storage_pool_xml(&xml, 0)
                        .map_err(|e| capl::libvirt::Error::Xml(format!("a pool: {e}")))?;
                }
                Ok(())
            })
            .await
            .expect("pools");
        let before = status_kib(std::process::id(), "VmRSS:");
        for i in 0..n {
            let identity = capl::libvirt::identity::MachineIdentity::new(
                NAMESPACE,
                &name(i),
                capl::libvirt::identity::MachineIdentity::uuid_for_uid(&name(i)),
            );
            let request = capl::libvirt::backend::MachineRequest {
                identity,
                cluster: CLUSTER.into(),
                host: capl::libvirt::backend::HostRef {
                    name: "a".into(),
                    uri: uri.clone(),
                    domain_type: capl::api::DomainType::Kvm,
                },
                vcpus: 1,
                memory_mib: 256,
                cpu_mode: capl::api::CpuMode::Maximum,
                firmware: capl::api::Firmware::Bios,
                pool: pool_name(i / PER_POOL),
                image: capl::libvirt::backend::BaseImage::Volume {
                    pool: POOL.into(),
                    name: BASE.into(),
                },
                root_gib: 1,
                data_disks: vec![],
                interfaces: vec![],
                bootstrap: None,
                direct_boot: None,
            };
            capl::libvirt::provision::provision(&hosts, &images, &request)
                .await
                .expect("a machine on the test driver");
        }
        println!(
            "{}",
            status_kib(std::process::id(), "VmRSS:").saturating_sub(before)
        );
    });
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// Prometheus text: `name{labels} value` → (labels, value) of the samples named `name`.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((labels, value)) = rest.rsplit_once('}') else {
                continue;
            };
            (labels, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let Ok(value) = value.split_whitespace().next().unwrap_or("").parse::<f64>() else {
            continue;
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",") {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.trim().to_owned(), v.trim_end_matches('"').to_owned());
            }
        }
        out.push((map, value));
    }
    out
}

type Writes = BTreeMap<(String, String, String), f64>;

/// The API server's requests by (resource, subresource, verb), writes only.
fn apiserver_writes(bed: &support::TestBed) -> Writes {
    let out = bed.kubectl(&["get", "--raw", "/metrics"]);
    assert!(out.status.success(), "apiserver /metrics");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut writes = Writes::new();
    for (labels, value) in samples(&text, "apiserver_request_total") {
        let verb = labels.get("verb").cloned().unwrap_or_default();
        if ![
            "POST",
            "PUT",
            "PATCH",
            "APPLY",
            "DELETE",
            "DELETECOLLECTION",
        ]
        .contains(&verb.as_str())
        {
            continue;
        }
        let key = (
            labels.get("resource").cloned().unwrap_or_default(),
            labels.get("subresource").cloned().unwrap_or_default(),
            verb,
        );
        *writes.entry(key).or_default() += value;
    }
    writes
}

fn delta(before: &Writes, after: &Writes) -> Writes {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn reconciles(metrics_port: u16) -> (f64, f64) {
    let text = http_get(metrics_port, "/metrics");
    let count = |kind: &str| {
        samples(&text, "capl_reconcile_total")
            .iter()
            .filter(|(l, _)| l.get("kind").map(String::as_str) == Some(kind))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    (count("LibvirtMachine"), count("LibvirtCluster"))
}

/// Runs `make(i)` for `0..n`, at most [`IN_FLIGHT`] at once; returns the results in order.
async fn bounded<T, F, Fut>(n: usize, make: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let mut results: Vec<(usize, T)> = futures::stream::iter((0..n).map(|i| {
        let fut = make(i);
        async move { (i, fut.await) }
    }))
    .buffer_unordered(IN_FLIGHT)
    .collect()
    .await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, t)| t).collect()
}

fn pool_name(k: usize) -> String {
    format!("bench-{k}")
}

fn name(i: usize) -> String {
    format!("m-{i:04}")
}

fn bootstrap_secret(i: usize) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{}-bootstrap", name(i))},
        "stringData": {"value": "#cloud-config\nruncmd: [echo bench]\n", "format": "cloud-config"},
    }))
    .expect("secret")
}

fn machine(i: usize) -> kube::api::DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2",
        "kind": "Machine",
        "metadata": {"name": name(i), "labels": {"cluster.x-k8s.io/cluster-name": CLUSTER}},
        "spec": {
            "clusterName": CLUSTER,
            "failureDomain": "a",
            "bootstrap": {"dataSecretName": format!("{}-bootstrap", name(i))},
            "infrastructureRef": {
                "apiGroup": "infrastructure.cluster.x-k8s.io",
                "kind": "LibvirtMachine",
                "name": name(i),
            },
        },
    }))
    .expect("machine")
}

/// The LibvirtMachine as Cluster API's Machine controller leaves it (controller owner
/// reference, cluster-name label), so that the core has nothing to patch on it.
fn libvirt_machine(i: usize, machine_uid: &str) -> LibvirtMachine {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {
            "name": name(i),
            "labels": {"cluster.x-k8s.io/cluster-name": CLUSTER},
            "ownerReferences": [{
                "apiVersion": "cluster.x-k8s.io/v1beta2",
                "kind": "Machine",
                "name": name(i),
                "uid": machine_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "vcpus": 1,
            "memoryMiB": 256,
            "image": {"volume": {"pool": POOL, "name": BASE}},
            "rootVolume": {"sizeGiB": 1, "pool": pool_name(i / PER_POOL)},
        },
    }))
    .expect("libvirt machine")
}

fn provisioned(m: &LibvirtMachine) -> bool {
    m.status
        .as_ref()
        .and_then(|s| s.initialization.as_ref())
        .and_then(|i| i.provisioned)
        == Some(true)
}

async fn setup_cluster(client: &Client) {
    namespace(client, NAMESPACE).await;
    capi(client, NAMESPACE, "Cluster")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "cluster.x-k8s.io/v1beta2",
                "kind": "Cluster",
                "metadata": {"name": CLUSTER},
                "spec": {"infrastructureRef": {
                    "apiGroup": "infrastructure.cluster.x-k8s.io",
                    "kind": "LibvirtCluster",
                    "name": CLUSTER,
                }},
            }))
            .expect("cluster"),
        )
        .await
        .expect("creating the Cluster");
    let clusters: Api<LibvirtCluster> = Api::namespaced(client.clone(), NAMESPACE);
    clusters
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
                "kind": "LibvirtCluster",
                "metadata": {"name": CLUSTER, "labels": {"cluster.x-k8s.io/cluster-name": CLUSTER}},
                "spec": {"hosts": [{"name": "a", "uri": "test:///default"}], "storagePool": POOL},
            }))
            .expect("libvirt cluster"),
        )
        .await
        .expect("creating the LibvirtCluster");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = clusters.get(CLUSTER).await.expect("the LibvirtCluster");
        let ready = c
            .status
            .as_ref()
            .and_then(|s| s.initialization.as_ref())
            .and_then(|i| i.provisioned)
            == Some(true);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the LibvirtCluster was not provisioned: {:?}",
            c.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_writes(
    title: &str,
    writes: &Writes,
    machines: usize,
    minus: &[((&str, &str, &str), f64)],
) {
    println!("{title}");
    let mut ours = 0.0;
    for ((resource, sub, verb), n) in writes {
        let created_by_bench = minus
            .iter()
            .find(|((r, s, v), _)| r == resource && s == sub && v == verb)
            .map(|(_, n)| *n)
            .unwrap_or(0.0);
        let shown = if sub.is_empty() {
            resource.clone()
        } else {
            format!("{resource}/{sub}")
        };
        let net = n - created_by_bench;
        println!(
            "  {shown:<34} {verb:<7} {n:>7.0}{} {:>6.2}/machine",
            if created_by_bench > 0.0 {
                format!(" (−{created_by_bench:.0} bench creates)")
            } else {
                String::new()
            },
            net / machines as f64
        );
        if resource == "libvirtmachines" {
            ours += net;
        }
    }
    println!(
        "  => LibvirtMachine writes (not counting the bench's creates): {ours:.0} = {:.2} per machine",
        ours / machines as f64
    );
}

/// Starts a manager (`cmd` plus the bench's flags), waits for `/readyz` 200 polling every 2 ms;
/// returns it with its start-to-ready time, its RSS (KiB) 2 s later and its metrics port.
fn spawn_ready(
    mut cmd: std::process::Command,
    bed: &support::TestBed,
    log: &std::path::Path,
) -> (support::process::Proc, Duration, u64, u16) {
    let (health, metrics) = (free_port().expect("port"), free_port().expect("port"));
    cmd.arg(format!("--kubeconfig={}", bed.kubeconfig.display()))
        .arg(format!("--health-probe-bind-address=127.0.0.1:{health}"))
        .arg(format!("--metrics-bind-address=127.0.0.1:{metrics}"))
        .arg("--webhook-port=0")
        .arg("--allow-test-driver")
        .arg(format!("--namespace={NAMESPACE}"))
        .args(MANAGER_FLAGS)
        // `info`, as by default.
        .env("RUST_LOG", "info");
    let spawned = Instant::now();
    let mut proc =
        support::process::Proc::spawn("manager", cmd, log, support::process::Lifetime::TestProcess)
            .expect("starting the manager");
    loop {
        if support::capi::http_ok(health, "/readyz") {
            break;
        }
        proc.check_running().expect("the manager runs");
        assert!(
            spawned.elapsed() < Duration::from_secs(30),
            "the manager never became ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let ready = spawned.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss = status_kib(proc.pid(), "VmRSS:");
    (proc, ready, rss, metrics)
}

fn bench(n: usize) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bed = support::TestBed::start().expect("test bed");
    bed.capi();
    bed.install_provider_crds();
    let dir = bed.test_dir("provision");
    // The `manager` binary itself: start-to-ready and idle memory, then stopped.
    let (mut real, ready, idle_rss, _) = spawn_ready(
        std::process::Command::new(env!("CARGO_BIN_EXE_manager")),
        &bed,
        &dir.join("manager-binary.log"),
    );
    println!(
        "`manager` binary: start-to-ready {} ms; idle RSS {idle_rss} KiB ({:.1} MiB)",
        ready.as_millis(),
        idle_rss as f64 / 1024.0,
    );
    real.stop(Duration::from_secs(10));
    // The manager that provisions (this binary as `--manager-child`, see the module doc).
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("this binary"));
    cmd.arg("--manager-child");
    let (mut manager, ready, idle_rss, metrics) = spawn_ready(cmd, &bed, &dir.join("manager.log"));
    let pid = manager.pid();
    println!(
        "manager (child) pid {pid}: start-to-ready {} ms; idle RSS {idle_rss} KiB ({:.1} MiB); flags {}",
        ready.as_millis(),
        idle_rss as f64 / 1024.0,
        MANAGER_FLAGS.join(" ")
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = bed.client().await;
        setup_cluster(&client).await;
        let idle_rss = status_kib(pid, "VmRSS:");
        println!("cluster provisioned; manager RSS {idle_rss} KiB");

        // Secrets and Machines first: not counted against the manager.
        let started = Instant::now();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
        let machines = capi(&client, NAMESPACE, "Machine");
        let uids: Vec<String> = bounded(n, |i| {
            let (secrets, machines) = (secrets.clone(), machines.clone());
            async move {
                secrets
                    .create(&PostParams::default(), &bootstrap_secret(i))
                    .await
                    .expect("creating a Secret");
                let m = machines
                    .create(&PostParams::default(), &machine(i))
                    .await
                    .expect("creating a Machine");
                m.uid().expect("a Machine's UID")
            }
        })
        .await;
        println!(
            "created {n} Secrets + {n} Machines in {:.2} s ({IN_FLIGHT} in flight)",
            started.elapsed().as_secs_f64()
        );

        // Watch our kind; count provisioned machines as they come.
        let api: Api<LibvirtMachine> = Api::namespaced(client.clone(), NAMESPACE);
        let (done_tx, mut done_rx) = tokio::sync::watch::channel(0usize);
        let watch_api = api.clone();
        let watch = tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut stream = Box::pin(watcher(watch_api, watcher::Config::default()));
            while let Some(event) = stream.next().await {
                let objects: Vec<LibvirtMachine> = match event {
                    Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) => vec![m],
                    _ => continue,
                };
                for m in objects {
                    if provisioned(&m) && seen.insert(m.name_any()) {
                        let _ = done_tx.send(seen.len());
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;

        let writes_before = apiserver_writes(&bed);
        let (machine_reconciles_before, cluster_reconciles_before) = reconciles(metrics);
        let t0 = Instant::now();
        let uids = Arc::new(uids);
        bounded(n, |i| {
            let (api, uids) = (api.clone(), uids.clone());
            async move {
                api.create(&PostParams::default(), &libvirt_machine(i, &uids[i]))
                    .await
                    .expect("creating a LibvirtMachine");
            }
        })
        .await;
        let created = t0.elapsed();
        println!(
            "created {n} LibvirtMachines in {:.2} s ({IN_FLIGHT} in flight); {} provisioned by then",
            created.as_secs_f64(),
            *done_rx.borrow()
        );
        let mut peak_rss = 0;
        let deadline = Instant::now() + WAIT;
        let mut last_print = Instant::now();
        loop {
            let count = *done_rx.borrow_and_update();
            peak_rss = peak_rss.max(status_kib(pid, "VmRSS:"));
            if count >= n {
                break;
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                println!("  {:>5.1} s: {count} provisioned", t0.elapsed().as_secs_f64());
                last_print = Instant::now();
            }
            if Instant::now() > deadline {
                let list = api.list(&ListParams::default()).await.expect("listing");
                for m in list.items.iter().filter(|m| !provisioned(m)).take(5) {
                    println!(
                        "not provisioned: {} finalizers {:?} spec {} status {}",
                        m.name_any(),
                        m.finalizers(),
                        serde_json::to_string(&m.spec).unwrap_or_default(),
                        serde_json::to_string(&m.status).unwrap_or_default()
                    );
                }
                println!("only {count} of {n} provisioned after {WAIT:?}");
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), done_rx.changed()).await;
        }
        let wall = t0.elapsed();
        let writes_done = apiserver_writes(&bed);
        let (machine_reconciles, cluster_reconciles) = reconciles(metrics);
        let hwm = status_kib(pid, "VmHWM:");
        let threads = status_kib(pid, "Threads:");
        println!(
            "all {n} provisioned {:.2} s after the first LibvirtMachine create ({:.2} s after the last)",
            wall.as_secs_f64(),
            (wall - created).as_secs_f64()
        );
        let machine_rec = machine_reconciles - machine_reconciles_before;
        let cluster_rec = cluster_reconciles - cluster_reconciles_before;
        if machine_rec + cluster_rec > 0.0 {
            println!(
                "reconciles: {machine_rec:.0} LibvirtMachine + {cluster_rec:.0} LibvirtCluster = {:.0}/s ({:.2} per machine)",
                (machine_rec + cluster_rec) / wall.as_secs_f64(),
                machine_rec / n as f64
            );
        } else {
            println!("reconciles: n/a (the manager's capl_reconcile_total stays at 0: the controllers do not record reconciles yet)");
        }
        let bench_creates = [(("libvirtmachines", "", "POST"), n as f64)];
        print_writes(
            "API server writes, first create → all provisioned:",
            &delta(&writes_before, &writes_done),
            n,
            &bench_creates,
        );
        // Anything still written once everything is provisioned.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let writes_settled = apiserver_writes(&bed);
        print_writes(
            "API server writes, first create → 10 s after all provisioned:",
            &delta(&writes_before, &writes_settled),
            n,
            &bench_creates,
        );
        // Who wrote our objects (field managers), to attribute the writes.
        let list = api.list(&ListParams::default()).await.expect("listing");
        let mut managers = BTreeMap::<String, usize>::new();
        for m in &list.items {
            for f in m.managed_fields() {
                let key = format!(
                    "{}/{}{}",
                    f.manager.as_deref().unwrap_or("?"),
                    f.operation.as_deref().unwrap_or("?"),
                    f.subresource
                        .as_deref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default()
                );
                *managers.entry(key).or_default() += 1;
            }
        }
        println!("manager threads at the end of the run: {threads}");
        // Where the libvirt time went (the manager's own histogram, by operation).
        let text = http_get(metrics, "/metrics");
        let sums = samples(&text, "capl_libvirt_call_duration_seconds_sum");
        for (labels, count) in samples(&text, "capl_libvirt_call_duration_seconds_count") {
            let sum = sums
                .iter()
                .find(|(l, _)| *l == labels)
                .map_or(0.0, |(_, s)| *s);
            println!(
                "libvirt calls {:<60} {count:>6.0} calls, {sum:>7.2} s in all (permit wait included)",
                labels.get("op").map(String::as_str).unwrap_or("?")
            );
        }
        println!("field managers on the LibvirtMachines (objects carrying each): {managers:?}");
        println!(
            "manager RSS: idle {idle_rss} KiB ({:.1} MiB), peak during the run {peak_rss} KiB ({:.1} MiB), VmHWM {hwm} KiB ({:.1} MiB), now {} KiB",
            idle_rss as f64 / 1024.0,
            peak_rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            status_kib(pid, "VmRSS:")
        );
        watch.abort();
    });
    // What of that is the in-process test driver's state (a real host keeps it in libvirtd).
    let out = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .args(["--test-driver-state", &n.to_string()])
        .output()
        .expect("measuring the test driver's state");
    let share = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    println!(
        "of which the in-process test driver's state for {n} machines (measured apart: RSS growth while \
         the provider's provisioning code makes them, sequentially, no seed volume): {share} KiB"
    );
    manager.stop(Duration::from_secs(10));
    let _ = std::fs::copy(dir.join("manager.log"), LOG_COPY);
    println!("manager log: {LOG_COPY}");
    bed.shutdown();
}
