//! The LibvirtCluster and LibvirtMachine controllers, in-process on the in-memory backend,
//! against the bed's real kube-apiserver and the real Cluster API core manager.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use capl::api::{LibvirtCluster, LibvirtMachine};
use capl::libvirt::backend::Backend;
use capl::libvirt::error::{ErrorKind, Step};
use capl::libvirt::fake::{FakeBackend, Fault, Method, Times};
use support::capi_objects::*;

const WAIT: Duration = Duration::from_secs(90);

struct Env {
    client: Client,
    ns: String,
    fake: Arc<FakeBackend>,
    running: Option<Running>,
    clusters: Api<LibvirtCluster>,
    machines: Api<LibvirtMachine>,
}

async fn env(ns: &str) -> Env {
    env_with(ns, settings(ns)).await
}

async fn env_with(ns: &str, settings: capl::controller::Settings) -> Env {
    let bed = support::shared();
    bed.capi();
    bed.install_provider_crds();
    let client = bed.client().await;
    namespace(&client, ns).await;
    let fake = Arc::new(FakeBackend::new());
    fake.add_volume(
        &support::host_uri("test:///default"),
        "default",
        BASE_VOLUME,
    );
    let running = Running::start(&client, fake.clone(), settings);
    let (clusters, machines) = ours(&client, ns);
    Env {
        client,
        ns: ns.to_owned(),
        fake,
        running: Some(running),
        clusters,
        machines,
    }
}

impl Env {
    /// Creates a Cluster and its LibvirtCluster and waits until the LibvirtCluster is
    /// provisioned.
    async fn provisioned_cluster(&self, name: &str) -> LibvirtCluster {
        capi(&self.client, &self.ns, "Cluster")
            .create(&PostParams::default(), &cluster(name))
            .await
            .expect("creating the Cluster");
        self.clusters
            .create(&PostParams::default(), &libvirt_cluster(name))
            .await
            .expect("creating the LibvirtCluster");
        eventually("the LibvirtCluster to be provisioned", WAIT, || async {
            let c = self.clusters.get(name).await.ok()?;
            let provisioned = c.status.as_ref()?.initialization.as_ref()?.provisioned;
            (provisioned == Some(true)).then_some(c)
        })
        .await
    }

    /// Creates a bootstrap Secret, a LibvirtMachine and its Machine; waits until the
    /// LibvirtMachine is provisioned with a providerID and addresses.
    async fn provisioned_machine(&self, cluster: &str, name: &str) -> LibvirtMachine {
        self.create_machine(cluster, name).await;
        self.wait_provisioned(name).await
    }

    async fn create_machine(&self, cluster: &str, name: &str) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        secrets
            .create(&PostParams::default(), &bootstrap_secret(name))
            .await
            .expect("creating the bootstrap Secret");
        self.machines
            .create(&PostParams::default(), &libvirt_machine(cluster, name))
            .await
            .expect("creating the LibvirtMachine");
        capi(&self.client, &self.ns, "Machine")
            .create(&PostParams::default(), &machine(cluster, name))
            .await
            .expect("creating the Machine");
    }

    async fn wait_provisioned(&self, name: &str) -> LibvirtMachine {
        eventually("the LibvirtMachine to be provisioned", WAIT, || async {
            let m = self.machines.get(name).await.ok()?;
            let status = m.status.as_ref()?;
            let provisioned = status.initialization.as_ref()?.provisioned == Some(true);
            let addressed = status.addresses.as_ref().is_some_and(|a| !a.is_empty());
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (provisioned && addressed && ready && m.spec.provider_id.is_some()).then_some(m)
        })
        .await
    }

    async fn set_paused(&self, cluster: &str, paused: bool) {
        capi(&self.client, &self.ns, "Cluster")
            .patch(
                cluster,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": paused}})),
            )
            .await
            .expect("pausing the Cluster");
    }

    async fn domains(&self) -> usize {
        let host = host_a();
        self.fake.list_machines(&host).await.expect("listing").len()
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// Host `a` of [`libvirt_cluster`] as the backend addresses it.
fn host_a() -> capl::libvirt::backend::HostRef {
    capl::libvirt::backend::HostRef {
        name: "a".into(),
        uri: support::host_uri("test:///default"),
        domain_type: capl::api::DomainType::Kvm,
    }
}

fn reason_of(machine: &LibvirtMachine, kind: &str) -> Option<String> {
    machine
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.reason.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_becomes_provisioned_with_failure_domains() {
    let env = env("ctl-cluster").await;
    let cluster = env.provisioned_cluster("c1").await;
    let status = cluster.status.clone().expect("status");
    let domains: Vec<(String, Option<bool>)> = status
        .failure_domains
        .iter()
        .flatten()
        .map(|d| (d.name.clone(), d.control_plane))
        .collect();
    assert_eq!(
        domains,
        vec![("a".into(), Some(true)), ("b".into(), Some(false))]
    );
    assert_eq!(status.ready, Some(true));
    let conditions = serde_json::to_value(&status).unwrap();
    assert_eq!(condition(&conditions, "Ready").unwrap()["status"], "True");
    assert_eq!(
        condition(&conditions, "HostsReachable").unwrap()["status"],
        "True"
    );
    assert!(
        cluster
            .finalizers()
            .contains(&capl::controller::FINALIZER.to_owned())
    );
    // Cluster API mirrors it into the Cluster.
    eventually(
        "the Cluster's infrastructure to be provisioned",
        WAIT,
        || async {
            let c = capi(&env.client, &env.ns, "Cluster").get("c1").await.ok()?;
            (c.data
                .pointer("/status/initialization/infrastructureProvisioned")
                == Some(&json!(true)))
            .then_some(())
        },
    )
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_reaches_provisioned_with_provider_id_and_addresses() {
    let env = env("ctl-machine").await;
    env.provisioned_cluster("c1").await;
    let machine = env.provisioned_machine("c1", "m1").await;
    let uuid = machine
        .spec
        .domain_uuid
        .clone()
        .expect("domainUUID persisted");
    assert_eq!(
        machine.spec.provider_id.as_deref(),
        Some(format!("libvirt://{uuid}").as_str())
    );
    assert_eq!(
        machine.spec.host.as_deref(),
        Some("a"),
        "a worker goes to the host with the most free memory (the first of equals)"
    );
    let status = machine.status.clone().expect("status");
    assert_eq!(status.host.as_deref(), Some("a"));
    assert_eq!(status.failure_domain.as_deref(), Some("a"));
    assert_eq!(status.domain_uuid.as_deref(), Some(uuid.as_str()));
    assert_eq!(status.state.as_deref(), Some("running"));
    assert_eq!(status.ready, Some(true));
    // The host was recorded in the cluster before the VM was created, and stays there.
    let cluster = env.clusters.get("c1").await.unwrap();
    let in_use: Vec<String> = cluster
        .status
        .and_then(|s| s.hosts_in_use)
        .into_iter()
        .flatten()
        .map(|h| format!("{}={}", h.name, h.uri))
        .collect();
    assert_eq!(in_use, vec!["a=test:///default".to_owned()]);
    // Cluster API's Machine shows the providerID.
    eventually("the Machine's providerID", WAIT, || async {
        let m = capi(&env.client, &env.ns, "Machine").get("m1").await.ok()?;
        (m.data.pointer("/spec/providerID") == Some(&json!(format!("libvirt://{uuid}"))))
            .then_some(())
    })
    .await;
    assert_eq!(env.domains().await, 1);
    // Transitions are Events.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let reasons = eventually("a Ready event", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        let reasons: Vec<String> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("m1"))
            .filter_map(|e| e.reason.clone())
            .collect();
        reasons.iter().any(|r| r == "Ready").then_some(reasons)
    })
    .await;
    assert!(
        reasons
            .iter()
            .any(|r| r == "WaitingForClusterInfrastructure"
                || r == "Creating"
                || r == "ImageDownloading"
                || r == "WaitingForHostRecord"),
        "{reasons:?}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_status_is_rebuilt_identically() {
    let env = env("ctl-rebuild").await;
    env.provisioned_cluster("c1").await;
    let before = env.provisioned_machine("c1", "m1").await;
    let ensures = env.fake.calls(Method::Ensure);
    env.machines
        .patch_status(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null})),
        )
        .await
        .expect("deleting the status");
    let after = env.wait_provisioned("m1").await;
    assert_eq!(
        comparable_status(&after.status),
        comparable_status(&before.status)
    );
    assert!(
        env.fake.calls(Method::Ensure) > ensures,
        "rebuilt from the backend"
    );
    assert_eq!(env.domains().await, 1, "no second VM");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_machine_deletes_the_vm_and_removes_the_finalizer() {
    let env = env("ctl-delete").await;
    env.provisioned_cluster("c1").await;
    let machine = env.provisioned_machine("c1", "m1").await;
    assert!(
        machine
            .finalizers()
            .contains(&capl::controller::FINALIZER.to_owned())
    );
    assert_eq!(env.domains().await, 1);
    capi(&env.client, &env.ns, "Machine")
        .delete("m1", &DeleteParams::default())
        .await
        .expect("deleting the Machine");
    eventually("the LibvirtMachine to be gone", WAIT, || async {
        env.machines
            .get_opt("m1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(env.domains().await, 0, "the VM is gone");
    let left: Vec<_> = env
        .fake
        .volumes(&support::host_uri("test:///default"))
        .into_iter()
        .filter(|(_, v)| v != BASE_VOLUME)
        .collect();
    assert!(left.is_empty(), "no volume left: {left:?}");
    assert!(env.fake.calls(Method::Delete) >= 1);
    // The cluster no longer lists the host as in use.
    eventually("hostsInUse to be emptied", WAIT, || async {
        let c = env.clusters.get("c1").await.ok()?;
        c.status?.hosts_in_use.is_none().then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_cluster_gets_no_backend_call() {
    let env = env("ctl-pause").await;
    env.provisioned_cluster("c1").await;
    env.provisioned_machine("c1", "m1").await;
    env.set_paused("c1", true).await;
    eventually("Paused conditions", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        let c = env.clusters.get("c1").await.ok()?;
        let paused =
            |s: serde_json::Value| condition(&s, "Paused").is_some_and(|c| c["status"] == "True");
        (paused(serde_json::to_value(&m.status).unwrap())
            && paused(serde_json::to_value(&c.status).unwrap()))
        .then_some(())
    })
    .await;
    // Let in-flight reconciles finish, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = env.fake.total_calls();
    // A change to the paused objects triggers reconciles, still without a backend call.
    env.machines
        .patch(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"poke": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        env.fake.total_calls(),
        calls,
        "no backend call while paused"
    );
    env.set_paused("c1", false).await;
    eventually("calls to resume", WAIT, || async {
        (env.fake.total_calls() > calls).then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_machine_finds_its_vm_and_creates_none() {
    let env = env("ctl-move").await;
    env.provisioned_cluster("c1").await;
    let original = env.provisioned_machine("c1", "m1").await;
    env.set_paused("c1", true).await;
    eventually("the machine to be paused", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        (reason_of(&m, "Paused").as_deref() == Some("Paused")).then_some(())
    })
    .await;
    // clusterctl move: drop the finalizer, delete, re-create with the same spec (new UID, no
    // status), unpause.
    env.machines
        .patch(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    env.machines
        .delete("m1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the old object to be gone", WAIT, || async {
        env.machines
            .get_opt("m1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let mut moved = libvirt_machine("c1", "m1");
    moved.spec = original.spec.clone();
    moved.metadata.owner_references = original.metadata.owner_references.clone();
    moved.metadata.labels = original.metadata.labels.clone();
    let created = env
        .machines
        .create(&PostParams::default(), &moved)
        .await
        .expect("re-creating the LibvirtMachine");
    assert_ne!(created.uid(), original.uid());
    assert!(created.status.is_none());
    let domains_before = env.domains().await;
    env.set_paused("c1", false).await;
    let rebuilt = env.wait_provisioned("m1").await;
    assert_eq!(env.domains().await, 1);
    assert_eq!(domains_before, 1);
    assert_eq!(rebuilt.spec.domain_uuid, original.spec.domain_uuid);
    // Everything but the generations (a new object starts at 1) is rebuilt as it was.
    let without_generations = |m: &LibvirtMachine| {
        let mut status = m.status.clone().expect("status");
        status.observed_generation = None;
        for c in status.conditions.iter_mut().flatten() {
            c.observed_generation = None;
        }
        comparable_status(&status)
    };
    assert_eq!(
        without_generations(&rebuilt),
        without_generations(&original)
    );
    let uuid = uuid::Uuid::parse_str(original.spec.domain_uuid.as_deref().unwrap()).unwrap();
    assert_eq!(
        env.fake
            .domain_running(&support::host_uri("test:///default"), uuid),
        Some(true),
        "the same VM"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_error_is_a_condition_not_a_hot_loop() {
    let env = env("ctl-invalid").await;
    env.provisioned_cluster("c1").await;
    env.fake
        .inject(Step::Define, Fault::Fail(ErrorKind::Invalid), Times::Always);
    env.create_machine("c1", "m1").await;
    eventually("the DefineInvalid condition", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        (reason_of(&m, "VMProvisioned").as_deref() == Some("DefineInvalid")).then_some(())
    })
    .await;
    let m = env.machines.get("m1").await.unwrap();
    assert_eq!(reason_of(&m, "Ready").as_deref(), Some("DefineInvalid"));
    let ensures = env.fake.calls(Method::Ensure);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let more = env.fake.calls(Method::Ensure) - ensures;
    println!("{more} ensure calls in 5 s after an Invalid error");
    assert!(
        more <= 1,
        "{more} ensure calls in 5 s after an Invalid error"
    );
    assert_eq!(env.domains().await, 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orphaned_domain_of_the_cluster_is_swept() {
    let env = env("ctl-orphan").await;
    env.provisioned_cluster("c1").await;
    let kept = env.provisioned_machine("c1", "m1").await;
    // A domain created for a LibvirtMachine that no longer exists (its finalizer was removed by
    // hand), and one of another cluster that must stay.
    let request = |name: &str, cluster: &str| capl::libvirt::backend::MachineRequest {
        identity: capl::libvirt::identity::MachineIdentity::new(
            &env.ns,
            name,
            capl::libvirt::identity::MachineIdentity::uuid_for_uid(name),
        ),
        cluster: cluster.into(),
        host: host_a(),
        vcpus: 1,
        memory_mib: 256,
        cpu_mode: capl::api::CpuMode::Maximum,
        firmware: capl::api::Firmware::Bios,
        pool: "default".into(),
        image: capl::libvirt::backend::BaseImage::Volume {
            pool: "default".into(),
            name: BASE_VOLUME.into(),
        },
        root_gib: 1,
        data_disks: vec![],
        interfaces: vec![],
        bootstrap: None,
        direct_boot: None,
    };
    for r in [request("ghost", "c1"), request("stranger", "other")] {
        eventually("the extra domain to exist", WAIT, || async {
            matches!(
                env.fake.ensure(&r).await,
                Ok(capl::libvirt::backend::Provisioning::Ready(_))
            )
            .then_some(())
        })
        .await;
    }
    eventually("the orphan to be swept", WAIT, || async {
        (env.domains().await == 2).then_some(())
    })
    .await;
    let uri = support::host_uri("test:///default");
    let kept_uuid = uuid::Uuid::parse_str(kept.spec.domain_uuid.as_deref().unwrap()).unwrap();
    assert_eq!(env.fake.domain_running(&uri, kept_uuid), Some(true));
    assert_eq!(
        env.fake.domain_running(
            &uri,
            capl::libvirt::identity::MachineIdentity::uuid_for_uid("stranger")
        ),
        Some(true),
        "another cluster's domain is left alone"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_honours_failure_domains_and_control_plane_hosts() {
    let env = env("ctl-place").await;
    // Host `b` (workers only) comes first: among equals the first eligible host wins.
    let mut infra = libvirt_cluster("c1");
    infra.spec.hosts.reverse();
    capi(&env.client, &env.ns, "Cluster")
        .create(&PostParams::default(), &cluster("c1"))
        .await
        .unwrap();
    env.clusters
        .create(&PostParams::default(), &infra)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let machines = capi(&env.client, &env.ns, "Machine");
    for (name, control_plane, failure_domain, format) in [
        ("cp", true, None, "cloud-config"),
        ("worker", false, None, "ignition"),
        ("pinned", false, Some("a"), "cloud-config"),
    ] {
        let mut secret = bootstrap_secret(name);
        let data = secret.string_data.get_or_insert_default();
        data.insert("format".into(), format.into());
        data.insert("value".into(), "{\"ignition\":{}}".into());
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        env.machines
            .create(&PostParams::default(), &libvirt_machine("c1", name))
            .await
            .unwrap();
        let mut m = machine("c1", name);
        if control_plane {
            m.metadata
                .labels
                .get_or_insert_default()
                .insert("cluster.x-k8s.io/control-plane".into(), String::new());
        }
        if let Some(domain) = failure_domain {
            m.data["spec"]["failureDomain"] = json!(domain);
        }
        machines.create(&PostParams::default(), &m).await.unwrap();
    }
    let host_of = |m: LibvirtMachine| m.spec.host.clone().unwrap_or_default();
    assert_eq!(
        host_of(env.wait_provisioned("cp").await),
        "a",
        "control plane"
    );
    assert_eq!(host_of(env.wait_provisioned("worker").await), "b", "worker");
    assert_eq!(
        host_of(env.wait_provisioned("pinned").await),
        "a",
        "failureDomain"
    );
    // Two machines of one MachineDeployment spread over both hosts.
    for name in ["md-1", "md-2"] {
        let secret = bootstrap_secret(name);
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let mut lm = libvirt_machine("c1", name);
        let mut m = machine("c1", name);
        for labels in [&mut lm.metadata.labels, &mut m.metadata.labels] {
            labels
                .get_or_insert_default()
                .insert("cluster.x-k8s.io/deployment-name".into(), "md".into());
        }
        env.machines
            .create(&PostParams::default(), &lm)
            .await
            .unwrap();
        machines.create(&PostParams::default(), &m).await.unwrap();
        env.wait_provisioned(name).await;
    }
    let md1 = host_of(env.machines.get("md-1").await.unwrap());
    let md2 = host_of(env.machines.get("md-2").await.unwrap());
    assert_eq!((md1.as_str(), md2.as_str()), ("b", "a"), "spread");
    let worker = env.machines.get("worker").await.unwrap();
    let prefix = format!(
        "{}_worker_{}",
        env.ns,
        &worker.spec.domain_uuid.unwrap().replace('-', "")[..8]
    );
    let volumes = env.fake.volumes(&support::host_uri("test:///default"));
    assert!(
        volumes
            .iter()
            .any(|(_, v)| v.starts_with(&prefix) && v.ends_with("-ignition.json")),
        "ignition delivered: {volumes:?}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_libvirt_cluster_waits_for_its_machines() {
    let env = env("ctl-cluster-delete").await;
    env.provisioned_cluster("c1").await;
    env.provisioned_machine("c1", "m1").await;
    env.clusters
        .delete("c1", &DeleteParams::default())
        .await
        .unwrap();
    let waiting = eventually("the cluster to wait for its machines", WAIT, || async {
        let c = env.clusters.get("c1").await.ok()?;
        let status = serde_json::to_value(&c.status).unwrap();
        let deleting = condition(&status, "Deleting")?;
        (deleting["reason"] == "WaitingForMachinesDeleted").then_some(deleting)
    })
    .await;
    assert!(
        waiting["message"]
            .as_str()
            .unwrap()
            .contains("1 LibvirtMachine"),
        "{waiting}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.clusters.get_opt("c1").await.unwrap().is_some());
    capi(&env.client, &env.ns, "Machine")
        .delete("m1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the LibvirtCluster to be gone", WAIT, || async {
        env.clusters
            .get_opt("c1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(env.domains().await, 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_host_is_a_condition_and_recovers() {
    let env = env("ctl-unreachable").await;
    env.provisioned_cluster("c1").await;
    let uri = support::host_uri("test:///default");
    env.fake.set_unreachable(&uri, true);
    env.create_machine("c1", "m1").await;
    eventually(
        "HostUnreachable on the cluster and the machine",
        WAIT,
        || async {
            let c = env.clusters.get("c1").await.ok()?;
            let m = env.machines.get("m1").await.ok()?;
            let hosts = condition(&serde_json::to_value(&c.status).unwrap(), "HostsReachable")?;
            let machine_reason = reason_of(&m, "Ready")?;
            (hosts["status"] == "False"
                && hosts["reason"] == "HostUnreachable"
                && machine_reason == "NoHostAvailable")
                .then_some(())
        },
    )
    .await;
    env.fake.set_unreachable(&uri, false);
    env.wait_provisioned("m1").await;
    eventually("the hosts to be reachable again", WAIT, || async {
        let c = env.clusters.get("c1").await.ok()?;
        let hosts = condition(&serde_json::to_value(&c.status).unwrap(), "HostsReachable")?;
        (hosts["status"] == "True").then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_cluster_leaves_no_vm_and_no_volume() {
    let env = env("ctl-cluster-gone").await;
    env.provisioned_cluster("c1").await;
    env.provisioned_machine("c1", "m1").await;
    env.provisioned_machine("c1", "m2").await;
    assert_eq!(env.domains().await, 2);
    capi(&env.client, &env.ns, "Cluster")
        .delete("c1", &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    eventually("every object to be gone", WAIT, || async {
        let machines = env.machines.list(&Default::default()).await.ok()?;
        let clusters = env.clusters.list(&Default::default()).await.ok()?;
        (machines.items.is_empty() && clusters.items.is_empty()).then_some(())
    })
    .await;
    assert_eq!(env.domains().await, 0);
    let volumes: Vec<_> = env
        .fake
        .volumes(&support::host_uri("test:///default"))
        .into_iter()
        .filter(|(_, v)| v != BASE_VOLUME)
        .collect();
    assert!(volumes.is_empty(), "{volumes:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_filter_managed_by_and_missing_owners_are_left_alone() {
    let ns = "ctl-filter";
    let env = env_with(
        ns,
        capl::controller::Settings {
            watch_filter: Some("mine".into()),
            ..settings(ns)
        },
    )
    .await;
    capi(&env.client, ns, "Cluster")
        .create(&PostParams::default(), &cluster("c1"))
        .await
        .unwrap();
    env.clusters
        .create(&PostParams::default(), &libvirt_cluster("c1"))
        .await
        .unwrap();
    // A LibvirtMachine with the filter label but no owner Machine, and one managed elsewhere.
    let mut orphan = libvirt_machine("c1", "no-owner");
    orphan
        .metadata
        .labels
        .get_or_insert_default()
        .insert("cluster.x-k8s.io/watch-filter".into(), "mine".into());
    env.machines
        .create(&PostParams::default(), &orphan)
        .await
        .unwrap();
    let mut elsewhere = libvirt_cluster("c2");
    elsewhere.metadata.labels.get_or_insert_default().extend([
        (
            "cluster.x-k8s.io/watch-filter".to_owned(),
            "mine".to_owned(),
        ),
        (
            "cluster.x-k8s.io/managed-by".to_owned(),
            "someone-else".to_owned(),
        ),
    ]);
    capi(&env.client, ns, "Cluster")
        .create(&PostParams::default(), &cluster("c2"))
        .await
        .unwrap();
    env.clusters
        .create(&PostParams::default(), &elsewhere)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for name in ["c1", "c2"] {
        let c = env.clusters.get(name).await.unwrap();
        assert!(c.status.is_none(), "{name} untouched: {:?}", c.status);
        assert!(c.finalizers().is_empty(), "{name}: {:?}", c.finalizers());
    }
    let m = env.machines.get("no-owner").await.unwrap();
    assert!(
        m.status.is_none() && m.finalizers().is_empty(),
        "waits quietly"
    );
    assert_eq!(env.fake.total_calls(), 0);
    // Labelled for this manager, c1 is reconciled.
    env.clusters
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"cluster.x-k8s.io/watch-filter": "mine"}}}),
            ),
        )
        .await
        .unwrap();
    eventually("c1 to be provisioned", WAIT, || async {
        let c = env.clusters.get("c1").await.ok()?;
        (c.status?.initialization?.provisioned == Some(true)).then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_error_backs_off() {
    let env = env("ctl-transient").await;
    env.provisioned_cluster("c1").await;
    env.fake.inject(
        Step::Start,
        Fault::Fail(ErrorKind::Transient),
        Times::Always,
    );
    env.create_machine("c1", "m1").await;
    eventually("the StartFailed condition", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        (reason_of(&m, "VMProvisioned").as_deref() == Some("StartFailed")).then_some(())
    })
    .await;
    let ensures = env.fake.calls(Method::Ensure);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let more = env.fake.calls(Method::Ensure) - ensures;
    println!("{more} ensure calls in 6 s of transient failures");
    // Backoff 0.2, 0.4, 0.8, 1.6, 3.2 s: a handful of attempts (each two or three calls), where
    // a hot loop would make hundreds.
    assert!((1..=20).contains(&more), "{more} ensure calls in 6 s");
    env.fake.clear_faults();
    env.wait_provisioned("m1").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_on_an_unreachable_host_says_why_and_finishes_when_it_returns() {
    let env = env("ctl-delete-unreachable").await;
    env.provisioned_cluster("c1").await;
    let machine = env.provisioned_machine("c1", "m1").await;
    let uuid = uuid::Uuid::parse_str(machine.spec.domain_uuid.as_deref().unwrap()).unwrap();
    let uri = support::host_uri("test:///default");
    env.fake.set_unreachable(&uri, true);
    capi(&env.client, &env.ns, "Machine")
        .delete("m1", &DeleteParams::default())
        .await
        .unwrap();
    let failed = eventually("DeletionFailed", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        let status = serde_json::to_value(&m.status).unwrap();
        let deleting = condition(&status, "Deleting")?;
        (deleting["reason"] == "DeletionFailed").then_some(deleting)
    })
    .await;
    assert!(
        failed["message"].as_str().unwrap().contains("unreachable"),
        "{failed}"
    );
    assert_eq!(
        env.fake.domain_running(&uri, uuid),
        Some(true),
        "the VM is still there"
    );
    env.fake.set_unreachable(&uri, false);
    eventually("the LibvirtMachine to be gone", WAIT, || async {
        env.machines
            .get_opt("m1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(env.domains().await, 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_credentials_come_from_the_secret_and_a_missing_one_is_a_condition() {
    let env = env("ctl-credentials").await;
    capi(&env.client, &env.ns, "Cluster")
        .create(&PostParams::default(), &cluster("c1"))
        .await
        .expect("creating the Cluster");
    let mut infra = libvirt_cluster("c1");
    infra.spec.hosts = vec![
        serde_json::from_value(json!({
            "name": "hv1",
            "uri": "qemu+tls://hv1.example.com/system",
            "credentialsSecretRef": {"name": "hv1-credentials"},
        }))
        .unwrap(),
    ];
    env.clusters
        .create(&PostParams::default(), &infra)
        .await
        .expect("creating the LibvirtCluster");
    let hosts_reachable = || async {
        let c = env.clusters.get("c1").await.ok()?;
        condition(&serde_json::to_value(&c.status).unwrap(), "HostsReachable")
    };
    let missing = eventually(
        "the missing Secret named in HostsReachable",
        WAIT,
        || async {
            let hosts = hosts_reachable().await?;
            (hosts["status"] == "False").then_some(hosts)
        },
    )
    .await;
    assert!(
        missing["message"]
            .as_str()
            .unwrap()
            .contains("hv1: credentials Secret hv1-credentials does not exist"),
        "{missing}"
    );

    let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hv1-credentials"},
        "type": "kubernetes.io/tls",
        "stringData": {
            "ca.crt": pem("CERTIFICATE"),
            "tls.crt": pem("CERTIFICATE"),
            "tls.key": pem("PRIVATE KEY"),
        },
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the Secret");
    // The cluster re-probes its hosts on its backoff; touch it so the test need not wait.
    env.clusters
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"touch": "1"}}})),
        )
        .await
        .expect("touching the LibvirtCluster");
    eventually("the host reachable with its credentials", WAIT, || async {
        let hosts = hosts_reachable().await?;
        (hosts["status"] == "True").then_some(())
    })
    .await;
    let connections = env.fake.connections();
    let with_credentials = connections
        .iter()
        .find(|c| c.starts_with("qemu+tls://hv1.example.com/system?pkipath="))
        .unwrap_or_else(|| panic!("no connection with credentials: {connections:?}"));
    let dir = with_credentials
        .split_once("pkipath=")
        .map(|(_, dir)| std::path::PathBuf::from(dir))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("clientkey.pem")).expect("the key file"),
        pem("PRIVATE KEY")
    );
    env.stop().await;
    capl::libvirt::credentials::CredentialFiles::remove_global();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_made_vm_needs_no_bootstrap_secret_but_a_vanished_one_waits_for_it() {
    let env = env("ctl-no-bootstrap").await;
    env.provisioned_cluster("c1").await;
    let made = env.provisioned_machine("c1", "m1").await;
    // `clusterctl move` leaves unowned Secrets behind: the VM exists, nothing else is needed.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    secrets
        .delete("m1-bootstrap", &DeleteParams::default())
        .await
        .expect("deleting the bootstrap Secret");
    let touch = |value: &'static str| {
        let machines = env.machines.clone();
        async move {
            machines
                .patch(
                    "m1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"touch": value}}})),
                )
                .await
                .expect("touching the machine");
        }
    };
    touch("1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = env.machines.get("m1").await.expect("the machine");
    assert_eq!(reason_of(&still, "Ready").as_deref(), Some("Ready"));

    // The VM vanishes behind the provider's back: it is not made again without its data.
    let host = host_a();
    let uuid = uuid::Uuid::parse_str(made.spec.domain_uuid.as_deref().unwrap()).unwrap();
    let identity = capl::libvirt::identity::MachineIdentity::new(&env.ns, "m1", uuid);
    env.fake.set_guests_ignore_acpi(false);
    eventually("the VM to be gone", WAIT, || async {
        matches!(
            env.fake
                .delete(&host, &identity, Duration::ZERO)
                .await
                .ok()?,
            capl::libvirt::backend::Deletion::Gone
        )
        .then_some(())
    })
    .await;
    touch("2").await;
    eventually("WaitingForBootstrapData", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        (reason_of(&m, "Ready").as_deref() == Some("WaitingForBootstrapData")).then_some(())
    })
    .await;
    assert_eq!(
        env.domains().await,
        0,
        "no VM made without its bootstrap data"
    );
    secrets
        .create(&PostParams::default(), &bootstrap_secret("m1"))
        .await
        .expect("re-creating the Secret");
    env.wait_provisioned("m1").await;
    assert_eq!(env.domains().await, 1);
    env.stop().await;
}
