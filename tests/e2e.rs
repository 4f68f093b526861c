//! End to end: the real Cluster API core manager and the real kube-apiserver drive this
//! provider's controllers, which run on the real libvirt backend (`LibvirtBackend`).
//!
//! - On the test driver (`test:///default`) the controllers run in this process
//!   (`capl::controller::run`): the test driver's state lives in the process, so the assertions
//!   read it through the backend's own connections. Two hosts may both be `test:///default` under
//!   different names. Every test has its own namespace; domains and volumes are named
//!   `<namespace>_<machine>_…`, so each test counts only its own.
//! - On the bed's real libvirtd + QEMU, the `manager` binary runs the controllers and the
//!   assertions use an independent connection; one real guest boots from the disk image made by
//!   `tests/guest/disk.sh`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use capl::api::{LibvirtCluster, LibvirtMachine};
use capl::libvirt::backend::Backend;
use capl::libvirt::live::LibvirtBackend;
use support::capi_objects::*;

const WAIT: Duration = Duration::from_secs(90);
/// The test driver's built-in pool.
const TEST_POOL: &str = "default-pool";
const TEST_IMAGE: &str = "e2e-base.img";

// ---------------------------------------------------------------- objects

/// A LibvirtCluster with `hosts` (`[{name, uri, ...}]`), pool `pool` and network `network`.
fn libvirt_cluster_on(name: &str, hosts: Value, pool: &str, network: &str) -> LibvirtCluster {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtCluster",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": name}},
        "spec": {"hosts": hosts, "storagePool": pool, "network": network},
    }))
    .unwrap()
}

/// Hosts `a` (control plane) and `b` (workers), both the test driver.
fn two_test_hosts() -> Value {
    json!([
        {"name": "a", "uri": "test:///default"},
        {"name": "b", "uri": "test:///default", "controlPlane": false},
    ])
}

fn machine_spec(pool: &str, image: &str) -> Value {
    json!({
        "vcpus": 1,
        "memoryMiB": 256,
        "image": {"volume": {"pool": pool, "name": image}},
        "rootVolume": {"sizeGiB": 1},
    })
}

fn libvirt_machine_on(cluster: &str, name: &str, pool: &str, image: &str) -> LibvirtMachine {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
        "spec": machine_spec(pool, image),
    }))
    .unwrap()
}

fn cloud_config_secret(name: &str, user_data: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "cluster.x-k8s.io/secret",
        "stringData": {"value": user_data, "format": "cloud-config"},
    }))
    .unwrap()
}

/// A LibvirtMachineTemplate `name` and a MachineDeployment `name` of `replicas` machines
/// reading bootstrap Secret `<name>-bootstrap`.
fn deployment(cluster: &str, name: &str, replicas: i64) -> (DynamicObject, DynamicObject) {
    let template = serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachineTemplate",
        "metadata": {"name": name},
        "spec": {"template": {"spec": machine_spec(TEST_POOL, TEST_IMAGE)}},
    }))
    .unwrap();
    let md = serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2",
        "kind": "MachineDeployment",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
        "spec": {
            "clusterName": cluster,
            "replicas": replicas,
            "selector": {"matchLabels": {"cluster.x-k8s.io/deployment-name": name}},
            "template": {
                "metadata": {"labels": {
                    "cluster.x-k8s.io/cluster-name": cluster,
                    "cluster.x-k8s.io/deployment-name": name,
                }},
                "spec": {
                    "clusterName": cluster,
                    "bootstrap": {"dataSecretName": format!("{name}-bootstrap")},
                    "infrastructureRef": {
                        "apiGroup": "infrastructure.cluster.x-k8s.io",
                        "kind": "LibvirtMachineTemplate",
                        "name": name,
                    },
                },
            },
        },
    }))
    .unwrap();
    (template, md)
}

fn infra(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let resource = kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
        "infrastructure.cluster.x-k8s.io",
        "v1alpha1",
        kind,
    ));
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// True once a LibvirtMachine is provisioned, Ready, with a providerID and an address.
fn provisioned(m: &LibvirtMachine) -> bool {
    let Some(status) = m.status.as_ref() else {
        return false;
    };
    status
        .initialization
        .as_ref()
        .is_some_and(|i| i.provisioned == Some(true))
        && status.addresses.as_ref().is_some_and(|a| !a.is_empty())
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        && m.spec.provider_id.is_some()
}

// ---------------------------------------------------------------- the test-driver environment

/// The controllers in this process on `LibvirtBackend` + `test:///default`, in namespace `ns`.
struct TestDriver {
    client: Client,
    ns: String,
    backend: Arc<LibvirtBackend>,
    running: Option<Running>,
    machines: Api<LibvirtMachine>,
    clusters: Api<LibvirtCluster>,
}

async fn test_driver(ns: &str) -> TestDriver {
    let bed = support::shared();
    bed.capi();
    bed.install_provider_crds();
    let client = bed.client().await;
    namespace(&client, ns).await;
    let backend = Arc::new(LibvirtBackend::new(4).expect("backend"));
    let image = capl::libvirt::xml::VolumePlan {
        name: TEST_IMAGE.into(),
        capacity_gib: 1,
        format: "raw".into(),
        backing: None,
    }
    .to_xml()
    .expect("xml");
    backend
        .hosts()
        .run(&support::host_uri("test:///default"), move |host| {
            host.ensure_volume(TEST_POOL, TEST_IMAGE, &image)
        })
        .await
        .expect("the base image volume");
    let running = Running::start(&client, backend.clone(), settings(ns));
    let (clusters, machines) = ours(&client, ns);
    TestDriver {
        client,
        ns: ns.to_owned(),
        backend,
        running: Some(running),
        machines,
        clusters,
    }
}

impl TestDriver {
    async fn cluster(&self, name: &str) {
        capi(&self.client, &self.ns, "Cluster")
            .create(&PostParams::default(), &cluster(name))
            .await
            .expect("creating the Cluster");
        self.clusters
            .create(
                &PostParams::default(),
                &libvirt_cluster_on(name, two_test_hosts(), TEST_POOL, "default"),
            )
            .await
            .expect("creating the LibvirtCluster");
    }

    async fn machine(&self, cluster: &str, name: &str) {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(
                &PostParams::default(),
                &cloud_config_secret(&format!("{name}-bootstrap"), "#cloud-config\n"),
            )
            .await
            .expect("creating the bootstrap Secret");
        self.machines
            .create(
                &PostParams::default(),
                &libvirt_machine_on(cluster, name, TEST_POOL, TEST_IMAGE),
            )
            .await
            .expect("creating the LibvirtMachine");
        capi(&self.client, &self.ns, "Machine")
            .create(&PostParams::default(), &machine(cluster, name))
            .await
            .expect("creating the Machine");
    }

    async fn wait_provisioned(&self, name: &str) -> LibvirtMachine {
        let wait = eventually("the LibvirtMachine to be provisioned", WAIT, || async {
            let m = self.machines.get(name).await.ok()?;
            provisioned(&m).then_some(m)
        });
        match tokio::time::timeout(WAIT - Duration::from_secs(1), wait).await {
            Ok(m) => m,
            Err(_) => {
                let m = self.machines.get(name).await.ok();
                panic!(
                    "{name} was not provisioned: {}",
                    serde_json::to_string_pretty(&m).unwrap_or_default()
                )
            }
        }
    }

    /// This namespace's domains (with their recorded owner) and volumes, read through the
    /// backend's own connection.
    async fn inventory(&self) -> (Vec<String>, Vec<String>) {
        let prefix = format!("{}_", self.ns);
        self.backend
            .hosts()
            .run(&support::host_uri("test:///default"), move |host| {
                let domains = support::guest_host::domains(host).map_err(|e| e.to_string());
                let volumes =
                    support::guest_host::volumes(host, TEST_POOL).map_err(|e| e.to_string());
                Ok((domains, volumes))
            })
            .await
            .map(|(domains, volumes)| {
                let mine = |names: Vec<String>| -> Vec<String> {
                    names
                        .into_iter()
                        .filter(|n| n.starts_with(&prefix))
                        .collect()
                };
                (
                    mine(domains.expect("domains")),
                    mine(volumes.expect("volumes")),
                )
            })
            .expect("the test driver")
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

// ---------------------------------------------------------------- test driver

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_reaches_provisioned_with_provider_id_and_addresses() {
    let env = test_driver("e2e-provisioned").await;
    env.cluster("c1").await;
    env.machine("c1", "m1").await;
    let lm = env.wait_provisioned("m1").await;
    let uuid = lm.spec.domain_uuid.clone().expect("domainUUID");
    let provider_id = format!("libvirt://{uuid}");
    assert_eq!(lm.spec.provider_id.as_deref(), Some(provider_id.as_str()));
    // Cluster API's Machine: phase Provisioned (no Node in a bed), the providerID and the
    // addresses mirrored from the LibvirtMachine.
    let addresses = lm.status.as_ref().and_then(|s| s.addresses.clone());
    let machine = eventually("the Machine to be Provisioned", WAIT, || async {
        let m = capi(&env.client, &env.ns, "Machine").get("m1").await.ok()?;
        (m.data.pointer("/status/phase") == Some(&json!("Provisioned"))
            && m.data.pointer("/status/addresses").is_some())
        .then_some(m)
    })
    .await;
    assert_eq!(
        machine.data.pointer("/spec/providerID"),
        Some(&json!(provider_id))
    );
    assert_eq!(
        machine.data.pointer("/status/addresses"),
        Some(&serde_json::to_value(addresses).unwrap())
    );
    // The domain exists under the providerID's UUID, owned by this LibvirtMachine.
    let host = capl::controller::cluster::host_ref(
        &env.clusters.get("c1").await.unwrap().spec.hosts[0],
        capl::libvirt::uri::UriPolicy {
            allow_test_driver: true,
        },
    )
    .unwrap();
    let owned: Vec<_> = env
        .backend
        .list_machines(&host)
        .await
        .expect("listing")
        .into_iter()
        .filter(|d| d.namespace == env.ns)
        .map(|d| (d.uuid.to_string(), d.name, d.cluster))
        .collect();
    assert_eq!(owned, vec![(uuid, "m1".to_owned(), "c1".to_owned())]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_deployment_of_three_spreads_over_two_hosts_and_scales_down_to_one() {
    let env = test_driver("e2e-md").await;
    env.cluster("c1").await;
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(
            &PostParams::default(),
            &cloud_config_secret("md-bootstrap", "#cloud-config\n"),
        )
        .await
        .unwrap();
    let (template, md) = deployment("c1", "md", 3);
    infra(&env.client, &env.ns, "LibvirtMachineTemplate")
        .create(&PostParams::default(), &template)
        .await
        .expect("creating the template");
    let mds = capi(&env.client, &env.ns, "MachineDeployment");
    mds.create(&PostParams::default(), &md)
        .await
        .expect("creating the MachineDeployment");
    let three = eventually("three provisioned machines", WAIT, || async {
        let list = env.machines.list(&Default::default()).await.ok()?;
        (list.items.len() == 3 && list.items.iter().all(provisioned)).then_some(list.items)
    })
    .await;
    let mut hosts: Vec<String> = three
        .iter()
        .map(|m| m.spec.host.clone().unwrap_or_default())
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts, vec!["a", "b"], "spread over both hosts");
    assert_eq!(env.inventory().await.0.len(), 3, "three domains");

    mds.patch(
        "md",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scaling to 1");
    let survivor = eventually("one machine left", WAIT, || async {
        let list = env.machines.list(&Default::default()).await.ok()?;
        (list.items.len() == 1).then(|| list.items.into_iter().next())?
    })
    .await;
    let uuid = survivor.spec.domain_uuid.clone().expect("domainUUID");
    let prefix = format!(
        "{}_{}_{}",
        env.ns,
        survivor.name_any(),
        &uuid.replace('-', "")[..8]
    );
    let (domains, volumes) = eventually("the other VMs to be gone", WAIT, || async {
        let (domains, volumes) = env.inventory().await;
        (domains.len() == 1 && volumes.iter().all(|v| v.starts_with(&prefix)))
            .then_some((domains, volumes))
    })
    .await;
    assert_eq!(domains, vec![prefix.clone()]);
    assert!(
        volumes.contains(&format!("{prefix}-root.qcow2")),
        "the survivor keeps its root disk: {volumes:?}"
    );
    env.stop().await;
}

/// The examples of `deploy/examples/` (host URI pointed at the test driver) come up: one
/// control-plane machine and two workers; deleting the Cluster then removes every domain and
/// every volume.
#[tokio::test(flavor = "multi_thread")]
async fn the_examples_come_up_and_deleting_the_cluster_leaves_no_domain_and_no_volume() {
    let ns = "e2e-examples";
    let env = test_driver(ns).await;
    // The examples' pool and network, on the backend's own connection.
    env.backend
        .hosts()
        .run(&support::host_uri("test:///default"), |host| {
            let xml = |name: &str| {
                capl::libvirt::xml::VolumePlan {
                    name: name.into(),
                    capacity_gib: 1,
                    format: "raw".into(),
                    backing: None,
                }
                .to_xml()
                .expect("xml")
            };
            let conn = host.connection();
            if conn.lookup_storage_pool_by_name("capl").is_err() {
                let pool = conn
                    .define_storage_pool_xml(
                        "<pool type='dir'><name>capl</name><target><path>/capl</path></target></pool>",
                        0,
                    )
                    .expect("pool");
                pool.create(0).expect("start pool");
            }
            if conn.lookup_network_by_name("capl").is_err() {
                let net = conn
                    .define_network_xml(
                        "<network><name>capl</name><bridge name='capl0'/>\
                         <ip address='10.213.9.1' netmask='255.255.255.0'/></network>",
                    )
                    .expect("network");
                net.create().expect("start network");
            }
            host.ensure_volume(
                "capl",
                support::guest_host::GUEST_VOLUME,
                &xml(support::guest_host::GUEST_VOLUME),
            )
        })
        .await
        .expect("pool, network and image");
    let out = support::shared().kubectl_stdin(
        &["apply", "-n", ns, "-f", "-"],
        &examples("test:///default"),
    );
    assert!(
        out.status.success(),
        "applying the examples: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = eventually("three provisioned machines", WAIT, || async {
        let list = env.machines.list(&Default::default()).await.ok()?;
        (list.items.len() == 3 && list.items.iter().all(provisioned)).then_some(list.items)
    })
    .await;
    assert!(all.iter().any(|m| m.name_any() == "example-control-plane-0"));
    let in_pool = |volumes: Vec<String>| volumes.len();
    let (domains, _) = env.inventory().await;
    assert_eq!(domains.len(), 3);
    let examples_volumes = env
        .backend
        .hosts()
        .run(&support::host_uri("test:///default"), |host| {
            Ok(support::guest_host::volumes(host, "capl").map_err(|e| e.to_string()))
        })
        .await
        .unwrap()
        .unwrap();
    assert!(
        in_pool(
            examples_volumes
                .into_iter()
                .filter(|v| v.starts_with(ns))
                .collect()
        ) >= 3,
        "every machine has its disks in the pool"
    );

    capi(&env.client, ns, "Cluster")
        .delete("example", &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    eventually("the Cluster to be gone", WAIT, || async {
        capi(&env.client, ns, "Cluster")
            .get_opt("example")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let (domains, _) = env.inventory().await;
    let left = env
        .backend
        .hosts()
        .run(&support::host_uri("test:///default"), |host| {
            Ok(support::guest_host::volumes(host, "capl").map_err(|e| e.to_string()))
        })
        .await
        .unwrap()
        .unwrap();
    let left: Vec<_> = left.into_iter().filter(|v| v.starts_with(ns)).collect();
    assert!(domains.is_empty(), "no domain left: {domains:?}");
    assert!(left.is_empty(), "no volume left: {left:?}");
    assert!(
        env.machines.list(&Default::default()).await.unwrap().items.is_empty()
            && env.clusters.list(&Default::default()).await.unwrap().items.is_empty(),
        "no LibvirtMachine or LibvirtCluster left (no stuck finalizer)"
    );
    env.stop().await;
}

/// The examples as one YAML stream, with the host URI replaced by `uri`.
fn examples(uri: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    ["cluster.yaml", "control-plane.yaml", "workers.yaml"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).expect("an example"))
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace("uri: qemu:///system", &format!("uri: \"{uri}\""))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_status_is_rebuilt_identically() {
    let env = test_driver("e2e-rebuild").await;
    env.cluster("c1").await;
    env.machine("c1", "m1").await;
    let before = env.wait_provisioned("m1").await;
    env.machines
        .patch_status(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null})),
        )
        .await
        .expect("deleting the status");
    let after = eventually("the status to be rebuilt", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        (provisioned(&m)
            && m.status.as_ref()?.observed_generation == before.status.as_ref()?.observed_generation)
            .then_some(m)
    })
    .await;
    assert_eq!(
        comparable_status(&after.status),
        comparable_status(&before.status)
    );
    assert_eq!(env.inventory().await.0.len(), 1, "no second VM");
    env.stop().await;
}
