//! Faults, with the real `manager` binary (as a process), the real Cluster API core manager, the
//! bed's kube-apiserver and its real libvirtd + QEMU: the manager killed (SIGKILL) while it creates
//! 20 machines, the libvirt host going away and coming back, kube-apiserver restarting. Every
//! check of the hypervisor goes through an independent libvirt connection.
//!
//! Guests boot no OS (a blank base volume): a running QEMU is all these tests need. The tests run
//! one at a time (they stop shared parts of the bed).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use uuid::Uuid;

use capl::api::{LibvirtCluster, LibvirtMachine};
use capl::libvirt::Host;
use capl::libvirt::identity::MachineIdentity;
use support::capi_objects::{bootstrap_secret, capi, condition, eventually, machine, namespace};
use support::process::{Proc, poll};

/// Storage pool of these tests on the bed's libvirtd.
const POOL: &str = "capl-faults";
/// Isolated network of these tests on the bed's libvirtd.
const NETWORK: &str = "capl-faults";
/// The blank base volume every machine's root disk is an overlay of.
const BASE: &str = "faults-base.qcow2";
/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(120);
/// How soon after a fault ends the manager must be back at work.
const RECOVERY: Duration = Duration::from_secs(60);

/// The tests stop shared parts of the bed (libvirtd, kube-apiserver): one at a time. (A tokio
/// mutex: the guard lives across awaits, and a failed test releases it without poisoning.)
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// The bed's libvirtd URI, with this file's pool (holding [`BASE`]) and network, both autostarted.
fn libvirt_fixture() -> String {
    static URI: OnceLock<String> = OnceLock::new();
    URI.get_or_init(|| {
        let (uri, host, dir) = support::libvirtd::bed_pool(POOL);
        support::libvirtd::qcow2(&dir.join(BASE), "1G");
        let pool = host
            .connection()
            .lookup_storage_pool_by_name(POOL)
            .expect("pool");
        pool.refresh(0).expect("refresh pool");
        pool.set_autostart(true).expect("autostart pool");
        let network = host
            .connection()
            .define_network_xml(&format!(
                "<network><name>{NETWORK}</name><bridge name='caplft0'/>\
                 <ip address='10.213.9.1' netmask='255.255.255.0'><dhcp>\
                 <range start='10.213.9.10' end='10.213.9.250'/></dhcp></ip></network>"
            ))
            .expect("define network");
        network.create().expect("start network");
        network.set_autostart(true).expect("autostart network");
        uri.as_str().to_owned()
    })
    .clone()
}

/// An independent connection to the bed's libvirtd (never the manager's).
fn connect(uri: &str) -> Host {
    Host::open(&support::host_uri(uri)).expect("connecting to the bed's libvirtd")
}

/// One test's world: a namespace, a manager process, a client.
struct World {
    test: &'static str,
    ns: String,
    uri: String,
    client: Client,
    manager: Option<Proc>,
}

impl World {
    async fn new(test: &'static str) -> Self {
        let uri = libvirt_fixture();
        let bed = support::shared();
        bed.capi();
        let client = bed.client().await;
        let ns = format!("faults-{test}");
        namespace(&client, &ns).await;
        let mut world = Self {
            test,
            ns,
            uri,
            client,
            manager: None,
        };
        world.start_manager();
        world
    }

    /// Starts the `manager` binary for this namespace and waits until it is ready.
    fn start_manager(&mut self) {
        let (proc, _) = support::shared().start_manager(
            self.test,
            env!("CARGO_BIN_EXE_manager"),
            &[
                "--webhook-port=0".into(),
                format!("--namespace={}", self.ns),
                // The host probe of a ready cluster repeats this often.
                "--sync-period=2s".into(),
                "--kube-api-qps=500".into(),
                "--kube-api-burst=1000".into(),
                // These guests boot no OS: delete powers them off after this.
                "--guest-shutdown-timeout=5s".into(),
            ],
        );
        self.manager = Some(proc);
    }

    /// SIGKILL: the manager gets no chance to finish anything.
    fn kill_manager(&mut self) {
        let mut proc = self.manager.take().expect("a running manager");
        let pid = libc::pid_t::try_from(proc.pid()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9");
        proc.stop(Duration::from_secs(1));
    }

    fn manager_running(&mut self) {
        if let Err(e) = self.manager.as_mut().expect("manager").check_running() {
            panic!("the manager exited: {e:#}");
        }
    }

    fn libvirt_clusters(&self) -> Api<LibvirtCluster> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn libvirt_machines(&self) -> Api<LibvirtMachine> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A Cluster and its LibvirtCluster with one host, the bed's libvirtd (TCG guests).
    async fn create_cluster(&self, name: &str) {
        capi(&self.client, &self.ns, "Cluster")
            .create(
                &PostParams::default(),
                &support::capi_objects::cluster(name),
            )
            .await
            .expect("creating the Cluster");
        let infra: LibvirtCluster = serde_json::from_value(json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
            "kind": "LibvirtCluster",
            "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": name}},
            "spec": {
                "hosts": [{"name": "a", "uri": self.uri, "domainType": "qemu"}],
                "storagePool": POOL,
                "network": NETWORK,
            },
        }))
        .unwrap();
        self.libvirt_clusters()
            .create(&PostParams::default(), &infra)
            .await
            .expect("creating the LibvirtCluster");
    }

    /// A cloud-config bootstrap Secret, a LibvirtMachine (1 vCPU, the minimum memory, a root
    /// overlay of [`BASE`]) and its Machine.
    async fn create_machine(&self, cluster: &str, name: &str) {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &bootstrap_secret(name))
            .await
            .expect("creating the bootstrap Secret");
        let infra: LibvirtMachine = serde_json::from_value(json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
            "kind": "LibvirtMachine",
            "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
            "spec": {
                "vcpus": 1,
                "memoryMiB": 256,
                "image": {"volume": {"pool": POOL, "name": BASE}},
                "rootVolume": {"sizeGiB": 1},
            },
        }))
        .unwrap();
        self.libvirt_machines()
            .create(&PostParams::default(), &infra)
            .await
            .expect("creating the LibvirtMachine");
        capi(&self.client, &self.ns, "Machine")
            .create(&PostParams::default(), &machine(cluster, name))
            .await
            .expect("creating the Machine");
    }

    /// The LibvirtMachines whose VM runs (`VMProvisioned` true, a providerID), once all of
    /// `names` are.
    async fn wait_provisioned(&self, names: &[String]) -> Vec<LibvirtMachine> {
        self.wait_provisioned_within(names, WAIT).await
    }

    async fn wait_provisioned_within(
        &self,
        names: &[String],
        timeout: Duration,
    ) -> Vec<LibvirtMachine> {
        let api = self.libvirt_machines();
        eventually("the LibvirtMachines to be provisioned", timeout, || async {
            let list = api.list(&Default::default()).await.ok()?;
            let done: Vec<LibvirtMachine> = list
                .items
                .into_iter()
                .filter(|m| names.contains(&m.name_any()) && vm_provisioned(m))
                .collect();
            (done.len() == names.len()).then_some(done)
        })
        .await
    }

    /// Our domains of this namespace, through an independent connection.
    fn domains(&self) -> Vec<capl::libvirt::backend::OwnedDomain> {
        connect(&self.uri)
            .list_machines()
            .expect("listing domains")
            .into_iter()
            .filter(|d| d.namespace == self.ns)
            .collect()
    }

    /// Deletes the Cluster and waits until every object of it and every domain and volume of
    /// this namespace is gone. The guests boot no OS, so none acts on the ACPI shutdown the
    /// provider asks for on delete: once a machine is being deleted, its guest is powered off
    /// here, as a booted guest would power itself off.
    async fn delete_cluster_and_wait(&self, cluster: &str) {
        let started = Instant::now();
        capi(&self.client, &self.ns, "Cluster")
            .delete(cluster, &DeleteParams::default())
            .await
            .expect("deleting the Cluster");
        let machines = self.libvirt_machines();
        eventually("everything of the cluster to be gone", WAIT, || async {
            let deleting: BTreeMap<String, bool> = machines
                .list(&Default::default())
                .await
                .ok()?
                .items
                .iter()
                .map(|m| (m.name_any(), m.metadata.deletion_timestamp.is_some()))
                .collect();
            // Each off its own connection and at once: a destroy takes libvirt a moment.
            let off: Vec<Uuid> = self
                .domains()
                .into_iter()
                .filter(|d| deleting.get(&d.name).copied().unwrap_or(true))
                .map(|d| d.uuid)
                .collect();
            std::thread::scope(|scope| {
                for uuid in off {
                    scope.spawn(move || power_off(&connect(&self.uri), uuid));
                }
            });
            let host = connect(&self.uri);
            let objects = self.remaining_objects().await?;
            let domains = self.domains().len();
            let volumes = machine_volumes(&host);
            if started.elapsed().as_secs().is_multiple_of(15) {
                let log = std::fs::read_to_string(support::shared().test_dir(self.test).join("manager.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                eprintln!(
                    "{:?}: left {objects:?}, {domains} domain(s), {} volume(s); manager log tail: {tail:#?}",
                    started.elapsed(),
                    volumes.len()
                );
            }
            (objects.is_empty() && domains == 0 && volumes.is_empty()).then_some(())
        })
        .await;
        println!(
            "{}: the cluster was gone {:?} after its delete",
            self.test,
            started.elapsed()
        );
    }

    /// Names of the Cluster API and provider objects left in the namespace.
    async fn remaining_objects(&self) -> Option<Vec<String>> {
        let mut left = Vec::new();
        for kind in ["Cluster", "Machine"] {
            for o in capi(&self.client, &self.ns, kind)
                .list(&Default::default())
                .await
                .ok()?
                .items
            {
                left.push(format!("{kind}/{}", o.name_any()));
            }
        }
        for o in self
            .libvirt_machines()
            .list(&Default::default())
            .await
            .ok()?
            .items
        {
            left.push(format!("LibvirtMachine/{}", o.name_any()));
        }
        for o in self
            .libvirt_clusters()
            .list(&Default::default())
            .await
            .ok()?
            .items
        {
            let conditions: Vec<String> = o
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .map(|c| format!("{}={}/{}: {}", c.type_, c.status, c.reason, c.message))
                .collect();
            left.push(format!(
                "LibvirtCluster/{} (deleting: {}, finalizers {:?}, {conditions:?})",
                o.name_any(),
                o.metadata.deletion_timestamp.is_some(),
                o.metadata.finalizers
            ));
        }
        Some(left)
    }

    /// Stops the manager gracefully and fails when it did not run until now.
    fn stop_manager(&mut self) {
        self.manager_running();
        if let Some(mut proc) = self.manager.take() {
            proc.stop(Duration::from_secs(10));
        }
    }
}

/// Whether the machine's VM exists and runs: `VMProvisioned` true and a providerID.
fn vm_provisioned(machine: &LibvirtMachine) -> bool {
    let status = serde_json::to_value(&machine.status).unwrap_or(Value::Null);
    condition(&status, "VMProvisioned").is_some_and(|c| c["status"] == "True")
        && machine.spec.provider_id.is_some()
}

/// The machine's condition `kind` as (status, reason, message).
fn condition_of<T: serde::Serialize>(status: &T, kind: &str) -> Option<(String, String, String)> {
    let status = serde_json::to_value(status).ok()?;
    let c = condition(&status, kind)?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Some((s("status"), s("reason"), s("message")))
}

/// Forces the domain off (no-op when it is not running).
fn power_off(host: &Host, uuid: Uuid) {
    if let Ok(domain) = host
        .connection()
        .lookup_domain_by_uuid_string(&uuid.to_string())
        && domain.is_active().unwrap_or(false)
    {
        let _ = domain.destroy();
    }
}

/// Every volume in [`POOL`] but the base volume (what machines made), after a pool refresh.
fn machine_volumes(host: &Host) -> Vec<String> {
    let pool = host
        .connection()
        .lookup_storage_pool_by_name(POOL)
        .expect("pool");
    pool.refresh(0).expect("refresh");
    let mut names = pool.list_volumes().expect("volumes");
    names.retain(|n| n != BASE);
    names.sort();
    names
}

/// The domain's libvirt id and whether it runs (the id changes when QEMU is restarted).
fn domain_run_id(host: &Host, uuid: Uuid) -> Option<(u32, bool)> {
    let domain = host
        .connection()
        .lookup_domain_by_uuid_string(&uuid.to_string())
        .ok()?;
    let active = domain.is_active().ok()?;
    Some((domain.id().unwrap_or(0), active))
}

/// The machine's domain UUID (`spec.domainUUID`).
fn uuid_of(machine: &LibvirtMachine) -> Uuid {
    Uuid::parse_str(machine.spec.domain_uuid.as_deref().expect("domainUUID")).expect("a UUID")
}

// ------------------------------------------------------------------------------- kill -9

/// The manager is killed (SIGKILL) while it creates 20 machines: some domains exist, others do
/// not yet. Started again, it finishes the job with exactly one domain per machine (by the UUIDs
/// the machines persisted), no volume that belongs to none of them, and deleting the Cluster
/// afterwards removes every domain, volume and object (no finalizer stuck).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_killed_while_creating_20_machines_finishes_the_job_after_a_restart() {
    let _serial = serial().await;
    let mut world = World::new("kill9").await;
    world.create_cluster("c1").await;
    let names: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    for name in &names {
        world.create_machine("c1", name).await;
    }

    // Kill while creation is demonstrably in flight: a quarter of the domains exist, not all.
    let started = Instant::now();
    let at_kill = poll(
        "a quarter of the domains to exist",
        WAIT,
        Duration::from_millis(20),
        || {
            let n = world.domains().len();
            Ok((n >= names.len() / 4).then_some(n))
        },
    )
    .expect("creation started");
    world.kill_manager();
    let killed = Instant::now();
    let after_kill = world.domains().len();
    println!(
        "killed after {:?} with {at_kill} domain(s) ({after_kill} once it was dead), {} volume(s)",
        started.elapsed(),
        machine_volumes(&connect(&world.uri)).len()
    );
    assert!(
        after_kill < names.len(),
        "the kill came before all domains existed ({after_kill})"
    );

    world.start_manager();
    let machines = world.wait_provisioned(&names).await;
    println!("all 20 provisioned {:?} after the kill", killed.elapsed());

    // Exactly 20 domains, one per machine, by the persisted UUID.
    let host = connect(&world.uri);
    let expected: BTreeMap<Uuid, String> = machines
        .iter()
        .map(|m| (uuid_of(m), m.name_any()))
        .collect();
    assert_eq!(expected.len(), 20, "20 distinct domain UUIDs");
    let found: BTreeMap<Uuid, String> = world
        .domains()
        .into_iter()
        .map(|d| (d.uuid, d.name))
        .collect();
    assert_eq!(found, expected, "exactly one domain per machine");
    let all = host.connection().list_all_domains(0).expect("domains");
    let ours_total = all
        .iter()
        .filter(|d| {
            d.uuid_string()
                .ok()
                .and_then(|u| Uuid::parse_str(&u).ok())
                .is_some_and(|u| expected.contains_key(&u))
        })
        .count();
    assert_eq!(ours_total, 20, "no other domain with one of these UUIDs");
    for (uuid, name) in &expected {
        assert_eq!(
            domain_run_id(&host, *uuid).map(|(_, active)| active),
            Some(true),
            "{name} runs"
        );
        let m = machines.iter().find(|m| &m.name_any() == name).unwrap();
        assert_eq!(
            m.spec.provider_id.as_deref(),
            Some(format!("libvirt://{uuid}").as_str())
        );
    }

    // No leaked volume: every volume in the pool belongs to one of the 20 (root, seed, serial console),
    // and each machine has the same set.
    let mut owned = BTreeSet::new();
    for (uuid, name) in &expected {
        let id = MachineIdentity::new(&world.ns, name, *uuid);
        let inventory = host.inventory(&id).expect("inventory");
        let mut roles: Vec<String> = inventory
            .volumes
            .iter()
            .map(|v| v.name.trim_start_matches(&id.volume_prefix()).to_owned())
            .collect();
        roles.sort();
        assert_eq!(
            roles,
            vec!["root.qcow2", "seed.iso", "serial.log"],
            "{name}: {inventory:?}"
        );
        owned.extend(inventory.volumes.into_iter().map(|v| v.name));
    }
    let in_pool: BTreeSet<String> = machine_volumes(&host).into_iter().collect();
    let strays: Vec<&String> = in_pool.difference(&owned).collect();
    assert!(strays.is_empty(), "volumes nobody owns: {strays:?}");
    assert_eq!(in_pool.len(), 60);

    world.delete_cluster_and_wait("c1").await;
    world.stop_manager();
    println!("test done after {:?}", started.elapsed());
}

// ------------------------------------------------------------------ host unreachable

/// The host's libvirtd stops (its guests keep running): the LibvirtMachine and the
/// LibvirtCluster's host probe say HostUnreachable, naming the host. libvirtd comes back: both
/// recover on their own, and the machine still has its one VM (the same QEMU, never re-created).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_reported_and_recovered_from_without_a_second_vm() {
    let _serial = serial().await;
    let mut world = World::new("unreachable").await;
    world.create_cluster("c1").await;
    world.create_machine("c1", "m1").await;
    let machine = world.wait_provisioned(&["m1".into()]).await.remove(0);
    let uuid = uuid_of(&machine);
    let before = domain_run_id(&connect(&world.uri), uuid).expect("the domain");
    assert!(before.1, "running");
    let clusters = world.libvirt_clusters();
    let machines = world.libvirt_machines();
    // The guest boots no OS, so it never reports an address: Ready waits for one.
    let ready_before = eventually("the machine to wait for an address", WAIT, || async {
        let m = machines.get("m1").await.ok()?;
        let ready = condition_of(&m.status, "Ready")?;
        (ready.1 == "WaitingForAddress").then_some(ready)
    })
    .await;
    eventually("the LibvirtCluster to be Ready", WAIT, || async {
        let c = clusters.get("c1").await.ok()?;
        (condition_of(&c.status, "Ready")?.0 == "True").then_some(())
    })
    .await;

    let bed = support::shared();
    bed.libvirtd().as_mut().expect("libvirtd").stop_daemon();
    let outage = Instant::now();

    let (_, reason, message) = eventually(
        "the LibvirtMachine to report HostUnreachable",
        WAIT,
        || async {
            let m = machines.get("m1").await.ok()?;
            let ready = condition_of(&m.status, "Ready")?;
            (ready.1 == "HostUnreachable").then_some(ready)
        },
    )
    .await;
    println!("machine: {reason}: {message}");
    assert!(
        message.contains("libvirt-sock") || message.contains(&world.uri),
        "the message names the host's connection: {message}"
    );
    let probe = eventually("the LibvirtCluster's host probe to fail", WAIT, || async {
        let c = clusters.get("c1").await.ok()?;
        let hosts = condition_of(&c.status, "HostsReachable")?;
        (hosts.0 == "False").then_some((hosts, condition_of(&c.status, "Ready")?))
    })
    .await;
    println!("cluster: {probe:?}");
    let ((_, hosts_reason, hosts_message), (ready, ready_reason, _)) = probe;
    assert_eq!(hosts_reason, "HostUnreachable");
    assert!(
        hosts_message.starts_with("a: ") && hosts_message.contains("libvirt-sock"),
        "names the host and its connection: {hosts_message}"
    );
    assert_eq!(
        (ready.as_str(), ready_reason.as_str()),
        ("False", "HostUnreachable")
    );
    // The machine stays provisioned (its VM was created; only the host does not answer).
    let m = machines.get("m1").await.unwrap();
    assert_eq!(m.status.as_ref().and_then(|s| s.ready), Some(true));

    bed.libvirtd()
        .as_mut()
        .expect("libvirtd")
        .start_daemon()
        .expect("libvirtd restarts");
    println!("libvirtd was down for {:?}", outage.elapsed());
    let back = Instant::now();
    eventually("the LibvirtCluster to be Ready again", RECOVERY, || async {
        let c = clusters.get("c1").await.ok()?;
        let ok = |kind| condition_of(&c.status, kind).is_some_and(|c| c.0 == "True");
        (ok("Ready") && ok("HostsReachable")).then_some(())
    })
    .await;
    eventually("the LibvirtMachine to recover", RECOVERY, || async {
        let m = machines.get("m1").await.ok()?;
        let ready = condition_of(&m.status, "Ready")?;
        (vm_provisioned(&m) && ready == ready_before).then_some(())
    })
    .await;
    println!("recovered {:?} after libvirtd returned", back.elapsed());
    let host = connect(&world.uri);
    let domains: Vec<Uuid> = world.domains().into_iter().map(|d| d.uuid).collect();
    assert_eq!(domains, vec![uuid], "still exactly one VM");
    assert_eq!(
        domain_run_id(&host, uuid),
        Some(before),
        "the same QEMU process still runs it"
    );
    world.manager_running();

    world.delete_cluster_and_wait("c1").await;
    world.stop_manager();
}

// ---------------------------------------------------------------- apiserver restart

/// kube-apiserver restarts (same port, same etcd) under a running manager: the manager keeps
/// running, a machine created after the restart is provisioned, and the first machine keeps its
/// one VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_recovers_from_an_apiserver_restart_on_its_own() {
    let _serial = serial().await;
    let mut world = World::new("apiserver").await;
    world.create_cluster("c1").await;
    world.create_machine("c1", "m1").await;
    let first = world.wait_provisioned(&["m1".into()]).await.remove(0);
    let first_uuid = uuid_of(&first);
    let before = domain_run_id(&connect(&world.uri), first_uuid).expect("the domain");

    let bed = support::shared();
    let url = {
        let mut plane = bed.plane();
        let plane = plane.as_mut().expect("the control plane");
        plane.kill_apiserver().expect("killing kube-apiserver");
        plane.url.clone()
    };
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "kube-apiserver is down"
    );
    // An outage long enough for every watch and request of the manager to fail (and to back
    // off a few times).
    tokio::time::sleep(Duration::from_secs(5)).await;
    world.manager_running();
    bed.plane()
        .as_mut()
        .expect("the control plane")
        .start_apiserver()
        .expect("kube-apiserver restarts");
    let back = Instant::now();

    // A fresh client: the old one's connections died with the apiserver.
    world.client = bed.client().await;
    world.create_machine("c1", "m2").await;
    // Recovering takes the manager a moment (its watches relist), not minutes.
    let machines = world
        .wait_provisioned_within(&["m1".into(), "m2".into()], RECOVERY)
        .await;
    println!(
        "a machine created after the restart was provisioned in {:?}",
        back.elapsed()
    );
    world.manager_running();
    let expected: BTreeSet<Uuid> = machines.iter().map(uuid_of).collect();
    assert_eq!(expected.len(), 2);
    let found: BTreeSet<Uuid> = world.domains().into_iter().map(|d| d.uuid).collect();
    assert_eq!(found, expected, "one VM per machine, no duplicate");
    assert_eq!(
        domain_run_id(&connect(&world.uri), first_uuid),
        Some(before),
        "the first machine's VM was left alone"
    );

    world.delete_cluster_and_wait("c1").await;
    world.stop_manager();
}
