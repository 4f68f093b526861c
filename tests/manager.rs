//! The `manager` binary against the test bed: the main job on its embedded default.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use support::apiserver::free_port;
use support::capi::http_ok;
use support::process::poll;

/// The manager with the given libvirt URI and webhook port (0: no webhook server).
fn manager(
    bed: &support::TestBed,
    libvirt_uri: &str,
    health_port: u16,
    webhook_port: u16,
) -> Command {
    bed.install_provider_crds();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_manager"));
    cmd.arg(format!("--kubeconfig={}", bed.kubeconfig.display()))
        .arg(format!("--libvirt-uri={libvirt_uri}"))
        .arg("--allow-test-driver")
        .arg(format!(
            "--health-probe-bind-address=127.0.0.1:{health_port}"
        ))
        .arg(format!("--webhook-port={webhook_port}"))
        .arg("--metrics-bind-address=0");
    cmd
}

#[test]
fn manager_becomes_ready_on_the_bed_and_stops_on_sigterm() {
    let bed = support::shared();
    let (mut proc, port) = bed.start_manager(
        "manager",
        env!("CARGO_BIN_EXE_manager"),
        &[
            "--libvirt-uri=test:///default".into(),
            "--allow-test-driver".into(),
            "--webhook-port=0".into(),
            "--metrics-bind-address=0".into(),
        ],
    );
    let log = proc.log().to_owned();
    assert!(http_ok(port, "/healthz"));
    proc.stop(Duration::from_secs(10));
    let logged = std::fs::read_to_string(&log).expect("manager log");
    assert!(
        logged.contains("connected to the Kubernetes API"),
        "{logged}"
    );
    assert!(
        logged.contains("shutting down"),
        "stopped on SIGTERM: {logged}"
    );
}

#[test]
fn manager_refuses_to_start_without_a_webhook_certificate() {
    let bed = support::shared();
    let empty = bed.test_dir("no-certs");
    let out = manager(bed, "test:///default", free_port().expect("port"), 19443)
        .arg(format!("--webhook-cert-dir={}", empty.display()))
        .output()
        .expect("running the manager");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loading the webhook serving certificate") && stderr.contains("tls.crt"),
        "the error names the missing file: {stderr}"
    );
}

#[test]
fn manager_fails_clearly_on_an_unreachable_libvirt_host() {
    let bed = support::shared();
    let out = manager(
        bed,
        "qemu:///system?socket=/nonexistent/libvirt-sock",
        free_port().expect("port"),
        0,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .output()
    .expect("running the manager");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/libvirt-sock"),
        "the error names the URI: {stderr}"
    );
}

#[test]
fn manager_exits_when_its_webhook_port_is_taken() {
    let bed = support::shared();
    let certs = bed.test_dir("port-taken");
    {
        let plane = bed.plane();
        plane
            .as_ref()
            .expect("plane")
            .ca
            .server("capl-webhook", &["127.0.0.1"])
            .expect("cert")
            .write(&certs, "tls.crt", "tls.key")
            .expect("write");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = manager(bed, "test:///default", free_port().expect("port"), port)
        .arg("--webhook-host=127.0.0.1")
        .arg(format!("--webhook-cert-dir={}", certs.display()))
        .output()
        .expect("running the manager");
    assert!(
        !out.status.success(),
        "the manager kept running without its webhook server"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("webhook server failed") && stderr.contains("in use"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------- metrics, election, logs

/// `GET http://127.0.0.1:<port><path>`: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name{labels}` in a metrics text, 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn metrics_serve_every_family_and_count_admissions() {
    let bed = support::shared();
    let certs = bed.test_dir("metrics").join("certs");
    let ca_pem = {
        let plane = bed.plane();
        let plane = plane.as_ref().expect("plane");
        plane
            .ca
            .server("capl-webhook", &["127.0.0.1"])
            .expect("cert")
            .write(&certs, "tls.crt", "tls.key")
            .expect("write");
        plane.ca.cert_pem.clone()
    };
    let (metrics_port, webhook_port) = (free_port().expect("port"), free_port().expect("port"));
    let (_proc, health) = bed.start_manager(
        "metrics",
        env!("CARGO_BIN_EXE_manager"),
        &[
            "--allow-test-driver".into(),
            "--libvirt-uri=test:///default".into(),
            "--webhook-host=127.0.0.1".into(),
            format!("--webhook-port={webhook_port}"),
            format!("--webhook-cert-dir={}", certs.display()),
            format!("--metrics-bind-address=127.0.0.1:{metrics_port}"),
        ],
    );
    assert_eq!(http_get(health, "/readyz"), (200, "ok".to_owned()));

    let (status, before) = http_get(metrics_port, "/metrics");
    assert_eq!(status, 200);
    for family in [
        "# TYPE capl_reconcile counter",
        r#"capl_reconcile_total{kind="LibvirtMachine",result="success"} 0"#,
        r#"capl_reconcile_total{kind="LibvirtCluster",result="error"} 0"#,
        "# TYPE capl_reconcile_duration_seconds histogram",
        r#"capl_reconcile_duration_seconds_count{kind="LibvirtMachine"} 0"#,
        "# TYPE capl_libvirt_call_duration_seconds histogram",
        r#"capl_libvirt_call_duration_seconds_count{op="manager::probe_libvirt",host="test"} 1"#,
        "# TYPE capl_image_downloads counter",
        r#"capl_image_downloads_total{result="success"} 0"#,
    ] {
        assert!(before.contains(family), "{family} missing:\n{before}");
    }

    // One admission through the real apiserver: a server-side dry-run create is reviewed by
    // the mutating and the validating webhook.
    bed.install_provider_crds();
    let target = capl::webhook::configs::Target::Url(format!("https://127.0.0.1:{webhook_port}"));
    let manifests =
        capl::webhook::configs::render(&target, Some(ca_pem.as_bytes())).expect("render");
    let out = bed.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifests);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let machine = json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": "counted", "namespace": "default"},
        "spec": {
            "vcpus": 2,
            "memoryMiB": 4096,
            "image": {"url": "https://images.example.com/debian.qcow2", "checksum": {"type": "sha256", "value": "a".repeat(64)}},
            "rootVolume": {"sizeGiB": 20},
            "networkInterfaces": [{"name": "eth0", "network": "default"}],
        },
    });
    let applied = bed.kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &machine.to_string(),
    );
    // Remove the webhooks before asserting: they point at this test's manager only.
    let removed = bed.kubectl_stdin(&["delete", "--ignore-not-found", "-f", "-"], &manifests);
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    assert!(removed.status.success(), "{}", text(&removed.stderr));

    let (_, after) = http_get(metrics_port, "/metrics");
    assert!(after.contains("# TYPE capl_admission counter"), "{after}");
    let series = r#"capl_admission_total{kind="LibvirtMachine",operation="CREATE",allowed="true"}"#;
    assert!(
        sample(&after, series) >= sample(&before, series) + 2.0,
        "mutate + validate counted:\n{after}"
    );

    // One reconcile: a LibvirtMachine without its Machine waits quietly (a success).
    let mut reconciled = machine.clone();
    reconciled["metadata"]["name"] = json!("reconciled");
    let created = bed.kubectl_stdin(&["create", "-f", "-"], &reconciled.to_string());
    assert!(created.status.success(), "{}", text(&created.stderr));
    let series = r#"capl_reconcile_total{kind="LibvirtMachine",result="success"}"#;
    let counted = poll(
        "a counted reconcile",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let (_, now) = http_get(metrics_port, "/metrics");
            let count = r#"capl_reconcile_duration_seconds_count{kind="LibvirtMachine"}"#;
            Ok((sample(&now, series) >= 1.0 && sample(&now, count) >= 1.0).then_some(()))
        },
    );
    bed.kubectl(&[
        "delete",
        "libvirtmachine",
        "reconciled",
        "-n",
        "default",
        "--wait=false",
    ]);
    counted.expect("the reconcile is counted");
}

fn lease_holder(bed: &support::TestBed, name: &str) -> String {
    let out = bed.kubectl(&[
        "get",
        "lease",
        "-n",
        "default",
        name,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    if out.status.success() {
        text(&out.stdout).trim().to_owned()
    } else {
        String::new()
    }
}

/// The identity a manager campaigns as, from its log.
fn identity_in(log: &Path) -> Option<String> {
    let logged = std::fs::read_to_string(log).ok()?;
    let line = logged
        .lines()
        .find(|line| line.contains("campaigning for leadership"))?;
    let rest = line.split("identity=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

fn count_in(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .map(|logged| logged.matches(needle).count())
        .unwrap_or(0)
}

#[test]
fn managers_elect_one_leader_take_over_and_exit_when_the_lease_is_lost() {
    const LEASE: &str = "capl-election-test";
    const LEASE_DURATION: Duration = Duration::from_secs(2);
    const RETRY: Duration = Duration::from_millis(250);
    let bed = support::shared();
    let start = |name: &str| {
        bed.start_manager(
            name,
            env!("CARGO_BIN_EXE_manager"),
            &[
                "--webhook-port=0".into(),
                "--metrics-bind-address=0".into(),
                "--leader-elect".into(),
                format!("--leader-election-id={LEASE}"),
                "--leader-election-namespace=default".into(),
                "--leader-elect-lease-duration=2s".into(),
                "--leader-elect-renew-deadline=1500ms".into(),
                "--leader-elect-retry-period=250ms".into(),
            ],
        )
    };
    // Both become ready (webhooks serve on every replica), leading or not.
    let (mut a, _) = start("election-a");
    let (mut b, _) = start("election-b");
    let ids = [a.log(), b.log()].map(|log| {
        poll("the campaign", Duration::from_secs(10), RETRY, || {
            Ok(identity_in(log))
        })
        .expect("identity")
    });
    assert_ne!(ids[0], ids[1]);
    let holder = poll("a leader", Duration::from_secs(10), RETRY, || {
        let holder = lease_holder(bed, LEASE);
        Ok((!holder.is_empty()).then_some(holder))
    })
    .expect("leader");
    // Settle for a few renewals: still exactly one leader.
    std::thread::sleep(LEASE_DURATION);
    assert_eq!(lease_holder(bed, LEASE), holder);
    let leaders = [a.log(), b.log()].map(|log| count_in(log, "became the leader"));
    assert_eq!(leaders.iter().sum::<usize>(), 1, "{leaders:?}");
    let (leader, follower, follower_id) = if holder == ids[0] {
        assert_eq!(leaders, [1, 0]);
        (&mut a, &mut b, &ids[1])
    } else {
        assert_eq!(holder, ids[1]);
        assert_eq!(leaders, [0, 1]);
        (&mut b, &mut a, &ids[0])
    };
    assert_eq!(count_in(leader.log(), "starting the controllers"), 1);
    assert_eq!(count_in(follower.log(), "starting the controllers"), 0);

    // The leader dies without releasing: the follower takes over once the Lease expires.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(leader.pid() as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    poll(
        "the takeover",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok((lease_holder(bed, LEASE) == *follower_id).then_some(())),
    )
    .expect("takeover");
    let takeover = killed.elapsed();
    eprintln!("takeover after kill -9: {takeover:?}");
    assert!(
        takeover <= LEASE_DURATION + 2 * RETRY + Duration::from_millis(500),
        "took {takeover:?}"
    );
    poll(
        "the new leader's controllers",
        Duration::from_secs(5),
        RETRY,
        || Ok((count_in(follower.log(), "starting the controllers") == 1).then_some(())),
    )
    .expect("controllers on the new leader");

    // Another identity takes the Lease: the new leader stops leading and exits with an error.
    let out = bed.kubectl(&[
        "patch",
        "lease",
        "-n",
        "default",
        LEASE,
        "--type=merge",
        "-p",
        r#"{"spec":{"holderIdentity":"someone-else","leaseDurationSeconds":30}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exited = poll(
        "the exit on a lost lease",
        Duration::from_secs(10),
        RETRY,
        || Ok(follower.check_running().err()),
    )
    .expect("exit");
    let logged = std::fs::read_to_string(follower.log()).expect("log");
    assert!(
        logged.contains("leader election lost"),
        "{exited:#}\n{logged}"
    );
    let _ = bed.kubectl(&["delete", "lease", "-n", "default", LEASE]);
}

#[test]
fn a_stopping_leader_releases_its_lease() {
    const LEASE: &str = "capl-release-test";
    let bed = support::shared();
    let (mut proc, _) = bed.start_manager(
        "release",
        env!("CARGO_BIN_EXE_manager"),
        &[
            "--webhook-port=0".into(),
            "--metrics-bind-address=0".into(),
            "--leader-elect".into(),
            format!("--leader-election-id={LEASE}"),
            "--leader-election-namespace=default".into(),
            "--leader-elect-retry-period=200ms".into(),
        ],
    );
    poll(
        "the lease",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok((!lease_holder(bed, LEASE).is_empty()).then_some(())),
    )
    .expect("leader");
    proc.stop(Duration::from_secs(10));
    assert_eq!(lease_holder(bed, LEASE), "", "released on SIGTERM");
    let _ = bed.kubectl(&["delete", "lease", "-n", "default", LEASE]);
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let bed = support::shared();
    let (mut proc, _) = bed.start_manager(
        "json-logs",
        env!("CARGO_BIN_EXE_manager"),
        &[
            "--webhook-port=0".into(),
            "--metrics-bind-address=0".into(),
            "--log-format=json".into(),
        ],
    );
    proc.stop(Duration::from_secs(10));
    let logged = std::fs::read_to_string(proc.log()).expect("log");
    let lines: Vec<Value> = logged
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines.len() >= 3, "{logged}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "connected to the Kubernetes API"),
        "{logged}"
    );
}

#[test]
fn json_logs_stay_json_when_the_manager_fails() {
    let bed = support::shared();
    let empty = bed.test_dir("json-failure");
    let out = manager(bed, "test:///default", free_port().expect("port"), 19444)
        .arg(format!("--webhook-cert-dir={}", empty.display()))
        .arg("--log-format=json")
        .output()
        .expect("running the manager");
    assert!(!out.status.success());
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let lines: Vec<Value> = all
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{all}");
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("loading the webhook serving certificate") && error.contains("tls.crt"),
        "{all}"
    );
}

#[test]
fn a_trace_log_holds_no_credentials() {
    let bed = support::shared();
    bed.install_provider_crds();
    let dir = bed.test_dir("no-secrets");
    // The bed's admin kubeconfig, with the key and certificate inline and a bearer token added
    // (the apiserver authenticates the certificate; the token is sent all the same).
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&bed.kubeconfig).expect("kubeconfig"))
            .expect("yaml");
    let user = &admin["users"][0]["user"];
    let read = |key: &str| std::fs::read(user[key].as_str().expect(key)).expect(key);
    let (cert, key) = (read("client-certificate"), read("client-key"));
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    const TOKEN: &str = "capl-test-token-0123456789abcdef";
    let mut config = admin.clone();
    config["users"][0]["user"] = serde_yaml::to_value(json!({
        "client-certificate-data": b64(&cert),
        "client-key-data": b64(&key),
        "token": TOKEN,
    }))
    .expect("user");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, serde_yaml::to_string(&config).expect("yaml")).expect("write");

    let health = free_port().expect("port");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_manager"));
    cmd.env("RUST_LOG", "trace")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--health-probe-bind-address=127.0.0.1:{health}"))
        .args([
            "--webhook-port=0",
            "--metrics-bind-address=0",
            "--leader-elect",
            "--leader-election-id=capl-secrets-test",
            "--leader-election-namespace=default",
            "--leader-elect-retry-period=200ms",
        ]);
    let log = dir.join("manager.log");
    let mut proc = support::process::Proc::spawn(
        "manager",
        cmd,
        &log,
        support::process::Lifetime::TestProcess,
    )
    .expect("spawn");
    poll(
        "ready and leading",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            proc.check_running()?;
            Ok(
                (http_ok(health, "/readyz") && count_in(&log, "became the leader") == 1)
                    .then_some(()),
            )
        },
    )
    .expect("ready");
    std::thread::sleep(Duration::from_secs(1));
    proc.stop(Duration::from_secs(10));
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("TRACE") || logged.contains("DEBUG"),
        "a verbose log"
    );
    let pem_lines = |pem: &[u8]| -> Vec<String> {
        text(pem)
            .lines()
            .filter(|line| !line.starts_with("-----") && line.len() >= 16)
            .map(str::to_owned)
            .collect()
    };
    let mut secrets = vec![TOKEN.to_owned(), b64(&key), b64(&cert)];
    secrets.extend(pem_lines(&key));
    secrets.extend(pem_lines(&cert));
    for secret in secrets {
        assert!(!logged.contains(&secret), "{secret} in the log");
    }
    let _ = bed.kubectl(&["delete", "lease", "-n", "default", "capl-secrets-test"]);
}

#[tokio::test]
async fn the_kube_client_is_paced_by_qps_and_burst() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bed = support::shared();
    let cli = <capl::config::Cli as clap::Parser>::try_parse_from([
        "manager".to_owned(),
        format!("--kubeconfig={}", bed.kubeconfig.display()),
        "--kube-api-qps=10".to_owned(),
        "--kube-api-burst=2".to_owned(),
    ])
    .expect("flags");
    let client = capl::manager::kube_client(&cli.run).await.expect("client");
    let start = Instant::now();
    for _ in 0..7 {
        client.apiserver_version().await.expect("version");
    }
    // 2 at once, then 5 more at 10/s.
    let took = start.elapsed();
    eprintln!("7 requests at qps 10, burst 2: {took:?}");
    assert!(took >= Duration::from_millis(480), "{took:?}");
}
