//! `tests/testbed run`: the main job, in the foreground.
//!
//! 1. etcd + kube-apiserver, the real Cluster API core manager, this provider's CRDs and webhook
//!    configurations;
//! 2. a libvirt host: by default the bed's real libvirtd + QEMU in its own network namespace,
//!    with a storage pool `capl`, an isolated network `capl` (DHCP, no NAT) and the bootable test
//!    guest as volume `capl/capl-test-guest.img`; with `--driver test`, libvirt's in-process test
//!    driver;
//! 3. the manager (with `--driver test`: the controllers and webhooks inside this process,
//!    because the test driver's state lives in one process and the guest image volume must be
//!    put there);
//! 4. `deploy/examples/` applied (the host URI pointed at that host), then the Machines and the
//!    domains libvirt holds, until Ctrl-C tears everything down.
//!
//! With `--helm`, the provider is installed the way users install it instead: the bed with a
//! node (containerd, kubelet, kube-proxy), the CAPI core manager and the real libvirtd + QEMU;
//! the provider's OCI image built without an engine and imported into the node's containerd;
//! `helm install` of `charts/cluster-api-provider-libvirt` with libvirtd's socket mounted into
//! the pods; then the same examples and report, plus the pods and the leader's log.
//!
//! With `--workload`, the whole way to a workload cluster instead: the bed with the Cluster API
//! core, kubeadm bootstrap and kubeadm control-plane managers, the real libvirtd with a routed
//! network this machine reaches, the Kubernetes node image (built once, cached) served over
//! HTTP, this provider's manager; then `deploy/cluster-template.yaml` through `clusterctl
//! generate cluster`: a control-plane VM runs `kubeadm init` from its cloud-init, a worker joins,
//! and the workload cluster answers `kubectl` until Ctrl-C deletes it (the provider removes its
//! VMs and volumes) and tears everything down.
//!
//! Every process dies with this one (they are started with `PR_SET_PDEATHSIG`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::support::apiserver::{ControlPlane, free_port};
use crate::support::capi::{CapiCore, http_ok};
use crate::support::guest_host;
use crate::support::libvirtd::Libvirtd;
use crate::support::process::{Lifetime, Proc, poll};
use crate::support::tools::{Tools, cache_dir};

/// Which libvirt the examples' host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    /// The bed's libvirtd + QEMU: real guests boot.
    Qemu,
    /// `test:///default` in this process: nothing boots.
    Test,
}

/// Namespace the examples are applied in.
const NAMESPACE: &str = "default";
/// How long the machines get to be provisioned.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(300);

/// What `tests/testbed run` was asked for.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    driver: Driver,
    /// Install the provider with its image and Helm chart on a node of the bed.
    helm: bool,
    /// A kubeadm workload cluster on provider-made VMs.
    workload: bool,
    /// Flags passed on to the manager process.
    manager_flags: Vec<String>,
}

/// Runs the main job until Ctrl-C.
pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    if options.helm {
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(helm::main_job());
    }
    if options.workload {
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(workload::main_job());
    }
    let Options {
        driver,
        manager_flags,
        ..
    } = options;
    if let Some(state) = crate::read_state()?
        && state.processes.iter().all(|(_, pid)| crate::alive(*pid))
    {
        bail!(
            "a detached test bed is up (its webhooks use port 9443): run `tests/testbed down` first"
        );
    }
    let dir = cache_dir()?.join("testbed-run");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(main_job(driver, &manager_flags, &dir));
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs are kept in {}", dir.display());
    }
    result
}

fn parse(args: &[String]) -> Result<Options> {
    let mut driver = None;
    let mut helm = false;
    let mut workload = false;
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--helm" => {
                helm = true;
                continue;
            }
            "--workload" => {
                workload = true;
                continue;
            }
            "--driver" => args.next().map(String::as_str),
            other => match other.strip_prefix("--driver=") {
                Some(value) => Some(value),
                None => {
                    rest.push(arg.clone());
                    continue;
                }
            },
        };
        driver = Some(match value {
            Some("qemu") => Driver::Qemu,
            Some("test") => Driver::Test,
            other => bail!("--driver takes qemu or test, not {other:?}"),
        });
    }
    if helm {
        if driver == Some(Driver::Test) {
            bail!(
                "--helm does not combine with --driver test: the provider's pods reach the bed's \
                 real libvirtd through its socket, the test driver lives inside one process"
            );
        }
        if !rest.is_empty() {
            bail!(
                "--helm takes no manager flags (the chart sets them; got {})",
                rest.join(" ")
            );
        }
    }
    if workload && (helm || driver.is_some() || !rest.is_empty()) {
        bail!(
            "--workload takes no other flag: its guests boot on the bed's real libvirtd and its \
             manager flags are fixed"
        );
    }
    Ok(Options {
        driver: driver.unwrap_or(Driver::Qemu),
        helm,
        workload,
        manager_flags: rest,
    })
}

fn step(text: &str) {
    eprintln!("==> {text}");
}

async fn main_job(driver: Driver, manager_flags: &[String], dir: &Path) -> Result<()> {
    let started = Instant::now();
    let tools = Tools::locate()?;
    step("starting etcd + kube-apiserver");
    let plane = ControlPlane::start(&tools, &dir.join("control-plane"), Lifetime::TestProcess)?;
    step("starting the Cluster API core manager (its CRDs and webhooks installed)");
    let capi = CapiCore::start(&tools, &plane, &dir.join("capi"), Lifetime::TestProcess)?;
    step("installing this provider's CRDs and webhook configurations");
    let cert_dir = crate::install_provider(&plane, dir)?;
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "-l",
        "cluster.x-k8s.io/provider=infrastructure-libvirt",
    ])?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let mut libvirtd = None;
    let mut manager = None;
    let mut in_process = None;
    let uri = match driver {
        Driver::Qemu => {
            step("starting libvirtd in its own network namespace");
            let started = Libvirtd::start(&dir.join("libvirt"), Lifetime::TestProcess)?;
            let uri = started.uri.clone();
            step(
                "preparing pool `capl`, isolated network `capl` (10.213.9.0/24, DHCP, no NAT) and the guest image",
            );
            let host = capl::libvirt::Host::open(&started.host_uri())?;
            guest_host::prepare(&host, "capl", &started.images().join("capl"), "capl0", 9)?;
            libvirtd = Some(started);
            step("starting the manager");
            manager = Some(start_manager(&plane, &uri, &cert_dir, manager_flags, dir)?);
            uri
        }
        Driver::Test => {
            if !manager_flags.is_empty() {
                bail!("--driver test runs no manager process: manager flags are not taken");
            }
            step("preparing pool `capl`, network `capl` and the image volume on test:///default");
            let backend = Arc::new(capl::libvirt::live::LibvirtBackend::new(4)?);
            prepare_test_driver(&backend).await?;
            step(
                "running the controllers and webhooks in this process (the test driver's state lives in one process)",
            );
            let client = kube_client(&plane.kubeconfig).await?;
            let policy = capl::libvirt::uri::UriPolicy {
                allow_test_driver: true,
            };
            let certs = capl::webhook::tls::CertStore::load(
                capl::webhook::tls::CertFiles::in_dir(&cert_dir, "tls.crt", "tls.key"),
            )?;
            let webhooks = tokio::spawn(capl::webhook::server::serve(
                "127.0.0.1:9443".parse()?,
                certs,
                capl::webhook::admission::AdmissionPolicy { uri: policy },
                stopped(),
            ));
            let controllers = tokio::spawn(capl::controller::run(
                client,
                backend.clone(),
                capl::controller::Settings {
                    uri_policy: policy,
                    namespace: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                stopped(),
            ));
            in_process = Some((backend, webhooks, controllers));
            "test:///default".to_owned()
        }
    };

    let provisioned = apply_examples_and_wait(&plane, &uri).await?;

    print_machines(&plane)?;
    match (&libvirtd, &in_process) {
        (Some(libvirtd), _) => print_domains_and_consoles(libvirtd)?,
        (None, Some((backend, _, _))) => {
            println!(
                "Domains on test:///default (the controllers' own connection: the test driver has no other):"
            );
            let table = backend
                .hosts()
                .run(&crate::support::host_uri("test:///default"), |host| {
                    Ok(domain_table(host).map_err(|e| format!("{e:#}")))
                })
                .await?
                .map_err(anyhow::Error::msg)?;
            print!("{table}");
            println!();
            println!("With the test driver, some steps cannot happen and none is pretended:");
            println!("  - no guest boots: the domains are records in the test driver's memory;");
            println!("  - no bootstrap seed is read: the seed volume exists, no guest reads it;");
            println!("  - no DHCP lease: the addresses above are the test driver's made-up ones;");
            println!("  - volumes hold no content: the guest image volume is an empty stand-in.");
        }
        _ => {}
    }
    println!();
    print_not_provisioned(provisioned);
    println!(
        "Up in {:.0?}. Explore it from another shell:",
        started.elapsed()
    );
    println!("  export KUBECONFIG={}", plane.kubeconfig.display());
    println!("  kubectl get cluster,machines,libvirtclusters,libvirtmachines -n {NAMESPACE}");
    println!("  kubectl scale machinedeployment example-workers -n {NAMESPACE} --replicas=3");
    if let Some(libvirtd) = &libvirtd {
        println!("  virsh -c '{}' list --all", libvirtd.uri);
        println!(
            "  virsh -c '{}' console <domain>   (the guest's serial console; Ctrl-] leaves)",
            libvirtd.uri
        );
    }
    if let Some(manager) = &manager {
        println!("  manager log: {}", manager.log().display());
    }
    println!("  Cluster API log: {}", capi.log().display());
    println!("Ctrl-C tears everything down.");

    wait_for_signal().await;
    step("tearing down");
    let _ = stop_tx.send(true);
    if let Some((_, webhooks, controllers)) = in_process {
        let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), webhooks).await;
    }
    if let Some(mut manager) = manager {
        manager.stop(Duration::from_secs(10));
    }
    // The namespace goes with libvirtd: its guests, dnsmasq and bridge with it.
    drop(libvirtd);
    drop(capi);
    drop(plane);
    step("the bed is down");
    Ok(())
}

/// Applies `deploy/examples/` with the host URI pointed at `uri` and waits for the machines
/// (see [`wait_provisioned`]).
async fn apply_examples_and_wait(plane: &ControlPlane, uri: &str) -> Result<bool> {
    step("applying deploy/examples/ (the host URI pointed at this bed)");
    let out = plane.kubectl_stdin(&["apply", "-n", NAMESPACE, "-f", "-"], &examples(uri)?)?;
    if !out.status.success() {
        bail!(
            "applying the examples: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    step("waiting for the machines (Cluster API phase of each)");
    wait_provisioned(plane).await
}

/// The Machines' table.
fn print_machines(plane: &ControlPlane) -> Result<()> {
    println!();
    println!("Machines (Cluster API):");
    print!(
        "{}",
        plane.kubectl_ok(&[
            "get",
            "machines",
            "-n",
            NAMESPACE,
            "-o",
            "custom-columns=NAME:.metadata.name,PHASE:.status.phase,PROVIDERID:.spec.providerID,ADDRESSES:.status.addresses[*].address",
        ])?
    );
    println!();
    Ok(())
}

/// The domains the bed's libvirtd holds (through a connection of this process) and what each
/// guest printed on its serial console.
fn print_domains_and_consoles(libvirtd: &Libvirtd) -> Result<()> {
    println!(
        "Domains on {} (an independent libvirt connection):",
        libvirtd.uri
    );
    let host = capl::libvirt::Host::open(&libvirtd.host_uri())?;
    print!("{}", domain_table(&host)?);
    println!();
    println!("What each guest printed on its serial console (it booted its disk, read its seed):");
    for owned in host.list_machines()? {
        let identity = capl::libvirt::identity::MachineIdentity::new(
            &owned.namespace,
            &owned.name,
            owned.uuid,
        );
        let console = host.console_tail(&identity, 64 * 1024)?;
        let shown: Vec<&str> = console
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("capl-guest:") || l.contains("echo capl-example"))
            .collect();
        println!("  {}:", owned.name);
        for line in shown {
            println!("    {line}");
        }
    }
    Ok(())
}

fn print_not_provisioned(provisioned: bool) {
    if !provisioned {
        println!("Not every machine was provisioned in {PROVISION_TIMEOUT:?}: see the conditions:");
        println!("  kubectl get libvirtmachines -n {NAMESPACE} -o yaml");
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(term) => { term.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

fn start_manager(
    plane: &ControlPlane,
    uri: &str,
    cert_dir: &Path,
    flags: &[String],
    dir: &Path,
) -> Result<Proc> {
    let binary = std::env::var_os("CAPL_MANAGER_BIN")
        .map(PathBuf::from)
        .context("CAPL_MANAGER_BIN is not set (run through tests/testbed)")?;
    let health = free_port()?;
    let metrics = free_port()?;
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
        .arg(format!("--libvirt-uri={uri}"))
        .arg("--webhook-host=127.0.0.1")
        .arg(format!("--webhook-cert-dir={}", cert_dir.display()))
        .arg(format!("--health-probe-bind-address=127.0.0.1:{health}"))
        .arg(format!("--metrics-bind-address=127.0.0.1:{metrics}"))
        .arg(format!("--namespace={NAMESPACE}"))
        .args(flags);
    let mut proc = Proc::spawn(
        "manager",
        cmd,
        &dir.join("manager.log"),
        Lifetime::TestProcess,
    )?;
    poll(
        "the manager's /readyz",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            proc.check_running()?;
            Ok(http_ok(health, "/readyz").then_some(()))
        },
    )?;
    eprintln!(
        "    manager ready: metrics on http://127.0.0.1:{metrics}/metrics, log in {}",
        proc.log().display()
    );
    Ok(proc)
}

async fn kube_client(kubeconfig: &Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The examples' pool, network and image volume on `test:///default`, through the backend's own
/// connection.
async fn prepare_test_driver(backend: &capl::libvirt::live::LibvirtBackend) -> Result<()> {
    let image = capl::libvirt::xml::VolumePlan {
        name: guest_host::GUEST_VOLUME.into(),
        capacity_gib: 1,
        format: "raw".into(),
        backing: None,
    }
    .to_xml()?;
    backend
        .hosts()
        .run(&crate::support::host_uri("test:///default"), move |host| {
            let conn = host.connection();
            let made: Result<(), String> = (|| {
                if conn.lookup_storage_pool_by_name("capl").is_err() {
                    let pool = conn
                        .define_storage_pool_xml(
                            "<pool type='dir'><name>capl</name><target><path>/capl</path></target></pool>",
                            0,
                        )
                        .map_err(|e| e.to_string())?;
                    pool.create(0).map_err(|e| e.to_string())?;
                }
                if conn.lookup_network_by_name("capl").is_err() {
                    let net = conn
                        .define_network_xml(
                            "<network><name>capl</name><bridge name='capl0'/>\
                             <ip address='10.213.9.1' netmask='255.255.255.0'/></network>",
                        )
                        .map_err(|e| e.to_string())?;
                    net.create().map_err(|e| e.to_string())?;
                }
                Ok(())
            })();
            host.ensure_volume("capl", guest_host::GUEST_VOLUME, &image)?;
            Ok(made)
        })
        .await?
        .map_err(anyhow::Error::msg)
}

/// `deploy/examples/*.yaml` as one stream, the host URI replaced by `uri`.
fn examples(uri: &str) -> Result<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut docs = Vec::new();
    for file in ["cluster.yaml", "control-plane.yaml", "workers.yaml"] {
        docs.push(
            std::fs::read_to_string(dir.join(file))
                .with_context(|| format!("reading deploy/examples/{file}"))?,
        );
    }
    Ok(docs
        .join("\n---\n")
        .replace("uri: qemu:///system", &format!("uri: \"{uri}\"")))
}

/// Prints the machines' phases as they change; true once all three are Provisioned or Running
/// with addresses, false after [`PROVISION_TIMEOUT`].
async fn wait_provisioned(plane: &ControlPlane) -> Result<bool> {
    let deadline = Instant::now() + PROVISION_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let now = plane.kubectl_ok(&[
            "get",
            "machines",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.phase}/{.status.addresses[0].address} {end}",
        ])?;
        if now != last {
            eprintln!("    {now}");
            last = now.clone();
        }
        let machines: Vec<&str> = now.split_whitespace().collect();
        let done = machines.len() == 3
            && machines.iter().all(|m| {
                let (phase, address) = m
                    .split_once('=')
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .unwrap_or_default();
                matches!(phase, "Provisioned" | "Running") && !address.is_empty()
            });
        if done {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(false)
}

/// NAME / STATE / UUID of every domain on `host`.
fn domain_table(host: &capl::libvirt::Host) -> Result<String> {
    let mut table = format!("{:<48} {:<10} {}\n", "NAME", "STATE", "UUID");
    for domain in host.connection().list_all_domains(0)? {
        let name = domain.name()?;
        let state = match domain.is_active()? {
            true => "running",
            false => "shut off",
        };
        table.push_str(&format!(
            "{name:<48} {state:<10} {}\n",
            domain.uuid_string()?
        ));
    }
    Ok(table)
}

/// `tests/testbed run --workload`: from zero to a kubeadm workload cluster on provider-made VMs.
mod workload {
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};

    use super::{NAMESPACE, step};
    use crate::support::TestBed;
    use crate::support::workload::{
        Diagnostics, Stage, Up, Workload, bring_up, cluster_manifest, clusterctl, machine_volumes,
    };

    /// The workload cluster's name.
    const CLUSTER: &str = "w1";
    /// Workers joined once the control plane stands.
    const WORKERS: i64 = 1;

    /// Tears the bed down however the job ends.
    struct Bed(TestBed);

    impl Drop for Bed {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }

    pub async fn main_job() -> Result<()> {
        let started = Instant::now();
        let signal = tokio::spawn(super::wait_for_signal());
        let manager = std::env::var("CAPL_MANAGER_BIN")
            .context("CAPL_MANAGER_BIN is not set (run through tests/testbed)")?;
        step("starting etcd + kube-apiserver");
        let bed = Bed(TestBed::start()?);
        step(
            "the node image (built once and cached: Debian 12, cloud-init, containerd, kubeadm, \
             every control-plane image), Cluster API (core, kubeadm bootstrap, kubeadm control \
             plane), libvirtd with pool `capl-workload` and a routed network this machine \
             reaches (10.213.41.0/24, no NAT), the image served over HTTP, this provider's manager",
        );
        let stage = Stage::start(&bed.0, NAMESPACE, &manager)?;
        println!(
            "    node image {} (sha256 {}), served at {}/node.qcow2",
            stage.image.path.display(),
            stage.image.sha256,
            stage.server.url
        );
        let client = bed.0.client().await;
        let spec = stage.cluster(NAMESPACE, CLUSTER, "qemu");
        step(&format!(
            "applying deploy/cluster-template.yaml through `clusterctl generate cluster {CLUSTER}` \
             (one control-plane machine; {WORKERS} worker once it stands)"
        ));
        let manifest = cluster_manifest(&bed.0.tools.clusterctl, &spec)?;
        let applied = bed
            .0
            .kubectl_stdin(&["apply", "-n", NAMESPACE, "-f", "-"], &manifest);
        anyhow::ensure!(
            applied.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
        print!("{}", String::from_utf8_lossy(&applied.stdout));
        step(
            "waiting: each VM boots under TCG, cloud-init runs kubeadm (about 6 minutes for the control plane, 6 more for the worker)",
        );
        let diagnose = Diagnostics {
            client: client.clone(),
            host: &stage.host,
            namespace: NAMESPACE.into(),
        };
        let workload = Workload {
            kubectl: bed.0.tools.kubectl.clone(),
            kubeconfig: bed.0.test_dir(NAMESPACE).join("w1.kubeconfig"),
        };
        let applied_at = Instant::now();
        let outcome = tokio::select! {
            up = bring_up(&diagnose, &spec, &workload, WORKERS, |what| {
                println!("[{:>6.0}s] {what}", applied_at.elapsed().as_secs_f64());
            }) => Some(up),
            _ = signal_or_pending(&signal) => None,
        };
        let result = match outcome {
            Some(up) => up.and_then(|up| show(&bed.0, &stage, &workload, &up, started)),
            None => Err(anyhow::anyhow!("interrupted")),
        };
        if result.is_ok() {
            // Everything stands until Ctrl-C.
            let _ = signal.await;
        }

        // However the wait ended, the Cluster goes the way users delete one: Cluster API drains
        // and deletes the Machines, the provider removes each VM and its volumes.
        step("deleting the Cluster (Ctrl-C again skips the wait)");
        let deleting = Instant::now();
        let deleted = tokio::select! {
            deleted = diagnose.delete_cluster(CLUSTER) => deleted,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted while deleting")),
        };
        println!(
            "    after {:.0?}: domains left {:?}, machine volumes left {:?}",
            deleting.elapsed(),
            crate::support::guest_host::domains(&stage.host)?,
            machine_volumes(&stage.host)?
        );
        step("tearing down");
        drop(stage);
        drop(bed);
        step("the bed is down");
        result.and(deleted)
    }

    /// What stands, and how to reach it from another shell.
    fn show(
        bed: &TestBed,
        stage: &Stage,
        workload: &Workload,
        up: &Up,
        started: Instant,
    ) -> Result<()> {
        println!();
        println!("{}", workload.kubectl(&["get", "nodes", "-o", "wide"]));
        println!(
            "{}",
            workload.kubectl(&["get", "pods", "-n", "kube-system", "-o", "wide"])
        );
        println!(
            "{}",
            clusterctl(
                &bed.tools.clusterctl,
                &bed.kubeconfig,
                &["describe", "cluster", CLUSTER, "-n", NAMESPACE],
            )?
        );
        println!(
            "Node {} carries providerID {} (its LibvirtMachine's). Up in {:.0?}. From another shell:",
            up.node_name,
            up.provider_id,
            started.elapsed()
        );
        println!(
            "  kubectl --kubeconfig {} get nodes          # the workload cluster",
            workload.kubeconfig.display()
        );
        println!(
            "  KUBECONFIG={} kubectl get cluster,machines,libvirtmachines   # the management cluster",
            bed.kubeconfig.display()
        );
        println!("  virsh -c '{}' list --all", stage.uri);
        println!("  manager log: {}", stage.manager.log().display());
        println!(
            "Ctrl-C deletes the Cluster (the provider removes its VMs and volumes) and tears everything down."
        );
        Ok(())
    }

    /// Resolves once the signal task has finished (Ctrl-C or SIGTERM).
    async fn signal_or_pending(signal: &tokio::task::JoinHandle<()>) {
        while !signal.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `tests/testbed run --helm`: the provider installed the way users install it.
mod helm {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use serde_json::Value;

    use super::{NAMESPACE, step};
    use crate::support::TestBed;
    use crate::support::apiserver::ControlPlane;
    use crate::support::capi::CapiCore;
    use crate::support::guest_host;
    use crate::support::libvirtd::Libvirtd;
    use crate::support::process::Lifetime;

    /// The Helm release.
    const RELEASE: &str = "capl";
    /// Its namespace.
    const RELEASE_NAMESPACE: &str = "capl-system";
    /// The pods' uid and gid: `nobody`, known to the host's libvirtd.
    const POD_UID: u32 = 65534;
    /// How long the Deployment gets to become Ready.
    const READY_TIMEOUT: Duration = Duration::from_secs(300);

    /// The chart's Deployment (and leader-election Lease) for [`RELEASE`].
    fn deployment() -> String {
        format!("{RELEASE}-cluster-api-provider-libvirt-controller-manager")
    }

    /// Tears the bed down (the node included) however the job ends.
    struct Bed(TestBed);

    impl Drop for Bed {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }

    /// Runs the job until Ctrl-C (or SIGTERM); a signal during start-up tears down at the next
    /// step.
    pub async fn main_job() -> Result<()> {
        let started = Instant::now();
        let signal = tokio::spawn(super::wait_for_signal());
        step(
            "starting the node's network namespace, etcd + kube-apiserver (node mode), \
             kube-controller-manager, kube-scheduler and the node (containerd, kubelet, kube-proxy)",
        );
        let bed = Bed(TestBed::start_with_node()?);
        if let Some(node) = bed.0.node().as_ref() {
            eprintln!(
                "    node {} Ready in {:.1?} ({:?})",
                node.name, node.timings.total, node.timings
            );
        }
        let result = with_bed(&bed.0, started, signal).await;
        step("tearing down (the pods, the node, libvirtd and its guests, the control plane)");
        drop(bed);
        step("the bed is down");
        result
    }

    // The bed's plane lock is held across awaits: this task is the only one that takes it, and
    // shutdown (the other taker) runs after this returns.
    #[allow(clippy::await_holding_lock)]
    async fn with_bed(
        bed: &TestBed,
        started: Instant,
        signal: tokio::task::JoinHandle<()>,
    ) -> Result<()> {
        let interrupted = || -> Result<()> {
            if signal.is_finished() {
                bail!("interrupted");
            }
            Ok(())
        };
        interrupted()?;
        let plane = bed.plane();
        let plane = plane.as_ref().context("the control plane is not running")?;
        step("starting the Cluster API core manager (its CRDs and webhooks installed)");
        let capi = CapiCore::start(
            &bed.tools,
            plane,
            &bed.dir.join("capi"),
            Lifetime::TestProcess,
        )?;
        interrupted()?;
        step("starting libvirtd in its own network namespace");
        let libvirtd = Libvirtd::start(&bed.dir.join("libvirt"), Lifetime::TestProcess)?;
        step(
            "preparing pool `capl`, isolated network `capl` (10.213.9.0/24, DHCP, no NAT) and the guest image",
        );
        guest_host::prepare(
            &libvirtd.connect()?,
            "capl",
            &libvirtd.images().join("capl"),
            "capl0",
            9,
        )?;
        interrupted()?;
        let outcome = install_and_report(bed, plane, &capi, &libvirtd, started, &interrupted).await;
        if let Err(error) = &outcome {
            eprintln!("{error:#}");
            eprintln!("{}", diagnostics(bed, plane));
            return outcome;
        }
        println!("Ctrl-C tears everything down.");
        let _ = signal.await;
        Ok(())
    }

    async fn install_and_report(
        bed: &TestBed,
        plane: &ControlPlane,
        capi: &CapiCore,
        libvirtd: &Libvirtd,
        started: Instant,
        interrupted: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        step("building the provider's OCI image without an engine (release binary, ssh included)");
        let building = Instant::now();
        let image = crate::support::image::build_default(true)?;
        eprintln!(
            "    {} ({}): {:.1} MB archive, {:.1} MB unpacked, {} layers; built in {:.1?}",
            image.reference,
            image.digest,
            image.archive_size as f64 / 1e6,
            image.unpacked_size as f64 / 1e6,
            image.layers.len(),
            building.elapsed()
        );
        interrupted()?;
        step("importing the image into the node's containerd (namespace k8s.io)");
        let importing = Instant::now();
        bed.import_image(&image.archive)?;
        eprintln!("    imported in {:.1?}", importing.elapsed());

        step("opening libvirtd's socket to the pods' user (nobody, 65534)");
        let (uri, socket_dir) = libvirtd.open_socket_to_pods()?;
        let args = install_args(&image.reference, &socket_dir)?;
        step(&format!("helm {}", args.join(" ")));
        let installing = Instant::now();
        let out = bed.helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !out.status.success() {
            bail!(
                "helm install: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        step(&format!(
            "waiting for Deployment {RELEASE_NAMESPACE}/{} to be Ready",
            deployment()
        ));
        wait_ready(plane, interrupted).await?;
        eprintln!(
            "    helm install → Deployment Ready in {:.1?}",
            installing.elapsed()
        );
        // The chart's CRDs and webhook configurations come with the release.
        plane.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "-l",
            "cluster.x-k8s.io/provider=infrastructure-libvirt",
        ])?;
        interrupted()?;

        let provisioned = super::apply_examples_and_wait(plane, &uri).await?;
        super::print_machines(plane)?;
        super::print_domains_and_consoles(libvirtd)?;
        println!();
        println!("The provider's pods (helm release {RELEASE} in {RELEASE_NAMESPACE}):");
        print!(
            "{}",
            plane.kubectl_ok(&["get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide"])?
        );
        println!();
        match leader(plane)? {
            Some(pod) => {
                println!("The last lines of the leader's log ({pod}):");
                let log = plane.kubectl_ok(&[
                    "logs",
                    "-n",
                    RELEASE_NAMESPACE,
                    &pod,
                    "-c",
                    "manager",
                    "--tail=15",
                ])?;
                for line in log.lines() {
                    println!("  {line}");
                }
            }
            None => println!("No replica holds the leader Lease {} yet.", deployment()),
        }
        println!();
        super::print_not_provisioned(provisioned);
        println!(
            "Up in {:.0?}. Explore it from another shell:",
            started.elapsed()
        );
        println!("  export KUBECONFIG={}", plane.kubeconfig.display());
        if let Some(helm_dir) = bed.tools.helm.parent() {
            println!(
                "  export PATH=\"{}:$PATH\"   (the pinned helm)",
                helm_dir.display()
            );
        }
        println!("  helm status {RELEASE} -n {RELEASE_NAMESPACE}");
        println!("  kubectl get pods,deployments,leases -n {RELEASE_NAMESPACE}");
        println!(
            "  kubectl logs -n {RELEASE_NAMESPACE} deployment/{} -c manager -f",
            deployment()
        );
        println!("  kubectl get cluster,machines,libvirtclusters,libvirtmachines -n {NAMESPACE}");
        println!("  kubectl scale machinedeployment example-workers -n {NAMESPACE} --replicas=3");
        println!("  virsh -c '{}' list --all", libvirtd.uri);
        println!(
            "  virsh -c '{}' console <domain>   (the guest's serial console; Ctrl-] leaves)",
            libvirtd.uri
        );
        println!("  Cluster API log: {}", capi.log().display());
        Ok(())
    }

    /// `helm install` arguments: the imported image (never pulled), libvirtd's socket
    /// directory mounted into the pods, and a pod user libvirtd knows.
    fn install_args(reference: &str, socket_dir: &Path) -> Result<Vec<String>> {
        let (repository, tag) = reference
            .rsplit_once(':')
            .with_context(|| format!("the image reference {reference} has no tag"))?;
        let chart =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/cluster-api-provider-libvirt");
        let mut args = vec![
            "install".to_owned(),
            RELEASE.to_owned(),
            chart.to_string_lossy().into_owned(),
            "-n".to_owned(),
            RELEASE_NAMESPACE.to_owned(),
            "--create-namespace".to_owned(),
        ];
        for value in [
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".to_owned(),
            "libvirt.socket.enabled=true".to_owned(),
            format!("libvirt.socket.hostPath={}", socket_dir.display()),
            // libvirtd looks the client's uid up on its own host (the chart's README): the
            // pods run as `nobody`, which this machine and the image both know.
            format!("securityContext.runAsUser={POD_UID}"),
            format!("securityContext.runAsGroup={POD_UID}"),
        ] {
            args.extend(["--set".to_owned(), value]);
        }
        Ok(args)
    }

    fn json_of(plane: &ControlPlane, args: &[&str]) -> Option<Value> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let out = plane.kubectl(&args).ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits until every replica of the Deployment is updated and Ready.
    async fn wait_ready(plane: &ControlPlane, interrupted: &dyn Fn() -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        loop {
            interrupted()?;
            if let Some(d) = json_of(
                plane,
                &["get", "deployment", "-n", RELEASE_NAMESPACE, &deployment()],
            ) {
                let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
                let ready = d["status"]["readyReplicas"].as_i64().unwrap_or(0);
                let now = format!("{ready}/{want} replicas Ready");
                if now != last {
                    eprintln!("    {now}");
                    last = now;
                }
                if ready == want
                    && d["status"]["updatedReplicas"].as_i64() == Some(want)
                    && d["status"]["replicas"].as_i64() == Some(want)
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the Deployment was not Ready in {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The pod holding the leader Lease (its identity is `<pod name>_<uuid>`), waiting up to
    /// 30 s for an election.
    fn leader(plane: &ControlPlane) -> Result<Option<String>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let holder = plane.kubectl_ok(&[
                "get",
                "lease",
                "-n",
                RELEASE_NAMESPACE,
                &deployment(),
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])?;
            if let Some(pod) = holder.split('_').next().filter(|p| !p.is_empty()) {
                return Ok(Some(pod.to_owned()));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What a failure shows: the pods, their events and logs, and the node's own logs.
    fn diagnostics(bed: &TestBed, plane: &ControlPlane) -> String {
        let run = |args: &[&str]| match plane.kubectl(args) {
            Ok(out) => format!(
                "$ kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("$ kubectl {}: {e:#}\n", args.join(" ")),
        };
        let mut text = String::new();
        text.push_str(&run(&["get", "pods", "-A", "-o", "wide"]));
        text.push_str(&run(&["describe", "pods", "-n", RELEASE_NAMESPACE]));
        text.push_str(&run(&[
            "logs",
            "-n",
            RELEASE_NAMESPACE,
            "-l",
            "app.kubernetes.io/component=manager",
            "-c",
            "manager",
            "--tail=40",
            "--prefix",
        ]));
        text.push_str(&run(&[
            "get",
            "libvirtmachines",
            "-n",
            NAMESPACE,
            "-o",
            "yaml",
        ]));
        if let Some(node) = bed.node().as_ref() {
            text.push_str(&node.diagnostics());
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn no_flag_is_the_qemu_driver_with_a_manager_process() {
        let options = parse(&args("--sync-period=1m")).unwrap();
        assert_eq!(
            options,
            Options {
                driver: Driver::Qemu,
                helm: false,
                workload: false,
                manager_flags: args("--sync-period=1m"),
            }
        );
        assert_eq!(parse(&args("--driver test")).unwrap().driver, Driver::Test);
        assert_eq!(parse(&args("--driver=test")).unwrap().driver, Driver::Test);
        assert!(parse(&args("--driver kvm")).is_err());
    }

    #[test]
    fn helm_takes_the_qemu_driver_only_and_no_manager_flags() {
        assert!(parse(&args("--helm")).unwrap().helm);
        assert!(parse(&args("--helm --driver qemu")).unwrap().helm);
        let error = parse(&args("--helm --driver test"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("does not combine with --driver test"),
            "{error}"
        );
        let error = parse(&args("--driver=test --helm"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("does not combine with --driver test"),
            "{error}"
        );
        let error = parse(&args("--helm --sync-period=1m"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no manager flags"), "{error}");
    }

    #[test]
    fn workload_takes_no_other_flag() {
        assert!(parse(&args("--workload")).unwrap().workload);
        for other in [
            "--helm",
            "--driver qemu",
            "--driver=test",
            "--sync-period=1m",
        ] {
            let error = parse(&args(&format!("--workload {other}")))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("--workload takes no other flag"),
                "{other}: {error}"
            );
        }
    }
}
