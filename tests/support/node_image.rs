//! The Kubernetes node image workload clusters boot from, built offline and cached by version.
//!
//! A qcow2 disk a LibvirtMachine's `spec.image` can name: Debian 12 from Debian's packages
//! (systemd, cloud-init, runc, conntrack, iptables, socat, the cloud kernel), the bed's own
//! containerd 2.x and kubelet, and kubeadm and crictl from the pinned Go modules
//! (`tests/tools/install.sh --workload`). Every image `kubeadm config images list` names for the
//! bed's Kubernetes version is built here from those same pinned builds (kube-apiserver,
//! kube-controller-manager, kube-scheduler, kube-proxy with the root's iptables, etcd, CoreDNS
//! and the bed's pause program as the sandbox image), written as OCI archives ([`super::oci`])
//! and imported into the image's containerd before the disk is made, so `kubeadm init` and
//! `kubeadm join` pull nothing. The Debian side is `tests/workload/node-image.sh`.
//!
//! Output, under `<cache>/node-image/<Kubernetes version>-<key>/` (the key hashes the pinned
//! versions, the script and this file, so any change builds afresh): `node.qcow2`,
//! `node.qcow2.sha256` (hex), `images.txt` (the imported references), `timings.txt`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use super::oci::{ImageConfig, LayerBuilder, Owner};
use super::process::{Lifetime, Proc, poll, tail};
use super::tools::{Tools, cache_dir, require};

/// The node image: the disk and what identifies it.
#[derive(Clone, Debug)]
pub struct NodeImage {
    /// The qcow2 file.
    pub path: PathBuf,
    /// Its sha256, hex (what `spec.image.checksum` names).
    pub sha256: String,
    /// The container images pre-imported into its containerd.
    pub images: Vec<String>,
}

/// What the builder spent where (cold builds only).
#[derive(Debug, Default)]
struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    fn run<T>(&mut self, phase: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        eprintln!("[node-image] {phase} ...");
        let value = f().with_context(|| format!("node image: {phase}"))?;
        let took = started.elapsed();
        eprintln!("[node-image] {phase}: {:.1}s", took.as_secs_f64());
        self.0.push((phase, took));
        Ok(value)
    }

    fn report(&self) -> String {
        let total: Duration = self.0.iter().map(|(_, d)| *d).sum();
        let mut text = String::new();
        for (phase, took) in &self.0 {
            text.push_str(&format!("{:>7.1}s  {phase}\n", took.as_secs_f64()));
        }
        text.push_str(&format!("{:>7.1}s  total\n", total.as_secs_f64()));
        text
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo().join("tests/workload/node-image.sh")
}

/// Builds the node image unless the cache holds it, and returns it. `CAPL_NODE_IMAGE_DIR` names a
/// directory laid out like the cache entry instead (an image built elsewhere).
pub fn node_image() -> Result<NodeImage> {
    if let Some(dir) = std::env::var_os("CAPL_NODE_IMAGE_DIR") {
        return read(Path::new(&dir));
    }
    let out = cache_entry()?;
    // One build at a time per cache (a test and `tests/testbed` may ask at once); the second
    // finds the first's result.
    let lock = std::fs::File::create(cache_dir()?.join("node-image.lock"))?;
    lock.lock().context("locking the node image cache")?;
    if !out.join("node.qcow2.sha256").exists() {
        build(&out)?;
    }
    read(&out)
}

/// `<cache>/node-image/<Kubernetes version>-<key>`.
fn cache_entry() -> Result<PathBuf> {
    let pins = std::fs::read_to_string(repo().join("tests/tools/versions.env"))?;
    let mut hasher = Sha256::default();
    hasher.update(&pins);
    hasher.update(std::fs::read(script())?);
    hasher.update(include_str!("node_image.rs"));
    // The sandbox image is the bed's pause program, built from source.
    for file in ["go.mod", "main.go"] {
        hasher.update(std::fs::read(repo().join("tests/tools/pause").join(file))?);
    }
    let key = format!("{:x}", hasher.finalize());
    let kubernetes = pins
        .lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .context("versions.env has no KUBERNETES_VERSION")?
        .trim()
        .to_owned();
    Ok(cache_dir()?
        .join("node-image")
        .join(format!("{kubernetes}-{}", &key[..12])))
}

fn read(dir: &Path) -> Result<NodeImage> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    Ok(NodeImage {
        path: dir.join("node.qcow2"),
        sha256: read("node.qcow2.sha256")?.trim().to_owned(),
        images: read("images.txt")?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The whole build, into `out` (made atomically: a work dir renamed at the end).
fn build(out: &Path) -> Result<()> {
    let mut timings = Timings::default();
    timings.run("tools (install.sh --workload)", install_tools)?;
    let tools = Tools::locate()?;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("the cache entry has no name")?;
    let work = out.with_file_name(format!("{name}.work"));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let rootfs = work.join("rootfs");
    let references = timings.run("image list (kubeadm config images list)", || {
        image_list(&tools)
    })?;
    let pause = references
        .iter()
        .find(|r| repository(r).ends_with("/pause"))
        .context("kubeadm lists no pause image")?
        .clone();
    timings.run("root file system (mmdebstrap)", || {
        let containerd = require(&tools.containerd_dir, "containerd")?;
        let mut cmd = Command::new(script());
        cmd.arg("rootfs")
            .arg(&rootfs)
            .env("CAPL_KUBEADM", require(&tools.kubeadm, "kubeadm")?)
            .env("CAPL_KUBELET", require(&tools.kubelet, "kubelet")?)
            .env("CAPL_CRICTL", require(&tools.crictl, "crictl")?)
            .env("CAPL_CONTAINERD_DIR", containerd)
            .env("CAPL_PAUSE_IMAGE", &pause);
        run(&mut cmd)
    })?;
    let archives = timings.run("control-plane images (OCI archives)", || {
        let iptables = work.join("iptables");
        run(Command::new(script())
            .arg("iptables")
            .arg(&iptables)
            .arg(&rootfs))?;
        let dir = work.join("images");
        std::fs::create_dir_all(&dir)?;
        references
            .iter()
            .map(|reference| {
                let archive = dir.join(format!(
                    "{}.tar",
                    repository(reference).rsplit('/').next().unwrap_or("image")
                ));
                write_image(&tools, reference, &iptables, &archive)?;
                Ok(archive)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    timings.run("import into the image's containerd", || {
        import(&tools, &rootfs, &work, &archives, &references)
    })?;
    let result = work.join("out");
    std::fs::create_dir_all(&result)?;
    let disk = result.join("node.qcow2");
    timings.run("disk (ext4 + SYSLINUX, qcow2)", || {
        run(Command::new(script()).arg("disk").arg(&rootfs).arg(&disk))
    })?;
    let sha256 = timings.run("sha256", || sha256_file(&disk))?;
    std::fs::write(result.join("node.qcow2.sha256"), format!("{sha256}\n"))?;
    std::fs::write(result.join("images.txt"), references.join("\n") + "\n")?;
    std::fs::write(result.join("timings.txt"), timings.report())?;
    eprint!("[node-image] timings:\n{}", timings.report());
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::rename(&result, out)?;
    std::fs::remove_dir_all(&work)?;
    prune_siblings(out);
    Ok(())
}

/// Removes the other entries of the cache's `node-image` dir: images of earlier pins or earlier
/// versions of this builder (1.5-2 GiB each), and work dirs of interrupted builds.
fn prune_siblings(keep: &Path) {
    let Some(parent) = keep.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path != keep {
            eprintln!("[node-image] removing the stale {}", path.display());
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn install_tools() -> Result<()> {
    let status = Command::new(repo().join("tests/tools/install.sh"))
        .arg("--workload")
        .stdout(Stdio::null())
        .status()
        .context("running tests/tools/install.sh --workload")?;
    ensure!(
        status.success(),
        "tests/tools/install.sh --workload failed (its output is above)"
    );
    Ok(())
}

/// What kubeadm pulls for the bed's Kubernetes version (`registry.k8s.io/...`).
fn image_list(tools: &Tools) -> Result<Vec<String>> {
    let out = Command::new(require(&tools.kubeadm, "kubeadm")?)
        .args(["config", "images", "list", "--kubernetes-version"])
        .arg(&tools.versions.kubernetes)
        .output()
        .context("running kubeadm config images list")?;
    ensure!(
        out.status.success(),
        "kubeadm config images list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `registry.k8s.io/coredns/coredns:v1.14.2` → `registry.k8s.io/coredns/coredns`.
fn repository(reference: &str) -> &str {
    reference
        .strip_suffix(super::oci::tag_of(reference))
        .and_then(|r| r.strip_suffix(':'))
        .unwrap_or(reference)
}

/// One image kubeadm names, from the pinned build that is that component at that version.
fn write_image(tools: &Tools, reference: &str, iptables: &Path, out: &Path) -> Result<()> {
    let name = repository(reference).rsplit('/').next().unwrap_or_default();
    let tag = super::oci::tag_of(reference);
    let kubernetes = &tools.versions.kubernetes;
    // (binary, path in the image, entrypoint)
    let (binary, path, entrypoint): (&Path, String, Vec<String>) = match name {
        "kube-apiserver" | "kube-controller-manager" | "kube-scheduler" | "kube-proxy" => {
            ensure!(
                tag == kubernetes,
                "kubeadm wants {reference}, the bed builds {kubernetes}"
            );
            let binary = match name {
                "kube-apiserver" => &tools.kube_apiserver,
                "kube-controller-manager" => require(&tools.kube_controller_manager, name)?,
                "kube-scheduler" => require(&tools.kube_scheduler, name)?,
                _ => require(&tools.kube_proxy, name)?,
            };
            (binary, format!("usr/local/bin/{name}"), vec![])
        }
        "etcd" => {
            let built = format!("{}-0", tools.versions.etcd.trim_start_matches('v'));
            ensure!(
                tag == built,
                "kubeadm wants {reference}; set ETCD_VERSION in tests/tools/versions.env to v{}",
                tag.trim_end_matches("-0")
            );
            (&tools.etcd, "usr/local/bin/etcd".into(), vec![])
        }
        "coredns" => {
            ensure!(
                tag == tools.versions.coredns,
                "kubeadm wants {reference}; set COREDNS_VERSION in tests/tools/versions.env to {tag}"
            );
            (
                require(&tools.coredns, "coredns")?,
                "coredns".into(),
                vec!["/coredns".into()],
            )
        }
        // The sandbox: the bed's own pause program (sleeps until signalled, reaps children).
        "pause" => (
            require(&tools.pause, "pause")?,
            "pause".into(),
            vec!["/pause".into()],
        ),
        other => bail!("kubeadm lists {reference}: no pinned build of {other}"),
    };
    let mut layer = LayerBuilder::new(&format!("COPY {name} /{path}"))?;
    layer.add_file_from(&path, binary, 0o755, 0, 0)?;
    layer.add_dir("tmp", 0o1777, 0, 0)?;
    let mut layers = Vec::new();
    if name == "kube-proxy" {
        // kube-proxy programs the node with iptables (nft): the root's tools and libraries.
        let mut base = LayerBuilder::new("COPY iptables (Debian's, as in the node's root) /")?;
        base.add_tree(iptables, "", Owner::FromTree)?;
        layers.push(base.build()?);
    }
    layers.push(layer.build()?);
    let config = ImageConfig {
        entrypoint,
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        stop_signal: Some("SIGTERM".into()),
        ..Default::default()
    };
    super::oci::write_archive(&layers, &config, reference, out)?;
    Ok(())
}

/// Imports the archives into the root file system's containerd store (`/var/lib/containerd`,
/// namespace `k8s.io` where the CRI looks, unpacked for overlayfs) with a containerd of the
/// same build running on this machine against that directory.
fn import(
    tools: &Tools,
    rootfs: &Path,
    work: &Path,
    archives: &[PathBuf],
    references: &[String],
) -> Result<()> {
    let bin = require(&tools.containerd_dir, "containerd")?;
    let ctr = bin.join("ctr");
    let state = work.join("containerd-state");
    let socket = work.join("containerd.sock");
    std::fs::create_dir_all(&state)?;
    let config = work.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 3
root = "{root}"
state = "{state}"
imports = []
# Only the image store: no CRI, no runtime, nothing that touches the machine.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images", "io.containerd.nri.v1.nri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"
"#,
            root = rootfs.join("var/lib/containerd").display(),
            state = state.display(),
            sock = socket.display(),
        ),
    )?;
    let mut cmd = Command::new(bin.join("containerd"));
    cmd.arg("--config").arg(&config);
    let log = work.join("containerd.log");
    let mut containerd = Proc::spawn("image-containerd", cmd, &log, Lifetime::TestProcess)?;
    let ctr_run = |args: &[&str]| -> Result<String> {
        let out = Command::new(&ctr)
            .arg(format!("--address={}", socket.display()))
            .args(args)
            .output()
            .context("running ctr")?;
        ensure!(
            out.status.success(),
            "ctr {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let result = (|| {
        poll(
            "the image containerd to answer",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                containerd.check_running()?;
                Ok(ctr_run(&["version"]).is_ok().then_some(()))
            },
        )?;
        for archive in archives {
            let path = archive.to_str().context("archive path is not UTF-8")?;
            ctr_run(&["--namespace=k8s.io", "images", "import", path])?;
        }
        let listed = ctr_run(&["--namespace=k8s.io", "images", "ls", "--quiet"])?;
        for reference in references {
            ensure!(
                listed.lines().any(|l| l.trim() == reference),
                "{reference} is not in the image's containerd after the import: {listed}"
            );
        }
        Ok(())
    })();
    containerd.stop(Duration::from_secs(10));
    result
        .map_err(|e: anyhow::Error| e.context(format!("containerd's log:\n{}", tail(&log, 20))))?;
    std::fs::remove_dir_all(&state).ok();
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed (its output is above)");
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// `tests/testbed node-image`: builds (or finds) the image and prints where it is.
pub fn cli(flags: &[String]) -> Result<()> {
    ensure!(flags.is_empty(), "node-image takes no flags");
    let image = node_image()?;
    println!("image:   {}", image.path.display());
    println!("sha256:  {}", image.sha256);
    println!(
        "size:    {:.1} MiB",
        std::fs::metadata(&image.path)?.len() as f64 / (1024.0 * 1024.0)
    );
    println!("images:  {}", image.images.join("\n         "));
    if let Some(timings) = image
        .path
        .parent()
        .and_then(|dir| std::fs::read_to_string(dir.join("timings.txt")).ok())
    {
        println!("cold build timings:\n{timings}");
    }
    Ok(())
}
