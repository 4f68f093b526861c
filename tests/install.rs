//! The provider installed the way users install it, on the bed's real node: the OCI image built
//! without an engine and imported into the node's containerd, then `helm install` (Helm 4 and
//! Helm 3) and `clusterctl init` from a local repository. The manager runs as pods; the
//! apiserver reaches their webhooks through the Service; they reconcile a Machine on the bed's
//! real libvirtd through its mounted socket.
//!
//! The tests share one bed with a node and take turns (they install cluster-scoped objects).

// Only the chart's paths and the cert-manager stand-in are used here.
#[allow(dead_code)]
#[path = "support/chart.rs"]
mod chart;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use support::TestBed;
use support::image::BuiltImage;
use support::process::poll;

/// Removes what a test installed when it panics, so the next test starts clean.
struct Cleanup(Box<dyn Fn()>);

impl Cleanup {
    fn release(helm_binary: &Path, release: &'static str, namespace: &'static str) -> Self {
        let helm_binary = helm_binary.to_owned();
        Self(Box::new(move || {
            let _ = uninstall_release(&helm_binary, release, namespace, "60s");
            let _ = bed().kubectl(&["delete", "namespace", namespace, "--timeout=60s"]);
        }))
    }

    /// clusterctl's components: their namespace and cluster-scoped objects (not the CRDs).
    fn components() -> Self {
        Self(Box::new(|| {
            let _ = bed().kubectl(&["delete", "namespace", "capl-system", "--timeout=60s"]);
            let _ = bed().kubectl(&[
                "delete",
                "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations",
                "-l",
                "cluster.x-k8s.io/provider=infrastructure-libvirt",
            ]);
        }))
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

/// One install at a time.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bed() -> &'static TestBed {
    support::with_node()
}

/// The image, built once per test binary and imported into the node's containerd.
fn image() -> &'static BuiltImage {
    static IMAGE: OnceLock<BuiltImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let started = Instant::now();
        let image = support::image::build_default(true).expect("the image");
        bed()
            .import_image(&image.archive)
            .expect("importing the image");
        eprintln!(
            "image {} ({}): {:.1} MiB archive, {:.1} MiB unpacked; built and imported in {:.1?}",
            image.reference,
            image.digest,
            image.archive_size as f64 / 1048576.0,
            image.unpacked_size as f64 / 1048576.0,
            started.elapsed()
        );
        image
    })
}

/// `--set` values that run the imported image (never pulled).
fn image_values() -> Vec<String> {
    let reference = &image().reference;
    let (repository, tag) = reference.rsplit_once(':').expect("a tagged reference");
    vec![
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".into(),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kubectl_ok(args: &[&str]) -> String {
    let out = bed().kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json_of(args: &[&str]) -> Option<Value> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let out = bed().kubectl(&args);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Runs a Helm binary (4 or 3) against the bed.
fn helm(binary: &Path, args: &[&str]) -> Output {
    let bed = bed();
    Command::new(binary)
        .arg(format!("--kubeconfig={}", bed.kubeconfig.display()))
        .args(args)
        .env("HELM_CACHE_HOME", bed.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", bed.dir.join("helm/config"))
        .env("HELM_DATA_HOME", bed.dir.join("helm/data"))
        .output()
        .unwrap_or_else(|e| panic!("helm {}: {e}", args.join(" ")))
}

fn helm_ok(binary: &Path, args: &[&str]) -> String {
    let out = helm(binary, args);
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// What a failing wait shows: the pods, their logs and the node's own state.
fn diagnostics(namespace: &str) -> String {
    let bed = bed();
    let pods = bed.kubectl(&["get", "pods", "-n", namespace, "-o", "wide"]);
    let describe = bed.kubectl(&["describe", "pods", "-n", namespace]);
    let logs = bed.kubectl(&[
        "logs",
        "-n",
        namespace,
        "-l",
        "app.kubernetes.io/component=manager",
        "--tail=40",
        "--prefix",
    ]);
    let node = bed
        .node()
        .as_ref()
        .map(|node| node.diagnostics())
        .unwrap_or_default();
    format!(
        "{}\n{}\n{}{}\n{node}",
        text(&pods.stdout),
        text(&describe.stdout),
        text(&logs.stdout),
        text(&logs.stderr)
    )
}

fn wait(what: &str, namespace: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    if let Err(error) = poll(what, timeout, Duration::from_millis(100), || {
        Ok(check().then_some(()))
    }) {
        panic!("{error:#}\n{}", diagnostics(namespace));
    }
}

/// [`wait`], also showing the workload's objects when it times out.
fn wait_for_workload(
    what: &str,
    namespace: &str,
    workload: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) {
    if let Err(error) = poll(what, timeout, Duration::from_millis(200), || {
        Ok(check().then_some(()))
    }) {
        let objects = bed().kubectl(&[
            "get",
            "clusters.cluster.x-k8s.io,machines.cluster.x-k8s.io,libvirtclusters,libvirtmachines",
            "-n",
            workload,
            "-o",
            "yaml",
        ]);
        panic!(
            "{error:#}\n{}\n{}",
            text(&objects.stdout),
            diagnostics(namespace)
        );
    }
}

/// Waits until the Deployment's replicas are all Ready; returns how long that took and, per
/// pod, the kubelet's container start → Ready time.
fn wait_ready(namespace: &str, deployment: &str, since: Instant) -> (Duration, Vec<i64>) {
    wait(
        &format!("Deployment {namespace}/{deployment} Ready"),
        namespace,
        Duration::from_secs(180),
        || {
            json_of(&["get", "deployment", "-n", namespace, deployment]).is_some_and(|d| {
                let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
                d["status"]["readyReplicas"].as_i64() == Some(want)
                    && d["status"]["updatedReplicas"].as_i64() == Some(want)
                    && d["status"]["replicas"].as_i64() == Some(want)
            })
        },
    );
    let elapsed = since.elapsed();
    let pods = json_of(&["get", "pods", "-n", namespace]).expect("pods");
    let seconds = |at: &Value| {
        at.as_str()
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64)
    };
    let per_pod = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|pod| {
            let started =
                seconds(&pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])?;
            let ready = pod["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready" && c["status"] == "True")
                .and_then(|c| seconds(&c["lastTransitionTime"]))?;
            Some(ready - started)
        })
        .collect();
    (elapsed, per_pod)
}

/// `helm install` of the chart with the imported image and `values`; waits until the
/// Deployment is Ready and prints how long that took.
fn install_release(helm_binary: &Path, release: &str, namespace: &str, values: &[String]) {
    let chart = chart::chart_dir().to_string_lossy().into_owned();
    let mut args = vec![
        "install",
        release,
        &chart,
        "--namespace",
        namespace,
        "--create-namespace",
    ];
    let values: Vec<String> = image_values()
        .into_iter()
        .chain(values.iter().cloned())
        .collect();
    for value in &values {
        args.extend(["--set", value]);
    }
    let installing = Instant::now();
    helm_ok(helm_binary, &args);
    let (to_ready, per_pod) = wait_ready(namespace, &deployment_of(release), installing);
    eprintln!(
        "{} install → all replicas Ready: {to_ready:.1?}; container start → Ready per pod (s): {per_pod:?}",
        helm_binary.display()
    );
}

/// The chart's Deployment of `release`.
fn deployment_of(release: &str) -> String {
    format!("{release}-cluster-api-provider-libvirt-controller-manager")
}

/// `helm uninstall --wait`; leaves only the CRDs, as [`nothing_left_but_the_crds`] checks.
fn uninstall_release(helm_binary: &Path, release: &str, namespace: &str, timeout: &str) -> Output {
    helm(
        helm_binary,
        &[
            "uninstall",
            release,
            "--namespace",
            namespace,
            "--wait",
            &format!("--timeout={timeout}"),
        ],
    )
}

fn machine(namespace: &str, name: &str, memory_mib: i64) -> String {
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "vcpus": 1,
            "memoryMiB": memory_mib,
            "image": {"volume": {"pool": "capl", "name": support::guest_host::GUEST_VOLUME}},
            "rootVolume": {"sizeGiB": 1},
        },
    })
    .to_string()
}

/// A bad machine is denied by the pods' webhook (field and rule named); a good one is created
/// with the defaults filled in, then deleted.
fn admission_goes_through_the_pods(namespace: &str) {
    let bed = bed();
    let _ = bed.kubectl(&["create", "namespace", namespace]);
    // The schema cannot tell a loopback image URL in hex: only the webhook can.
    let mut bad: Value = serde_json::from_str(&machine(namespace, "loopback", 512)).expect("json");
    bad["spec"]["image"] = json!({"url": "http://0x7f.1/x.qcow2",
        "checksum": {"type": "sha256", "value": "a".repeat(64)}});
    let denied = bed.kubectl_stdin(&["create", "-f", "-"], &bad.to_string());
    assert!(
        !denied.status.success(),
        "a loopback image URL was admitted"
    );
    let message = text(&denied.stderr);
    assert!(
        message.contains("denied the request")
            && message.contains("spec.image.url: must not point at a loopback address"),
        "{message}"
    );
    let created = bed.kubectl_stdin(
        &["create", "-f", "-"],
        &machine(namespace, "defaulted", 512),
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    let stored = json_of(&["get", "libvirtmachine", "-n", namespace, "defaulted"]).expect("stored");
    assert_eq!(stored["spec"]["cpuMode"], "host-passthrough", "{stored:#}");
    assert_eq!(stored["spec"]["firmware"], "bios", "{stored:#}");
    kubectl_ok(&[
        "delete",
        "libvirtmachine",
        "-n",
        namespace,
        "defaulted",
        "--timeout=60s",
    ]);
}

fn secret_field(namespace: &str, name: &str, key: &str) -> String {
    json_of(&["get", "secret", "-n", namespace, name])
        .and_then(|s| s["data"][key].as_str().map(str::to_owned))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|b| text(&b))
        .unwrap_or_default()
}

fn pod_ips(namespace: &str) -> Vec<String> {
    json_of(&["get", "pods", "-n", namespace])
        .and_then(|p| p["items"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_owned))
        .collect()
}

/// The socket of the bed's libvirtd, reachable by the pods' (non-root) user: the socket and
/// the directories above it opened up for this test bed only.
fn libvirt_socket() -> (String, String) {
    let libvirtd = bed().libvirtd();
    let (uri, dir) = libvirtd
        .as_ref()
        .expect("libvirtd")
        .open_socket_to_pods()
        .expect("opening the socket");
    (uri, dir.to_string_lossy().into_owned())
}

fn domains() -> Vec<String> {
    let libvirtd = bed().libvirtd();
    let host = libvirtd
        .as_ref()
        .expect("libvirtd")
        .connect()
        .expect("connect");
    support::guest_host::domains(&host).expect("domains")
}

/// A Cluster and one Machine made by the pods' manager on the bed's real libvirtd (through its
/// mounted socket), then deleted: the domain goes with it.
fn a_machine_is_made_on_the_bed_libvirt(namespace: &str, uri: &str, manager_namespace: &str) {
    let bed = bed();
    let _ = bed.capi();
    {
        let libvirtd = bed.libvirtd();
        let started = libvirtd.as_ref().expect("libvirtd");
        let host = started.connect().expect("connect");
        support::guest_host::prepare(&host, "capl", &started.images().join("capl"), "capl0", 11)
            .expect("pool, network and guest image");
    }
    let _ = bed.kubectl(&["create", "namespace", namespace]);
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Cluster", "metadata": {"name": "pod-made", "namespace": namespace},
         "spec": {"infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "LibvirtCluster", "name": "pod-made"}}},
        {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1", "kind": "LibvirtCluster",
         "metadata": {"name": "pod-made", "namespace": namespace, "labels": {"cluster.x-k8s.io/cluster-name": "pod-made"}},
         "spec": {"hosts": [{"name": "bed", "uri": uri}], "storagePool": "capl", "network": "capl"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pod-made-0-bootstrap", "namespace": namespace},
         "type": "cluster.x-k8s.io/secret", "stringData": {"value": "#cloud-config\n", "format": "cloud-config"}},
        {"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
         "metadata": {"name": "pod-made-0", "namespace": namespace, "labels": {"cluster.x-k8s.io/cluster-name": "pod-made"}},
         "spec": {"clusterName": "pod-made", "bootstrap": {"dataSecretName": "pod-made-0-bootstrap"},
                  "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "LibvirtMachine", "name": "pod-made-0"}}},
        serde_json::from_str::<Value>(&machine(namespace, "pod-made-0", 256)).expect("machine"),
    ]});
    let out = bed.kubectl_stdin(&["apply", "-f", "-"], &objects.to_string());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = domains().len();
    wait_for_workload(
        "the pods' manager to make the machine's domain",
        manager_namespace,
        namespace,
        Duration::from_secs(180),
        || {
            json_of(&["get", "libvirtmachine", "-n", namespace, "pod-made-0"]).is_some_and(|m| {
                m["spec"]["providerID"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("libvirt://"))
            }) && domains().len() > before
        },
    );
    kubectl_ok(&[
        "delete",
        "cluster",
        "-n",
        namespace,
        "pod-made",
        "--wait=false",
    ]);
    wait_for_workload(
        "the Cluster, its machine and its domain to go",
        manager_namespace,
        namespace,
        Duration::from_secs(180),
        || {
            json_of(&["get", "libvirtmachines", "-n", namespace])
                .is_some_and(|l| l["items"].as_array().is_some_and(Vec::is_empty))
                && json_of(&["get", "clusters.cluster.x-k8s.io", "-n", namespace])
                    .is_some_and(|l| l["items"].as_array().is_some_and(Vec::is_empty))
                && domains().len() == before
        },
    );
}

/// Everything the release made is gone but the CRDs (and the namespace Helm did not create).
fn nothing_left_but_the_crds(release: &str, namespace: &str) {
    let kinds = "deployments,replicasets,pods,services,serviceaccounts,secrets,configmaps,roles,rolebindings,leases,poddisruptionbudgets,networkpolicies";
    let left_over = || -> Vec<String> {
        kubectl_ok(&["get", kinds, "-n", namespace, "-o", "name"])
            .lines()
            .filter(|l| *l != "configmap/kube-root-ca.crt" && *l != "serviceaccount/default")
            .map(str::to_owned)
            .collect()
    };
    // The pods go last: the garbage collector deletes them after their ReplicaSet, and each
    // drains for its preStop sleep first.
    let _ = poll(
        "the release's objects to go",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || Ok(left_over().is_empty().then_some(())),
    );
    let left = left_over();
    assert!(left.is_empty(), "left in {namespace}: {left:?}");
    let cluster_scoped = kubectl_ok(&[
        "get",
        "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations",
        "-l",
        &format!("app.kubernetes.io/instance={release},app.kubernetes.io/managed-by=Helm"),
        "-o",
        "name",
    ]);
    assert!(cluster_scoped.trim().is_empty(), "left: {cluster_scoped}");
    let crds = kubectl_ok(&[
        "get",
        "crd",
        "-o",
        "name",
        "-l",
        "cluster.x-k8s.io/provider=infrastructure-libvirt",
    ]);
    assert_eq!(crds.lines().count(), 4, "the CRDs stay: {crds}");
}

#[test]
fn helm_4_installs_a_provider_that_admits_reconciles_upgrades_rotates_and_uninstalls_cleanly() {
    let _turn = turn();
    let tools = &bed().tools;
    // Not capl-system: clusterctl's Namespace enforces Pod Security "restricted", which refuses
    // the hostPath of the libvirt socket.
    let (release, namespace) = ("capl", "capl-helm4");
    let _cleanup = Cleanup::release(&bed().tools.helm, release, namespace);
    let (uri, socket_dir) = libvirt_socket();
    let chart = chart::chart_dir();
    install_release(
        &tools.helm,
        release,
        namespace,
        &[
            "manager.allowTestDriver=false".into(),
            "libvirt.socket.enabled=true".into(),
            format!("libvirt.socket.hostPath={socket_dir}"),
            // libvirtd looks the client's uid up on its own host: it must exist there (`nobody`).
            "securityContext.runAsUser=65534".into(),
            "securityContext.runAsGroup=65534".into(),
        ],
    );
    let deployment = deployment_of(release);
    for crd in [
        "libvirtclusters",
        "libvirtmachines",
        "libvirtclustertemplates",
        "libvirtmachinetemplates",
    ] {
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}.infrastructure.cluster.x-k8s.io"),
        ]);
    }
    // The webhook configurations carry the manager's CA once it injected it.
    wait(
        "the CA injected",
        namespace,
        Duration::from_secs(60),
        || {
            json_of(&[
                "get",
                "validatingwebhookconfiguration",
                "-l",
                &format!("app.kubernetes.io/instance={release}"),
            ])
            .and_then(|l| l["items"][0]["webhooks"].as_array().cloned())
            .is_some_and(|w| w.iter().all(|w| w["clientConfig"]["caBundle"].is_string()))
        },
    );
    admission_goes_through_the_pods("install-workload");
    a_machine_is_made_on_the_bed_libvirt("install-workload", &uri, namespace);

    // An upgrade rolls both pods while admissions stream: none is lost.
    let stream =
        support::admissions::Stream::start(bed(), machine("install-workload", "streamed", 512));
    let upgrading = Instant::now();
    helm_ok(
        &tools.helm,
        &[
            "upgrade",
            release,
            &chart.to_string_lossy(),
            "--namespace",
            namespace,
            "--reuse-values",
            "--set",
            "podAnnotations.rolled=yes",
        ],
    );
    let (rolled, _) = wait_ready(namespace, &deployment, upgrading);
    wait(
        "the old pods to go",
        namespace,
        Duration::from_secs(90),
        || pod_ips(namespace).len() == 2,
    );
    std::thread::sleep(Duration::from_secs(3));
    let counted = stream.stop();
    eprintln!(
        "helm 4 upgrade: rolled in {rolled:.1?}; admissions meanwhile: {} allowed, {} failed",
        counted.allowed, counted.failed
    );
    assert_eq!(counted.failed, 0, "{:#?}", counted.failures);
    assert!(counted.allowed > 0);

    // A forced CA rotation while admissions stream: none is lost, both pods serve the new pair.
    let secret = format!("{release}-cluster-api-provider-libvirt-webhook-cert");
    let old_ca = secret_field(namespace, &secret, "ca.crt");
    assert!(!old_ca.is_empty());
    let stream =
        support::admissions::Stream::start(bed(), machine("install-workload", "streamed", 512));
    kubectl_ok(&[
        "patch",
        "secret",
        "-n",
        namespace,
        &secret,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/data","value":{}}]"#,
    ]);
    wait(
        "both pods serving a pair from the new CA",
        namespace,
        Duration::from_secs(60),
        || {
            let ca = secret_field(namespace, &secret, "ca.crt");
            let cert =
                support::certs::first_certificate(&secret_field(namespace, &secret, "tls.crt"));
            ca.matches("BEGIN CERTIFICATE").count() == 2
                && ca.ends_with(&old_ca)
                && !cert.is_empty()
                && pod_ips(namespace).iter().all(|ip| {
                    support::certs::served_certificate(&format!("{ip}:9443"), None) == cert
                })
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let counted = stream.stop();
    eprintln!(
        "CA rotation in the pods: admissions meanwhile: {} allowed, {} failed",
        counted.allowed, counted.failed
    );
    assert_eq!(counted.failed, 0, "{:#?}", counted.failures);

    // Uninstall leaves the CRDs only.
    let out = uninstall_release(&tools.helm, release, namespace, "120s");
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        text(&out.stderr)
    );
    nothing_left_but_the_crds(release, namespace);
}

#[test]
fn helm_3_installs_and_uninstalls_the_same_chart() {
    let _turn = turn();
    let tools = &bed().tools;
    let (release, namespace) = ("capl3", "capl-helm3");
    let _cleanup = Cleanup::release(&bed().tools.helm3, release, namespace);
    install_release(&tools.helm3, release, namespace, &[]);
    admission_goes_through_the_pods("install-workload-3");
    let out = uninstall_release(&tools.helm3, release, namespace, "120s");
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        text(&out.stderr)
    );
    nothing_left_but_the_crds(release, namespace);
}

#[test]
fn clusterctl_init_from_a_local_repository_brings_up_the_same_pod() {
    let _turn = turn();
    let bed = bed();
    let image = &image().reference;
    // clusterctl checks the Cluster API version (CAPI's CRDs) before it deletes anything.
    let _ = bed.capi();
    let _cleanup = Cleanup::components();
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
    let tools = &bed.tools;

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
        Some(&chart::cert_manager_api().to_string()),
    );
    wait_established("crd/issuers.cert-manager.io");
    wait_established("crd/certificates.cert-manager.io");
    let _ = bed.kubectl(&["create", "namespace", "capi-system"]);
    let core_provider = json!({
        "apiVersion": "clusterctl.cluster.x-k8s.io/v1alpha3", "kind": "Provider",
        "metadata": {"name": "cluster-api", "namespace": "capi-system",
                     "labels": {"clusterctl.cluster.x-k8s.io": "", "cluster.x-k8s.io/provider": "cluster-api"}},
        "providerName": "cluster-api", "type": "CoreProvider", "version": core_version,
    });
    kubectl(&["apply", "-f", "-"], Some(&core_provider.to_string()));

    let home = dir.join("home");
    let out = Command::new(&tools.clusterctl)
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
        // The image imported into the node (the components' default is the published one).
        .env("CAPL_IMAGE", image)
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
    // The same pod as the chart's: Running and Ready, admitting through the Service.
    let installed = Instant::now();
    let (to_ready, per_pod) = wait_ready("capl-system", "capl-controller-manager", installed);
    eprintln!(
        "clusterctl init → Ready after the init returned: {to_ready:.1?}; per pod (s): {per_pod:?}"
    );
    let pod = json_of(&[
        "get",
        "pods",
        "-n",
        "capl-system",
        "-l",
        "app.kubernetes.io/component=manager",
    ])
    .expect("pods");
    assert_eq!(
        pod["items"][0]["spec"]["containers"][0]["image"],
        image.as_str()
    );
    admission_goes_through_the_pods("clusterctl-workload");

    // clusterctl removes what it installed (the CRDs stay unless asked).
    let out = Command::new(&tools.clusterctl)
        .args([
            "delete",
            "--infrastructure",
            "libvirt",
            "--config",
            &config.to_string_lossy(),
            "--kubeconfig",
            &bed.kubeconfig.to_string_lossy(),
        ])
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true")
        .output()
        .expect("clusterctl delete");
    assert!(
        out.status.success(),
        "clusterctl delete: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    wait(
        "the components to go",
        "capl-system",
        Duration::from_secs(120),
        || {
            json_of(&["get", "pods", "-n", "capl-system"])
                .is_some_and(|p| p["items"].as_array().is_some_and(Vec::is_empty))
                && !bed
                    .kubectl(&[
                        "get",
                        "validatingwebhookconfiguration",
                        "capl-webhook-configuration",
                    ])
                    .status
                    .success()
        },
    );
    // clusterctl deletes cluster-scoped objects only when their names start with
    // `<namespace>-` (cmd/clusterctl/client/cluster/components.go): the ClusterRole and its
    // binding stay, and go by hand.
    let left = kubectl_ok(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-l",
        "cluster.x-k8s.io/provider=infrastructure-libvirt",
        "-o",
        "name",
    ]);
    assert_eq!(
        left.lines().collect::<Vec<_>>(),
        [
            "clusterrole.rbac.authorization.k8s.io/capl-manager",
            "clusterrolebinding.rbac.authorization.k8s.io/capl-manager"
        ]
    );
    kubectl_ok(&[
        "delete",
        "clusterroles,clusterrolebindings",
        "-l",
        "cluster.x-k8s.io/provider=infrastructure-libvirt",
    ]);
}
