//! Where the pinned test-bed binaries live: the cache that `tests/tools/install.sh` fills.
//!
//! Every path can be overridden with the environment variable that `install.sh` prints
//! (`CAPL_KUBE_APISERVER`, ...); otherwise it is derived from `tests/tools/versions.env` and the cache
//! directory exactly as `install.sh` derives it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The versions pinned in `tests/tools/versions.env`.
#[derive(Debug, Clone)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
    pub helm: String,
    /// Helm v3, for the chart's compatibility checks.
    pub helm3: String,
    pub cluster_api: String,
    pub containerd: String,
    /// crictl in the workload node image.
    pub cri_tools: String,
    /// CoreDNS in the workload node image.
    pub coredns: String,
}

/// Paths of every real component the bed runs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub versions: Versions,
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub helm: PathBuf,
    /// Helm v3 (`HELM3_VERSION`).
    pub helm3: PathBuf,
    pub kubectl: PathBuf,
    pub capi_manager: PathBuf,
    pub clusterctl: PathBuf,
    /// The `sigs.k8s.io/cluster-api` module in the Go module cache (CRDs, webhook manifests).
    pub capi_src: PathBuf,
    /// The node's kubelet (this and the other node components are `None` when not built: only
    /// node mode needs them).
    pub kubelet: Option<PathBuf>,
    /// The node's kube-proxy.
    pub kube_proxy: Option<PathBuf>,
    /// kube-controller-manager (node mode: Deployments get Pods, Services get endpoints).
    pub kube_controller_manager: Option<PathBuf>,
    /// kube-scheduler (node mode: Pods get the node).
    pub kube_scheduler: Option<PathBuf>,
    /// Directory holding `containerd`, `containerd-shim-runc-v2` and `ctr`.
    pub containerd_dir: Option<PathBuf>,
    /// The bed's pause program (sandbox image and test probe).
    pub pause: Option<PathBuf>,
    /// kubeadm, crictl and CoreDNS: only the workload node image needs them
    /// (`install.sh --workload`).
    pub kubeadm: Option<PathBuf>,
    pub crictl: Option<PathBuf>,
    pub coredns: Option<PathBuf>,
}

/// Fails with how to get a node component that [`Tools::locate`] did not find.
pub fn require<'a>(tool: &'a Option<PathBuf>, name: &str) -> Result<&'a PathBuf> {
    tool.as_ref()
        .with_context(|| format!("{name} is not built; {INSTALL_HINT}"))
}

const INSTALL_HINT: &str = "run `tests/tools/install.sh` (README's test command does; \
     `--workload` for the node image's tools) to build it";

impl Tools {
    /// Locates every tool; a missing one is an error that says how to get it.
    pub fn locate() -> Result<Self> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let pins = read_env_file(&repo.join("tests/tools/versions.env"))?;
        let pin = |key: &str| {
            pins.get(key)
                .cloned()
                .with_context(|| format!("tests/tools/versions.env has no {key}"))
        };
        let versions = Versions {
            kubernetes: pin("KUBERNETES_VERSION")?,
            etcd: pin("ETCD_VERSION")?,
            helm: pin("HELM_VERSION")?,
            helm3: pin("HELM3_VERSION")?,
            cluster_api: pin("CLUSTER_API_VERSION")?,
            containerd: pin("CONTAINERD_VERSION")?,
            cri_tools: pin("CRI_TOOLS_VERSION")?,
            coredns: pin("COREDNS_VERSION")?,
        };
        let optional = |env: &str, default: PathBuf| -> Option<PathBuf> {
            let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
            path.exists().then_some(path)
        };
        let cache = cache_dir()?.join("tools");
        let capi_dir = cache.join(format!("cluster-api-{}", versions.cluster_api));
        let kubernetes = cache.join(format!("kubernetes-{}", versions.kubernetes));
        let tool = |env: &str, default: PathBuf| -> Result<PathBuf> {
            let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
            if !path.exists() {
                bail!("{} not found ({env}); {INSTALL_HINT}", path.display());
            }
            Ok(path)
        };
        let tools = Self {
            kube_apiserver: tool(
                "CAPL_KUBE_APISERVER",
                cache
                    .join(format!("kubernetes-{}", versions.kubernetes))
                    .join("kube-apiserver"),
            )?,
            etcd: tool(
                "CAPL_ETCD",
                cache.join(format!("etcd-{}", versions.etcd)).join("etcd"),
            )?,
            helm: tool(
                "CAPL_HELM",
                cache.join(format!("helm-{}", versions.helm)).join("helm"),
            )?,
            helm3: tool(
                "CAPL_HELM3",
                cache.join(format!("helm-{}", versions.helm3)).join("helm"),
            )?,
            kubectl: which("kubectl")?,
            capi_manager: tool("CAPL_CAPI_MANAGER", capi_dir.join("capi-manager"))?,
            clusterctl: tool("CAPL_CLUSTERCTL", capi_dir.join("clusterctl"))?,
            capi_src: tool("CAPL_CAPI_SRC", capi_module_dir(repo, &versions)?)?,
            kubelet: optional("CAPL_KUBELET", kubernetes.join("kubelet")),
            kube_proxy: optional("CAPL_KUBE_PROXY", kubernetes.join("kube-proxy")),
            kube_controller_manager: optional(
                "CAPL_KUBE_CONTROLLER_MANAGER",
                kubernetes.join("kube-controller-manager"),
            ),
            kube_scheduler: optional("CAPL_KUBE_SCHEDULER", kubernetes.join("kube-scheduler")),
            containerd_dir: optional(
                "CAPL_CONTAINERD_DIR",
                cache.join(format!("containerd-{}", versions.containerd)),
            ),
            pause: pause_binary(repo, &cache),
            kubeadm: optional("CAPL_KUBEADM", kubernetes.join("kubeadm")),
            crictl: optional(
                "CAPL_CRICTL",
                cache
                    .join(format!("cri-tools-{}", versions.cri_tools))
                    .join("crictl"),
            ),
            coredns: optional(
                "CAPL_COREDNS",
                cache
                    .join(format!("coredns-{}", versions.coredns))
                    .join("coredns"),
            ),
            versions,
        };
        Ok(tools)
    }
}

/// `${CAPL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cluster-api-provider-libvirt}`
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAPL_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("cluster-api-provider-libvirt"))
}

/// `$CAPL_PAUSE`, or the cache entry `install.sh` builds: keyed by a hash of the program's source
/// (`pause-<first 16 hex digits of sha256(go.mod + main.go)>`).
fn pause_binary(repo: &Path, cache: &Path) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CAPL_PAUSE") {
        return Some(PathBuf::from(path)).filter(|p| p.exists());
    }
    let src = repo.join("tests/tools/pause");
    let mut source = std::fs::read(src.join("go.mod")).ok()?;
    source.extend(std::fs::read(src.join("main.go")).ok()?);
    let digest = sha256_hex(&source);
    let path = cache.join(format!("pause-{}", &digest[..16])).join("pause");
    path.exists().then_some(path)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    use std::fmt::Write;
    sha2::Sha256::digest(bytes)
        .iter()
        .fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

fn capi_module_dir(repo: &Path, versions: &Versions) -> Result<PathBuf> {
    let out = Command::new("go")
        .args(["env", "GOMODCACHE"])
        .current_dir(repo.join("tests/tools/cluster-api"))
        .output()
        .context("running `go env GOMODCACHE` (Go is needed to locate the CAPI module)")?;
    let modcache = String::from_utf8(out.stdout)?.trim().to_owned();
    Ok(PathBuf::from(modcache).join(format!("sigs.k8s.io/cluster-api@{}", versions.cluster_api)))
}

fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{name} is not on PATH"))
}

/// Reads `KEY=value` lines, ignoring comments and blanks.
fn read_env_file(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}
