//! The Cluster API core objects the controllers read (Machines, Clusters, bootstrap Secrets),
//! as [`DynamicObject`]s of `cluster.x-k8s.io/v1beta2`, and the contract's labels and
//! annotations.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Resource, ResourceExt};
use serde_json::Value;

use super::{Error, Result};

/// Cluster API's group.
pub const GROUP: &str = "cluster.x-k8s.io";
/// The contract version we read Cluster API objects at.
pub const VERSION: &str = "v1beta2";
/// Label naming the Cluster an object belongs to.
pub const CLUSTER_NAME_LABEL: &str = "cluster.x-k8s.io/cluster-name";
/// Label marking control-plane Machines.
pub const CONTROL_PLANE_LABEL: &str = "cluster.x-k8s.io/control-plane";
/// Label naming the MachineDeployment a Machine belongs to.
pub const DEPLOYMENT_NAME_LABEL: &str = "cluster.x-k8s.io/deployment-name";
/// Annotation pausing reconciliation of one object.
pub const PAUSED_ANNOTATION: &str = "cluster.x-k8s.io/paused";

/// The `ApiResource` of a Cluster API core kind.
pub fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind))
}

/// Name of the owner of `kind` (a Cluster API core kind, any version) in `object`'s owner
/// references.
pub fn owner_name<K: Resource>(object: &K, kind: &str) -> Option<String> {
    object
        .owner_references()
        .iter()
        .find(|o| {
            o.kind == kind
                && o.api_version
                    .split_once('/')
                    .is_some_and(|(group, _)| group == GROUP)
        })
        .map(|o| o.name.clone())
}

/// The Cluster API object `kind`/`name` in `namespace`, `None` when it does not exist.
pub async fn get(
    client: &Client,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<DynamicObject>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource(kind));
    Ok(api.get_opt(name).await?)
}

/// A string at a JSON pointer of a dynamic object's body.
pub fn string_at<'a>(object: &'a DynamicObject, pointer: &str) -> Option<&'a str> {
    object
        .data
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Whether the Cluster (or `object` itself) is paused.
pub fn paused<K: Resource>(cluster: Option<&DynamicObject>, object: &K) -> bool {
    object.annotations().contains_key(PAUSED_ANNOTATION)
        || cluster.is_some_and(|c| {
            c.data.pointer("/spec/paused").and_then(Value::as_bool) == Some(true)
                || c.annotations().contains_key(PAUSED_ANNOTATION)
        })
}

/// The format of bootstrap data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootstrapFormat {
    /// `cloud-config` (the default).
    CloudConfig,
    /// `ignition`.
    Ignition,
}

/// Bootstrap data as the bootstrap provider wrote it. Never printed.
#[derive(Clone)]
pub struct BootstrapData {
    /// Its format.
    pub format: BootstrapFormat,
    /// The bytes under the Secret's `value` key.
    pub value: crate::cloudinit::Sensitive<Vec<u8>>,
}

impl std::fmt::Debug for BootstrapData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootstrapData({:?}, [redacted])", self.format)
    }
}

/// Why bootstrap data is not usable yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootstrapProblem {
    /// The Machine names no Secret yet.
    NotNamed,
    /// The Secret does not exist (yet).
    Missing(String),
    /// The Secret is there but unusable (no `value`, unknown `format`).
    Invalid(String),
}

/// Reads the Machine's bootstrap Secret (`value`, optional `format`).
pub async fn bootstrap_data(
    client: &Client,
    machine: &DynamicObject,
) -> Result<std::result::Result<BootstrapData, BootstrapProblem>> {
    let Some(name) = string_at(machine, "/spec/bootstrap/dataSecretName") else {
        return Ok(Err(BootstrapProblem::NotNamed));
    };
    let namespace = machine
        .namespace()
        .ok_or_else(|| Error::Object("a Machine without a namespace".into()))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let Some(secret) = secrets.get_opt(name).await? else {
        return Ok(Err(BootstrapProblem::Missing(name.to_owned())));
    };
    Ok(parse_bootstrap(name, &secret))
}

/// The bootstrap data of a Secret.
pub fn parse_bootstrap(
    name: &str,
    secret: &Secret,
) -> std::result::Result<BootstrapData, BootstrapProblem> {
    let data = secret.data.as_ref();
    let Some(value) = data.and_then(|d| d.get("value")) else {
        return Err(BootstrapProblem::Invalid(format!(
            "Secret {name} has no key \"value\""
        )));
    };
    let format = match data.and_then(|d| d.get("format")).map(|f| f.0.as_slice()) {
        None | Some(b"cloud-config") => BootstrapFormat::CloudConfig,
        Some(b"ignition") => BootstrapFormat::Ignition,
        Some(_) => {
            return Err(BootstrapProblem::Invalid(format!(
                "Secret {name} has a \"format\" other than cloud-config or ignition"
            )));
        }
    };
    Ok(BootstrapData {
        format,
        value: crate::cloudinit::Sensitive::new(value.0.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(pairs: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn bootstrap_format_defaults_to_cloud_config_and_never_prints() {
        let data = parse_bootstrap("s", &secret(&[("value", b"#cloud-config\nsecret-marker")]))
            .expect("usable");
        assert_eq!(data.format, BootstrapFormat::CloudConfig);
        assert!(!format!("{data:?}").contains("secret-marker"));
        let ign = parse_bootstrap("s", &secret(&[("value", b"{}"), ("format", b"ignition")]))
            .expect("usable");
        assert_eq!(ign.format, BootstrapFormat::Ignition);
        assert!(matches!(
            parse_bootstrap("s", &secret(&[("value", b"x"), ("format", b"yaml")])),
            Err(BootstrapProblem::Invalid(_))
        ));
        assert!(matches!(
            parse_bootstrap("s", &secret(&[])),
            Err(BootstrapProblem::Invalid(_))
        ));
    }
}
