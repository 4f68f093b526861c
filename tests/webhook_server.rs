//! The webhook server against slow, greedy and odd clients: the real `manager` binary serving
//! TLS on loopback (slow headers, connection floods, socket options, maximum-size reviews,
//! client-triggerable log lines), and the command line's health probe default.

mod support;

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use capl::webhook::server::{HEADER_READ_TIMEOUT, MAX_BODY_BYTES, MAX_CONNECTIONS};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use support::apiserver::free_port;
use support::process::Proc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const VALIDATE: &str = "/validate-infrastructure-cluster-x-k8s-io-v1alpha1-libvirtmachine";
const MUTATE: &str = "/mutate-infrastructure-cluster-x-k8s-io-v1alpha1-libvirtmachine";

/// Tests that load the server (write) run alone: their counts would mix, and while they hold its
/// connection slots other tests' connections would wait (read).
static LOAD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The manager under test.
struct Manager {
    port: u16,
    pid: u32,
    log: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    _proc: Proc,
}

/// The manager shared by this binary's tests.
fn manager() -> &'static Manager {
    static MANAGER: OnceLock<Manager> = OnceLock::new();
    MANAGER.get_or_init(|| start_manager("webhook-server"))
}

/// Starts a manager serving its webhooks on 127.0.0.1 with a certificate of the bed's CA.
fn start_manager(name: &str) -> Manager {
    let bed = support::shared();
    let cert_dir = bed.test_dir(name).join("certs");
    let plane = bed.plane();
    let plane = plane.as_ref().expect("control plane");
    plane
        .ca
        .server("capl-webhook", &["127.0.0.1", "localhost"])
        .expect("serving cert")
        .write(&cert_dir, "tls.crt", "tls.key")
        .expect("writing the cert");
    let port = free_port().expect("port");
    let (proc, _) = bed.start_manager(
        name,
        env!("CARGO_BIN_EXE_manager"),
        &[
            "--webhook-host=127.0.0.1".into(),
            format!("--webhook-port={port}"),
            format!("--webhook-cert-dir={}", cert_dir.display()),
        ],
    );
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(plane.ca.cert_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Manager {
        port,
        pid: proc.pid(),
        log: proc.log().to_owned(),
        tls: Arc::new(tls),
        _proc: proc,
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(manager: &Manager) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", manager.port))
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(manager.tls.clone())
        .connect("127.0.0.1".try_into().expect("name"), tcp)
        .await
        .expect("TLS handshake")
}

fn review(operation: &str, annotations: Value) -> Vec<u8> {
    let object = json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": "m", "namespace": "default", "annotations": annotations},
        "spec": {
            "vcpus": 2,
            "memoryMiB": 4096,
            "image": {"url": "https://images.example.com/debian.qcow2", "checksum": {"type": "sha256", "value": "a".repeat(64)}},
            "rootVolume": {"sizeGiB": 20},
            "networkInterfaces": [{"name": "eth0", "network": "default"}],
        },
    });
    let old = (operation == "UPDATE").then(|| object.clone());
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3f7c3d4e-0000-4000-8000-000000000001",
            "kind": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "kind": "LibvirtMachine"},
            "resource": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "resource": "libvirtmachines"},
            "name": "m",
            "namespace": "default",
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": object,
            "oldObject": old,
        }
    }))
    .expect("review JSON")
}

/// An UPDATE review just under `MAX_BODY_BYTES`: ~1.7 MiB of small annotations in both objects.
fn max_size_review() -> Vec<u8> {
    let entries = (MAX_BODY_BYTES - 64 * 1024) / 2 / 14;
    let annotations: serde_json::Map<String, Value> = (0..entries)
        .map(|i| (format!("a{i:07}"), json!("")))
        .collect();
    let body = review("UPDATE", Value::Object(annotations));
    assert!(body.len() <= MAX_BODY_BYTES);
    body
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn http1(manager: &Manager) -> Sender {
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls_connect(manager).await))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

/// Posts `body` to `path`; returns the status and the answer's text.
async fn post(sender: &mut Sender, path: &str, body: Vec<u8>) -> (u16, String) {
    let request = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// One ordinary admission on a fresh connection, allowed.
async fn admission_succeeds(manager: &Manager) {
    let mut sender = http1(manager).await;
    let (status, text) = post(&mut sender, VALIDATE, review("CREATE", json!({}))).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"allowed\":true"), "{text}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- slow clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_trickling_their_headers_are_closed_and_others_are_served() {
    let manager = manager();
    let _load = LOAD.write().await;
    let head = format!(
        "POST {VALIDATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: {}",
        "x".repeat(64)
    );
    let deadline = HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let mut slow = Vec::new();
    for _ in 0..200 {
        let tls = tls_connect(manager).await;
        let head = head.clone().into_bytes();
        // Each connection writes one byte of its request head per second; returns how long the
        // server kept it open (None: still open at the deadline).
        slow.push(tokio::spawn(async move {
            let opened = Instant::now();
            let (mut reader, mut writer) = tokio::io::split(tls);
            let mut buf = [0u8; 512];
            let mut next = 0;
            loop {
                tokio::select! {
                    read = reader.read(&mut buf) => {
                        if matches!(read, Ok(0) | Err(_)) {
                            return Some(opened.elapsed());
                        }
                    }
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        if opened.elapsed() > deadline {
                            return None;
                        }
                        let byte = [head[next % head.len()]];
                        next += 1;
                        if writer.write_all(&byte).await.is_err() || writer.flush().await.is_err() {
                            return Some(opened.elapsed());
                        }
                    }
                }
            }
        }));
    }
    // Meanwhile, ordinary requests are served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    admission_succeeds(manager).await;

    let mut open_for = Vec::new();
    for task in slow {
        open_for.push(task.await.expect("slow client"));
    }
    let still_open = open_for.iter().filter(|held| held.is_none()).count();
    assert_eq!(
        still_open, 0,
        "{still_open} of 200 slow connections still open after {deadline:?}"
    );
    let longest = open_for.iter().flatten().max().copied().unwrap_or_default();
    println!("200 slow connections: the last closed after {longest:?}");
    assert!(
        longest <= HEADER_READ_TIMEOUT + Duration::from_secs(3),
        "a slow connection stayed open {longest:?}"
    );
    admission_succeeds(manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_stays_under_the_cap_and_service_resumes() {
    let manager = manager();
    let _load = LOAD.write().await;
    let baseline = open_fds(manager.pid);
    let mut flood = Vec::new();
    for i in 0..MAX_CONNECTIONS + 150 {
        // In bursts the server can take in (a listen queue that overflows loses connections).
        if i % 25 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flood.push(
            TcpStream::connect(("127.0.0.1", manager.port))
                .await
                .expect("connect"),
        );
    }
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(open_fds(manager.pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("connection flood: {peak} descriptors at the peak, {baseline} before");
    assert!(
        peak <= baseline + MAX_CONNECTIONS + 8,
        "the manager held {peak} descriptors ({baseline} before the flood, cap {MAX_CONNECTIONS})"
    );
    assert!(
        peak >= baseline + MAX_CONNECTIONS / 2,
        "the flood did not reach the server ({peak} descriptors, {baseline} before)"
    );
    drop(flood);
    let start = Instant::now();
    loop {
        let served =
            tokio::time::timeout(Duration::from_secs(3), admission_succeeds(manager)).await;
        if served.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no admission served after the flood"
        );
    }
    let mut settled = open_fds(manager.pid);
    for _ in 0..50 {
        if settled <= baseline + 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        settled = open_fds(manager.pid);
    }
    assert!(
        settled <= baseline + 4,
        "{settled} descriptors after the flood, {baseline} before"
    );
}

/// Duplicates the manager's descriptors into this process (pidfd_getfd) and returns the TCP
/// socket whose peer is `peer`.
fn manager_socket(pid: u32, peer: std::net::SocketAddr) -> std::net::TcpStream {
    // SAFETY: plain syscalls; the returned descriptors are owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_open returned a fresh descriptor.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(target_fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        use std::os::fd::AsRawFd as _;
        // SAFETY: as above.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: pidfd_getfd returned a fresh descriptor of ours.
        let stream = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        if stream.peer_addr().is_ok_and(|addr| addr == peer) {
            return stream;
        }
    }
    panic!("no socket of the manager is connected to {peer}");
}

#[tokio::test]
async fn accepted_sockets_have_nodelay_and_keepalive() {
    let manager = manager();
    let _load = LOAD.read().await;
    let tls = tls_connect(manager).await;
    let local = tls.get_ref().0.local_addr().expect("local address");
    let server_side = manager_socket(manager.pid, local);
    assert!(
        server_side.nodelay().expect("TCP_NODELAY"),
        "TCP_NODELAY is off"
    );
    let socket = socket2::SockRef::from(&server_side);
    assert!(
        socket.keepalive().expect("SO_KEEPALIVE"),
        "TCP keepalive is off"
    );
    assert_eq!(
        socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
        capl::webhook::server::TCP_KEEPALIVE_TIME
    );
}

#[tokio::test]
async fn http2_is_served_when_the_client_offers_it() {
    let manager = manager();
    let _load = LOAD.read().await;
    let mut config = (*manager.tls).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", manager.port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().expect("name"), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = hyper::Request::post(format!("https://127.0.0.1{VALIDATE}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(review("CREATE", json!({})))))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert!(String::from_utf8_lossy(&bytes).contains("\"allowed\":true"));
    }
}

#[tokio::test]
async fn on_sigterm_in_flight_requests_finish_and_idle_connections_do_not_hold_the_exit() {
    let manager = tokio::task::spawn_blocking(|| start_manager("webhook-server-stop"))
        .await
        .expect("manager");
    let mut idle = http1(&manager).await;
    let (status, _) = post(&mut idle, VALIDATE, review("CREATE", json!({}))).await;
    assert_eq!(status, 200);
    let body = review("CREATE", json!({}));
    let (first, rest) = body.split_at(body.len() / 2);
    let mut in_flight = tls_connect(&manager).await;
    let head = format!(
        "POST {VALIDATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.expect("head");
    in_flight.write_all(first).await.expect("first half");
    in_flight.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pid = libc::pid_t::try_from(manager.pid).expect("pid");
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    in_flight.write_all(rest).await.expect("second half");
    in_flight.flush().await.expect("flush");
    let mut answer = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        in_flight.read_to_string(&mut answer),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"allowed\":true"), "{answer}");
    // An idle connection holding the exit would keep the manager for CLOSE_GRACE (10 s); the
    // controllers' own stop takes at most their STOP_GRACE (3 s) here, where no Cluster API CRDs
    // are installed and one of their watches never syncs.
    while support::process::pid_alive(pid) {
        assert!(
            stopped.elapsed() < Duration::from_secs(8),
            "the manager still runs {:?} after SIGTERM; its log:\n{}",
            stopped.elapsed(),
            std::fs::read_to_string(&manager.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(idle);
}

// ---------------------------------------------------------------- heavy requests

#[tokio::test]
async fn a_declared_body_over_the_limit_gets_413_before_it_is_sent() {
    let manager = manager();
    let _load = LOAD.read().await;
    let mut tls = tls_connect(manager).await;
    let head = format!(
        "POST {VALIDATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    tls.write_all(head.as_bytes()).await.expect("head");
    tls.flush().await.expect("flush");
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(3), tls.read_exact(&mut answer))
        .await
        .expect("an answer before the body")
        .expect("read");
    assert_eq!(&answer, b"HTTP/1.1 413");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_maximum_size_reviews_keeps_memory_bounded() {
    let manager = manager();
    let _load = LOAD.write().await;
    let body = max_size_review();
    let mut senders = Vec::new();
    for _ in 0..8 {
        senders.push(http1(manager).await);
    }
    // Reset the peak (VmHWM) to the current resident size.
    std::fs::write(format!("/proc/{}/clear_refs", manager.pid), "5").expect("clear_refs");
    let before = status_kib(manager.pid, "VmHWM:");
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let body = body.clone();
            tokio::spawn(async move { post(&mut sender, MUTATE, body).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("review").0);
    }
    let grown_mib = status_kib(manager.pid, "VmHWM:").saturating_sub(before) / 1024;
    println!("8 maximum-size reviews at once: peak RSS +{grown_mib} MiB, statuses {statuses:?}");
    assert!(
        statuses.iter().all(|status| [200, 503].contains(status)) && statuses.contains(&200),
        "{statuses:?}"
    );
    // One such review takes ~100 MiB to decode and answer; the budget admits two at once.
    assert!(
        grown_mib < 320,
        "8 reviews of {} KiB at once grew the manager by {grown_mib} MiB",
        body.len() / 1024
    );
}

// ---------------------------------------------------------------- logs

/// A TLS ClientHello naming `host` in its SNI extension (which rustls would never send for an IP).
fn client_hello(host: &str) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        u16::try_from(n).expect("u16").to_be_bytes()
    }
    let mut name = vec![0u8]; // host_name
    name.extend(u16be(host.len()));
    name.extend(host.as_bytes());
    let mut list = u16be(name.len()).to_vec();
    list.extend(name);
    let mut extensions = vec![0, 0]; // server_name
    extensions.extend(u16be(list.len()));
    extensions.extend(list);
    let mut hello = vec![3, 3]; // TLS 1.2
    hello.extend([7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend([0, 4, 0x13, 0x01, 0xc0, 0x2f]); // two cipher suites
    hello.extend([1, 0]); // null compression
    hello.extend(u16be(extensions.len()));
    hello.extend(extensions);
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&u32::try_from(hello.len()).expect("u32").to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16be(handshake.len()));
    record.extend(handshake);
    record
}

#[tokio::test]
async fn an_ip_address_sni_logs_nothing() {
    let manager = manager();
    let _load = LOAD.read().await;
    let logged_before = std::fs::read(&manager.log).expect("log").len();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(("127.0.0.1", manager.port))
            .await
            .expect("connect");
        tcp.write_all(&client_hello("127.0.0.1"))
            .await
            .expect("hello");
        let mut answer = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut answer)).await;
        assert!(
            matches!(read, Ok(Ok(1))),
            "the server did not answer the hello"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read(&manager.log).expect("log");
    let new = String::from_utf8_lossy(&log[logged_before..]);
    for line in new.lines() {
        assert!(
            !(line.contains("WARN") || line.contains("INFO") || line.contains("SNI")),
            "a client's handshake was logged: {line}"
        );
    }
}

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let manager = manager();
    let log = std::fs::read(&manager.log).expect("log");
    assert!(
        String::from_utf8_lossy(&log).contains("webhook server listening"),
        "the manager logged nothing"
    );
    assert!(!log.contains(&0x1b), "ANSI escape codes in the log file");
}

// ---------------------------------------------------------------- command line

#[test]
fn health_probes_bind_every_interface_by_default() {
    use clap::Parser as _;
    let parse = |args: &[&str]| {
        capl::config::Cli::try_parse_from(std::iter::once("manager").chain(args.iter().copied()))
            .map(|cli| cli.run.health_probe_bind_address.to_string())
    };
    assert_eq!(parse(&[]).expect("defaults"), "0.0.0.0:9440");
    for (flag, address) in [
        (":8081", "0.0.0.0:8081"),
        ("127.0.0.1:9440", "127.0.0.1:9440"),
        ("[::]:9440", "[::]:9440"),
    ] {
        let arg = format!("--health-probe-bind-address={flag}");
        assert_eq!(parse(&[&arg]).expect(flag), address);
    }
    for bad in ["9440", "localhost:9440", ":", ":http"] {
        let arg = format!("--health-probe-bind-address={bad}");
        assert!(parse(&[&arg]).is_err(), "{bad} accepted");
    }
}
