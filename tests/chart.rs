//! The Helm chart, the clusterctl components and the cert-manager manifests, without a node:
//! lint (Helm v3 and v4), the schema's refusals, RBAC, the webhooks against the generator, Pod
//! Security "restricted", server-side dry runs on the bed, generated files kept current, and the
//! cluster templates rendered by the real clusterctl.

#[path = "support/chart.rs"]
mod chart;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::{Value, json};

use capl::api;
use capl::webhook::configs::{self, Target};
use support::tools::Tools;

fn tools() -> Tools {
    Tools::locate().expect("the pinned tools (tests/tools/install.sh)")
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn render(extra: &[&str]) -> Vec<Value> {
    docs(&chart::template(&tools().helm, extra).expect("helm template"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

fn args_of(objects: &[Value]) -> Vec<String> {
    let deployment = one(objects, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "manager");
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

fn update_golden() -> bool {
    std::env::var_os("CAPL_UPDATE_GOLDEN").is_some()
}

// ---------------------------------------------------------------- chart metadata and files

#[test]
fn chart_version_follows_the_crate() {
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart::chart_dir().join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let rendered = api::crd::rendered().expect("rendering CRDs");
    let dir = chart::chart_dir().join("crds");
    let hint =
        "run `cargo run --bin manager -- crds --out-dir charts/cluster-api-provider-libvirt/crds`";
    if update_golden() {
        for (name, yaml) in &rendered {
            std::fs::write(dir.join(name), yaml).expect("writing a chart CRD");
        }
    }
    let expected: BTreeSet<String> = rendered.iter().map(|(n, _)| n.clone()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("chart crds/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "chart crds/ holds other files; {hint}");
    for (name, yaml) in &rendered {
        let in_chart = std::fs::read_to_string(dir.join(name)).expect("chart CRD");
        let in_repo = std::fs::read_to_string(chart::repo().join("crds").join(name)).expect("CRD");
        assert!(in_chart == *yaml, "chart crds/{name} is stale; {hint}");
        assert!(
            in_chart == in_repo,
            "chart crds/{name} differs from crds/{name}"
        );
    }
}

#[test]
fn generated_files_are_current() {
    let files = chart::generated(&tools().helm).expect("generating");
    for (path, content) in files {
        let full = chart::repo().join(&path);
        if update_golden() {
            std::fs::write(&full, &content).expect("writing a generated file");
        }
        let on_disk = std::fs::read_to_string(&full).unwrap_or_default();
        assert!(
            on_disk == content,
            "{} is stale: rerun with CAPL_UPDATE_GOLDEN=1 and commit it",
            path.display()
        );
    }
}

#[test]
fn every_value_is_described_and_in_the_schema() {
    let values = std::fs::read_to_string(chart::chart_dir().join("values.yaml")).expect("values");
    let (leaves, _) = chart::parse_values(&values).expect("every value has a comment");
    assert!(leaves.len() > 50, "{} values", leaves.len());
    // An undocumented value is refused by the generator.
    let err = chart::parse_values("a: 1\n").expect_err("no comment");
    assert!(err.to_string().contains("a has no comment"), "{err}");
    // A schema property without a value in values.yaml too.
    let schema = json!({"properties": {"a": {"type": "integer"}, "b": {"type": "string"}}});
    let err = chart::readme("# A.\na: 1\n", &schema).expect_err("b undocumented");
    assert!(err.to_string().contains("has b"), "{err}");
    let readme = chart::readme_from_disk().expect("README");
    assert!(readme.contains("| `image.pullPolicy` | string | `IfNotPresent` | one of `Always`, `IfNotPresent`, `Never` |"), "{readme}");
}

// ---------------------------------------------------------------- lint and schema

/// Value sets every lint runs with (each must pass `--strict` with Helm v3 and v4).
const LINT_SETS: &[&[&str]] = &[
    &[],
    &["--set", "certManager.enabled=true"],
    &[
        "--set",
        "metrics.serviceMonitor.enabled=true,networkPolicy.enabled=true,libvirt.knownHosts.enabled=true,libvirt.knownHosts.content=host ssh-ed25519 AAAA,libvirt.socket.enabled=true,manager.allowTestDriver=true,image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef,podAntiAffinity=hard,replicaCount=1,tmpDir.sizeLimit=20Gi",
    ],
];

#[test]
fn helm_lint_strict_passes_with_helm_3_and_4() {
    let tools = tools();
    let chart = chart::chart_dir();
    let chart = chart.to_string_lossy();
    for helm in [&tools.helm, &tools.helm3] {
        for set in LINT_SETS {
            let mut args = vec!["lint", "--strict", &*chart];
            args.extend_from_slice(set);
            let out = chart::helm(helm, &args)
                .unwrap_or_else(|e| panic!("{} {set:?}: {e:#}", helm.display()));
            assert!(out.contains("0 chart(s) failed"), "{out}");
        }
    }
}

#[test]
fn the_schema_rejects_bad_values_naming_them() {
    let tools = tools();
    // (--set argument, what the error must name)
    let cases: &[(&str, &str)] = &[
        (
            "unknownKey=1",
            "additional properties 'unknownKey' not allowed",
        ),
        (
            "image.unknown=x",
            "additional properties 'unknown' not allowed",
        ),
        ("replicaCount=-1", "/replicaCount"),
        ("replicaCount=0", "/replicaCount"),
        ("replicaCount=two", "/replicaCount"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("image.tag=v1 beta", "/image/tag"),
        ("image.tag=v1;rm", "/image/tag"),
        ("image.digest=sha256:xyz", "/image/digest"),
        ("image.repository=Bad Repo", "/image/repository"),
        ("manager.logFormat=xml", "/manager/logFormat"),
        (
            "manager.libvirtMachineConcurrency=0",
            "/manager/libvirtMachineConcurrency",
        ),
        ("manager.kubeApiQps=0", "/manager/kubeApiQps"),
        ("manager.syncPeriod=soon", "/manager/syncPeriod"),
        ("manager.extraArgs[0]=rm -rf", "/manager/extraArgs/0"),
        (
            "manager.leaderElection.enabled=maybe",
            "/manager/leaderElection/enabled",
        ),
        ("webhook.port=70000", "/webhook/port"),
        ("metrics.port=0", "/metrics/port"),
        ("podAntiAffinity=always", "/podAntiAffinity"),
        ("securityContext.runAsUser=0", "/securityContext/runAsUser"),
        ("certManager.duration=1y", "/certManager/duration"),
        ("fullnameOverride=Not_A_Name", "/fullnameOverride"),
        ("libvirt.home=relative", "/libvirt/home"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
    ];
    let chart = chart::chart_dir();
    let chart = chart.to_string_lossy();
    for helm in [&tools.helm, &tools.helm3] {
        for (set, named) in cases {
            let err = chart::helm(helm, &["template", "x", &*chart, "--set", set])
                .map(|_| ())
                .expect_err(&format!("{set} was accepted by {}", helm.display()));
            let message = format!("{err:#}");
            assert!(
                message.contains("values don't meet the specifications of the schema"),
                "{set}: {message}"
            );
            // Helm v3 names the path as `replicaCount`, v4 as `/replicaCount`.
            let v3_name = named.trim_start_matches('/').replace('/', ".");
            assert!(
                message.contains(named) || message.contains(&v3_name),
                "{set} ({}): the error does not name {named}: {message}",
                helm.display()
            );
        }
    }
}

// ---------------------------------------------------------------- what the chart renders

#[test]
fn rbac_is_exact_and_has_no_wildcards() {
    type Rule = (String, String, String, Option<String>);
    fn rules(objects: &[Value], kind: &str) -> BTreeSet<Rule> {
        let mut out = BTreeSet::new();
        for role in of_kind(objects, kind) {
            for rule in role["rules"].as_array().expect("rules") {
                let list = |key: &str| -> Vec<String> {
                    rule[key]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|v| v.as_str().expect("str").to_owned())
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let names = list("resourceNames");
                for group in list("apiGroups") {
                    for resource in list("resources") {
                        for verb in list("verbs") {
                            for name in names
                                .iter()
                                .map(|n| Some(n.clone()))
                                .chain(names.is_empty().then_some(None))
                            {
                                out.insert((group.clone(), resource.clone(), verb.clone(), name));
                            }
                        }
                    }
                }
            }
        }
        out
    }
    let rule = |g: &str, r: &str, v: &str, n: Option<&str>| -> Rule {
        (g.into(), r.into(), v.into(), n.map(str::to_owned))
    };
    let expand = |g: &str, resources: &[&str], verbs: &[&str], n: Option<&str>| {
        let mut set = BTreeSet::new();
        for r in resources {
            for v in verbs {
                set.insert(rule(g, r, v, n));
            }
        }
        set
    };
    let infra = "infrastructure.cluster.x-k8s.io";
    let mut cluster_wide = BTreeSet::new();
    cluster_wide.extend(expand(
        infra,
        &["libvirtmachines", "libvirtclusters"],
        &["get", "list", "watch", "patch"],
        None,
    ));
    cluster_wide.extend(expand(
        infra,
        &["libvirtmachines/status", "libvirtclusters/status"],
        &["patch"],
        None,
    ));
    cluster_wide.extend(expand(
        "cluster.x-k8s.io",
        &["machines", "clusters"],
        &["get", "list", "watch"],
        None,
    ));
    cluster_wide.extend(expand("", &["secrets"], &["get"], None));
    cluster_wide.extend(expand(
        "events.k8s.io",
        &["events"],
        &["create", "patch"],
        None,
    ));
    let mut namespaced = BTreeSet::new();
    namespaced.extend(expand(
        "coordination.k8s.io",
        &["leases"],
        &["create"],
        None,
    ));
    namespaced.extend(expand(
        "coordination.k8s.io",
        &["leases"],
        &["get", "update"],
        Some("capl-cluster-api-provider-libvirt-controller-manager"),
    ));

    // cert-manager mode: nothing for certificates.
    let objects = render(&["--set", "certManager.enabled=true"]);
    assert_eq!(rules(&objects, "ClusterRole"), cluster_wide);
    assert_eq!(rules(&objects, "Role"), namespaced);

    // Self-managed mode: the Secret and the two webhook configurations, by name.
    let config = "capl-cluster-api-provider-libvirt-webhook-configuration";
    cluster_wide.extend(expand(
        "admissionregistration.k8s.io",
        &[
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
        ],
        &["get", "list", "watch", "update", "patch"],
        Some(config),
    ));
    namespaced.extend(expand("", &["secrets"], &["create"], None));
    namespaced.extend(expand(
        "",
        &["secrets"],
        &["get", "list", "watch", "update", "patch"],
        Some("capl-cluster-api-provider-libvirt-webhook-cert"),
    ));
    let objects = render(&[]);
    assert_eq!(rules(&objects, "ClusterRole"), cluster_wide);
    assert_eq!(rules(&objects, "Role"), namespaced);
    for kind in ["ClusterRole", "Role"] {
        let text = serde_json::to_string(one(&objects, kind)).expect("json");
        assert!(!text.contains('*'), "a wildcard in the {kind}: {text}");
    }
    // Bindings bind the chart's ServiceAccount in the release namespace.
    let sa = one(&objects, "ServiceAccount")["metadata"]["name"].clone();
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let binding = one(&objects, kind);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": sa, "namespace": chart::NAMESPACE}])
        );
    }
}

/// A webhook configuration with the chart's names replaced by the generator's, without labels,
/// annotations and caBundle.
fn normalized(mut config: Value) -> Value {
    let name = configs::CONFIGURATION_NAME;
    config["metadata"] = json!({"name": name});
    for webhook in config["webhooks"].as_array_mut().expect("webhooks") {
        let service = &mut webhook["clientConfig"]["service"];
        service["name"] = json!(configs::SERVICE_NAME);
        service["namespace"] = json!(configs::SERVICE_NAMESPACE);
        if let Some(client) = webhook["clientConfig"].as_object_mut() {
            client.remove("caBundle");
        }
    }
    config
}

#[test]
fn chart_webhooks_match_the_generator() {
    let generated = docs(&configs::render(&Target::default(), None).expect("render"));
    for set in [&[][..], &["--set", "certManager.enabled=true"][..]] {
        let objects = render(set);
        for (kind, expected) in [
            ("MutatingWebhookConfiguration", &generated[0]),
            ("ValidatingWebhookConfiguration", &generated[1]),
        ] {
            let config = one(&objects, kind).clone();
            assert_eq!(
                config["metadata"]["name"],
                "capl-cluster-api-provider-libvirt-webhook-configuration"
            );
            let text = serde_json::to_string(&config).expect("json");
            assert!(
                !text.contains("caBundle"),
                "the chart must not template caBundle"
            );
            assert_eq!(normalized(config), normalized(expected.clone()), "{kind}");
        }
    }
}

#[test]
fn both_certificate_modes_render_as_documented() {
    let self_managed = [
        "--webhook-cert-secret=capl-cluster-api-provider-libvirt-webhook-cert",
        "--webhook-cert-secret-namespace=$(POD_NAMESPACE)",
        "--webhook-service-name=capl-cluster-api-provider-libvirt-webhook-service",
        "--webhook-service-namespace=$(POD_NAMESPACE)",
        "--webhook-configuration-name=capl-cluster-api-provider-libvirt-webhook-configuration",
    ];
    // Default: self-managed; no cert-manager objects, no certificate volume.
    let objects = render(&[]);
    let args = args_of(&objects);
    for flag in self_managed {
        assert!(args.contains(&flag.to_owned()), "{flag} missing: {args:?}");
    }
    for flag in [
        "--leader-elect",
        "--leader-election-namespace=$(POD_NAMESPACE)",
        "--health-probe-bind-address=:9440",
        "--metrics-bind-address=:8080",
        "--webhook-port=9443",
    ] {
        assert!(args.contains(&flag.to_owned()), "{flag} missing: {args:?}");
    }
    assert!(of_kind(&objects, "Certificate").is_empty());
    assert!(of_kind(&objects, "Issuer").is_empty());
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"], json!([{"name": "tmp", "emptyDir": {}}]));
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert!(one(&objects, kind)["metadata"].get("annotations").is_none());
    }

    // cert-manager: Issuers, Certificates, the mounted Secret, CA injection; no self-managed flags.
    let objects = render(&["--set", "certManager.enabled=true"]);
    let args = args_of(&objects);
    assert!(
        !args.iter().any(|a| a.starts_with("--webhook-cert-secret")
            || a.starts_with("--webhook-service")
            || a.starts_with("--webhook-configuration")),
        "{args:?}"
    );
    assert_eq!(of_kind(&objects, "Issuer").len(), 2);
    let certificates = of_kind(&objects, "Certificate");
    assert_eq!(certificates.len(), 2);
    let serving = certificates
        .iter()
        .find(|c| c["metadata"]["name"] == "capl-cluster-api-provider-libvirt-serving-cert")
        .expect("serving Certificate");
    assert_eq!(
        serving["spec"]["dnsNames"],
        json!([
            "capl-cluster-api-provider-libvirt-webhook-service.capl-system.svc",
            "capl-cluster-api-provider-libvirt-webhook-service.capl-system.svc.cluster.local"
        ])
    );
    let secret = serving["spec"]["secretName"].clone();
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "webhook-cert")
        .expect("certificate volume");
    assert_eq!(volume["secret"]["secretName"], secret);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == "webhook-cert")
        .expect("certificate mount");
    assert_eq!(mount["mountPath"], "/tmp/k8s-webhook-server/serving-certs");
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert_eq!(
            one(&objects, kind)["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "capl-system/capl-cluster-api-provider-libvirt-serving-cert"
        );
    }
}

#[test]
fn optional_objects_and_libvirt_mounts_render_when_asked() {
    let objects = render(&[]);
    for kind in ["ServiceMonitor", "NetworkPolicy", "ConfigMap", "Namespace"] {
        assert!(
            of_kind(&objects, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    assert_eq!(
        one(&objects, "PodDisruptionBudget")["spec"]["minAvailable"],
        1
    );
    let service = one(&objects, "Service");
    assert_eq!(
        service["spec"]["ports"][0],
        json!({"name": "webhook", "port": 443, "targetPort": "webhook-server", "protocol": "TCP"})
    );

    let objects = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true,networkPolicy.enabled=true,libvirt.knownHosts.enabled=true,libvirt.knownHosts.content=hv1 ssh-ed25519 AAAA,libvirt.socket.enabled=true,manager.allowTestDriver=true,replicaCount=1,manager.extraArgs[0]=--kube-api-qps=50",
    ]);
    assert_eq!(
        one(&objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"],
        "metrics"
    );
    one(&objects, "NetworkPolicy");
    assert!(
        of_kind(&objects, "PodDisruptionBudget").is_empty(),
        "no PDB for one replica"
    );
    assert_eq!(
        one(&objects, "ConfigMap")["data"]["known_hosts"],
        "hv1 ssh-ed25519 AAAA"
    );
    let args = args_of(&objects);
    assert!(args.contains(&"--allow-test-driver".to_owned()));
    assert_eq!(args.last().map(String::as_str), Some("--kube-api-qps=50"));
    let container = &one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("path"))
        .collect();
    assert!(
        mounts.contains(&"/home/nonroot/.ssh/known_hosts"),
        "{mounts:?}"
    );
    assert!(mounts.contains(&"/var/run/libvirt"), "{mounts:?}");
}

// ---------------------------------------------------------------- on the bed (no node needed)

fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let bed = support::shared();
    let out = match stdin {
        Some(input) => bed.kubectl_stdin(args, input),
        None => bed.kubectl(args),
    };
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn list(objects: &[Value]) -> String {
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": objects}))
        .expect("json")
}

/// Creates `namespace` (idempotently) with Pod Security "restricted" enforced and warned.
fn restricted_namespace(namespace: &str) {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }}});
    kubectl_ok(&["apply", "-f", "-"], Some(&ns.to_string()));
}

#[test]
fn rendered_chart_passes_server_side_dry_run_on_the_bed() {
    support::shared().install_provider_crds();
    // The APIs of cert-manager (Issuers and Certificates of certManager.enabled=true) and of the
    // Prometheus operator (ServiceMonitor), CRDs only: neither runs without a node.
    let mut apis = cert_manager_api();
    apis["items"].as_array_mut().expect("items").push(open_crd(
        "monitoring.coreos.com",
        "ServiceMonitor",
        "servicemonitors",
    ));
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&apis.to_string()),
    );
    for crd in [
        "crd/issuers.cert-manager.io",
        "crd/certificates.cert-manager.io",
        "crd/servicemonitors.monitoring.coreos.com",
    ] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !support::shared()
            .kubectl(&["wait", "--for=condition=Established", "--timeout=30s", crd])
            .status
            .success()
        {
            assert!(std::time::Instant::now() < deadline, "{crd}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    for (namespace, set) in [
        ("capl-dry-run", &[][..]),
        (
            "capl-dry-run-cert-manager",
            &[
                "--set",
                "certManager.enabled=true,metrics.serviceMonitor.enabled=true",
            ][..],
        ),
        (
            "capl-dry-run-options",
            &[
                "--set",
                "networkPolicy.enabled=true,libvirt.knownHosts.enabled=true,libvirt.knownHosts.content=hv1 ssh-ed25519 AAAA,priorityClassName=,manager.extraEnv[0].name=HTTPS_PROXY,manager.extraEnv[0].value=http://proxy:3128",
            ][..],
        ),
    ] {
        restricted_namespace(namespace);
        let chart_dir = chart::chart_dir();
        let chart_dir = chart_dir.to_string_lossy();
        let mut args = vec!["template", "capl", &*chart_dir, "--namespace", namespace];
        args.extend_from_slice(set);
        let yaml = chart::helm(&tools().helm, &args).expect("helm template");
        let objects = docs(&yaml);
        let out = kubectl_ok(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&list(&objects)),
        );
        assert!(!out.contains("Warning"), "warnings: {out}");
        assert_eq!(
            out.matches("created (server dry run)").count(),
            objects.len(),
            "every object: {out}"
        );
        assert!(out.contains("deployment.apps/capl-cluster-api-provider-libvirt-controller-manager created (server dry run)"), "{out}");
    }
}

#[test]
fn the_manager_pod_meets_pod_security_restricted() {
    let namespace = "capl-restricted";
    restricted_namespace(namespace);
    let objects = render(&[]);
    // The ServiceAccount must exist for a Pod to be admitted (dry run or not).
    let sa = one(&objects, "ServiceAccount").clone();
    let sa_in_ns = {
        let mut sa = sa;
        sa["metadata"]["namespace"] = json!(namespace);
        sa
    };
    kubectl_ok(&["apply", "-f", "-"], Some(&sa_in_ns.to_string()));

    let pod_of = |objects: &[Value]| {
        let template = &one(objects, "Deployment")["spec"]["template"];
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "capl-manager-check", "namespace": namespace, "labels": template["metadata"]["labels"]},
               "spec": template["spec"]})
    };
    // The Deployment: no Pod Security warning.
    let mut deployment = one(&objects, "Deployment").clone();
    deployment["metadata"]["namespace"] = json!(namespace);
    let out = kubectl_ok(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&deployment.to_string()),
    );
    assert!(!out.contains("violate PodSecurity"), "{out}");
    // Its pod, created (dry run) where "restricted" is enforced: admitted.
    let out = kubectl_ok(
        &["create", "--dry-run=server", "-f", "-"],
        Some(&pod_of(&objects).to_string()),
    );
    assert!(out.contains("created (server dry run)"), "{out}");
    // Control: the same pod with the libvirt socket (a hostPath) is refused, so enforcement is on.
    let objects = render(&["--set", "libvirt.socket.enabled=true"]);
    let out = support::shared().kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &pod_of(&objects).to_string(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("violates PodSecurity \"restricted:latest\"")
            && stderr.contains("hostPath"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------- deploy/

#[test]
fn components_follow_the_clusterctl_rules() {
    let text = std::fs::read_to_string(chart::repo().join("deploy/infrastructure-components.yaml"))
        .expect("components");
    let objects = docs(&text);
    let namespaces = of_kind(&objects, "Namespace");
    assert_eq!(namespaces.len(), 1, "exactly one Namespace");
    assert_eq!(namespaces[0]["metadata"]["name"], "capl-system");
    assert_eq!(of_kind(&objects, "CustomResourceDefinition").len(), 4);
    for object in &objects {
        let labels = &object["metadata"]["labels"];
        assert_eq!(
            labels["cluster.x-k8s.io/provider"], "infrastructure-libvirt",
            "{}",
            object["metadata"]["name"]
        );
        assert!(
            labels.get("app.kubernetes.io/managed-by").is_none(),
            "Helm labels in {}",
            object["metadata"]["name"]
        );
        if let Some(ns) = object["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "capl-system");
        }
    }
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "capl-controller-manager");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["name"],
        "manager"
    );
    for variable in [
        "${CAPL_IMAGE:=",
        "${CAPL_LOG_LEVEL:=info}",
        "${CAPL_LIBVIRTMACHINE_CONCURRENCY:=10}",
        "${CAPL_KUBE_API_QPS:=20}",
    ] {
        assert!(text.contains(variable), "{variable} missing");
    }
    assert!(!text.contains("caBundle"));
    // clusterctl takes `${VAR:=}` for a variable without default (that must be set).
    assert!(!text.contains(":=}"), "an empty default");
    let metadata: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart::repo().join("deploy/metadata.yaml")).expect("metadata"),
    )
    .expect("yaml");
    assert_eq!(
        metadata["apiVersion"],
        "clusterctl.cluster.x-k8s.io/v1alpha3"
    );
    let (major, minor) = {
        let mut parts = env!("CARGO_PKG_VERSION")
            .split('.')
            .map(|p| p.parse::<i64>().expect("number"));
        (parts.next().expect("major"), parts.next().expect("minor"))
    };
    assert!(
        metadata["releaseSeries"]
            .as_array()
            .expect("series")
            .contains(&json!({"major": major, "minor": minor, "contract": "v1beta2"}))
    );
}

/// `clusterctl generate cluster` from a template file, with the variables a user sets.
fn clusterctl_generate(template: &Path, namespace: &str, extra_env: &[(&str, &str)]) -> String {
    let tools = tools();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("clusterctl.yaml");
    std::fs::write(&config, "providers: []\n").expect("config");
    let mut cmd = std::process::Command::new(&tools.clusterctl);
    cmd.args([
        "generate",
        "cluster",
        "demo",
        "--from",
        &template.to_string_lossy(),
        "--config",
        &config.to_string_lossy(),
        "--target-namespace",
        namespace,
        "--kubernetes-version",
        "v1.33.4",
        "--control-plane-machine-count",
        "3",
        "--worker-machine-count",
        "2",
    ])
    .env("HOME", dir.path())
    .env("XDG_CONFIG_HOME", dir.path())
    .env("KUBECONFIG", &support::shared().kubeconfig)
    .env("CONTROL_PLANE_ENDPOINT_IP", "10.213.9.5")
    .env("LIBVIRT_URI", "qemu+ssh://capl@hv1.example.com/system")
    .env(
        "LIBVIRT_IMAGE_URL",
        "https://images.example.com/ubuntu-2404-kube-v1.33.4.qcow2",
    )
    .env(
        "LIBVIRT_IMAGE_SHA256",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    );
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("clusterctl");
    assert!(
        out.status.success(),
        "clusterctl generate cluster: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Applies the kubeadm bootstrap and control-plane CRDs (from the Go module cache) so that
/// KubeadmControlPlane and KubeadmConfigTemplate can be dry-run (schema only: their managers do
/// not run here, so their conversion stays `None`).
fn install_kubeadm_crds() {
    let src = tools().capi_src;
    let mut crds = Vec::new();
    for dir in [
        "bootstrap/kubeadm/config/crd/bases",
        "controlplane/kubeadm/config/crd/bases",
    ] {
        for entry in std::fs::read_dir(src.join(dir)).expect("CRD dir") {
            let path = entry.expect("entry").path();
            for mut crd in support::capi::read_yaml_docs(&path).expect("CRD") {
                if let Some(spec) = crd["spec"].as_object_mut() {
                    spec.remove("conversion");
                }
                crds.push(crd);
            }
        }
    }
    kubectl_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&list(&crds)),
    );
    // `kubectl wait` fails at once while a new CRD has no conditions yet: retry.
    let bed = support::shared();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = bed.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/kubeadmcontrolplanes.controlplane.cluster.x-k8s.io",
            "crd/kubeadmconfigtemplates.bootstrap.cluster.x-k8s.io",
        ]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kubeadm CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The provider's webhooks on the bed: the `manager` binary serving them on loopback, and the
/// generated configurations pointed at it by URL.
fn provider_webhooks() {
    static STARTED: std::sync::OnceLock<support::process::Proc> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| {
        let bed = support::shared();
        let dir = bed.test_dir("chart-webhooks");
        let cert_dir = dir.join("certs");
        let plane = bed.plane();
        let plane = plane.as_ref().expect("control plane");
        plane
            .ca
            .server("capl-webhook", &["127.0.0.1", "localhost"])
            .expect("serving cert")
            .write(&cert_dir, "tls.crt", "tls.key")
            .expect("writing the cert");
        let port = support::apiserver::free_port().expect("port");
        let (proc, _) = bed.start_manager(
            "chart-webhooks",
            env!("CARGO_BIN_EXE_manager"),
            &[
                "--webhook-host=127.0.0.1".into(),
                format!("--webhook-port={port}"),
                format!("--webhook-cert-dir={}", cert_dir.display()),
            ],
        );
        let manifests = configs::render(
            &Target::Url(format!("https://127.0.0.1:{port}")),
            Some(plane.ca.cert_pem.as_bytes()),
        )
        .expect("render");
        let out = bed.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifests);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        proc
    });
}

fn template_path(name: &str) -> PathBuf {
    chart::repo().join("deploy").join(name)
}

#[test]
fn cluster_templates_render_with_clusterctl_and_pass_server_dry_run() {
    let bed = support::shared();
    bed.capi();
    install_kubeadm_crds();
    provider_webhooks();
    for (file, namespace) in [
        ("cluster-template.yaml", "capl-template"),
        ("cluster-template-kube-vip.yaml", "capl-template-kube-vip"),
    ] {
        let rendered = clusterctl_generate(&template_path(file), namespace, &[]);
        assert!(
            !rendered.contains("${"),
            "{file}: an unset variable: {rendered}"
        );
        let raw = std::fs::read_to_string(template_path(file)).expect("template");
        assert!(
            !raw.contains(":=}"),
            "{file}: clusterctl takes `${{VAR:=}}` as required"
        );
        let objects = docs(&rendered);
        let kinds: BTreeSet<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().expect("kind"))
            .collect();
        for kind in [
            "Cluster",
            "LibvirtCluster",
            "KubeadmControlPlane",
            "LibvirtMachineTemplate",
            "MachineDeployment",
            "KubeadmConfigTemplate",
        ] {
            assert!(kinds.contains(kind), "{file}: no {kind}");
        }
        let kcp = one(&objects, "KubeadmControlPlane");
        assert_eq!(kcp["spec"]["replicas"], 3, "{file}");
        assert_eq!(kcp["spec"]["version"], "v1.33.4", "{file}");
        assert_eq!(
            one(&objects, "MachineDeployment")["spec"]["replicas"],
            2,
            "{file}"
        );
        assert_eq!(
            one(&objects, "LibvirtCluster")["spec"]["controlPlaneEndpoint"]["host"],
            "10.213.9.5"
        );
        // Nodes match Machines: kubelet's provider-id is the seed's provider-id (libvirt://<uuid>).
        for (kind, pointer) in [
            (
                "KubeadmControlPlane",
                "/spec/kubeadmConfigSpec/initConfiguration/nodeRegistration/kubeletExtraArgs",
            ),
            (
                "KubeadmControlPlane",
                "/spec/kubeadmConfigSpec/joinConfiguration/nodeRegistration/kubeletExtraArgs",
            ),
            (
                "KubeadmConfigTemplate",
                "/spec/template/spec/joinConfiguration/nodeRegistration/kubeletExtraArgs",
            ),
        ] {
            let args = one(&objects, kind)
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{file}: {kind} {pointer}"));
            assert!(
                args.as_array().expect("list").contains(
                    &json!({"name": "provider-id", "value": "{{ ds.meta_data.provider_id }}"})
                ),
                "{file}: {kind}: {args}"
            );
        }
        kubectl_ok(&["create", "namespace", namespace], None);
        let out = kubectl_ok(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
        assert!(
            out.contains("cluster.cluster.x-k8s.io/demo created (server dry run)"),
            "{out}"
        );
        assert!(out.contains("libvirtmachinetemplate.infrastructure.cluster.x-k8s.io/demo-control-plane created (server dry run)"), "{out}");
    }
    // The kube-vip flavor runs kube-vip as a static pod announcing the endpoint.
    let rendered = clusterctl_generate(&template_path("cluster-template-kube-vip.yaml"), "x", &[]);
    assert!(rendered.contains("/etc/kubernetes/manifests/kube-vip.yaml"));
    assert!(
        rendered.contains("value: 10.213.9.5"),
        "the VIP in kube-vip's manifest"
    );
}

// ---------------------------------------------------------------- clusterctl init, offline

/// Minimal cert-manager CRDs (Issuer, Certificate; any content). cert-manager cannot run on a bed
/// without a node; clusterctl only needs its API to accept its test Issuer and Certificate to
/// take cert-manager for installed (`EnsureInstalled` → `waitForAPIReady`).
fn cert_manager_api() -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": [
        open_crd("cert-manager.io", "Issuer", "issuers"),
        open_crd("cert-manager.io", "Certificate", "certificates"),
    ]})
}

/// A namespaced v1 CRD that accepts any content (the API of a component that cannot run here).
fn open_crd(group: &str, kind: &str, plural: &str) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {"group": group, "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    })
}

#[test]
fn clusterctl_init_from_a_local_repository_installs_the_components() {
    // A bed of its own: clusterctl writes the webhook configurations (pointing at a Service
    // without endpoints), which would deny the other tests' objects on the shared bed.
    let bed = support::TestBed::start().expect("a second bed");
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        let out = match stdin {
            Some(s) => bed.kubectl_stdin(args, s),
            None => bed.kubectl(args),
        };
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let wait_established = |crd: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !bed
            .kubectl(&["wait", "--for=condition=Established", "--timeout=30s", crd])
            .status
            .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{crd} not Established"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let tools = tools();

    // The local repository: this provider from deploy/, the core provider's metadata.yaml (its
    // contract) from the CAPI module.
    let dir = bed.test_dir("clusterctl-init");
    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    let ours = dir.join("repo/infrastructure-libvirt").join(&version);
    std::fs::create_dir_all(&ours).expect("repo dir");
    for file in [
        "infrastructure-components.yaml",
        "metadata.yaml",
        "cluster-template.yaml",
        "cluster-template-kube-vip.yaml",
    ] {
        std::fs::copy(chart::repo().join("deploy").join(file), ours.join(file)).expect("copy");
    }
    let core_version = &tools.versions.cluster_api;
    let core = dir.join("repo/cluster-api").join(core_version);
    std::fs::create_dir_all(&core).expect("core dir");
    std::fs::copy(
        tools.capi_src.join("metadata.yaml"),
        core.join("metadata.yaml"),
    )
    .expect("metadata");
    std::fs::write(core.join("core-components.yaml"), "").expect("core components");
    let config = dir.join("clusterctl.yaml");
    std::fs::write(
        &config,
        format!(
            "providers:\n  - name: cluster-api\n    type: CoreProvider\n    url: file://{}/core-components.yaml\n  - name: libvirt\n    type: InfrastructureProvider\n    url: file://{}/infrastructure-components.yaml\n",
            core.display(),
            ours.display()
        ),
    )
    .expect("config");

    // What a management cluster already has: the inventory with the core provider (clusterctl
    // installs core, kubeadm bootstrap and control plane on a "first run", i.e. without one),
    // and cert-manager's API.
    kubectl(
        &[
            "apply",
            "--server-side",
            "-f",
            &tools
                .capi_src
                .join("cmd/clusterctl/config/manifest/clusterctl-api.yaml")
                .to_string_lossy(),
        ],
        None,
    );
    wait_established("crd/providers.clusterctl.cluster.x-k8s.io");
    kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&cert_manager_api().to_string()),
    );
    wait_established("crd/issuers.cert-manager.io");
    wait_established("crd/certificates.cert-manager.io");
    kubectl(&["create", "namespace", "capi-system"], None);
    let core_provider = json!({
        "apiVersion": "clusterctl.cluster.x-k8s.io/v1alpha3", "kind": "Provider",
        "metadata": {"name": "cluster-api", "namespace": "capi-system",
                     "labels": {"clusterctl.cluster.x-k8s.io": "", "cluster.x-k8s.io/provider": "cluster-api"}},
        "providerName": "cluster-api", "type": "CoreProvider", "version": core_version,
    });
    kubectl(&["apply", "-f", "-"], Some(&core_provider.to_string()));

    let home = dir.join("home");
    let out = std::process::Command::new(&tools.clusterctl)
        .args([
            "init",
            "--infrastructure",
            &format!("libvirt:{version}"),
            "--config",
            &config.to_string_lossy(),
            "--kubeconfig",
            &bed.kubeconfig.to_string_lossy(),
        ])
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true")
        .output()
        .expect("clusterctl");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "clusterctl init: {log}");
    assert!(
        log.contains("Skipping installing cert-manager as it is already installed"),
        "{log}"
    );

    // The inventory records this provider; its objects exist, labelled by clusterctl.
    let provider: Value = serde_json::from_str(&kubectl(
        &[
            "get",
            "providers.clusterctl.cluster.x-k8s.io",
            "-n",
            "capl-system",
            "infrastructure-libvirt",
            "-o",
            "json",
        ],
        None,
    ))
    .expect("json");
    assert_eq!(provider["type"], "InfrastructureProvider");
    assert_eq!(provider["providerName"], "libvirt");
    assert_eq!(provider["version"], version.as_str());
    let deployment: Value = serde_json::from_str(&kubectl(
        &[
            "get",
            "deployment",
            "-n",
            "capl-system",
            "capl-controller-manager",
            "-o",
            "json",
        ],
        None,
    ))
    .expect("json");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["name"],
        "manager"
    );
    assert_eq!(
        deployment["metadata"]["labels"]["clusterctl.cluster.x-k8s.io"],
        ""
    );
    let crds = kubectl(
        &[
            "get",
            "crd",
            "-l",
            "cluster.x-k8s.io/provider=infrastructure-libvirt",
            "-o",
            "name",
        ],
        None,
    );
    assert_eq!(crds.lines().count(), 4, "{crds}");
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let config: Value = serde_json::from_str(&kubectl(
            &["get", kind, "capl-webhook-configuration", "-o", "json"],
            None,
        ))
        .expect("json");
        assert_eq!(
            config["webhooks"][0]["clientConfig"]["service"]["namespace"],
            "capl-system"
        );
    }
    for (kind, name) in [
        ("serviceaccount", "capl-manager"),
        ("service", "capl-webhook-service"),
        ("role", "capl-manager"),
        ("poddisruptionbudget", "capl-controller-manager"),
    ] {
        kubectl(&["get", kind, "-n", "capl-system", name], None);
    }
    kubectl(&["get", "clusterrole", "capl-manager"], None);
    bed.shutdown();
}

// ---------------------------------------------------------------- RBAC is enough

/// Polls `probe` every 200 ms for up to 60 s.
fn wait_for(what: &str, context: &dyn Fn() -> String, mut probe: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !probe() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            context()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn the_chart_rbac_is_enough_for_the_manager() {
    // A bed of its own, with the Cluster API core: the manager runs as the chart's
    // ServiceAccount (impersonated) on the test driver, and nothing else's webhooks interfere.
    let bed = support::TestBed::start().expect("a bed");
    bed.capi();
    bed.install_provider_crds();
    let get_json = |args: &[&str]| -> Option<Value> {
        let out = bed.kubectl(args);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("json"))
    };
    let apply = |objects: &[Value]| {
        let out = bed.kubectl_stdin(&["apply", "-f", "-"], &list(objects));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let release_ns = "capl-rbac";
    let ns = "rbac-workload";
    for name in [release_ns, ns] {
        assert!(bed.kubectl(&["create", "namespace", name]).status.success());
    }
    // The chart's ServiceAccount and RBAC, in the default (self-managed certificate) mode.
    let chart_dir = chart::chart_dir();
    let yaml = chart::helm(
        &tools().helm,
        &[
            "template",
            "capl",
            &chart_dir.to_string_lossy(),
            "--namespace",
            release_ns,
        ],
    )
    .expect("helm template");
    let objects = docs(&yaml);
    let rbac: Vec<Value> = objects
        .iter()
        .filter(|o| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&o["kind"].as_str().unwrap_or_default())
        })
        .cloned()
        .collect();
    assert_eq!(rbac.len(), 5);
    apply(&rbac);
    let args = args_of(&objects);
    let lease = args
        .iter()
        .find_map(|a| a.strip_prefix("--leader-election-id="))
        .expect("lease id")
        .to_owned();

    // A kubeconfig that acts as the ServiceAccount.
    let dir = bed.test_dir("rbac");
    let mut kubeconfig: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&bed.kubeconfig).expect("kubeconfig"))
            .expect("yaml");
    let sa = one(&objects, "ServiceAccount")["metadata"]["name"]
        .as_str()
        .expect("sa")
        .to_owned();
    for user in kubeconfig["users"].as_array_mut().expect("users") {
        user["user"]["as"] = json!(format!("system:serviceaccount:{release_ns}:{sa}"));
    }
    let impersonating = dir.join("kubeconfig");
    std::fs::write(
        &impersonating,
        serde_yaml::to_string(&kubeconfig).expect("yaml"),
    )
    .expect("write");

    // The manager with the chart's arguments that matter here (leader election on the chart's
    // Lease, events, controllers), reconciling a cluster and a machine on the test driver.
    let log_path = dir.join("manager.log");
    // The self-managed certificate: the chart's empty Secret, the manager's flags as the chart
    // passes them (the pod's namespace spelled out).
    apply(&[one(&objects, "Secret").clone()]);
    let certificate_args: Vec<String> = args
        .iter()
        .filter(|a| {
            a.starts_with("--webhook-cert-secret")
                || a.starts_with("--webhook-service-")
                || a.starts_with("--webhook-configuration-name=")
        })
        .map(|a| a.replace("$(POD_NAMESPACE)", release_ns))
        .collect();
    assert_eq!(certificate_args.len(), 5, "{args:?}");
    let mut manager_args = vec![
        format!("--kubeconfig={}", impersonating.display()),
        "--leader-elect".into(),
        format!("--leader-election-namespace={release_ns}"),
        format!("--leader-election-id={lease}"),
        "--allow-test-driver".into(),
        format!(
            "--webhook-port={}",
            support::apiserver::free_port().expect("port")
        ),
        "--webhook-host=127.0.0.1".into(),
    ];
    manager_args.extend(certificate_args);
    let (proc, _) = bed.start_manager("rbac", env!("CARGO_BIN_EXE_manager"), &manager_args);
    apply(&[
        json!({"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Cluster", "metadata": {"name": "c", "namespace": ns},
               "spec": {"infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "LibvirtCluster", "name": "c"}}}),
        json!({"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtCluster",
               "metadata": {"name": "c", "namespace": ns, "labels": {"cluster.x-k8s.io/cluster-name": "c"}},
               "spec": {"hosts": [{"name": "a", "uri": "test:///default"}], "storagePool": "default-pool"}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "m-bootstrap", "namespace": ns},
               "stringData": {"value": "#cloud-config\n", "format": "cloud-config"}}),
        json!({"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
               "metadata": {"name": "m", "namespace": ns, "labels": {"cluster.x-k8s.io/cluster-name": "c"}},
               "spec": {"clusterName": "c", "bootstrap": {"dataSecretName": "m-bootstrap"},
                        "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "LibvirtMachine", "name": "m"}}}),
        json!({"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtMachine",
               "metadata": {"name": "m", "namespace": ns, "labels": {"cluster.x-k8s.io/cluster-name": "c"}},
               "spec": {"vcpus": 1, "memoryMiB": 512, "image": {"volume": {"pool": "default-pool", "name": "missing.qcow2"}}, "rootVolume": {"sizeGiB": 1}}}),
    ]);
    // The Lease (create, get, update), the cluster's finalizer and status (patch, status patch,
    // Cluster get/watch), the machine's identity (patch; Machine, Secret get) and its status.
    let context = || {
        format!(
            "the manager's log:\n{}\nthe objects:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            String::from_utf8_lossy(&bed.kubectl(&["get", "-n", ns, "machines.cluster.x-k8s.io,libvirtmachines,clusters.cluster.x-k8s.io,libvirtclusters", "-o", "yaml"]).stdout)
        )
    };
    wait_for("the Lease", &context, || {
        get_json(&["get", "lease", "-n", release_ns, &lease, "-o", "json"]).is_some_and(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .is_some_and(|h| !h.is_empty())
        })
    });
    wait_for("the LibvirtCluster provisioned", &context, || {
        get_json(&["get", "libvirtcluster", "-n", ns, "c", "-o", "json"]).is_some_and(|c| {
            c["status"]["initialization"]["provisioned"] == true
                && c["metadata"]["finalizers"].is_array()
        })
    });
    wait_for("the LibvirtMachine's identity and status", &context, || {
        get_json(&["get", "libvirtmachine", "-n", ns, "m", "-o", "json"]).is_some_and(|m| {
            m["spec"]["domainUUID"].is_string() && m["status"]["conditions"].is_array()
        })
    });
    wait_for("an Event", &context, || {
        get_json(&["get", "events.events.k8s.io", "-n", ns, "-o", "json"])
            .is_some_and(|e| e["items"].as_array().is_some_and(|i| !i.is_empty()))
    });
    // The certificate's Secret (get, watch, update), then the webhook configurations once they
    // exist (get, watch, patch). They are removed before anything else is admitted: their
    // Service has no endpoints here.
    let secret = one(&objects, "Secret")["metadata"]["name"]
        .as_str()
        .expect("secret")
        .to_owned();
    wait_for("the certificate in its Secret", &context, || {
        get_json(&["get", "secret", "-n", release_ns, &secret, "-o", "json"])
            .is_some_and(|s| s["data"]["tls.crt"].is_string() && s["data"]["ca.crt"].is_string())
    });
    let configurations: Vec<Value> = objects
        .iter()
        .filter(|o| {
            o["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("WebhookConfiguration"))
        })
        .cloned()
        .collect();
    assert_eq!(configurations.len(), 2);
    apply(&configurations);
    let injected = |kind: &str, name: &str| {
        get_json(&["get", kind, name, "-o", "json"]).is_some_and(|c| {
            c["webhooks"]
                .as_array()
                .is_some_and(|w| w.iter().all(|w| w["clientConfig"]["caBundle"].is_string()))
        })
    };
    wait_for("the CA in both configurations", &context, || {
        configurations.iter().all(|c| {
            injected(
                &c["kind"].as_str().unwrap_or_default().to_lowercase(),
                c["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
    });
    for c in &configurations {
        let kind = c["kind"].as_str().unwrap_or_default().to_lowercase();
        let name = c["metadata"]["name"].as_str().unwrap_or_default();
        assert!(bed.kubectl(&["delete", &kind, name]).status.success());
    }
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "a request was forbidden:\n{log}"
    );
    drop(proc);
    bed.shutdown();
}
