//! The real Cluster API core manager, run as a local process against the bed.
//!
//! A plain kube-apiserver has no nodes, so nothing runs in Pods: CAPI's CRDs (from the Go module
//! cache) and webhook configurations are installed with their conversion and admission client
//! configs pointing by URL at the manager's webhook server on 127.0.0.1, which serves a
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

/// A running CAPI core manager.
pub struct CapiCore {
    pub webhook_url: String,
    /// Names of the installed CRDs.
    pub crds: Vec<String>,
    proc: Proc,
}

impl CapiCore {
    /// Installs CAPI's core CRDs and webhook configurations, starts the manager and waits until it
    /// reports ready (which includes its webhook server).
    pub fn start(
        tools: &Tools,
        plane: &ControlPlane,
        dir: &Path,
        lifetime: Lifetime,
    ) -> Result<Self> {
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
        for path in yaml_files(&tools.capi_src.join("core/config/crd/bases"))? {
            for mut crd in read_yaml_docs(&path)? {
                point_conversion_at(&mut crd, &webhook_url, &ca_bundle);
                if let Some(name) = crd.pointer("/metadata/name").and_then(Value::as_str) {
                    crds.push(name.to_owned());
                }
                objects.push(crd);
            }
        }
        for mut config in
            read_yaml_docs(&tools.capi_src.join("core/config/webhook/manifests.yaml"))?
        {
            point_webhooks_at(&mut config, &webhook_url, &ca_bundle)?;
            objects.push(config);
        }
        let manifest = dir.join("capi-core.json");
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

        let mut cmd = Command::new(&tools.capi_manager);
        cmd.env("KUBECONFIG", &plane.kubeconfig)
            .arg(format!("--webhook-port={webhook_port}"))
            .arg(format!("--webhook-cert-dir={}", cert_dir.display()))
            .arg(format!("--health-addr=127.0.0.1:{health_port}"))
            .arg(format!(
                "--diagnostics-address=127.0.0.1:{diagnostics_port}"
            ))
            .arg("--insecure-diagnostics")
            .arg("--leader-elect=false")
            .arg("--v=2");
        let mut proc = Proc::spawn("capi-manager", cmd, &dir.join("capi-manager.log"), lifetime)?;
        poll(
            "the CAPI core manager to be ready",
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

/// Replaces each webhook's in-cluster service reference by a URL on loopback.
fn point_webhooks_at(config: &mut Value, url: &str, ca_bundle: &str) -> Result<()> {
    let kind = config["kind"].as_str().unwrap_or_default().to_owned();
    if let Some(name) = config.pointer_mut("/metadata/name") {
        *name = json!(format!(
            "capi-{}",
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
