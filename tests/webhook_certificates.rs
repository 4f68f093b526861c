//! Self-managed webhook certificates (`--webhook-cert-secret`) against the real apiserver: two
//! manager replicas share one Secret; the CA reaches the webhook configurations; renewal (by
//! time, forced, and a whole new CA) happens under a stream of admissions and loses none.
//!
//! Its own test binary: the webhook configurations it registers route every LibvirtMachine of
//! the bed to its managers.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// The PEM certificate a webhook server presents (via openssl, trusting nothing).
fn served(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {SERVICE}.{NAMESPACE}.svc </dev/null 2>/dev/null | openssl x509"
        ))
        .stderr(Stdio::null())
        .output()
        .expect("openssl");
    text(&out.stdout)
}

/// The first certificate of a PEM bundle, normalised by openssl.
fn first_cert(pem: &str) -> String {
    let mut child = Command::new("openssl")
        .arg("x509")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(pem.as_bytes())
        .expect("write");
    text(&child.wait_with_output().expect("openssl").stdout)
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
            let cert = first_cert(&field(&secret_data(bed), "tls.crt"));
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
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stream = {
        let (stop, ok, failed, failures) =
            (stop.clone(), ok.clone(), failed.clone(), failures.clone());
        std::thread::spawn(move || {
            let good = machine("streamed", 4096);
            while !stop.load(Ordering::Relaxed) {
                let out = bed.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], &good);
                if out.status.success() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut failures) = failures.lock() {
                        failures.push(text(&out.stderr));
                    }
                }
            }
        })
    };

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
            let cert = first_cert(&field(&secret_data(bed), "tls.crt"));
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
        first_cert(&rotated_ca),
        first_cert(&first_ca),
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
            let cert = first_cert(&field(&secret_data(bed), "tls.crt"));
            Ok((!cert.is_empty() && cert != rotated_cert).then_some(cert))
        },
    )
    .expect("renewed by time");
    assert_eq!(
        both_serve_the_secret(bed, ports, "both replicas serving the timed renewal"),
        by_time
    );

    stop.store(true, Ordering::Relaxed);
    stream.join().expect("stream");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("admissions during renewals: {ok} allowed, {failed} failed");
    let removed = bed.kubectl_stdin(&["delete", "--ignore-not-found", "-f", "-"], &manifests);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    drop((a, b));
    assert_eq!(failed, 0, "{:#?}", failures.lock().map(|f| f.clone()));
    assert!(ok >= 20, "only {ok} admissions were made");
}
