//! The `manager` binary against the test bed: the main job on its embedded default.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::apiserver::free_port;
use support::capi::http_ok;

/// The manager with the given libvirt URI and webhook port (0: no webhook server).
fn manager(
    bed: &support::TestBed,
    libvirt_uri: &str,
    health_port: u16,
    webhook_port: u16,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_manager"));
    cmd.arg(format!("--kubeconfig={}", bed.kubeconfig.display()))
        .arg(format!("--libvirt-uri={libvirt_uri}"))
        .arg("--allow-test-driver")
        .arg(format!(
            "--health-probe-bind-address=127.0.0.1:{health_port}"
        ))
        .arg(format!("--webhook-port={webhook_port}"));
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
