//! The real Cluster API managers (core, and the kubeadm bootstrap and control-plane providers),
//! run as local processes against the bed.
//!
//! A plain kube-apiserver has no nodes, so nothing runs in Pods: each manager's CRDs (from the Go
//! module cache) and webhook configurations are installed with their conversion and admission
//! client configs pointing by URL at that manager's webhook server on 127.0.0.1, which serves a
//! certificate from the bed's CA.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde::Deserialize as _;
use serde_json::{Value, json};

use super::apiserver::{ControlPlane, free_port};
use super::process::{Lifetime, Proc, poll};
use super::tools::Tools;

/// Which Cluster API manager to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// The core manager (Cluster, Machine, MachineSet, MachineDeployment, ...).
    Core,
    /// The kubeadm bootstrap provider (KubeadmConfig: the cloud-config that runs kubeadm).
    KubeadmBootstrap,
    /// The kubeadm control-plane provider (KubeadmControlPlane).
    KubeadmControlPlane,
}

impl Provider {
    /// The manager's name (its binary in the tools cache, its log, its webhook prefix).
    pub fn name(self) -> &'static str {
        match self {
            Self::Core => "capi-manager",
            Self::KubeadmBootstrap => "capi-kubeadm-bootstrap-manager",
            Self::KubeadmControlPlane => "capi-kubeadm-control-plane-manager",
        }
    }

    /// The provider's directory in the `sigs.k8s.io/cluster-api` module (`config/` below it).
    fn module_dir(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::KubeadmBootstrap => "bootstrap/kubeadm",
            Self::KubeadmControlPlane => "controlplane/kubeadm",
        }
    }

    /// Flags for the bed's workload clusters, whose guests run under TCG: the control-plane
    /// provider reaches each member's etcd through the workload apiserver and the kubelet
    /// (a port-forward), which an emulated machine answers in tens of seconds, not the 10-15 s
    /// the defaults allow (missed calls leave the Machine's `Ready` unknown).
    fn extra_args(self) -> &'static [&'static str] {
        match self {
            Self::KubeadmControlPlane => &[
                "--etcd-dial-timeout-duration=60s",
                "--etcd-call-timeout-duration=60s",
            ],
            Self::Core | Self::KubeadmBootstrap => &[],
        }
    }

    fn binary(self, tools: &Tools) -> PathBuf {
        match self {
            Self::Core => tools.capi_manager.clone(),
            other => tools
                .capi_manager
                .parent()
                .unwrap_or(Path::new("."))
                .join(other.name()),
        }
    }
}

/// A running Cluster API manager.
pub struct CapiCore {
    pub webhook_url: String,
    /// Names of the installed CRDs.
    pub crds: Vec<String>,
    proc: Proc,
}

impl CapiCore {
    /// Installs CAPI's core CRDs and webhook configurations, starts the core manager and waits
    /// until it reports ready (which includes its webhook server).
    pub fn start(
        tools: &Tools,
        plane: &ControlPlane,
        dir: &Path,
        lifetime: Lifetime,
    ) -> Result<Self> {
        Self::start_provider(tools, plane, dir, lifetime, Provider::Core)
    }

    /// Installs `provider`'s CRDs and webhook configurations, starts its manager and waits until
    /// it reports ready.
    pub fn start_provider(
        tools: &Tools,
        plane: &ControlPlane,
        dir: &Path,
        lifetime: Lifetime,
        provider: Provider,
    ) -> Result<Self> {
        let config = tools.capi_src.join(provider.module_dir()).join("config");
        std::fs::create_dir_all(dir)?;
        let webhook_port = free_port()?;
        let health_port = free_port()?;
        let diagnostics_port = free_port()?;
        let webhook_url = format!("https://127.0.0.1:{webhook_port}");
        let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&plane.ca.cert_pem);

        let cert_dir = dir.join("webhook-certs");
        plane
            .ca
            .server("capi-webhook", &["127.0.0.1", "localhost"])?
            .write(&cert_dir, "tls.crt", "tls.key")?;

        let mut objects = Vec::new();
        let mut crds = Vec::new();
        let labels = kustomize_labels(&config.join("crd/kustomization.yaml"))?;
        for path in yaml_files(&config.join("crd/bases"))? {
            for mut crd in read_yaml_docs(&path)? {
                point_conversion_at(&mut crd, &webhook_url, &ca_bundle);
                add_labels(&mut crd, &labels);
                if let Some(name) = crd.pointer("/metadata/name").and_then(Value::as_str) {
                    crds.push(name.to_owned());
                }
                objects.push(crd);
            }
        }
        for mut webhooks in read_yaml_docs(&config.join("webhook/manifests.yaml"))? {
            point_webhooks_at(&mut webhooks, provider, &webhook_url, &ca_bundle)?;
            objects.push(webhooks);
        }
        let manifest = dir.join(format!("{}.json", provider.name()));
        std::fs::write(
            &manifest,
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": objects}))?,
        )?;
        plane.kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=capl-testbed",
            "-f",
            &manifest.to_string_lossy(),
        ])?;
        let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        let crd_refs: Vec<String> = crds.iter().map(|c| format!("crd/{c}")).collect();
        wait.extend(crd_refs.iter().map(String::as_str));
        plane.kubectl_ok(&wait)?;

        let mut cmd = Command::new(provider.binary(tools));
        cmd.env("KUBECONFIG", &plane.kubeconfig)
            .arg(format!("--webhook-port={webhook_port}"))
            .arg(format!("--webhook-cert-dir={}", cert_dir.display()))
            .arg(format!("--health-addr=127.0.0.1:{health_port}"))
            .arg(format!(
                "--diagnostics-address=127.0.0.1:{diagnostics_port}"
            ))
            .arg("--insecure-diagnostics")
            .arg("--leader-elect=false")
            .arg("--v=2")
            .args(provider.extra_args());
        let log = dir.join(format!("{}.log", provider.name()));
        let mut proc = Proc::spawn(provider.name(), cmd, &log, lifetime)?;
        poll(
            &format!("{} to be ready", provider.name()),
            Duration::from_secs(120),
            Duration::from_millis(250),
            || {
                proc.check_running()?;
                Ok(http_ok(health_port, "/readyz").then_some(()))
            },
        )?;
        Ok(Self {
            webhook_url,
            crds,
            proc,
        })
    }

    pub fn log(&self) -> PathBuf {
        self.proc.log().to_owned()
    }

    pub fn detach(self) -> (String, u32) {
        let name = self.proc.name().to_owned();
        (name, self.proc.detach())
    }
}

/// The labels a kustomization adds to its resources (`labels[].pairs`): Cluster API's contract
/// labels (`cluster.x-k8s.io/v1beta2: v1beta2`), which its controllers read off the CRDs.
fn kustomize_labels(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let mut labels = serde_json::Map::new();
    for doc in read_yaml_docs(path)? {
        for entry in doc["labels"].as_array().into_iter().flatten() {
            if let Some(pairs) = entry["pairs"].as_object() {
                labels.extend(pairs.clone());
            }
        }
    }
    Ok(labels)
}

fn add_labels(object: &mut Value, labels: &serde_json::Map<String, Value>) {
    if labels.is_empty() {
        return;
    }
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        let existing = metadata.entry("labels").or_insert_with(|| json!({}));
        if let Some(existing) = existing.as_object_mut() {
            existing.extend(labels.clone());
        }
    }
}

/// Sets the CRD's conversion webhook (CRDs serving more than one version need it).
fn point_conversion_at(crd: &mut Value, url: &str, ca_bundle: &str) {
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if versions < 2 {
        return;
    }
    if let Some(spec) = crd.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert(
            "conversion".into(),
            json!({
                "strategy": "Webhook",
                "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"url": format!("{url}/convert"), "caBundle": ca_bundle},
                },
            }),
        );
    }
}

/// Replaces each webhook's in-cluster service reference by a URL on loopback, and prefixes the
/// configuration's name with the provider's (every provider ships the same names).
fn point_webhooks_at(
    config: &mut Value,
    provider: Provider,
    url: &str,
    ca_bundle: &str,
) -> Result<()> {
    let kind = config["kind"].as_str().unwrap_or_default().to_owned();
    let prefix = match provider {
        Provider::Core => "capi",
        other => other.name().trim_end_matches("-manager"),
    };
    if let Some(name) = config.pointer_mut("/metadata/name") {
        *name = json!(format!(
            "{prefix}-{}",
            name.as_str().unwrap_or("webhook-configuration")
        ));
    }
    let Some(webhooks) = config.get_mut("webhooks").and_then(Value::as_array_mut) else {
        bail!("{kind} without webhooks");
    };
    for webhook in webhooks {
        let path = webhook
            .pointer("/clientConfig/service/path")
            .and_then(Value::as_str)
            .context("webhook without a service path")?
            .to_owned();
        webhook["clientConfig"] = json!({"url": format!("{url}{path}"), "caBundle": ca_bundle});
    }
    Ok(())
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every non-empty document of a YAML stream.
pub fn read_yaml_docs(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value =
            Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Whether `GET http://127.0.0.1:<port><path>` answers 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}
