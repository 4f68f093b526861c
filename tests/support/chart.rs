//! Files generated from the Helm chart (`charts/cluster-api-provider-libvirt`), one source of truth:
//!
//! - the chart's `README.md`, from `values.yaml` (a comment above every value) and
//!   `values.schema.json` (types and constraints);
//! - `certs/cert-manager.yaml`, the chart's cert-manager manifests;
//! - `deploy/infrastructure-components.yaml`, the clusterctl components: `helm template` with
//!   `deploy/values.yaml`, then the clusterctl variables of [`component_variables`].
//!
//! `tests/chart.rs` fails when a file on disk differs; `CAPL_UPDATE_GOLDEN=1` rewrites them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo().join("charts/cluster-api-provider-libvirt")
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Release name and namespace the generated files are rendered with.
pub const RELEASE: &str = "capl";
pub const NAMESPACE: &str = "capl-system";

/// Runs `helm` (v3 or v4) with its caches in a throwaway directory; `Err` carries stderr.
pub fn helm(helm: &Path, args: &[&str]) -> Result<String> {
    let home = tempfile::tempdir()?;
    let out = Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template capl <chart> -n capl-system <extra>`.
pub fn template(helm_bin: &Path, extra: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    helm(helm_bin, &args)
}

// ---------------------------------------------------------------- certs/

/// `certs/cert-manager.yaml`: the chart's cert-manager Issuers and Certificates for release
/// `capl` in `capl-system`.
pub fn cert_manager_manifests(helm_bin: &Path) -> Result<String> {
    let body = template(
        helm_bin,
        &[
            "--set",
            "certManager.enabled=true,fullnameOverride=capl,standardLabels=false",
            "--show-only",
            "templates/certificates.yaml",
        ],
    )?;
    Ok(format!(
        "# Generated from charts/cluster-api-provider-libvirt (templates/certificates.yaml) with\n\
         # certManager.enabled=true for release `capl` in namespace `capl-system`; do not edit.\n\
         # Regenerate: CAPL_UPDATE_GOLDEN=1 cargo test --test chart generated_files_are_current\n{body}"
    ))
}

// ---------------------------------------------------------------- deploy/

/// clusterctl variables in the components: each rendered literal (which must occur exactly once)
/// becomes a `${VAR:=default}`. Only values with a non-empty default: clusterctl treats
/// `${VAR:=}` as a variable without default, which must be set (its yamlprocessor).
pub fn component_variables() -> Vec<(String, String)> {
    let image = format!(
        "ghcr.io/cluster-api-provider-libvirt/manager:{}",
        env!("CARGO_PKG_VERSION")
    );
    let mut variables = vec![(
        format!("image: \"{image}\""),
        format!("image: \"${{CAPL_IMAGE:={image}}}\""),
    )];
    variables.extend(
        COMPONENT_FLAGS
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string())),
    );
    variables
}

/// The flag and environment variables of [`component_variables`].
const COMPONENT_FLAGS: &[(&str, &str)] = &[
    (
        "name: RUST_LOG\n              value: \"info\"",
        "name: RUST_LOG\n              value: \"${CAPL_LOG_LEVEL:=info}\"",
    ),
    ("--log-format=text", "--log-format=${CAPL_LOG_FORMAT:=text}"),
    (
        "--libvirtmachine-concurrency=10",
        "--libvirtmachine-concurrency=${CAPL_LIBVIRTMACHINE_CONCURRENCY:=10}",
    ),
    (
        "--libvirtcluster-concurrency=10",
        "--libvirtcluster-concurrency=${CAPL_LIBVIRTCLUSTER_CONCURRENCY:=10}",
    ),
    (
        "--kube-api-qps=20",
        "--kube-api-qps=${CAPL_KUBE_API_QPS:=20}",
    ),
    (
        "--kube-api-burst=30",
        "--kube-api-burst=${CAPL_KUBE_API_BURST:=30}",
    ),
    (
        "--sync-period=10m",
        "--sync-period=${CAPL_SYNC_PERIOD:=10m}",
    ),
    (
        "--guest-shutdown-timeout=60s",
        "--guest-shutdown-timeout=${CAPL_GUEST_SHUTDOWN_TIMEOUT:=60s}",
    ),
    (
        "--guest-address-timeout=10m",
        "--guest-address-timeout=${CAPL_GUEST_ADDRESS_TIMEOUT:=10m}",
    ),
];

/// `deploy/infrastructure-components.yaml`: the chart with `deploy/values.yaml`, CRDs included,
/// and the clusterctl variables.
pub fn infrastructure_components(helm_bin: &Path) -> Result<String> {
    let values = repo().join("deploy/values.yaml");
    let values = values.to_string_lossy();
    let mut body = template(helm_bin, &["--include-crds", "--values", &values])?;
    for (literal, variable) in component_variables() {
        let found = body.matches(&literal).count();
        if found != 1 {
            bail!("the rendered components hold {literal:?} {found} times (expected once)");
        }
        body = body.replace(&literal, &variable);
    }
    Ok(format!(
        "# clusterctl components of cluster-api-provider-libvirt, generated from\n\
         # charts/cluster-api-provider-libvirt with deploy/values.yaml; do not edit.\n\
         # Regenerate: CAPL_UPDATE_GOLDEN=1 cargo test --test chart generated_files_are_current\n{body}"
    ))
}

// ---------------------------------------------------------------- README

/// One value of `values.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueDoc {
    /// Dotted path (`image.tag`).
    pub path: String,
    /// The comment lines above it, joined.
    pub description: String,
    /// The default as written in `values.yaml`.
    pub default: String,
}

/// The leaves of `values.yaml` (keys with an inline value) and the parents (keys of maps), in
/// file order. Every leaf must have a comment right above it.
pub fn parse_values(text: &str) -> Result<(Vec<ValueDoc>, BTreeSet<String>)> {
    let mut leaves = Vec::new();
    let mut parents = BTreeSet::new();
    let mut comment: Vec<String> = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            comment.clear();
            continue;
        }
        if let Some(text) = trimmed.strip_prefix('#') {
            comment.push(text.trim().to_owned());
            continue;
        }
        let Some((key, rest)) = trimmed.split_once(':') else {
            bail!(
                "values.yaml line {}: multi-line defaults are not supported (write them inline)",
                number + 1
            );
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("values.yaml line {}: unexpected key {key:?}", number + 1);
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let path = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([key])
            .collect::<Vec<_>>()
            .join(".");
        let rest = rest.trim();
        if rest.is_empty() {
            parents.insert(path);
            stack.push((indent, key.to_owned()));
        } else {
            if comment.is_empty() {
                bail!("values.yaml: {path} has no comment above it");
            }
            leaves.push(ValueDoc {
                path,
                description: comment.join(" "),
                default: rest.to_owned(),
            });
        }
        comment.clear();
    }
    Ok((leaves, parents))
}

/// The schema node of a dotted path.
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(schema, |node, key| {
        node.get("properties")
            .and_then(|p| p.get(key))
            .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))
    })
}

/// Type and constraints of a schema node, for the README.
fn describe_schema(node: &Value) -> (String, String) {
    let type_of = |node: &Value| match node.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => String::new(),
    };
    let alternatives = node
        .get("oneOf")
        .or_else(|| node.get("anyOf"))
        .and_then(Value::as_array);
    let nodes: Vec<&Value> = match alternatives {
        Some(list) => list.iter().collect(),
        None => vec![node],
    };
    let types = nodes
        .iter()
        .map(|n| type_of(n))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut rules = Vec::new();
    for n in nodes {
        if let Some(values) = n.get("enum").and_then(Value::as_array) {
            let values: Vec<String> = values.iter().map(|v| format!("`{}`", plain(v))).collect();
            rules.push(format!("one of {}", values.join(", ")));
        }
        for (key, word) in [
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("maxLength", "length ≤"),
            ("minLength", "length ≥"),
        ] {
            if let Some(v) = n.get(key) {
                rules.push(format!("{word} {v}"));
            }
        }
        if let Some(p) = n.get("pattern").and_then(Value::as_str) {
            rules.push(format!("matches `{}`", p.replace('|', "\\|")));
        }
        if n.get("additionalProperties") == Some(&Value::Bool(false)) {
            rules.push("no other keys".into());
        }
    }
    (types, rules.join("; "))
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const README_HEAD: &str = "\
<!-- Generated from values.yaml and values.schema.json by tests/support/chart.rs; do not edit.
     Regenerate: CAPL_UPDATE_GOLDEN=1 cargo test --test chart generated_files_are_current -->
# cluster-api-provider-libvirt

The Cluster API infrastructure provider for libvirt/KVM hosts: the manager (LibvirtCluster and
LibvirtMachine controllers, defaulting and validating admission webhooks), its CRDs, least-privilege
RBAC, and the webhook certificate.

```sh
helm install capl charts/cluster-api-provider-libvirt --namespace capl-system --create-namespace
```

Cluster API's core (`cluster.x-k8s.io`, contract v1beta2) must run in the cluster for the
controllers to reconcile anything. The pod meets the Pod Security \"restricted\" profile (unless
`libvirt.socket.enabled` mounts a hostPath).

## Webhook certificates

- **Self-managed** (default, no cert-manager): the manager creates a CA and a serving certificate in
  the Secret `<fullname>-webhook-cert`, injects the CA into both webhook configurations
  (`<fullname>-webhook-configuration`), renews before expiry, and every replica serves the new
  certificate without a restart. The chart never renders a `caBundle`, so `helm upgrade` keeps the
  injected one.
- **cert-manager** (`--set certManager.enabled=true`): an Issuer chain (self-signed → CA) issues the
  serving certificate into `<fullname>-webhook-server-cert`, mounted at
  `/tmp/k8s-webhook-server/serving-certs`; cainjector fills the `caBundle` (annotation
  `cert-manager.io/inject-ca-from`). The same manifests are in `certs/cert-manager.yaml`.

## CRDs

The CRDs in `crds/` are generated by `manager crds` (identical to the repository's `crds/`). Helm
installs them on the first install only and never upgrades or deletes them: `helm uninstall` leaves
the CRDs and every object of them. Upgrade them with `kubectl apply --server-side -f crds/`.

## libvirt hosts

The manager reaches hosts by the URIs of the LibvirtClusters. For `qemu+ssh://` hosts set
`libvirt.knownHosts` (their host keys, mounted at `~/.ssh/known_hosts`) and give each host a
`credentialsSecretRef`; for a libvirtd on the node itself, `libvirt.socket.enabled` mounts its
socket directory (a hostPath). Credential files and base image downloads go to an emptyDir at
`/tmp` (`tmpDir.sizeLimit`), the root filesystem is read-only.

## Values

`values.schema.json` rejects unknown keys and bad values at `helm install`/`helm template`.

| value | type | default | constraints | description |
|---|---|---|---|---|
";

/// The chart's README: the fixed text above and one table row per value.
pub fn readme(values_yaml: &str, schema: &Value) -> Result<String> {
    let (leaves, parents) = parse_values(values_yaml)?;
    let mut out = README_HEAD.to_owned();
    for leaf in &leaves {
        let node = schema_at(schema, &leaf.path)
            .with_context(|| format!("values.schema.json has no property {}", leaf.path))?;
        let (types, rules) = describe_schema(node);
        let cell = |s: &str| s.replace('|', "\\|");
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} |\n",
            leaf.path,
            types,
            cell(&leaf.default),
            rules,
            cell(&leaf.description)
        ));
    }
    // Every schema property is documented (or is a parent of documented values).
    let documented: BTreeSet<&str> = leaves
        .iter()
        .map(|l| l.path.as_str())
        .chain(parents.iter().map(String::as_str))
        .collect();
    for path in schema_paths(schema, "") {
        if path != "global" && !documented.contains(path.as_str()) {
            bail!("values.schema.json has {path}, which values.yaml does not set and describe");
        }
    }
    Ok(out)
}

fn schema_paths(node: &Value, prefix: &str) -> Vec<String> {
    let Some(props) = node.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for (key, child) in props {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        paths.extend(schema_paths(child, &path));
        paths.push(path);
    }
    paths
}

/// The chart's README from the files on disk.
pub fn readme_from_disk() -> Result<String> {
    let values = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        chart_dir().join("values.schema.json"),
    )?)?;
    readme(&values, &schema)
}

// ---------------------------------------------------------------- all of them

/// Every generated file: (path relative to the repository, content).
pub fn generated(helm_bin: &Path) -> Result<Vec<(PathBuf, String)>> {
    Ok(vec![
        (
            PathBuf::from("charts/cluster-api-provider-libvirt/README.md"),
            readme_from_disk()?,
        ),
        (
            PathBuf::from("certs/cert-manager.yaml"),
            cert_manager_manifests(helm_bin)?,
        ),
        (
            PathBuf::from("deploy/infrastructure-components.yaml"),
            infrastructure_components(helm_bin)?,
        ),
    ])
}
