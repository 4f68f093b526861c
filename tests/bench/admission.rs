//! Admission benchmark: the release `manager` serving its webhooks over TLS on loopback, driven by
//! keep-alive HTTP/1.1 connections at fixed rates and at saturation. Prints throughput, latency
//! percentiles (send to last response byte) and the manager's resident memory.
//!
//! `cargo bench --bench admission` (starts the test bed's etcd + kube-apiserver, which the manager
//! needs to start; admission itself never calls them). The last phase sends maximum-size UPDATE
//! reviews all at once and reports the manager's peak resident memory during that phase.
//!
//! `cargo test --all-targets` builds and runs this binary too (without `--bench`): it then only
//! prints a line and exits.

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use support::apiserver::free_port;

const PHASE: Duration = Duration::from_secs(10);

fn review_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3f7c3d4e-0000-4000-8000-000000000001",
            "kind": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "kind": "LibvirtMachine"},
            "resource": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "resource": "libvirtmachines"},
            "name": "worker-7d9f5-abcde",
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:capi-system:capi-manager"},
            "object": {
                "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
                "kind": "LibvirtMachine",
                "metadata": {
                    "name": "worker-7d9f5-abcde", "namespace": "default",
                    "labels": {"cluster.x-k8s.io/cluster-name": "prod", "cluster.x-k8s.io/deployment-name": "prod-md-0"},
                    "ownerReferences": [{"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine", "name": "prod-md-0-abcde", "uid": "0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c"}]
                },
                "spec": {
                    "vcpus": 4, "memoryMiB": 8192, "cpuMode": "host-passthrough", "firmware": "uefi",
                    "image": {"url": "https://images.example.com/ubuntu-24.04-kube-v1.36.3.qcow2", "checksum": {"type": "sha256", "value": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}, "format": "qcow2"},
                    "rootVolume": {"sizeGiB": 40, "pool": "fast-ssd"},
                    "dataVolumes": [{"name": "containerd", "sizeGiB": 100}],
                    "networkInterfaces": [{"name": "eth0", "network": "k8s", "model": "virtio"}, {"name": "eth1", "bridge": "br-storage", "macAddress": "52:54:00:12:34:56", "model": "virtio"}],
                    "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@example"]
                }
            },
            "dryRun": false
        }
    }))
    .expect("review JSON")
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16, tls: Arc<rustls::ClientConfig>) -> Sender {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect("127.0.0.1".try_into().expect("name"), tcp)
        .await
        .expect("TLS");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

async fn send(sender: &mut Sender, path: &str, body: &Bytes) -> Duration {
    let request = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "127.0.0.1")
        .body(Full::new(body.clone()))
        .expect("request");
    let start = Instant::now();
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert!(
        status.is_success() && bytes.windows(14).any(|w| w == b"\"allowed\":true"),
        "unexpected answer {status}"
    );
    start.elapsed()
}

struct Outcome {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// `connections` keep-alive connections; each sends at `rate / connections` per second, or as
/// fast as it can when `rate` is `None`.
async fn run(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    path: &'static str,
    rate: Option<u32>,
    connections: u32,
) -> Outcome {
    let body = Bytes::from(review_body());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (tls, body) = (tls.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(port, tls).await;
            let mut latencies = Vec::new();
            let interval =
                rate.map(|r| Duration::from_secs_f64(f64::from(connections) / f64::from(r)));
            // Stagger the connections' schedules across one interval.
            let offset = interval.map_or(Duration::ZERO, |i| {
                i.mul_f64(f64::from(c) / f64::from(connections))
            });
            let begin = tokio::time::Instant::now() + offset;
            let mut k: u32 = 0;
            while begin.elapsed() < PHASE {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(begin + interval * k).await;
                }
                latencies.push(send(&mut sender, path, &body).await);
                k += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("load task"));
    }
    Outcome {
        latencies,
        elapsed: start.elapsed(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32, field: &str) -> u64 {
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

fn report(label: &str, outcome: &mut Outcome, pid: u32) {
    outcome.latencies.sort();
    let n = outcome.latencies.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<28} {n:>8} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9}",
        n as f64 / outcome.elapsed.as_secs_f64(),
        us(percentile(&outcome.latencies, 0.50)),
        us(percentile(&outcome.latencies, 0.90)),
        us(percentile(&outcome.latencies, 0.99)),
        us(*outcome.latencies.last().expect("samples")),
        rss_kib(pid, "VmRSS:"),
    );
}

/// An UPDATE review of `MAX_BODY_BYTES` at most whose object and old object each carry ~1.6 MiB
/// of small annotations: the shape that costs the most memory per byte to decode.
fn max_size_review() -> Vec<u8> {
    let mut object = serde_json::from_slice::<serde_json::Value>(&review_body())
        .expect("review")["request"]["object"]
        .clone();
    let limit = capl::webhook::server::MAX_BODY_BYTES;
    // `"a0000000":"",` is 14 bytes; two objects plus the envelope must stay under the limit.
    let entries = (limit - 64 * 1024) / 2 / 14;
    let annotations: serde_json::Map<String, serde_json::Value> = (0..entries)
        .map(|i| (format!("a{i:07}"), json!("")))
        .collect();
    object["metadata"]["annotations"] = serde_json::Value::Object(annotations);
    let mut review: serde_json::Value = serde_json::from_slice(&review_body()).expect("review");
    review["request"]["operation"] = json!("UPDATE");
    review["request"]["oldObject"] = object.clone();
    review["request"]["object"] = object;
    let body = serde_json::to_vec(&review).expect("review JSON");
    assert!(body.len() <= limit, "{} > {limit}", body.len());
    body
}

/// Resets the manager's peak RSS (VmHWM) to its current RSS.
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// `count` maximum-size reviews on `count` connections at once; prints status counts, latencies
/// and the manager's peak RSS during the phase.
async fn heavy(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    path: &'static str,
    count: usize,
    pid: u32,
) {
    let body = Bytes::from(max_size_review());
    let mut senders = Vec::new();
    for _ in 0..count {
        senders.push(connect(port, tls.clone()).await);
    }
    reset_peak_rss(pid);
    let before = rss_kib(pid, "VmRSS:");
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let body = body.clone();
            tokio::spawn(async move {
                let request = hyper::Request::post(path)
                    .header("content-type", "application/json")
                    .header("host", "127.0.0.1")
                    .body(Full::new(body))
                    .expect("request");
                let sent = Instant::now();
                let response = sender.send_request(request).await.expect("response");
                let status = response.status();
                let _ = response.into_body().collect().await;
                (status, sent.elapsed())
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut latencies = Vec::new();
    for task in tasks {
        let (status, latency) = task.await.expect("heavy task");
        *statuses.entry(status.as_u16()).or_default() += 1;
        latencies.push(latency);
    }
    latencies.sort();
    println!(
        "{count} x {} KiB {path}: {:.1} s in all, p50 {} ms, max {} ms, statuses {statuses:?}; RSS {before} KiB before, peak {} KiB",
        body.len() / 1024,
        start.elapsed().as_secs_f64(),
        percentile(&latencies, 0.5).as_millis(),
        latencies.last().expect("samples").as_millis(),
        rss_kib(pid, "VmHWM:"),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("admission benchmark: run it with `cargo bench --bench admission`");
        return;
    }
    // `cargo bench --bench admission -- <word>` runs only the phases whose label has <word>.
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with("--"));
    let wanted = |label: &str| filter.as_deref().is_none_or(|word| label.contains(word));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bed = support::TestBed::start().expect("test bed");
    let dir = bed.test_dir("bench");
    let plane_guard = bed.plane();
    let plane = plane_guard.as_ref().expect("control plane");
    let cert_dir = dir.join("certs");
    plane
        .ca
        .server("capl-webhook", &["127.0.0.1"])
        .expect("cert")
        .write(&cert_dir, "tls.crt", "tls.key")
        .expect("write cert");
    let port = free_port().expect("port");
    let (mut manager, _) = bed.start_manager(
        "bench",
        env!("CARGO_BIN_EXE_manager"),
        &[
            "--webhook-host=127.0.0.1".into(),
            format!("--webhook-port={port}"),
            format!("--webhook-cert-dir={}", cert_dir.display()),
        ],
    );
    let pid = manager.pid();
    let idle_rss = rss_kib(pid, "VmRSS:");

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(plane.ca.cert_pem.as_bytes()) {
        roots.add(cert.expect("CA")).expect("CA");
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let validate = "/validate-infrastructure-cluster-x-k8s-io-v1alpha1-libvirtmachine";
    let mutate = "/mutate-infrastructure-cluster-x-k8s-io-v1alpha1-libvirtmachine";
    println!(
        "manager pid {pid}, idle RSS {idle_rss} KiB; {} s per phase; LibvirtMachine CREATE review of {} bytes",
        PHASE.as_secs(),
        review_body().len()
    );
    println!(
        "{:<28} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "phase", "requests", "req/s", "p50 µs", "p90 µs", "p99 µs", "max µs", "RSS KiB"
    );
    runtime.block_on(async {
        // Warm-up (connection set-up, allocator).
        let _ = run(port, tls.clone(), validate, Some(500), 2).await;
        for (label, path, rate, connections) in [
            ("validate @ 1000/s, 4 conns", validate, Some(1000), 4),
            ("mutate   @ 1000/s, 4 conns", mutate, Some(1000), 4),
            ("validate @ 5000/s, 16 conns", validate, Some(5000), 16),
            ("validate saturation, 16 conns", validate, None, 16),
            ("mutate   saturation, 16 conns", mutate, None, 16),
        ] {
            if !wanted(label) {
                continue;
            }
            let mut outcome = run(port, tls.clone(), path, rate, connections).await;
            report(label, &mut outcome, pid);
        }
    });
    println!("manager peak RSS (VmHWM): {} KiB", rss_kib(pid, "VmHWM:"));
    runtime.block_on(async {
        for (label, path, count) in [
            ("heavy mutate x1", mutate, 1),
            ("heavy mutate x32", mutate, 32),
            ("heavy validate x32", validate, 32),
        ] {
            if wanted(label) {
                heavy(port, tls.clone(), path, count, pid).await;
            }
        }
    });
    manager.stop(Duration::from_secs(5));
    drop(plane_guard);
    bed.shutdown();
}
