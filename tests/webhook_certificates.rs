//! Self-managed webhook certificates (`--webhook-cert-secret`) against the real apiserver: two
//! manager replicas share one Secret; the CA reaches the webhook configurations; renewal (by
//! time, forced, and a whole new CA) happens under a stream of admissions and loses none.
//!
//! Its own test binary: the webhook configurations it registers route every LibvirtMachine of
//! the bed to its managers.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use support::apiserver::free_port;
use support::process::poll;

const NAMESPACE: &str = "capl-system";
const SECRET: &str = "capl-webhook-cert";
const SERVICE: &str = "capl-webhook-service";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The Secret's data, decoded (empty when it does not exist).
fn secret_data(bed: &support::TestBed) -> serde_json::Map<String, Value> {
    let out = bed.kubectl(&["get", "secret", "-n", NAMESPACE, SECRET, "-o", "json"]);
    if !out.status.success() {
        return Default::default();
    }
    let secret: Value = serde_json::from_slice(&out.stdout).expect("secret json");
    secret["data"]
        .as_object()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().unwrap_or_default())
                .expect("base64");
            (key, Value::String(text(&decoded)))
        })
        .collect()
}

fn field(data: &serde_json::Map<String, Value>, key: &str) -> String {
    data.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The caBundle of every webhook of both configurations, decoded.
fn bundles(bed: &support::TestBed) -> Vec<String> {
    let mut found = Vec::new();
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let out = bed.kubectl(&[
            "get",
            kind,
            capl::webhook::configs::CONFIGURATION_NAME,
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let config: Value = serde_json::from_slice(&out.stdout).expect("json");
        for webhook in config["webhooks"].as_array().expect("webhooks") {
            let bundle = webhook["clientConfig"]["caBundle"].as_str().unwrap_or("");
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(bundle)
                .expect("base64");
            found.push(text(&decoded));
        }
    }
    found
}

/// The PEM certificate a replica presents.
fn served(port: u16) -> String {
    support::certs::served_certificate(
        &format!("127.0.0.1:{port}"),
        Some(&format!("{SERVICE}.{NAMESPACE}.svc")),
    )
}

fn count_certs(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// Waits until both replicas serve the Secret's tls.crt; returns it.
fn both_serve_the_secret(bed: &support::TestBed, ports: [u16; 2], what: &str) -> String {
    poll(
        what,
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let cert = support::certs::first_certificate(&field(&secret_data(bed), "tls.crt"));
            Ok(
                (!cert.is_empty() && ports.iter().all(|port| served(*port) == cert))
                    .then_some(cert),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn machine(name: &str, memory_mib: i64) -> String {
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "vcpus": 2,
            "memoryMiB": memory_mib,
            "image": {"url": "https://images.example.com/debian.qcow2", "checksum": {"type": "sha256", "value": "a".repeat(64)}},
            "rootVolume": {"sizeGiB": 20},
            "networkInterfaces": [{"name": "eth0", "network": "default"}],
        },
    })
    .to_string()
}

#[test]
fn self_managed_certificates_are_injected_renewed_and_rotated_without_a_lost_admission() {
    let bed = support::shared();
    bed.install_provider_crds();
    let _ = bed.kubectl(&["create", "namespace", NAMESPACE]);
    let ports = [free_port().expect("port"), free_port().expect("port")];
    // The configurations as the chart installs them: no caBundle (the manager injects it).
    let target = capl::webhook::configs::Target::Url(format!("https://127.0.0.1:{}", ports[0]));
    let manifests = capl::webhook::configs::render(&target, None).expect("render");
    let out = bed.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifests);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let start = |name: &str, port: u16| {
        bed.start_manager(
            name,
            env!("CARGO_BIN_EXE_manager"),
            &[
                format!("--webhook-port={port}"),
                "--webhook-host=127.0.0.1".into(),
                format!("--webhook-cert-secret={SECRET}"),
                format!("--webhook-cert-secret-namespace={NAMESPACE}"),
                format!("--webhook-service-name={SERVICE}"),
                "--webhook-cert-host=127.0.0.1".into(),
                // Renewal by time comes after 40 s, within the test.
                "--webhook-cert-validity=60s".into(),
            ],
        )
    };
    let (a, _) = start("replica-a", ports[0]);
    let (b, _) = start("replica-b", ports[1]);

    // One Secret, one CA; the CA is in every webhook; both replicas serve the Secret's pair.
    let data = secret_data(bed);
    for key in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(!field(&data, key).is_empty(), "{key} missing");
    }
    let first_ca = field(&data, "ca.crt");
    assert_eq!(count_certs(&first_ca), 1);
    poll(
        "the CA in every webhook",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok(bundles(bed).iter().all(|b| *b == first_ca).then_some(())),
    )
    .expect("injected");
    let initial_cert = both_serve_the_secret(bed, ports, "both replicas serving the Secret's pair");

    // The apiserver trusts the certificate: a bad machine is denied by our webhook, with the
    // field and the rule.
    let denied = bed.kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &machine("too-small", 64),
    );
    assert!(!denied.status.success());
    assert!(
        text(&denied.stderr).contains("spec.memoryMiB"),
        "{}",
        text(&denied.stderr)
    );

    // A stream of admissions for the rest of the test.
    let stream = support::admissions::Stream::start(bed, machine("streamed", 4096));

    // Forced renewal of the serving pair: the manager reissues it from the same CA.
    let out = bed.kubectl(&[
        "patch",
        "secret",
        "-n",
        NAMESPACE,
        SECRET,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/data/tls.crt"}]"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let renewed = poll(
        "a new serving pair",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let cert = support::certs::first_certificate(&field(&secret_data(bed), "tls.crt"));
            Ok((!cert.is_empty() && cert != initial_cert).then_some(cert))
        },
    )
    .expect("renewed");
    assert_eq!(field(&secret_data(bed), "ca.crt"), first_ca, "same CA");
    let renewed_served =
        both_serve_the_secret(bed, ports, "both replicas serving the renewed pair");
    assert_eq!(renewed_served, renewed);

    // A whole new CA (the Secret emptied): the old CA stays trusted beside the new one while the
    // replicas switch.
    let out = bed.kubectl(&[
        "patch",
        "secret",
        "-n",
        NAMESPACE,
        SECRET,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/data","value":{}}]"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rotated_ca = poll(
        "a new CA",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let ca = field(&secret_data(bed), "ca.crt");
            Ok((count_certs(&ca) == 2).then_some(ca))
        },
    )
    .expect("rotated");
    assert_ne!(
        support::certs::first_certificate(&rotated_ca),
        support::certs::first_certificate(&first_ca),
        "a new CA first"
    );
    assert!(rotated_ca.ends_with(&first_ca), "then the previous CA");
    poll(
        "the rotated bundle in every webhook",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok(bundles(bed).iter().all(|b| *b == rotated_ca).then_some(())),
    )
    .expect("injected");
    let rotated_cert = both_serve_the_secret(bed, ports, "both replicas serving the new CA's pair");

    // Renewal by time: the 60 s certificate is replaced after two thirds of it, untouched.
    let by_time = poll(
        "a renewal by time",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let cert = support::certs::first_certificate(&field(&secret_data(bed), "tls.crt"));
            Ok((!cert.is_empty() && cert != rotated_cert).then_some(cert))
        },
    )
    .expect("renewed by time");
    assert_eq!(
        both_serve_the_secret(bed, ports, "both replicas serving the timed renewal"),
        by_time
    );

    let counted = stream.stop();
    eprintln!(
        "admissions during renewals: {} allowed, {} failed",
        counted.allowed, counted.failed
    );
    let removed = bed.kubectl_stdin(&["delete", "--ignore-not-found", "-f", "-"], &manifests);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    drop((a, b));
    assert_eq!(counted.failed, 0, "{:#?}", counted.failures);
    assert!(
        counted.allowed >= 20,
        "only {} admissions were made",
        counted.allowed
    );
}
