//! The Mutating- and ValidatingWebhookConfigurations that route our kinds to the manager;
//! `manager webhooks` writes them to `webhooks/`, and tests point them at a local manager by URL.

use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::admission::{Endpoint, Kind};
use crate::api::{GROUP, PROVIDER_LABEL_VALUE, VERSION};

/// Name of both configurations.
pub const CONFIGURATION_NAME: &str = "capl-webhook-configuration";
/// The in-cluster Service in front of the manager's webhook port.
pub const SERVICE_NAME: &str = "capl-webhook-service";
pub const SERVICE_NAMESPACE: &str = "capl-system";

/// How the apiserver reaches the webhook server.
#[derive(Clone, Debug)]
pub enum Target {
    /// The in-cluster Service (what the chart and clusterctl components use).
    Service { namespace: String, name: String },
    /// A base URL, e.g. `https://127.0.0.1:9443` for a manager run outside the cluster.
    Url(String),
}

impl Default for Target {
    fn default() -> Self {
        Target::Service {
            namespace: SERVICE_NAMESPACE.into(),
            name: SERVICE_NAME.into(),
        }
    }
}

fn client_config(target: &Target, path: String, ca_bundle: Option<&[u8]>) -> WebhookClientConfig {
    let (service, url) = match target {
        Target::Service { namespace, name } => (
            Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(path),
                port: Some(443),
            }),
            None,
        ),
        Target::Url(base) => (None, Some(format!("{}{path}", base.trim_end_matches('/')))),
    };
    WebhookClientConfig {
        ca_bundle: ca_bundle.map(|pem| ByteString(pem.to_vec())),
        service,
        url,
    }
}

fn rules(kind: Kind) -> Vec<RuleWithOperations> {
    vec![RuleWithOperations {
        api_groups: Some(vec![GROUP.into()]),
        api_versions: Some(vec![VERSION.into()]),
        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
        resources: Some(vec![kind.plural()]),
        scope: Some("Namespaced".into()),
    }]
}

fn metadata() -> ObjectMeta {
    ObjectMeta {
        name: Some(CONFIGURATION_NAME.into()),
        labels: Some(
            [(
                "cluster.x-k8s.io/provider".to_owned(),
                PROVIDER_LABEL_VALUE.to_owned(),
            )]
            .into(),
        ),
        ..ObjectMeta::default()
    }
}

fn webhook_name(endpoint: Endpoint, kind: Kind) -> String {
    let verb = match endpoint {
        Endpoint::Mutate => "default",
        Endpoint::Validate => "validation",
    };
    format!("{verb}.{}.{GROUP}", kind.name().to_lowercase())
}

/// The defaulting configuration: one webhook per kind.
pub fn mutating(target: &Target, ca_bundle: Option<&[u8]>) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: metadata(),
        webhooks: Some(
            Kind::ALL
                .iter()
                .map(|&kind| MutatingWebhook {
                    name: webhook_name(Endpoint::Mutate, kind),
                    admission_review_versions: vec!["v1".into()],
                    client_config: client_config(target, kind.path(Endpoint::Mutate), ca_bundle),
                    failure_policy: Some("Fail".into()),
                    match_policy: Some("Equivalent".into()),
                    side_effects: "None".into(),
                    timeout_seconds: Some(10),
                    reinvocation_policy: Some("Never".into()),
                    rules: Some(rules(kind)),
                    ..MutatingWebhook::default()
                })
                .collect(),
        ),
    }
}

/// The validating configuration: one webhook per kind.
pub fn validating(target: &Target, ca_bundle: Option<&[u8]>) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: metadata(),
        webhooks: Some(
            Kind::ALL
                .iter()
                .map(|&kind| ValidatingWebhook {
                    name: webhook_name(Endpoint::Validate, kind),
                    admission_review_versions: vec!["v1".into()],
                    client_config: client_config(target, kind.path(Endpoint::Validate), ca_bundle),
                    failure_policy: Some("Fail".into()),
                    match_policy: Some("Equivalent".into()),
                    side_effects: "None".into(),
                    timeout_seconds: Some(10),
                    rules: Some(rules(kind)),
                    ..ValidatingWebhook::default()
                })
                .collect(),
        ),
    }
}

/// Both configurations as one YAML stream.
pub fn render(target: &Target, ca_bundle: Option<&[u8]>) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "---\n{}---\n{}",
        serde_yaml::to_string(&mutating(target, ca_bundle))?,
        serde_yaml::to_string(&validating(target, ca_bundle))?
    ))
}

/// File the generated configurations live in.
pub const FILE_NAME: &str = "manifests.yaml";

/// Writes `dir/manifests.yaml` for the in-cluster Service.
pub fn write(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(FILE_NAME);
    std::fs::write(&path, render(&Target::default(), None)?)?;
    Ok(path)
}
