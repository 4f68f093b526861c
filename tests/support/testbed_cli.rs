//! The test bed's shell face, for the development flow (`tests/testbed up|env|down|versions|run`).
//!
//! `up` starts the same launcher the tests use, detached, with its state under the cache dir;
//! `env` prints what a shell needs (`eval "$(tests/testbed env)"`); `down` stops everything.
//! `run` is the main job: see [`run`].

#[path = "mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use support::apiserver::{ControlPlane, PlaneOptions};
use support::capi::CapiCore;
use support::libvirtd::{self, Libvirtd};
use support::node::{self, Node, NodeHandle};
use support::process::{self, Lifetime};
use support::tools::{self, Tools};

#[path = "testbed_run.rs"]
mod run;

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    kubeconfig: PathBuf,
    /// (name, pid) of every detached process, in start order.
    processes: Vec<(String, u32)>,
    libvirt_netns: Option<String>,
    libvirt_uri: Option<String>,
    capi_webhook_url: Option<String>,
    /// Serving certificate dir for a manager run against the bed (`up --provider`).
    webhook_cert_dir: Option<PathBuf>,
    /// The node (`up --node`): everything `down` needs to remove it.
    #[serde(default)]
    node: Option<NodeHandle>,
}

pub(crate) fn state_dir() -> Result<PathBuf> {
    Ok(tools::cache_dir()?.join("testbed"))
}

pub(crate) fn read_state() -> Result<Option<State>> {
    let path = state_dir()?.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: tests/testbed <command>\n\
         \n\
         up [--capi] [--libvirtd] [--provider] [--node]\n\
                                   start etcd + kube-apiserver (and optionally the CAPI core\n\
                                   manager, a real libvirtd in its own network namespace, and\n\
                                   this provider's CRDs + webhooks pointed at 127.0.0.1:9443;\n\
                                   --node: a real node, where Pods run)\n\
         env                       print shell exports for the running bed\n\
         down                      stop everything and remove the bed's files\n\
         versions                  print the version of every real component\n\
         image [--no-ssh] [--cold] build the provider's OCI image archive (no engine); print its\n\
                                   path, digest, sizes and build times\n\
         run [--driver qemu|test] [manager flags...]\n\
                                   the main job in the foreground: the bed, the CAPI core manager,\n\
                                   this provider's manager and a libvirt host; applies\n\
                                   deploy/examples/ and reports; Ctrl-C tears it all down\n\
         run --helm                the same, installed the way users do: the bed with a node, the\n\
                                   image built and imported into its containerd, `helm install`\n\
                                   of the chart (pods use the bed libvirtd's socket); not with\n\
                                   --driver test\n\
         run --workload            the whole way: a kubeadm workload cluster on provider-made\n\
                                   VMs (the node image built once, the CAPI kubeadm providers,\n\
                                   a control plane and a worker under TCG); kubectl reaches it\n\
                                   until Ctrl-C deletes it and tears everything down"
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => up(&args[1..]),
        Some("env") => env(),
        Some("down") => down(),
        Some("versions") => versions(),
        Some("run") => run::run(&args[1..]),
        Some("image") => support::image::cli(&args[1..]),
        Some("node-image") => support::node_image::cli(&args[1..]),
        _ => usage(),
    }
}

fn up(flags: &[String]) -> Result<()> {
    if let Some(state) = read_state()? {
        let node_processes = state.node.iter().flat_map(|n| n.processes.iter());
        if state
            .processes
            .iter()
            .chain(node_processes)
            .all(|(_, pid)| alive(*pid))
        {
            eprintln!("the test bed is already up");
            return print_env(&state);
        }
        eprintln!("a previous test bed is half-dead: cleaning it up first");
        down()?;
    }
    let flag = |name: &str| flags.iter().any(|f| f == name);
    let (with_capi, with_libvirtd, with_provider, with_node) = (
        flag("--capi"),
        flag("--libvirtd"),
        flag("--provider"),
        flag("--node"),
    );
    let tools = Tools::locate()?;
    let dir = state_dir()?;
    std::fs::create_dir_all(&dir)?;
    // The node's network comes first: in node mode the apiserver listens on its host side.
    let network = if with_node {
        Some(node::Network::create(Lifetime::Detached)?)
    } else {
        None
    };
    let options = PlaneOptions {
        node_address: network.as_ref().map(|n| n.host_ip),
    };
    let plane = ControlPlane::start_with(
        &tools,
        &dir.join("control-plane"),
        Lifetime::Detached,
        &options,
    )?;
    let mut state = State {
        kubeconfig: plane.kubeconfig.clone(),
        ..State::default()
    };
    if let Some(network) = network {
        let started = std::time::Instant::now();
        let node = Node::start(
            &tools,
            &plane,
            network,
            &dir.join("node"),
            Lifetime::Detached,
        )?;
        eprintln!(
            "node {} Ready in {:?} ({:?})",
            node.name,
            started.elapsed(),
            node.timings
        );
        state.node = Some(node.detach());
    }
    if with_capi {
        let capi = CapiCore::start(&tools, &plane, &dir.join("capi"), Lifetime::Detached)?;
        state.capi_webhook_url = Some(capi.webhook_url.clone());
        state.processes.push(capi.detach());
    }
    if with_provider {
        state.webhook_cert_dir = Some(install_provider(&plane, &dir)?);
    }
    // The plane's processes go first so `down` stops them last.
    let mut processes = plane.detach();
    processes.append(&mut state.processes);
    state.processes = processes;
    if with_libvirtd {
        let libvirtd = Libvirtd::start(&dir.join("libvirt"), Lifetime::Detached)?;
        state.libvirt_uri = Some(libvirtd.uri.clone());
        state.libvirt_netns = Some(libvirtd.detach());
    }
    std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&state)?)?;
    eprintln!("the test bed is up; logs in {}", dir.display());
    print_env(&state)
}

/// Installs this provider's CRDs and webhook configurations (pointed at a manager on
/// 127.0.0.1:9443) and writes that manager's serving certificate; returns the cert dir.
pub(crate) fn install_provider(plane: &ControlPlane, dir: &std::path::Path) -> Result<PathBuf> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    plane.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        &repo.join("crds").to_string_lossy(),
    ])?;
    let cert_dir = dir.join("webhook-certs");
    plane
        .ca
        .server("capl-webhook", &["127.0.0.1", "localhost"])?
        .write(&cert_dir, "tls.crt", "tls.key")?;
    let target = capl::webhook::configs::Target::Url("https://127.0.0.1:9443".into());
    let manifests = capl::webhook::configs::render(&target, Some(plane.ca.cert_pem.as_bytes()))?;
    let out = plane.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifests)?;
    if !out.status.success() {
        bail!(
            "applying webhook configurations: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(cert_dir)
}

fn env() -> Result<()> {
    match read_state()? {
        Some(state) => print_env(&state),
        None => bail!("the test bed is not up (run `tests/testbed up`)"),
    }
}

fn print_env(state: &State) -> Result<()> {
    println!("export KUBECONFIG='{}'", state.kubeconfig.display());
    if let Some(uri) = &state.libvirt_uri {
        println!("export LIBVIRT_DEFAULT_URI='{uri}'");
    }
    if let Some(dir) = &state.webhook_cert_dir {
        println!("export CAPL_WEBHOOK_CERT_DIR='{}'", dir.display());
    }
    if let Some(node) = &state.node {
        // `ctr --address "$CAPL_NODE_CONTAINERD" -n k8s.io images import <archive>` puts an
        // image where the node's kubelet finds it.
        println!(
            "export CAPL_NODE_CONTAINERD='{}'",
            node.dir.join("containerd.sock").display()
        );
        println!("export CAPL_NODE_NETNS='{}'", node.netns);
    }
    Ok(())
}

fn down() -> Result<()> {
    let dir = state_dir()?;
    if let Some(state) = read_state()? {
        if let Some(handle) = &state.node {
            node::stop_agents(handle);
        }
        if let Some(netns) = &state.libvirt_netns {
            libvirtd::destroy_namespace(netns);
        }
        for (name, pid) in state.processes.iter().rev() {
            eprintln!("stopping {name} ({pid})");
            process::terminate(*pid, Duration::from_secs(10));
        }
        // The kubelet and kube-proxy went first (an apiserver with their watches open waits
        // out its grace period); the rest of the node goes after the control plane.
        if let Some(handle) = &state.node {
            eprintln!("removing node (namespace {})", handle.netns);
            node::destroy(handle);
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    eprintln!("the test bed is down");
    Ok(())
}

pub(crate) fn alive(pid: u32) -> bool {
    libc::pid_t::try_from(pid).is_ok_and(process::pid_alive)
}

/// One line per real component, as CI prints them.
fn versions() -> Result<()> {
    let tools = Tools::locate()?;
    let first_line = |cmd: &mut Command| -> String {
        cmd.output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|| "not runnable".into())
    };
    println!(
        "kube-apiserver: {}",
        first_line(Command::new(&tools.kube_apiserver).arg("--version"))
    );
    println!(
        "etcd:           {}",
        first_line(Command::new(&tools.etcd).arg("--version"))
    );
    println!(
        "helm:           {}",
        first_line(Command::new(&tools.helm).args(["version", "--short"]))
    );
    println!(
        "cluster-api:    {}",
        first_line(Command::new(&tools.clusterctl).args(["version", "-o", "short"]))
    );
    let node_tool = |tool: &Option<PathBuf>, args: &[&str]| {
        tool.as_ref().map_or_else(
            || "not built".to_owned(),
            |path| first_line(Command::new(path).args(args)),
        )
    };
    println!(
        "kubelet:        {}",
        node_tool(&tools.kubelet, &["--version"])
    );
    println!(
        "containerd:     {}",
        node_tool(
            &tools.containerd_dir.as_ref().map(|d| d.join("containerd")),
            &["--version"]
        )
    );
    println!(
        "runc:           {}",
        first_line(Command::new("runc").arg("--version"))
    );
    println!(
        "kubectl:        {}",
        first_line(Command::new(&tools.kubectl).args(["version", "--client"]))
    );
    let host = capl::libvirt::Host::open(&support::host_uri("test:///default"))?;
    println!("libvirt:        {}", host.versions()?);
    println!(
        "qemu:           {}",
        first_line(Command::new("qemu-system-x86_64").arg("--version"))
    );
    Ok(())
}
