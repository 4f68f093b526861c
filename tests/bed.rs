//! The test bed's own tests: each real component starts and does real work.

mod support;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A throwaway kind that exists only to prove the bed serves CRDs end to end.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "testbed.capl.dev",
    version = "v1",
    kind = "Widget",
    namespaced
)]
pub struct WidgetSpec {
    /// Number of sprockets on the widget; the bed's explain test looks for this sentence.
    pub sprockets: i32,
}

const FIELD_MANAGER: &str = "capl-tests";

async fn install_widget_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "widgets.testbed.capl.dev",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(Widget::crd()),
    )
    .await
    .expect("applying the Widget CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "widgets.testbed.capl.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("the Widget CRD became Established in time")
    .expect("watching the Widget CRD");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn apiserver_reports_the_pinned_version() {
    let bed = support::shared();
    let client = bed.client().await;
    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(version.git_version, bed.tools.versions.kubernetes);
    println!(
        "kube-apiserver {} on etcd {}",
        version.git_version, bed.tools.versions.etcd
    );
}

/// (a) A CRD applied and a custom object created through kube-rs.
#[tokio::test]
async fn crd_applied_and_object_created_through_kube_rs() {
    let bed = support::shared();
    let client = bed.client().await;
    install_widget_crd(&client).await;

    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let created = widgets
        .create(
            &PostParams::default(),
            &Widget::new("first", WidgetSpec { sprockets: 3 }),
        )
        .await
        .expect("creating a Widget");
    assert!(created.uid().is_some(), "the apiserver assigned a uid");
    let fetched = widgets.get("first").await.expect("reading the Widget back");
    assert_eq!(fetched.spec.sprockets, 3);
    widgets
        .delete("first", &DeleteParams::default())
        .await
        .expect("deleting the Widget");
}

/// (b) `kubectl explain` prints a field's description from the CRD's schema.
#[tokio::test]
async fn kubectl_explain_prints_field_descriptions() {
    let bed = support::shared();
    install_widget_crd(&bed.client().await).await;
    // The OpenAPI document is republished a moment after the CRD is established.
    let explained = support::process::poll(
        "kubectl explain to know widgets",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let out = bed.kubectl(&["explain", "widgets.spec.sprockets"]);
            Ok(out.status.success().then(|| text(&out.stdout)))
        },
    )
    .expect("kubectl explain widgets.spec.sprockets");
    assert!(
        explained.contains("Number of sprockets on the widget"),
        "explain output lacks the doc comment:\n{explained}"
    );
}

/// (c) Server-side dry-run with strict field validation rejects an unknown field.
#[tokio::test]
async fn server_side_dry_run_rejects_unknown_fields() {
    let bed = support::shared();
    install_widget_crd(&bed.client().await).await;
    let widget = |spec: &str| {
        format!(
            "apiVersion: testbed.capl.dev/v1\nkind: Widget\nmetadata:\n  name: dry\n  namespace: default\nspec:\n{spec}"
        )
    };
    let args = ["apply", "--dry-run=server", "--validate=strict", "-f", "-"];

    let good = bed.kubectl_stdin(&args, &widget("  sprockets: 2\n"));
    assert!(
        good.status.success(),
        "valid widget: {}",
        text(&good.stderr)
    );

    let bad = bed.kubectl_stdin(&args, &widget("  sprockets: 2\n  gears: 9\n"));
    let stderr = text(&bad.stderr);
    assert!(!bad.status.success(), "an unknown field was accepted");
    assert!(
        stderr.contains("unknown field") && stderr.contains("spec.gears"),
        "the rejection names the field: {stderr}"
    );

    // Dry-run persisted nothing.
    let get = bed.kubectl(&["get", "widgets", "dry", "--ignore-not-found", "-o", "name"]);
    assert_eq!(text(&get.stdout).trim(), "");
}

/// (d) helm renders, installs and uninstalls a trivial chart.
#[tokio::test]
async fn helm_installs_and_uninstalls_a_chart() {
    let bed = support::shared();
    let chart = bed.test_dir("helm").join("hello");
    std::fs::create_dir_all(chart.join("templates")).expect("chart dir");
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: hello\nversion: 0.1.0\n",
    )
    .expect("Chart.yaml");
    std::fs::write(chart.join("values.yaml"), "greeting: hello\n").expect("values.yaml");
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .expect("template");
    let chart = chart.to_string_lossy().into_owned();

    let version = bed.helm(&["version", "--short"]);
    println!("helm {}", text(&version.stdout).trim());
    assert!(text(&version.stdout).contains(&bed.tools.versions.helm));

    let rendered = bed.helm(&["template", "demo", &chart, "--set", "greeting=hi"]);
    assert!(rendered.status.success(), "{}", text(&rendered.stderr));
    assert!(text(&rendered.stdout).contains("greeting: \"hi\""));

    let install = bed.helm(&[
        "install",
        "demo",
        &chart,
        "--namespace",
        "default",
        "--wait",
    ]);
    assert!(
        install.status.success(),
        "helm install: {}",
        text(&install.stderr)
    );
    let cm = bed.kubectl(&[
        "get",
        "configmap",
        "demo-greeting",
        "-o",
        "jsonpath={.data.greeting}",
    ]);
    assert_eq!(text(&cm.stdout), "hello");

    let uninstall = bed.helm(&["uninstall", "demo", "--namespace", "default", "--wait"]);
    assert!(
        uninstall.status.success(),
        "helm uninstall: {}",
        text(&uninstall.stderr)
    );
    let gone = bed.kubectl(&[
        "get",
        "configmap",
        "demo-greeting",
        "--ignore-not-found",
        "-o",
        "name",
    ]);
    assert_eq!(
        text(&gone.stdout).trim(),
        "",
        "uninstall removed the ConfigMap"
    );
}

/// (e) The real CAPI core manager reconciles a bare Cluster, through its own webhooks.
#[tokio::test]
async fn capi_core_manager_reconciles_a_bare_cluster() {
    let bed = support::shared();
    let webhook_url = bed.capi();
    assert!(webhook_url.starts_with("https://127.0.0.1:"));
    let client = bed.client().await;

    let gvk = GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta2", "Cluster");
    let clusters: Api<DynamicObject> =
        Api::namespaced_with(client, "default", &ApiResource::from_gvk(&gvk));
    let cluster: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2",
        "kind": "Cluster",
        "metadata": {"name": "bare", "namespace": "default"},
        "spec": {
            "infrastructureRef": {
                "apiGroup": "infrastructure.cluster.x-k8s.io",
                "kind": "LibvirtCluster",
                "name": "bare",
            },
        },
    }))
    .expect("a Cluster object");
    // The mutating webhook (served by the CAPI manager over TLS) runs on this create.
    clusters
        .create(&PostParams::default(), &cluster)
        .await
        .expect("creating a bare Cluster through CAPI's webhooks");

    let reconciled = tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(clusters.clone(), "bare", |obj: Option<&DynamicObject>| {
            obj.and_then(|o| o.data.pointer("/status/conditions"))
                .and_then(|c| c.as_array())
                .is_some_and(|c| c.iter().any(|c| c["type"] == "InfrastructureReady"))
        }),
    )
    .await
    .expect("CAPI set the Cluster's InfrastructureReady condition in time")
    .expect("watching the Cluster")
    .expect("the Cluster exists");
    assert!(
        reconciled
            .finalizers()
            .iter()
            .any(|f| f == "cluster.cluster.x-k8s.io"),
        "CAPI added its finalizer: {:?}",
        reconciled.finalizers()
    );
    let conditions: Vec<String> = reconciled
        .data
        .pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
        .map(|c| format!("{}={} ({})", c["type"], c["status"], c["reason"]))
        .collect();
    println!("CAPI reconciled Cluster/bare: {}", conditions.join(", "));
    assert!(
        conditions
            .iter()
            .any(|c| c.starts_with("\"InfrastructureReady\"") && !c.contains("=\"True\"")),
        "the LibvirtCluster does not exist, so infrastructure is not ready: {conditions:?}"
    );

    // Deletion goes through CAPI too: it removes its finalizer, then the object is gone.
    clusters
        .delete("bare", &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(clusters, "bare", conditions::is_deleted("")),
    )
    .await
    .expect("CAPI released the Cluster in time")
    .expect("watching the deletion");
}

/// (f) The in-process test driver defines, starts, destroys and undefines a domain via `virt`.
#[test]
fn test_driver_runs_a_domain_lifecycle() {
    let host = capl::libvirt::Host::open(&support::host_uri("test:///default"))
        .expect("opening test:///default");
    let versions = host.versions().expect("versions");
    println!("test driver: {versions}");
    assert!(versions.driver.eq_ignore_ascii_case("test"), "{versions}");

    let conn = host.connection();
    let xml = "<domain type='test'><name>bed-f</name><memory unit='MiB'>128</memory>\
               <os><type>hvm</type></os></domain>";
    let domain = conn.define_domain_xml(xml).expect("define");
    domain.create().expect("start");
    assert!(domain.is_active().expect("is_active"));
    domain.destroy().expect("destroy");
    assert!(!domain.is_active().expect("is_active"));
    domain.undefine().expect("undefine");
    assert!(
        conn.lookup_domain_by_name("bed-f").is_err(),
        "the domain is gone"
    );
}

/// (g) The real libvirtd (in its own network namespace) starts a small QEMU domain on a blank
/// qcow2 disk made here, destroys it, and leaves nothing behind.
#[test]
fn real_libvirtd_starts_and_destroys_a_qemu_domain() {
    let bed = support::shared();
    let libvirtd = bed.libvirtd();
    let libvirtd = libvirtd.as_ref().expect("libvirtd");
    let disk = libvirtd.images().join("blank.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(made.status.success(), "qemu-img: {}", text(&made.stderr));

    let host = libvirtd
        .connect()
        .expect("connecting to the bed's libvirtd");
    let versions = host.versions().expect("versions");
    println!("real libvirtd: {versions}");
    assert!(versions.driver.eq_ignore_ascii_case("qemu"), "{versions}");
    let conn = host.connection();
    let xml = format!(
        "<domain type='qemu'><name>bed-g</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='pty'/><console type='pty'/></devices></domain>",
        disk.display()
    );
    let domain = conn.define_domain_xml(&xml).expect("define");
    domain.create().expect("start the QEMU domain");
    assert!(domain.is_active().expect("is_active"));
    let qemu_running = libvirtd.pids().iter().any(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmd| cmd.contains("qemu-system-x86_64") && cmd.contains("bed-g"))
    });
    assert!(qemu_running, "a QEMU process runs in the bed's namespace");

    domain.destroy().expect("destroy");
    domain.undefine().expect("undefine");
    std::fs::remove_file(&disk).expect("removing the disk");

    assert!(
        conn.list_all_domains(0).expect("list domains").is_empty(),
        "no domain left"
    );
    let leftovers: Vec<u32> = libvirtd
        .pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.contains("qemu-system"))
        })
        .collect();
    assert!(leftovers.is_empty(), "QEMU processes left: {leftovers:?}");
    assert!(
        std::fs::read_dir(libvirtd.images())
            .expect("images dir")
            .next()
            .is_none(),
        "no disk left"
    );
}
