//! Admission webhooks: the handler on its own, then the real manager serving the real apiserver
//! over TLS (defaulting, denials, immutability, topology dry-runs, certificate rotation).

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::to_bytes;
use axum::http::StatusCode;
use capl::api::LibvirtMachine;
use capl::libvirt::uri::UriPolicy;
use capl::webhook::admission::{AdmissionPolicy, Endpoint, Kind};
use capl::webhook::configs::{self, Target};
use capl::webhook::server::handle;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::apiserver::free_port;
use support::capi::read_yaml_docs;
use support::process::Proc;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn machine(spec: Value) -> Value {
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": spec,
    })
}

fn minimal_spec() -> Value {
    json!({
        "vcpus": 2,
        "memoryMiB": 4096,
        "image": {"url": "https://images.example.com/debian.qcow2", "checksum": {"type": "sha256", "value": "a".repeat(64)}},
        "rootVolume": {"sizeGiB": 20},
        "networkInterfaces": [{"name": "eth0", "network": "default"}],
    })
}

fn review(operation: &str, object: &Value, old: Option<&Value>, dry_run: bool) -> Vec<u8> {
    let kind = object["kind"].as_str().unwrap_or("LibvirtMachine");
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3f7c3d4e-0000-4000-8000-000000000001",
            "kind": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "resource": format!("{}s", kind.to_lowercase())},
            "name": object["metadata"]["name"],
            "namespace": "default",
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": object,
            "oldObject": old,
            "dryRun": dry_run,
        }
    }))
    .expect("review JSON")
}

/// The policy of the tests' manager (`--allow-test-driver`).
const DEV: AdmissionPolicy = AdmissionPolicy {
    uri: UriPolicy {
        allow_test_driver: true,
    },
};
/// The production policy (no flags).
const PROD: AdmissionPolicy = AdmissionPolicy {
    uri: UriPolicy {
        allow_test_driver: false,
    },
};

/// Calls the handler directly under the tests' policy; returns (status, parsed response or raw
/// body).
async fn call(kind: Kind, endpoint: Endpoint, body: &[u8]) -> (StatusCode, Value) {
    call_with(&DEV, kind, endpoint, body).await
}

/// Calls the handler directly under `policy`.
async fn call_with(
    policy: &AdmissionPolicy,
    kind: Kind,
    endpoint: Endpoint,
    body: &[u8],
) -> (StatusCode, Value) {
    let response = handle(kind, endpoint, body, policy);
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

fn apply_patch(object: &Value, response: &Value) -> Value {
    let mut patched = object.clone();
    // kube-rs encodes the patch bytes as a JSON array of numbers (Go decodes it into []byte).
    if let Some(bytes) = response["response"]["patch"].as_array() {
        let bytes: Vec<u8> = bytes
            .iter()
            .filter_map(|b| b.as_u64())
            .map(|b| b as u8)
            .collect();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("JSON patch");
        json_patch::patch(&mut patched, &patch).expect("patch applies");
    }
    patched
}

// ---------------------------------------------------------------- the handler alone

#[tokio::test]
async fn defaulting_fills_defaults_once() {
    let object = machine(minimal_spec());
    let (status, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Mutate,
        &review("CREATE", &object, None, false),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["response"]["allowed"], true);
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let defaulted = apply_patch(&object, &response);
    assert_eq!(defaulted["spec"]["cpuMode"], "host-passthrough");
    assert_eq!(defaulted["spec"]["firmware"], "bios");
    assert_eq!(defaulted["spec"]["image"]["format"], "qcow2");
    assert_eq!(defaulted["spec"]["networkInterfaces"][0]["model"], "virtio");
    // Fields the user set are untouched.
    assert_eq!(defaulted["spec"]["memoryMiB"], 4096);

    let (_, again) = call(
        Kind::LibvirtMachine,
        Endpoint::Mutate,
        &review("CREATE", &defaulted, None, false),
    )
    .await;
    assert!(
        again["response"]["patch"].is_null(),
        "defaulting a defaulted object yields no patch"
    );

    let cluster = json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtCluster",
        "metadata": {"name": "c"},
        "spec": {"controlPlaneEndpoint": {"host": "10.0.0.10"}, "hosts": [{"name": "a", "uri": "qemu:///system"}]},
    });
    let (_, response) = call(
        Kind::LibvirtCluster,
        Endpoint::Mutate,
        &review("CREATE", &cluster, None, false),
    )
    .await;
    let defaulted = apply_patch(&cluster, &response);
    assert_eq!(defaulted["spec"]["controlPlaneEndpoint"]["port"], 6443);
    assert_eq!(defaulted["spec"]["storagePool"], "default");
    assert_eq!(defaulted["spec"]["network"], "default");
    assert_eq!(defaulted["spec"]["hosts"][0]["controlPlane"], true);
    assert_eq!(defaulted["spec"]["hosts"][0]["domainType"], "kvm");
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_never_a_5xx() {
    for body in [
        b"".as_slice(),
        b"not json",
        b"{}",
        b"[]",
        b"{\"request\": 7}",
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
        &[0xff, 0xfe, 0x00],
    ] {
        for endpoint in [Endpoint::Mutate, Endpoint::Validate] {
            let (status, body_text) = call(Kind::LibvirtMachine, endpoint, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {body_text}");
        }
    }
}

#[tokio::test]
async fn a_wrong_kind_or_a_malformed_object_is_denied_with_a_reason() {
    let cluster_review = review(
        "CREATE",
        &json!({"kind": "LibvirtCluster", "metadata": {"name": "x"}, "spec": {}}),
        None,
        false,
    );
    let (status, response) = call(Kind::LibvirtMachine, Endpoint::Validate, &cluster_review).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["response"]["allowed"], false);
    let message = response["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("admits infrastructure.cluster.x-k8s.io/LibvirtMachine"),
        "{message}"
    );

    let mut spec = minimal_spec();
    spec["memoryMiB"] = json!("2Gi");
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("CREATE", &machine(spec.clone()), None, false),
    )
    .await;
    assert_eq!(response["response"]["allowed"], false);
    let message = response["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("spec.memoryMiB: invalid type"),
        "{message}"
    );
    // Defaulting leaves it to the apiserver's schema validation.
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Mutate,
        &review("CREATE", &machine(spec), None, false),
    )
    .await;
    assert_eq!(response["response"]["allowed"], true);
}

struct Fixture {
    name: String,
    doc: Value,
    expects: Vec<String>,
}

fn webhook_fixtures() -> Vec<Fixture> {
    let dir = repo().join("tests/fixtures/webhook");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("fixture");
            Fixture {
                name: path
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned(),
                doc: read_yaml_docs(&path).expect("yaml").remove(0),
                expects: text
                    .lines()
                    .filter_map(|l| l.strip_prefix("# expect: "))
                    .map(str::to_owned)
                    .collect(),
            }
        })
        .collect()
}

fn kind_of(doc: &Value) -> Kind {
    match doc["kind"].as_str() {
        Some("LibvirtCluster") => Kind::LibvirtCluster,
        Some("LibvirtClusterTemplate") => Kind::LibvirtClusterTemplate,
        Some("LibvirtMachine") => Kind::LibvirtMachine,
        Some("LibvirtMachineTemplate") => Kind::LibvirtMachineTemplate,
        other => panic!("fixture kind {other:?}"),
    }
}

#[tokio::test]
async fn webhook_fixtures_are_denied_with_the_field_and_rule() {
    let fixtures = webhook_fixtures();
    assert!(fixtures.len() >= 10);
    for fixture in fixtures {
        let (_, response) = call(
            kind_of(&fixture.doc),
            Endpoint::Validate,
            &review("CREATE", &fixture.doc, None, false),
        )
        .await;
        assert_eq!(
            response["response"]["allowed"], false,
            "{} was allowed",
            fixture.name
        );
        let message = response["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        for expect in &fixture.expects {
            assert!(
                message.contains(expect.as_str()),
                "{}: {message:?} lacks {expect:?}",
                fixture.name
            );
        }
    }
}

#[tokio::test]
async fn risky_values_are_allowed_with_warnings() {
    let mut spec = minimal_spec();
    spec["image"]["url"] = json!("http://images.example.com/debian.qcow2");
    spec["memoryMiB"] = json!(1024);
    spec["networkInterfaces"][0]["macAddress"] = json!("00:1b:21:00:00:01");
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("CREATE", &machine(spec), None, false),
    )
    .await;
    assert_eq!(response["response"]["allowed"], true);
    let warnings = response["response"]["warnings"].to_string();
    for expect in [
        "spec.image.url: uses plain http",
        "spec.memoryMiB: 1024 MiB",
        "spec.networkInterfaces[0].macAddress: is a vendor-assigned",
    ] {
        assert!(warnings.contains(expect), "{warnings} lacks {expect}");
    }
}

#[tokio::test]
async fn machine_updates_name_every_immutable_field() {
    let old = machine(minimal_spec());
    let mut spec = minimal_spec();
    spec["memoryMiB"] = json!(8192);
    spec["vcpus"] = json!(4);
    spec["providerID"] = json!("libvirt://host-a/0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c");
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("UPDATE", &machine(spec), Some(&old), false),
    )
    .await;
    let message = response["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(response["response"]["allowed"], false);
    assert!(
        message.contains("spec.memoryMiB: is immutable"),
        "{message}"
    );
    assert!(message.contains("spec.vcpus: is immutable"), "{message}");
    assert!(
        !message.contains("providerID"),
        "setting providerID once is allowed: {message}"
    );
}

fn cluster(spec: Value) -> Value {
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtCluster",
        "metadata": {"name": "c", "namespace": "default"},
        "spec": spec,
    })
}

fn message_of(response: &Value) -> String {
    response["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_test_driver_is_allowed_only_with_the_flag() {
    let object = cluster(json!({"hosts": [{"name": "a", "uri": "test:///default"}]}));
    let body = review("CREATE", &object, None, false);
    let (_, denied) = call_with(&PROD, Kind::LibvirtCluster, Endpoint::Validate, &body).await;
    assert_eq!(denied["response"]["allowed"], false);
    let message = message_of(&denied);
    assert!(
        message.starts_with("spec.hosts[0].uri: ") && message.contains("--allow-test-driver"),
        "{message}"
    );
    let (_, allowed) = call_with(&DEV, Kind::LibvirtCluster, Endpoint::Validate, &body).await;
    assert_eq!(allowed["response"]["allowed"], true, "{allowed}");
    let warnings = allowed["response"]["warnings"].to_string();
    assert!(
        warnings
            .contains("spec.hosts[0].uri: the test driver keeps virtual machines in memory only"),
        "{warnings}"
    );
    // Templates are held to the same policy.
    let template = json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtClusterTemplate",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {"template": {"spec": {"hosts": [{"name": "a", "uri": "test:///default"}]}}},
    });
    let body = review("CREATE", &template, None, false);
    let (_, denied) = call_with(
        &PROD,
        Kind::LibvirtClusterTemplate,
        Endpoint::Validate,
        &body,
    )
    .await;
    assert!(
        message_of(&denied).starts_with("spec.template.spec.hosts[0].uri: ")
            && message_of(&denied).contains("--allow-test-driver"),
        "{denied}"
    );
    // Any other test:// URI is refused whatever the flag says: the driver quotes the file.
    for uri in [
        "test:///etc/passwd",
        "test:///var/run/secrets/kubernetes.io/serviceaccount/token",
    ] {
        let object = cluster(json!({"hosts": [{"name": "a", "uri": uri}]}));
        let body = review("CREATE", &object, None, false);
        let (_, denied) = call_with(&DEV, Kind::LibvirtCluster, Endpoint::Validate, &body).await;
        assert!(
            message_of(&denied).contains("only accepted as test:///default"),
            "{uri}: {denied}"
        );
    }
}

#[tokio::test]
async fn echoed_values_are_bounded_and_escaped() {
    let huge = format!("\u{1b}[31m{}", "x".repeat(16 * 1024));
    let whole_run = "x".repeat(65);
    let mut spec = minimal_spec();
    spec["rootVolume"]["pool"] = json!(huge);
    spec["networkInterfaces"] = json!([{"name": huge, "bridge": huge, "macAddress": huge}]);
    spec["dataVolumes"] = json!([{"name": huge, "sizeGiB": 1}]);
    spec["sshAuthorizedKeys"] = json!([format!("ssh-ed25519 {}", "A".repeat(16 * 1024)), huge]);
    spec["providerID"] = json!(huge);
    let template = json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachineTemplate",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {"template": {
            "metadata": {"labels": {huge.clone(): huge.clone()}, "annotations": {huge.clone(): ""}},
            "spec": spec.clone(),
        }},
    });
    let mut bad_enum = minimal_spec();
    bad_enum["cpuMode"] = json!(huge);
    let cases = [
        (Kind::LibvirtMachine, machine(spec)),
        (Kind::LibvirtMachineTemplate, template),
        (Kind::LibvirtMachine, machine(bad_enum)),
        (
            Kind::LibvirtCluster,
            cluster(json!({
                "controlPlaneEndpoint": {"host": huge},
                "hosts": [
                    {"name": huge, "uri": format!("qemu+ssh://{}/system", "x".repeat(1000)), "credentialsSecretRef": {"name": huge}},
                    {"name": "c", "uri": format!("qemu:///system?socket=/{}-sock", "x".repeat(1000))},
                    {"name": "b", "uri": huge},
                ],
            })),
        ),
    ];
    for (kind, object) in cases {
        let (_, response) = call(
            kind,
            Endpoint::Validate,
            &review("CREATE", &object, None, false),
        )
        .await;
        assert_eq!(response["response"]["allowed"], false);
        let message = message_of(&response);
        assert!(
            message.len() < 8 * 1024,
            "{kind:?}: a {} byte message",
            message.len()
        );
        assert!(
            !message.contains(&whole_run),
            "{kind:?}: a value came back whole: {message}"
        );
        assert!(
            !message.contains('\u{1b}'),
            "{kind:?}: a raw control character: {message}"
        );
        let warnings = response["response"]["warnings"].to_string();
        assert!(
            warnings.len() < 8 * 1024 && !warnings.contains(&whole_run),
            "{warnings}"
        );
    }
}

#[tokio::test]
async fn hosts_in_use_can_neither_be_removed_nor_repointed() {
    let hosts = json!([
        {"name": "a", "uri": "qemu+ssh://a.example.com/system"},
        {"name": "b", "uri": "qemu:///system"},
    ]);
    let mut old = cluster(json!({"hosts": hosts}));
    old["status"] =
        json!({"hostsInUse": [{"name": "a", "uri": "qemu+ssh://a.example.com/system"}]});
    let validate = |new: Value, old: Value| async move {
        let (_, response) = call(
            Kind::LibvirtCluster,
            Endpoint::Validate,
            &review("UPDATE", &new, Some(&old), false),
        )
        .await;
        response
    };
    // Removing the host its machines run on: denied.
    let removed = cluster(json!({"hosts": [hosts[1]]}));
    let response = validate(removed.clone(), old.clone()).await;
    assert_eq!(response["response"]["allowed"], false);
    assert!(
        message_of(&response).contains(
            "spec.hosts: host \"a\" has machines on it (status.hostsInUse) and cannot be removed"
        ),
        "{response}"
    );
    // Without machines on it, removal is only a warning (the old behaviour).
    let mut unused = old.clone();
    unused["status"] = json!({});
    let response = validate(removed.clone(), unused).await;
    assert_eq!(response["response"]["allowed"], true, "{response}");
    // Re-adding its name under another URI (step two of the bypass, e.g. after the host was
    // dropped while the webhook was down): denied by the recorded URI.
    let mut dropped = removed.clone();
    dropped["status"] = old["status"].clone();
    let readded = cluster(json!({"hosts": [
        {"name": "a", "uri": "qemu+ssh://evil.example.com/system"},
        hosts[1],
    ]}));
    let response = validate(readded, dropped.clone()).await;
    assert_eq!(response["response"]["allowed"], false);
    assert!(
        message_of(&response).contains("spec.hosts[0].uri: host \"a\" has machines on it (status.hostsInUse) at \"qemu+ssh://a.example.com/system\""),
        "{response}"
    );
    // Re-added with the recorded URI: fine.
    let response = validate(cluster(json!({"hosts": hosts})), dropped).await;
    assert_eq!(response["response"]["allowed"], true, "{response}");
}

#[tokio::test]
async fn update_defaulting_leaves_unchanged_fields_as_stored() {
    // Stored before the defaults existed (or while the webhook was not installed).
    let stored_spec = json!({
        "vcpus": 2, "memoryMiB": 4096,
        "image": {"url": "https://images.example.com/debian.qcow2", "checksum": {"type": "sha256", "value": "a".repeat(64)}},
        "rootVolume": {"sizeGiB": 20},
        "networkInterfaces": [{"name": "eth0", "network": "default"}],
    });
    let old = machine(stored_spec.clone());
    let mut with_finalizer = old.clone();
    with_finalizer["metadata"]["finalizers"] = json!(["test.capl/hold"]);
    let mut with_provider_id = old.clone();
    with_provider_id["spec"]["providerID"] =
        json!("libvirt://a/0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c");
    for new in [with_finalizer, with_provider_id] {
        let (_, response) = call(
            Kind::LibvirtMachine,
            Endpoint::Mutate,
            &review("UPDATE", &new, Some(&old), false),
        )
        .await;
        assert_eq!(response["response"]["allowed"], true);
        assert!(
            response["response"]["patch"].is_null(),
            "an update that leaves the spec's fields alone gets no defaults: {}",
            apply_patch(&new, &response)["spec"]
        );
    }
    // A field that changes is defaulted; the unchanged ones stay as stored.
    let old = cluster(json!({
        "controlPlaneEndpoint": {"host": "10.0.0.10"},
        "hosts": [{"name": "a", "uri": "qemu:///system"}],
    }));
    let new = cluster(json!({
        "controlPlaneEndpoint": {"host": "10.0.0.10"},
        "hosts": [{"name": "a", "uri": "qemu:///system"}, {"name": "b", "uri": "qemu+tls://b.example.com/system"}],
    }));
    let (_, response) = call(
        Kind::LibvirtCluster,
        Endpoint::Mutate,
        &review("UPDATE", &new, Some(&old), false),
    )
    .await;
    let defaulted = apply_patch(&new, &response);
    assert_eq!(defaulted["spec"]["hosts"][1]["domainType"], "kvm");
    assert_eq!(
        defaulted["spec"]["controlPlaneEndpoint"],
        json!({"host": "10.0.0.10"})
    );
    assert!(defaulted["spec"].get("network").is_none(), "{defaulted}");
    // On create, everything is defaulted as before.
    let (_, response) = call(
        Kind::LibvirtCluster,
        Endpoint::Mutate,
        &review("CREATE", &new, None, false),
    )
    .await;
    assert_eq!(apply_patch(&new, &response)["spec"]["network"], "default");
}

#[tokio::test]
async fn validation_ratchets_on_fields_left_unchanged() {
    // Stored before the rules tightened: an image URL at the metadata address in a numeric
    // spelling and a key blob that does not decode.
    let mut spec = minimal_spec();
    spec["image"]["url"] = json!("http://2852039166/latest/meta-data/x.qcow2");
    spec["sshAuthorizedKeys"] =
        json!(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9 x"]);
    let old = machine(spec.clone());
    let (_, created) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("CREATE", &old, None, false),
    )
    .await;
    assert_eq!(
        created["response"]["allowed"], false,
        "a new object is held to every rule"
    );
    let mut new = old.clone();
    new["metadata"]["finalizers"] = json!([]);
    new["spec"]["providerID"] = json!("libvirt://a/0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c");
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("UPDATE", &new, Some(&old), false),
    )
    .await;
    assert_eq!(response["response"]["allowed"], true, "{response}");
    let warnings = response["response"]["warnings"].to_string();
    assert!(
        warnings.contains("spec.image.url: must not point at") && warnings.contains("not enforced"),
        "{warnings}"
    );
    // A changed field is checked: a bad providerID is denied even on an old object.
    new["spec"]["providerID"] = json!("libvirt://a/\u{1b}[2J");
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("UPDATE", &new, Some(&old), false),
    )
    .await;
    assert_eq!(response["response"]["allowed"], false);
    assert!(
        message_of(&response).starts_with("spec.providerID: must be 1-512 printable ASCII"),
        "{response}"
    );
}

#[tokio::test]
async fn an_interface_naming_neither_network_nor_bridge_takes_the_cluster_network() {
    let mut spec = minimal_spec();
    spec["networkInterfaces"] = json!([{"name": "eth0"}]);
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("CREATE", &machine(spec.clone()), None, false),
    )
    .await;
    assert_eq!(response["response"]["allowed"], true, "{response}");
    spec["networkInterfaces"] = json!([{"name": "eth0", "network": "default", "bridge": "br0"}]);
    let (_, response) = call(
        Kind::LibvirtMachine,
        Endpoint::Validate,
        &review("CREATE", &machine(spec), None, false),
    )
    .await;
    assert!(
        message_of(&response)
            .contains("spec.networkInterfaces[0]: at most one of network or bridge"),
        "{response}"
    );
}

fn template(memory: i64, annotations: Value) -> Value {
    let mut spec = minimal_spec();
    spec["memoryMiB"] = json!(memory);
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachineTemplate",
        "metadata": {"name": "workers", "namespace": "default", "annotations": annotations},
        "spec": {"template": {"spec": spec}},
    })
}

#[tokio::test]
async fn templates_are_immutable_except_for_topology_dry_runs() {
    let old = template(4096, json!({}));
    let cases = [
        (template(8192, json!({})), false, false),
        (
            template(8192, json!({"topology.cluster.x-k8s.io/dry-run": ""})),
            false,
            false,
        ),
        (template(8192, json!({})), true, false),
        (
            template(8192, json!({"topology.cluster.x-k8s.io/dry-run": ""})),
            true,
            true,
        ),
        (
            template(4096, json!({"unrelated": "annotation"})),
            false,
            true,
        ),
    ];
    for (i, (new, dry_run, allowed)) in cases.iter().enumerate() {
        let (_, response) = call(
            Kind::LibvirtMachineTemplate,
            Endpoint::Validate,
            &review("UPDATE", new, Some(&old), *dry_run),
        )
        .await;
        assert_eq!(
            response["response"]["allowed"], *allowed,
            "case {i}: {response}"
        );
        if !allowed {
            let message = response["response"]["status"]["message"]
                .as_str()
                .unwrap_or_default();
            assert!(
                message.contains("spec.template.spec.memoryMiB: is immutable"),
                "{message}"
            );
        }
    }
}

// ---------------------------------------------------------------- on the real apiserver

/// The manager under test: its webhook URL, CA, cert dir and process.
struct Manager {
    webhook_port: u16,
    cert_dir: PathBuf,
    _proc: Proc,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes a serving cert into `dir` the way kubelet mounts a Secret: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<generation>`, swapped atomically on update.
fn mount_secret(dir: &Path, generation: u32, ca: &support::certs::Ca) {
    let data_dir = dir.join(format!("..gen{generation}"));
    ca.server("capl-webhook", &["127.0.0.1", "localhost"])
        .expect("serving cert")
        .write(&data_dir, "tls.crt", "tls.key")
        .expect("writing the cert");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(data_dir.file_name().expect("name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("atomic swap of ..data");
    for file in ["tls.crt", "tls.key"] {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{file}"), &link).expect("link");
        }
    }
}

fn manager() -> &'static Manager {
    static MANAGER: OnceLock<Manager> = OnceLock::new();
    MANAGER.get_or_init(|| {
        let bed = support::shared();
        let dir = bed.test_dir("webhook-manager");
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir).expect("cert dir");
        let plane = bed.plane();
        let plane = plane.as_ref().expect("control plane");
        mount_secret(&cert_dir, 1, &plane.ca);

        let webhook_port = free_port().expect("port");
        let (proc, _) = bed.start_manager(
            "webhook-manager",
            env!("CARGO_BIN_EXE_manager"),
            &[
                "--webhook-host=127.0.0.1".into(),
                "--allow-test-driver".into(),
                format!("--webhook-port={webhook_port}"),
                format!("--webhook-cert-dir={}", cert_dir.display()),
                "--webhook-cert-reload-interval=200ms".into(),
            ],
        );
        bed.install_provider_crds();
        // Objects stored while no webhook was installed: without defaults, and breaking rules
        // only the webhook knows (what an upgrade finds in etcd).
        let out = bed.kubectl_stdin(&["apply", "-f", "-"], &legacy_objects());
        assert!(
            out.status.success(),
            "legacy objects: {}",
            text(&out.stderr)
        );
        let target = Target::Url(format!("https://127.0.0.1:{webhook_port}"));
        let manifests =
            configs::render(&target, Some(plane.ca.cert_pem.as_bytes())).expect("render");
        let out = bed.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifests);
        assert!(out.status.success(), "{}", text(&out.stderr));
        Manager {
            webhook_port,
            cert_dir,
            _proc: proc,
        }
    })
}

/// Namespace of the objects stored before the webhooks were installed.
const LEGACY_NAMESPACE: &str = "legacy";

/// The objects [`manager`] stores before installing the webhook configurations.
fn legacy_objects() -> String {
    let mut machine_spec = minimal_spec();
    machine_spec["image"]["url"] = json!("http://2852039166/latest/meta-data/x.qcow2");
    machine_spec["sshAuthorizedKeys"] =
        json!(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9 x"]);
    let docs = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEGACY_NAMESPACE}}),
        json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtMachine",
            "metadata": {"name": "legacy", "namespace": LEGACY_NAMESPACE},
            "spec": machine_spec,
        }),
        json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtCluster",
            "metadata": {"name": "legacy", "namespace": LEGACY_NAMESPACE},
            "spec": {
                "controlPlaneEndpoint": {"host": "10.0.0.10"},
                "hosts": [{"name": "a", "uri": "qemu+ssh://a.example.com/system?no_tty=1&no_tty=1"}],
            },
        }),
        json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtMachineTemplate",
            "metadata": {"name": "legacy", "namespace": LEGACY_NAMESPACE},
            "spec": {"template": {
                "metadata": {"labels": {"pool name": "workers"}},
                "spec": minimal_spec(),
            }},
        }),
    ];
    docs.iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).expect("json")))
        .collect()
}

fn apply(doc: &Value, dry_run: bool) -> std::process::Output {
    let mut args = vec!["apply", "-n", "default", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    support::shared().kubectl_stdin(&args, &serde_json::to_string(doc).expect("json"))
}

#[test]
fn generated_webhook_configurations_are_up_to_date() {
    let on_disk = std::fs::read_to_string(repo().join("webhooks").join(configs::FILE_NAME))
        .unwrap_or_default();
    let generated = configs::render(&Target::default(), None).expect("render");
    assert!(
        on_disk == generated,
        "webhooks/ is stale: run `cargo run --bin manager -- webhooks` and commit it"
    );
    for line in [
        "sideEffects: None",
        "failurePolicy: Fail",
        "timeoutSeconds: 10",
        "matchPolicy: Equivalent",
    ] {
        assert_eq!(
            generated.matches(line).count(),
            8,
            "{line} on every webhook"
        );
    }
}

#[test]
fn kubectl_apply_of_a_minimal_machine_comes_back_defaulted() {
    manager();
    let mut doc = machine(minimal_spec());
    doc["metadata"]["name"] = json!("defaulted");
    let out = apply(&doc, false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = support::shared().kubectl(&[
        "get",
        "libvirtmachine",
        "defaulted",
        "-n",
        "default",
        "-o",
        "json",
    ]);
    let stored: Value = serde_json::from_slice(&out.stdout).expect("object JSON");
    assert_eq!(stored["spec"]["cpuMode"], "host-passthrough");
    assert_eq!(stored["spec"]["firmware"], "bios");
    assert_eq!(stored["spec"]["image"]["format"], "qcow2");
    assert_eq!(stored["spec"]["networkInterfaces"][0]["model"], "virtio");
}

#[test]
fn webhook_only_rules_deny_through_the_apiserver() {
    manager();
    for fixture in webhook_fixtures() {
        let out = apply(&fixture.doc, true);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", fixture.name);
        assert!(
            stderr.contains("denied the request"),
            "{}: {stderr}",
            fixture.name
        );
        for expect in &fixture.expects {
            assert!(
                stderr.contains(expect.as_str()),
                "{}: {stderr} lacks {expect:?}",
                fixture.name
            );
        }
    }
    // Warnings reach kubectl.
    let mut spec = minimal_spec();
    spec["image"]["url"] = json!("http://images.example.com/debian.qcow2");
    let out = apply(&machine(spec), true);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Warning: spec.image.url: uses plain http"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn template_updates_pass_only_as_topology_dry_runs() {
    manager();
    let bed = support::shared();
    let out = apply(&template(4096, json!({})), false);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let changed = template(8192, json!({}));
    let out = apply(&changed, true);
    assert!(!out.status.success(), "template change allowed");
    assert!(
        text(&out.stderr).contains("spec.template.spec.memoryMiB: is immutable"),
        "{}",
        text(&out.stderr)
    );

    // What Cluster API's topology controller sends: a server-side-apply dry-run with its annotation.
    let planned = template(8192, json!({"topology.cluster.x-k8s.io/dry-run": ""}));
    let out = bed.kubectl_stdin(
        &[
            "apply",
            "-n",
            "default",
            "--server-side",
            "--dry-run=server",
            "--field-manager=capi-topology",
            "--force-conflicts",
            "-f",
            "-",
        ],
        &serde_json::to_string(&planned).expect("json"),
    );
    assert!(
        out.status.success(),
        "topology dry-run denied: {}",
        text(&out.stderr)
    );

    // The same annotation without dryRun is still denied.
    let out = apply(&planned, false);
    assert!(
        !out.status.success(),
        "a real update with the annotation was allowed"
    );
}

#[test]
fn stored_objects_without_defaults_take_finalizers_and_a_provider_id() {
    manager();
    let bed = support::shared();
    let kubectl = |args: &[&str]| {
        let mut all = vec!["-n", LEGACY_NAMESPACE];
        all.extend_from_slice(args);
        let out = bed.kubectl(&all);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            text(&out.stderr)
        );
        text(&out.stderr)
    };
    for kind in ["libvirtmachine", "libvirtcluster", "libvirtmachinetemplate"] {
        let stored = bed.kubectl(&["get", kind, "legacy", "-n", LEGACY_NAMESPACE, "-o", "json"]);
        let stored: Value = serde_json::from_slice(&stored.stdout).expect("object");
        kubectl(&[
            "patch",
            kind,
            "legacy",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["test.capl.io/hold"]}}"#,
        ]);
        if kind == "libvirtmachine" {
            let warnings = kubectl(&[
                "patch",
                kind,
                "legacy",
                "--type=merge",
                "-p",
                r#"{"spec":{"providerID":"libvirt://a/0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c"}}"#,
            ]);
            assert!(warnings.contains("not enforced"), "{warnings}");
        }
        kubectl(&[
            "patch",
            kind,
            "legacy",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ]);
        let after = bed.kubectl(&["get", kind, "legacy", "-n", LEGACY_NAMESPACE, "-o", "json"]);
        let mut after: Value = serde_json::from_slice(&after.stdout).expect("object");
        if kind == "libvirtmachine" {
            assert_eq!(
                after["spec"]["providerID"],
                "libvirt://a/0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c"
            );
            after["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("providerID");
        }
        assert_eq!(
            after["spec"], stored["spec"],
            "{kind}: the stored spec was changed"
        );
        assert!(after["metadata"].get("finalizers").is_none(), "{kind}");
    }
}

#[test]
fn hosts_in_use_hold_through_the_apiserver() {
    manager();
    let bed = support::shared();
    let host_a = json!({"name": "a", "uri": "qemu+ssh://a.example.com/system"});
    let host_b = json!({"name": "b", "uri": "qemu:///system"});
    let mut doc =
        cluster(json!({"controlPlaneEndpoint": {"host": "10.0.0.10"}, "hosts": [host_a, host_b]}));
    doc["metadata"]["name"] = json!("in-use");
    let out = apply(&doc, false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The machine controller records the host before it creates a VM there.
    let out = bed.kubectl(&[
        "patch",
        "libvirtcluster",
        "in-use",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"hostsInUse":[{"name":"a","uri":"qemu+ssh://a.example.com/system"}]}}"#,
    ]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));

    // Step one of the two-step change: remove the host. Denied.
    let mut removed = doc.clone();
    removed["spec"]["hosts"] = json!([host_b]);
    let out = apply(&removed, false);
    assert!(!out.status.success(), "a host in use was removed");
    assert!(
        text(&out.stderr)
            .contains("host \"a\" has machines on it (status.hostsInUse) and cannot be removed"),
        "{}",
        text(&out.stderr)
    );
    // A direct change of its URI: denied.
    let mut repointed = doc.clone();
    repointed["spec"]["hosts"][0]["uri"] = json!("qemu+ssh://evil.example.com/system");
    let out = apply(&repointed, false);
    assert!(!out.status.success(), "a host in use was re-pointed");
    assert!(
        text(&out.stderr).contains("spec.hosts[0].uri"),
        "{}",
        text(&out.stderr)
    );
    // A host without machines can still go.
    let mut spare = doc.clone();
    spare["spec"]["hosts"] = json!([host_a]);
    let out = apply(&spare, false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Step two, had step one happened anyway (say, while the webhook was down): re-adding the
    // name under another URI is denied by the recorded one.
    let out = bed.kubectl(&[
        "patch", "libvirtcluster", "in-use", "-n", "default", "--subresource=status",
        "--type=merge", "-p",
        r#"{"status":{"hostsInUse":[{"name":"a","uri":"qemu+ssh://a.example.com/system"},{"name":"b","uri":"qemu:///system"}]}}"#,
    ]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    let mut readded = spare.clone();
    readded["spec"]["hosts"] =
        json!([host_a, {"name": "b", "uri": "qemu+tls://b.example.com/system"}]);
    let out = apply(&readded, false);
    assert!(
        !out.status.success(),
        "a host in use came back under another URI"
    );
    assert!(
        text(&out.stderr)
            .contains("host \"b\" has machines on it (status.hostsInUse) at \"qemu:///system\""),
        "{}",
        text(&out.stderr)
    );
    let mut restored = spare.clone();
    restored["spec"]["hosts"] = json!([host_a, host_b]);
    let out = apply(&restored, false);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The certificate the webhook serves right now (DER), fetched over TLS.
async fn served_certificate(port: u16, ca_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().expect("name"), tcp)
        .await
        .expect("TLS handshake with the bed's CA");
    tls.get_ref().1.peer_certificates().expect("peer certs")[0].to_vec()
}

#[tokio::test]
async fn certificate_rotation_during_admissions_loses_none() {
    let manager = manager();
    let bed = support::shared();
    let ca_pem = bed.plane().as_ref().expect("plane").ca.cert_pem.clone();
    let before = served_certificate(manager.webhook_port, &ca_pem).await;

    let client = bed.client().await;
    let machines: Api<LibvirtMachine> = Api::namespaced(client, "default");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let stream = tokio::spawn(async move {
        let mut failures = Vec::new();
        for i in 0..150 {
            let mut doc = machine(minimal_spec());
            doc["metadata"]["name"] = json!(format!("rotation-{i}"));
            let object: LibvirtMachine = serde_json::from_value(doc).expect("typed");
            if let Err(e) = machines.create(&dry_run, &object).await {
                failures.push(format!("{i}: {e}"));
            }
        }
        failures
    });
    // Rotate twice while the stream runs (kubelet-style ..data swaps).
    let cert_dir = manager.cert_dir.clone();
    tokio::task::spawn_blocking(move || {
        for generation in [2, 3] {
            std::thread::sleep(Duration::from_millis(300));
            let plane = support::shared().plane();
            mount_secret(&cert_dir, generation, &plane.as_ref().expect("plane").ca);
        }
    })
    .await
    .expect("rotation");
    let failures = stream.await.expect("stream");
    assert!(
        failures.is_empty(),
        "admissions lost during rotation: {failures:?}"
    );

    let mut rotated = false;
    for _ in 0..100 {
        if served_certificate(manager.webhook_port, &ca_pem).await != before {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the webhook still serves the first certificate");
}

#[tokio::test]
async fn the_router_limits_bodies_and_rejects_other_methods_and_paths() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    let path = Kind::LibvirtMachine.path(Endpoint::Validate);

    let huge = vec![b' '; capl::webhook::server::MAX_BODY_BYTES + 1];
    let response = capl::webhook::server::router(DEV)
        .oneshot(
            Request::post(&path)
                .body(Body::from(huge))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let response = capl::webhook::server::router(DEV)
        .oneshot(Request::get(&path).body(Body::empty()).expect("request"))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);

    let response = capl::webhook::server::router(DEV)
        .oneshot(
            Request::post("/validate-something-else")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let body = review("CREATE", &machine(minimal_spec()), None, false);
    let response = capl::webhook::server::router(DEV)
        .oneshot(
            Request::post(&path)
                .body(Body::from(body))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
}
