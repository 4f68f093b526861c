//! The test bed: a real management plane on one machine.
//!
//! [`shared()`] starts etcd + kube-apiserver once per test binary; the CAPI core manager and the
//! real libvirtd start on first use. Everything is torn down when the binary exits, whatever the
//! tests did (see [`process`]).
//!
//! [`with_node()`] is the same bed with a real node (see [`node`]): the apiserver listens on the
//! node's host-side veth address, kube-controller-manager and kube-scheduler run, and containerd,
//! a kubelet and kube-proxy run in the node's network namespace, so Pods run (`helm install`
//! works). A test binary uses one or the other, not both.
#![allow(dead_code)]

pub mod admissions;
pub mod apiserver;
pub mod capi;
pub mod capi_objects;
pub mod certs;
pub mod guest_host;
pub mod image;
pub mod libvirtd;
pub mod node;
pub mod node_image;
pub mod oci;
pub mod process;
pub mod tools;
pub mod workload;

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{Context, Result};

use apiserver::ControlPlane;
use capi::CapiCore;
use libvirtd::Libvirtd;
use node::Node;
use process::Lifetime;
use tools::Tools;

/// The components of one bed. Start-up is lazy per component; teardown is [`TestBed::shutdown`].
pub struct TestBed {
    pub tools: Tools,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    plane: Mutex<Option<ControlPlane>>,
    capi: Mutex<Option<CapiCore>>,
    /// The kubeadm bootstrap and control-plane managers (started together on first use).
    capi_kubeadm: Mutex<Vec<CapiCore>>,
    libvirtd: Mutex<Option<Libvirtd>>,
    node: Mutex<Option<Node>>,
    provider_crds: Mutex<bool>,
    temp: Mutex<Option<tempfile::TempDir>>,
}

/// The bed shared by every test of this binary, started on first use.
pub fn shared() -> &'static TestBed {
    static BED: OnceLock<TestBed> = OnceLock::new();
    BED.get_or_init(|| {
        let bed = TestBed::start().unwrap_or_else(|e| panic!("the test bed did not start: {e:#}"));
        process::at_exit(|| {
            if let Some(bed) = BED.get() {
                bed.shutdown();
            }
        });
        bed
    })
}

/// The bed with a node, shared by every test of this binary, started on first use (see
/// [`TestBed::start_with_node`]).
pub fn with_node() -> &'static TestBed {
    static BED: OnceLock<TestBed> = OnceLock::new();
    BED.get_or_init(|| {
        let bed = TestBed::start_with_node()
            .unwrap_or_else(|e| panic!("the test bed with a node did not start: {e:#}"));
        process::at_exit(|| {
            if let Some(bed) = BED.get() {
                bed.shutdown();
            }
        });
        bed
    })
}

impl TestBed {
    /// Starts etcd and kube-apiserver in a fresh temp dir.
    pub fn start() -> Result<Self> {
        let (tools, temp) = Self::prepare()?;
        let dir = temp.path().to_owned();
        let plane = ControlPlane::start(&tools, &dir.join("control-plane"), Lifetime::TestProcess)?;
        Ok(Self::assemble(tools, temp, plane, None))
    }

    /// Starts the bed with a node: the node's network namespace and veth pair, etcd and
    /// kube-apiserver on the host-side veth address with kube-controller-manager and
    /// kube-scheduler, then containerd, the kubelet and kube-proxy; returns once the Node is
    /// Ready.
    pub fn start_with_node() -> Result<Self> {
        let (tools, temp) = Self::prepare()?;
        let dir = temp.path().to_owned();
        let network = node::Network::create(Lifetime::TestProcess)?;
        let options = apiserver::PlaneOptions {
            node_address: Some(network.host_ip),
        };
        let plane = ControlPlane::start_with(
            &tools,
            &dir.join("control-plane"),
            Lifetime::TestProcess,
            &options,
        )?;
        let node = Node::start(
            &tools,
            &plane,
            network,
            &dir.join("node"),
            Lifetime::TestProcess,
        )?;
        Ok(Self::assemble(tools, temp, plane, Some(node)))
    }

    fn prepare() -> Result<(Tools, tempfile::TempDir)> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tools = Tools::locate()?;
        // Nodes first: their dirs hold mounts that must go before the dirs do.
        node::sweep_stale();
        sweep_stale_dirs();
        let temp = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the bed's temp dir")?;
        Ok((tools, temp))
    }

    fn assemble(
        tools: Tools,
        temp: tempfile::TempDir,
        plane: ControlPlane,
        node: Option<Node>,
    ) -> Self {
        Self {
            kubeconfig: plane.kubeconfig.clone(),
            tools,
            dir: temp.path().to_owned(),
            plane: Mutex::new(Some(plane)),
            capi: Mutex::new(None),
            capi_kubeadm: Mutex::new(Vec::new()),
            libvirtd: Mutex::new(None),
            node: Mutex::new(node),
            provider_crds: Mutex::new(false),
            temp: Mutex::new(Some(temp)),
        }
    }

    /// The node (`None` unless the bed was started with one).
    pub fn node(&self) -> MutexGuard<'_, Option<Node>> {
        lock(&self.node)
    }

    /// Imports an OCI image archive (e.g. from [`oci::write_archive`]) into the node's
    /// containerd, where its kubelet finds it (use `imagePullPolicy: Never` or `IfNotPresent`).
    pub fn import_image(&self, archive: &std::path::Path) -> Result<()> {
        lock(&self.node)
            .as_ref()
            .context("this bed has no node (use support::with_node())")?
            .import_image(archive)
    }

    /// A fresh client for the calling test's runtime (clients must not cross tokio runtimes).
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.kubeconfig.display()));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", self.kubeconfig.display()));
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("building a client: {e}"))
    }

    /// The control plane (etcd + kube-apiserver).
    pub fn plane(&self) -> MutexGuard<'_, Option<ControlPlane>> {
        lock(&self.plane)
    }

    /// Runs the real `kubectl` against the bed.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        apiserver::kubectl(&self.tools.kubectl, &self.kubeconfig, args, None)
            .unwrap_or_else(|e| panic!("kubectl {}: {e:#}", args.join(" ")))
    }

    /// Runs the real `kubectl` with `stdin` piped in.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        apiserver::kubectl(&self.tools.kubectl, &self.kubeconfig, args, Some(stdin))
            .unwrap_or_else(|e| panic!("kubectl {}: {e:#}", args.join(" ")))
    }

    /// Runs the real `helm` against the bed.
    pub fn helm(&self, args: &[&str]) -> Output {
        std::process::Command::new(&self.tools.helm)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .output()
            .unwrap_or_else(|e| panic!("helm {}: {e}", args.join(" ")))
    }

    /// Starts the CAPI core manager on first use; returns its webhook URL.
    pub fn capi(&self) -> String {
        let mut capi = lock(&self.capi);
        if capi.is_none() {
            let plane = self.plane();
            let plane = plane.as_ref().expect("the control plane is running");
            let started = CapiCore::start(
                &self.tools,
                plane,
                &self.dir.join("capi"),
                Lifetime::TestProcess,
            )
            .unwrap_or_else(|e| panic!("the CAPI core manager did not start: {e:#}"));
            *capi = Some(started);
        }
        capi.as_ref()
            .map(|c| c.webhook_url.clone())
            .unwrap_or_default()
    }

    /// Starts the CAPI core manager and the kubeadm bootstrap and control-plane managers on
    /// first use (KubeadmConfig and KubeadmControlPlane then work as in a real management cluster).
    pub fn capi_kubeadm(&self) {
        self.capi();
        let mut managers = lock(&self.capi_kubeadm);
        if !managers.is_empty() {
            return;
        }
        let plane = self.plane();
        let plane = plane.as_ref().expect("the control plane is running");
        for provider in [
            capi::Provider::KubeadmBootstrap,
            capi::Provider::KubeadmControlPlane,
        ] {
            let started = CapiCore::start_provider(
                &self.tools,
                plane,
                &self.dir.join(provider.name()),
                Lifetime::TestProcess,
                provider,
            )
            .unwrap_or_else(|e| panic!("{} did not start: {e:#}", provider.name()));
            managers.push(started);
        }
    }

    /// Starts the real libvirtd on first use.
    pub fn libvirtd(&self) -> MutexGuard<'_, Option<Libvirtd>> {
        let mut libvirtd = lock(&self.libvirtd);
        if libvirtd.is_none() {
            let started = Libvirtd::start(&self.dir.join("libvirt"), Lifetime::TestProcess)
                .unwrap_or_else(|e| panic!("libvirtd did not start: {e:#}"));
            *libvirtd = Some(started);
        }
        libvirtd
    }

    /// Applies this provider's `crds/` (once per bed) and waits until they are Established.
    pub fn install_provider_crds(&self) {
        let mut installed = lock(&self.provider_crds);
        if *installed {
            return;
        }
        let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        let out = self.kubectl(&["apply", "--server-side", "-f", &crds.to_string_lossy()]);
        assert!(
            out.status.success(),
            "applying crds/: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "-l",
            "cluster.x-k8s.io/provider=infrastructure-libvirt",
        ]);
        assert!(
            out.status.success(),
            "waiting for crds/: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        *installed = true;
    }

    /// Starts the `manager` binary against the bed with `args` (plus kubeconfig and a health
    /// port) and waits until it is ready; its log goes to `<test dir>/manager.log`.
    pub fn start_manager(&self, test: &str, binary: &str, args: &[String]) -> (process::Proc, u16) {
        // The manager's controllers need the provider's CRDs (they fail fast without them).
        self.install_provider_crds();
        let health = apiserver::free_port().expect("a free port");
        let mut cmd = std::process::Command::new(binary);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--health-probe-bind-address=127.0.0.1:{health}"))
            // Several managers run at once in one test binary: none takes the default metrics
            // port unless a test asks for one (the last of a repeated flag wins).
            .arg("--metrics-bind-address=0")
            .args(args);
        let log = self.test_dir(test).join("manager.log");
        let mut proc = process::Proc::spawn("manager", cmd, &log, Lifetime::TestProcess)
            .unwrap_or_else(|e| panic!("starting the manager: {e:#}"));
        process::poll(
            "the manager's /readyz",
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(100),
            || {
                proc.check_running()?;
                Ok(capi::http_ok(health, "/readyz").then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("the manager did not become ready: {e:#}"));
        (proc, health)
    }

    /// A directory for one test's files, inside the bed's temp dir.
    pub fn test_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.join("tests").join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    }

    /// Stops everything (CAPI, libvirtd, the node, apiserver, etcd) and removes the temp dir.
    /// Idempotent.
    pub fn shutdown(&self) {
        drop(std::mem::take(&mut *lock(&self.capi_kubeadm)));
        drop(lock(&self.capi).take());
        drop(lock(&self.libvirtd).take());
        // The node's agents before the apiserver (which otherwise waits out its grace period for
        // their watches), the rest of the node after it.
        if let Some(node) = lock(&self.node).as_mut() {
            node.stop_agents();
        }
        drop(lock(&self.plane).take());
        drop(lock(&self.node).take());
        drop(lock(&self.temp).take());
    }
}

/// A libvirt URI as the tests use it: checked by the provider's own allowlist, with the test
/// driver allowed.
pub fn host_uri(uri: &str) -> capl::libvirt::uri::HostUri {
    capl::libvirt::uri::HostUri::parse(
        uri,
        capl::libvirt::uri::UriPolicy {
            allow_test_driver: true,
        },
    )
    .unwrap_or_else(|e| panic!("{uri}: {e}"))
}

/// Prefix of every bed's temp dir: `capl-bed-<owner pid>-<random>`.
const DIR_PREFIX: &str = "capl-bed-";

/// Removes temp dirs of beds whose test process died without cleaning up (SIGKILL).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok());
        if owner.is_some_and(|pid| !process::pid_alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
