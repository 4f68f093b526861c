//! The API's CRDs: generated files up to date, every field documented and bounded, CEL rules and
//! fixtures checked client-side (kube's CEL evaluator, the jsonschema crate) and on the real
//! apiserver (`kubectl explain`, `kubectl apply --dry-run=server`).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capl::api::{
    self, LibvirtCluster, LibvirtClusterTemplate, LibvirtMachine, LibvirtMachineTemplate,
};
use serde_json::Value;

// ---------------------------------------------------------------- fixtures

/// One fixture file: its documents and the expectations in its header comments.
struct Fixture {
    name: String,
    path: PathBuf,
    docs: Vec<Value>,
    /// `# expect: <text>`: substrings every rejection must contain (empty: must be accepted).
    expects: Vec<String>,
    /// `# jsonschema: reject|accept`: whether the plain JSON schema (no CEL, no list-map keys)
    /// catches this fixture.
    jsonschema: Option<String>,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures(set: &str) -> Vec<Fixture> {
    let dir = repo().join("tests/fixtures").join(set);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("fixture");
            let header = |key: &str| -> Vec<String> {
                text.lines()
                    .filter_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .map(str::to_owned)
                    .collect()
            };
            Fixture {
                name: path
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned(),
                docs: support::capi::read_yaml_docs(&path).expect("fixture YAML"),
                expects: header("expect"),
                jsonschema: header("jsonschema").into_iter().next(),
                path,
            }
        })
        .collect()
}

// ---------------------------------------------------------------- generated files

#[test]
fn crds_dir_is_up_to_date() {
    let rendered = api::crd::rendered().expect("rendering CRDs");
    let dir = repo().join("crds");
    let hint = "run `cargo run --bin manager -- crds` and commit crds/";
    for (name, yaml) in &rendered {
        let on_disk = std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("crds/{name} is missing ({e}); {hint}"));
        assert!(on_disk == *yaml, "crds/{name} is stale; {hint}");
    }
    let expected: BTreeSet<&str> = rendered.iter().map(|(n, _)| n.as_str()).collect();
    for entry in std::fs::read_dir(&dir).expect("crds/") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            expected.contains(name.as_str()),
            "crds/{name} is not generated; {hint}"
        );
    }
}

#[test]
fn crds_carry_the_cluster_api_contract_labels() {
    for crd in api::crd::all() {
        let labels = crd.metadata.labels.clone().unwrap_or_default();
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            labels.get("cluster.x-k8s.io/v1beta2").map(String::as_str),
            Some("v1alpha1"),
            "{name}"
        );
        assert_eq!(
            labels.get("cluster.x-k8s.io/provider").map(String::as_str),
            Some(api::PROVIDER_LABEL_VALUE),
            "{name}"
        );
        assert_eq!(crd.spec.scope, "Namespaced", "{name}");
        assert!(
            crd.spec
                .names
                .categories
                .as_deref()
                .unwrap_or_default()
                .contains(&"cluster-api".into()),
            "{name} is in the cluster-api category"
        );
        assert!(
            crd.spec.names.short_names.is_some(),
            "{name} has a short name"
        );
    }
}

fn schema_of(crd_name: &str) -> Value {
    let crd = api::crd::all()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(crd_name))
        .unwrap_or_else(|| panic!("no CRD {crd_name}"));
    let version = &crd.spec.versions[0];
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
            || crd_name.starts_with("libvirtclustertemplates"),
        "{crd_name} has a status subresource"
    );
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("openAPIV3Schema"),
    )
    .expect("schema JSON")
}

/// Every property under `schema`, as (dotted path, schema).
fn walk<'a>(schema: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.push((p.clone(), sub));
            walk(sub, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(items, path, out);
    }
}

const CRD_NAMES: [&str; 4] = [
    "libvirtclusters.infrastructure.cluster.x-k8s.io",
    "libvirtclustertemplates.infrastructure.cluster.x-k8s.io",
    "libvirtmachines.infrastructure.cluster.x-k8s.io",
    "libvirtmachinetemplates.infrastructure.cluster.x-k8s.io",
];

#[test]
fn every_field_is_documented_and_every_spec_string_and_list_is_bounded() {
    for crd in CRD_NAMES {
        let schema = schema_of(crd);
        let mut fields = Vec::new();
        walk(&schema, "", &mut fields);
        for (path, sub) in &fields {
            if path == "apiVersion" || path == "kind" || path == "metadata" {
                continue;
            }
            let description = sub.get("description").and_then(Value::as_str).unwrap_or("");
            assert!(
                !description.trim().is_empty(),
                "{crd}: {path} has no description"
            );
            if !path.starts_with("spec")
                || path.contains(".labels")
                || path.contains(".annotations")
            {
                continue;
            }
            match sub.get("type").and_then(Value::as_str) {
                Some("string") => assert!(
                    sub.get("maxLength").is_some() || sub.get("enum").is_some(),
                    "{crd}: string {path} has no maxLength"
                ),
                Some("array") => {
                    assert!(
                        sub.get("maxItems").is_some(),
                        "{crd}: list {path} has no maxItems"
                    )
                }
                Some("integer") => assert!(
                    sub.get("minimum").is_some() && sub.get("maximum").is_some(),
                    "{crd}: integer {path} is unbounded"
                ),
                _ => {}
            }
        }
    }
}

#[test]
fn conditions_and_keyed_lists_are_list_maps() {
    let machine = schema_of(CRD_NAMES[2]);
    for (pointer, key) in [
        ("/properties/status/properties/conditions", "type"),
        ("/properties/spec/properties/networkInterfaces", "name"),
        ("/properties/spec/properties/dataVolumes", "name"),
    ] {
        let list = machine
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{pointer}"));
        assert_eq!(list["x-kubernetes-list-type"], "map", "{pointer}");
        assert_eq!(
            list["x-kubernetes-list-map-keys"],
            serde_json::json!([key]),
            "{pointer}"
        );
    }
    let cluster = schema_of(CRD_NAMES[0]);
    for pointer in [
        "/properties/spec/properties/hosts",
        "/properties/status/properties/failureDomains",
    ] {
        assert_eq!(
            cluster.pointer(pointer).expect(pointer)["x-kubernetes-list-type"],
            "map"
        );
    }
}

#[test]
fn templates_carry_no_transition_rules() {
    for crd in [CRD_NAMES[1], CRD_NAMES[3]] {
        let text = schema_of(crd).to_string();
        assert!(
            !text.contains("oldSelf"),
            "{crd} has an oldSelf rule: it would block topology dry-runs and ownerRef updates"
        );
    }
}

// ---------------------------------------------------------------- jsonschema

/// The CRD schema as plain JSON Schema: `nullable` becomes a `null` type and objects with declared
/// properties reject unknown ones (what the apiserver's pruning + strict validation do).
fn strict_json_schema(schema: &Value) -> Value {
    fn rewrite(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.remove("nullable") == Some(Value::Bool(true))
                    && let Some(Value::String(t)) = map.get("type").cloned()
                {
                    map.insert("type".into(), serde_json::json!([t, "null"]));
                }
                if map.contains_key("properties")
                    && !map.contains_key("additionalProperties")
                    && !map.contains_key("x-kubernetes-preserve-unknown-fields")
                {
                    map.insert("additionalProperties".into(), Value::Bool(false));
                }
                for sub in map.values_mut() {
                    rewrite(sub);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(rewrite),
            _ => {}
        }
    }
    let mut schema = schema.clone();
    rewrite(&mut schema);
    // apiVersion, kind and metadata are validated by the apiserver itself, not the CRD schema.
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for field in ["apiVersion", "kind"] {
            props.insert(field.into(), serde_json::json!({"type": "string"}));
        }
        props.insert("metadata".into(), serde_json::json!({"type": "object"}));
    }
    schema
}

fn crd_for_kind(kind: &str) -> &'static str {
    match kind {
        "LibvirtCluster" => CRD_NAMES[0],
        "LibvirtClusterTemplate" => CRD_NAMES[1],
        "LibvirtMachine" => CRD_NAMES[2],
        "LibvirtMachineTemplate" => CRD_NAMES[3],
        other => panic!("fixture of unknown kind {other}"),
    }
}

fn json_schema_errors(doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().expect("kind");
    let schema = strict_json_schema(&schema_of(crd_for_kind(kind)));
    let validator = jsonschema::draft4::new(&schema).expect("a valid JSON schema");
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn fixtures_against_the_json_schema() {
    for fixture in fixtures("valid") {
        for doc in &fixture.docs {
            let errors = json_schema_errors(doc);
            assert!(errors.is_empty(), "{}: {errors:?}", fixture.name);
        }
    }
    for fixture in fixtures("invalid") {
        let errors = json_schema_errors(&fixture.docs[0]);
        match fixture.jsonschema.as_deref() {
            Some("reject") => assert!(
                !errors.is_empty(),
                "{}: the schema accepted it",
                fixture.name
            ),
            Some("accept") => assert!(errors.is_empty(), "{}: {errors:?}", fixture.name),
            other => panic!("{}: jsonschema header is {other:?}", fixture.name),
        }
    }
}

/// A validator for one schema `pattern`, the way the JSON-schema tests evaluate it.
fn pattern(regex: &str) -> jsonschema::Validator {
    jsonschema::draft4::new(&serde_json::json!({"type": "string", "pattern": regex}))
        .expect("a valid pattern")
}

/// The CRD's host URI pattern accepts every URI the backend's parser accepts, and refuses the
/// syntax the parser refuses (the review's bypasses included). It may accept more only where a
/// regular expression cannot say the rule: repeated parameters, forbidden IP literals, the test
/// driver without the flag.
#[test]
fn host_uri_pattern_agrees_with_the_parser() {
    use capl::libvirt::uri::{HostUri, UriPolicy};
    let schema = pattern(api::cluster::HOST_URI_PATTERN);
    let dev = UriPolicy {
        allow_test_driver: true,
    };
    let parsed_ok = [
        "qemu:///system",
        "qemu:///session",
        "qemu:///system?socket=/run/libvirt/libvirt-sock",
        "qemu:///system?socket=/tmp/capl-bed-1-x/libvirt/run/libvirt-sock",
        "qemu:///system?socket=/a/.b/...c/-sock-ro",
        "qemu+ssh://capl@hv1.example.com/system",
        "qemu+ssh://_svc.x-1@hv1.example.com/session",
        "qemu+ssh://hv1.example.com:2222/system?no_tty=1&known_hosts_verify=normal",
        "qemu+ssh://root@hv-1/system?socket=/var/run/libvirt/libvirt-sock-ro",
        "qemu+ssh://hv1/system?no_verify=0&no_tty=1&known_hosts_verify=ignore&socket=/r/x-sock",
        "qemu+ssh://capl@192.0.2.10/system",
        "qemu+ssh://capl@[2001:db8::10]:22/system",
        "qemu+ssh://[2001:db8:0:0:0:0:0:10]/system",
        "qemu+ssh://[::ffff:192.0.2.1]/system",
        "qemu+ssh://1a.2b.example/system",
        "qemu+tls://hv1.example.com/system",
        "qemu+tls://hv1.example.com:16514/system?no_verify=1",
        "qemu+tls://HV1.Example.COM:65535/system",
        "test:///default",
    ];
    for uri in parsed_ok {
        assert!(HostUri::parse(uri, dev).is_ok(), "parser refuses {uri}");
        assert!(schema.is_valid(&Value::from(uri)), "pattern refuses {uri}");
    }
    let refused_by_both = [
        "qemu+ssh://h/system?no_tty=1;command=/tmp/x",
        "qemu+ssh://h/system?socket=/run/x%7Ctouch%20/tmp/pwn",
        "qemu+ssh://h/system?no_tty%00=1",
        "qemu+ssh://%2DoProxyCommand/system",
        "qemu+ssh://h%20-oProxyCommand=x/system",
        "qemu+ssh://-oProxyCommand=x/system",
        "qemu+ssh://-l@h/system",
        "qemu+ssh://u:pw@h/system",
        "qemu+ssh://h/system?command=/bin/sh",
        "qemu+ssh://h/system?keyfile=/etc/shadow",
        "qemu+ssh://h/system?netcat=/tmp/x",
        "qemu+ssh://h/system?known_hosts=/etc/x",
        "qemu+ssh://h/system?proxy=native",
        "qemu+ssh://h/system?name=qemu:///embed",
        "qemu+ssh://h/system?no_tty=yes",
        "qemu+ssh://h/system?known_hosts_verify=never",
        "qemu+ssh://h/system?no_tty",
        "qemu+ssh://h/system?",
        "qemu+ssh://h/system?socket=/etc/passwd",
        "qemu+ssh://h/system?socket=/run/../etc/x-sock",
        "qemu+ssh://h/system?socket=/run/./x-sock",
        "qemu+ssh://h/system?socket=relative-sock",
        "qemu+ssh://h/system?socket=/run/$(touch)-sock",
        "qemu+ssh://h/system?socket=/run/x|touch-sock",
        "qemu+tls://h/system?pkipath=/etc",
        "qemu+tls://h/system?socket=/run/x-sock",
        "qemu+tls://user@h/system",
        "qemu:///system?no_tty=1",
        "qemu+ext:///system?command=/bin/sh",
        "qemu+tcp://h/system",
        "qemu+unix:///system",
        "QEMU:///system",
        "http://h/system",
        "qemu://h/system",
        "qemu+ssh:///system",
        "qemu:///embed",
        "qemu:///system/../x",
        "qemu:///system#x",
        "qemu+ssh://127.1/system",
        "qemu+ssh://0x7f.1/system",
        "qemu+ssh://2130706433/system",
        "qemu+ssh://256.1.1.1/system",
        "qemu+ssh://01.2.3.4/system",
        "qemu+ssh://[1:2:3:4:5:6:7:8:9]/system",
        "qemu+ssh://[fe80::1%25eth0]/system",
        "qemu+ssh://h:0/system",
        "qemu+ssh://h:99999/system",
        "qemu+ssh://h:022/system",
        "qemu+ssh://h.example.com./system",
        "qemu+ssh://h..example.com/system",
        "qemu+ssh://h",
        "qemu+ssh://h/system\n",
        "test:///etc/passwd",
        "test:///var/run/secrets/kubernetes.io/serviceaccount/token",
        "test:///default/../../etc/passwd",
        "test://host/default",
        "test:///default?x=1",
        "test://",
    ];
    for uri in refused_by_both {
        assert!(HostUri::parse(uri, dev).is_err(), "parser accepts {uri}");
        assert!(!schema.is_valid(&Value::from(uri)), "pattern accepts {uri}");
    }
    // Where only the parser (and the webhook) can tell.
    for uri in [
        "qemu+ssh://h/system?no_tty=1&no_tty=0",
        "qemu+ssh://127.0.0.1/system",
        "qemu+ssh://[::1]/system",
        "qemu+ssh://[::ffff:169.254.169.254]/system",
        "qemu+ssh://localhost/system",
        "qemu+tls://169.254.169.254/system",
    ] {
        assert!(HostUri::parse(uri, dev).is_err(), "parser accepts {uri}");
        assert!(
            schema.is_valid(&Value::from(uri)),
            "{uri}: the pattern is stricter than documented"
        );
    }
}

#[test]
fn endpoint_host_pattern_takes_dns_names_and_ip_addresses_only() {
    let schema = pattern(api::cluster::ENDPOINT_HOST_PATTERN);
    for ok in [
        "10.0.0.10",
        "api.example.com",
        "k8s-api",
        "2001:db8::10",
        "::1",
        "fe80::1",
    ] {
        assert!(schema.is_valid(&Value::from(ok)), "{ok}");
    }
    for bad in [
        "api|cluster",
        "API.example.com",
        "[2001:db8::10]",
        "a..b",
        "-a",
        "a_b",
        "host:6443",
        "exa\u{0}mple.com",
        "exa mple.com",
        "https://api.example.com",
    ] {
        assert!(!schema.is_valid(&Value::from(bad)), "{bad}");
    }
}

// ---------------------------------------------------------------- CEL, client-side

/// Runs the CRD's CEL rules on `doc` (and `old` for transition rules) with kube's evaluator.
fn cel_errors(doc: &Value, old: Option<&Value>) -> Result<(), String> {
    fn check<K>(doc: &Value, old: Option<&Value>) -> Result<(), String>
    where
        K: kube::CustomResourceExt + serde::Serialize + serde::de::DeserializeOwned,
    {
        let new: K = serde_json::from_value(doc.clone()).map_err(|e| format!("decode: {e}"))?;
        let result = match old {
            None => kube::core::cel::validate_cel(&new),
            Some(old) => {
                let old: K =
                    serde_json::from_value(old.clone()).map_err(|e| format!("decode: {e}"))?;
                kube::core::cel::validate_cel_update(&new, &old)
            }
        };
        result.map_err(|e| e.to_string())
    }
    match doc["kind"].as_str() {
        Some("LibvirtCluster") => check::<LibvirtCluster>(doc, old),
        Some("LibvirtClusterTemplate") => check::<LibvirtClusterTemplate>(doc, old),
        Some("LibvirtMachine") => check::<LibvirtMachine>(doc, old),
        Some("LibvirtMachineTemplate") => check::<LibvirtMachineTemplate>(doc, old),
        other => panic!("unknown kind {other:?}"),
    }
}

#[test]
fn cel_rules_accept_valid_fixtures_and_reject_invalid_ones() {
    for fixture in fixtures("valid") {
        cel_errors(&fixture.docs[0], None).unwrap_or_else(|e| panic!("{}: {e}", fixture.name));
    }
    // Fixtures the plain schema accepts are caught by CEL, except duplicates (caught by list-map keys).
    let mut checked = 0;
    for fixture in fixtures("invalid") {
        if fixture.jsonschema.as_deref() != Some("accept")
            || fixture.expects.iter().any(|e| e.contains("Duplicate"))
        {
            continue;
        }
        let err = cel_errors(&fixture.docs[0], None)
            .err()
            .unwrap_or_else(|| panic!("{}: CEL accepted it", fixture.name));
        let message = fixture.expects.last().expect("an expectation");
        assert!(
            err.contains(message.as_str()),
            "{}: {err} lacks {message:?}",
            fixture.name
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} CEL fixtures");
}

#[test]
fn cel_transition_rules_guard_updates() {
    for fixture in fixtures("update") {
        let [before, after] = &fixture.docs[..] else {
            panic!("{}: an update fixture has two documents", fixture.name)
        };
        let result = cel_errors(after, Some(before));
        match fixture.expects.first() {
            None => result.unwrap_or_else(|e| panic!("{}: {e}", fixture.name)),
            Some(message) => {
                let err = result
                    .err()
                    .unwrap_or_else(|| panic!("{}: update accepted", fixture.name));
                assert!(err.contains(message.as_str()), "{}: {err}", fixture.name);
            }
        }
    }
}

// ---------------------------------------------------------------- schema and webhooks agree

/// Runs one admission request through the provider's own handlers, with the policy the tests'
/// manager runs with (`--allow-test-driver`).
fn admit(
    endpoint: capl::webhook::admission::Endpoint,
    doc: &Value,
) -> kube::core::admission::AdmissionResponse {
    use capl::webhook::admission::{AdmissionPolicy, Kind};
    use kube::core::DynamicObject;
    use kube::core::admission::{AdmissionRequest, AdmissionReview};
    let kind_name = doc["kind"].as_str().expect("kind");
    let kind = *Kind::ALL
        .iter()
        .find(|k| k.name() == kind_name)
        .expect("one of our kinds");
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-4000-8000-000000000010",
            "kind": {"group": api::GROUP, "version": api::VERSION, "kind": kind_name},
            "resource": {"group": api::GROUP, "version": api::VERSION, "resource": kind.plural()},
            "name": doc["metadata"]["name"],
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "tester"},
            "object": doc,
        }
    }))
    .expect("review");
    let request: AdmissionRequest<DynamicObject> = review.try_into().expect("request");
    let policy = AdmissionPolicy {
        uri: capl::libvirt::uri::UriPolicy {
            allow_test_driver: true,
        },
    };
    capl::webhook::admission::review(kind, endpoint, &request, &policy)
}

/// Every valid fixture passes the schema (JSON schema and CEL) and both webhooks: defaulting, then
/// validation of the defaulted object.
#[test]
fn valid_fixtures_pass_the_schema_and_the_webhooks() {
    use capl::webhook::admission::Endpoint;
    let mut checked = 0;
    for fixture in fixtures("valid") {
        for doc in &fixture.docs {
            let errors = json_schema_errors(doc);
            assert!(errors.is_empty(), "{}: schema: {errors:?}", fixture.name);
            cel_errors(doc, None).unwrap_or_else(|e| panic!("{}: CEL: {e}", fixture.name));
            let mutated = admit(Endpoint::Mutate, doc);
            assert!(
                mutated.allowed,
                "{}: defaulting: {:?}",
                fixture.name, mutated.result
            );
            let mut defaulted = doc.clone();
            if let Some(patch) = &mutated.patch {
                let patch: json_patch::Patch = serde_json::from_slice(patch).expect("JSON patch");
                json_patch::patch(&mut defaulted, &patch).expect("the patch applies");
            }
            assert!(
                json_schema_errors(&defaulted).is_empty(),
                "{}: the defaulted object breaks the schema",
                fixture.name
            );
            let validated = admit(Endpoint::Validate, &defaulted);
            assert!(
                validated.allowed,
                "{}: denied by the webhook: {}",
                fixture.name, validated.result.message
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} valid fixtures");
}

/// Invalid fixtures with a `# webhook: <message>` header are denied by the webhook as well, with
/// that message: the schema is not the only line of defence.
#[test]
fn invalid_fixtures_marked_for_the_webhook_are_denied_by_it_too() {
    use capl::webhook::admission::Endpoint;
    let mut checked = 0;
    for fixture in fixtures("invalid") {
        let text = std::fs::read_to_string(&fixture.path).expect("fixture");
        let Some(message) = text.lines().find_map(|l| l.strip_prefix("# webhook: ")) else {
            continue;
        };
        let response = admit(Endpoint::Validate, &fixture.docs[0]);
        assert!(
            !response.allowed,
            "{}: the webhook allowed it",
            fixture.name
        );
        assert!(
            response.result.message.contains(message),
            "{}: {:?} lacks {message:?}",
            fixture.name,
            response.result.message
        );
        checked += 1;
    }
    assert!(
        checked >= 20,
        "only {checked} fixtures marked for the webhook"
    );
}

// ---------------------------------------------------------------- on the real apiserver

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The shared bed with `crds/` applied and Established.
fn bed_with_crds() -> &'static support::TestBed {
    let bed = support::shared();
    bed.install_provider_crds();
    bed
}

fn namespace(bed: &support::TestBed, name: &str) -> String {
    let out = bed.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"),
    );
    assert!(
        out.status.success(),
        "namespace {name}: {}",
        text(&out.stderr)
    );
    name.to_owned()
}

fn apply(bed: &support::TestBed, ns: &str, doc: &Value, dry_run: bool) -> std::process::Output {
    let mut args = vec!["apply", "-n", ns, "--validate=strict", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    bed.kubectl_stdin(&args, &serde_json::to_string(doc).expect("JSON"))
}

#[test]
fn kubectl_explain_documents_every_field() {
    let bed = bed_with_crds();
    for (resource, crd) in [
        ("libvirtmachines", CRD_NAMES[2]),
        ("libvirtclusters", CRD_NAMES[0]),
    ] {
        let schema = schema_of(crd);
        let spec = &schema["properties"]["spec"];
        let mut fields = Vec::new();
        walk(spec, "", &mut fields);

        // --recursive lists every field of the schema.
        let explained = support::process::poll(
            "kubectl explain to know the CRD",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                let out = bed.kubectl(&["explain", &format!("{resource}.spec"), "--recursive"]);
                Ok(out.status.success().then(|| text(&out.stdout)))
            },
        )
        .expect("kubectl explain --recursive");
        let listed: BTreeSet<&str> = explained
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for (path, _) in &fields {
            let leaf = path.rsplit('.').next().expect("name");
            assert!(
                listed.contains(leaf),
                "explain {resource}.spec --recursive lacks {path}"
            );
        }

        // Every leaf's explanation carries its description.
        for (path, sub) in fields.iter().filter(|(_, s)| s.get("properties").is_none()) {
            let out = bed.kubectl(&["explain", &format!("{resource}.spec.{path}")]);
            assert!(
                out.status.success(),
                "explain {path}: {}",
                text(&out.stderr)
            );
            let shown = text(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let description = sub["description"].as_str().expect("description");
            let start: String = description
                .split_whitespace()
                .take(6)
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                shown.contains(&start),
                "explain {resource}.spec.{path} lacks {start:?}:\n{shown}"
            );
        }
    }
}

#[test]
fn valid_fixtures_apply() {
    let bed = bed_with_crds();
    let ns = namespace(bed, "api-valid");
    for fixture in fixtures("valid") {
        let out = apply(bed, &ns, &fixture.docs[0], false);
        assert!(
            out.status.success(),
            "{}: {}",
            fixture.name,
            text(&out.stderr)
        );
    }
    // Read back through the API, the objects keep what was written.
    let out = bed.kubectl(&[
        "get",
        "libvirtmachine",
        "full",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.networkInterfaces[1].macAddress}",
    ]);
    assert_eq!(text(&out.stdout), "52:54:00:12:34:56");
    // Printer columns and short names work.
    let out = bed.kubectl(&["get", "lvm", "-n", &ns]);
    let table = text(&out.stdout);
    for column in ["CLUSTER", "HOST", "STATE", "ADDRESS", "PROVIDERID", "AGE"] {
        assert!(table.contains(column), "lvm table lacks {column}:\n{table}");
    }
    let out = bed.kubectl(&["get", "cluster-api", "-n", &ns, "-o", "name"]);
    assert!(
        text(&out.stdout).contains("libvirtcluster"),
        "category cluster-api lists our kinds"
    );
}

#[test]
fn invalid_fixtures_are_rejected_naming_the_field() {
    let bed = bed_with_crds();
    let ns = namespace(bed, "api-invalid");
    for fixture in fixtures("invalid") {
        assert!(
            !fixture.expects.is_empty(),
            "{}: no expectation",
            fixture.path.display()
        );
        let out = apply(bed, &ns, &fixture.docs[0], true);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{}: the apiserver accepted it",
            fixture.name
        );
        for expect in &fixture.expects {
            assert!(
                stderr.contains(expect.as_str()),
                "{}: rejection lacks {expect:?}:\n{stderr}",
                fixture.name
            );
        }
    }
}

#[test]
fn immutable_fields_are_enforced_on_update() {
    let bed = bed_with_crds();
    let ns = namespace(bed, "api-update");
    for fixture in fixtures("update") {
        let [before, after] = &fixture.docs[..] else {
            panic!("{}: two documents expected", fixture.name)
        };
        let kind = before["kind"].as_str().expect("kind").to_lowercase();
        let name = before["metadata"]["name"].as_str().expect("name");
        let _ = bed.kubectl(&[
            "delete",
            &kind,
            name,
            "-n",
            &ns,
            "--ignore-not-found",
            "--wait",
        ]);
        let created = apply(bed, &ns, before, false);
        assert!(
            created.status.success(),
            "{}: {}",
            fixture.name,
            text(&created.stderr)
        );
        let updated = apply(bed, &ns, after, true);
        let stderr = text(&updated.stderr);
        if fixture.expects.is_empty() {
            assert!(updated.status.success(), "{}: {stderr}", fixture.name);
        } else {
            assert!(
                !updated.status.success(),
                "{}: the update was accepted",
                fixture.name
            );
            for expect in &fixture.expects {
                assert!(
                    stderr.contains(expect.as_str()),
                    "{}: lacks {expect:?}: {stderr}",
                    fixture.name
                );
            }
        }
    }
}
