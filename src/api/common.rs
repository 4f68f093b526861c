//! Types shared by the cluster and machine kinds, and the CRD-wide constants.

use std::collections::BTreeMap;

use kube::KubeSchema;
use kube::core::{Message, Rule};
use serde::{Deserialize, Serialize};

/// API group of every kind of this provider.
pub const GROUP: &str = "infrastructure.cluster.x-k8s.io";
/// API version of every kind of this provider.
pub const VERSION: &str = "v1alpha1";
/// `cluster.x-k8s.io/provider` label value carried by every object we ship.
pub const PROVIDER_LABEL_VALUE: &str = "infrastructure-libvirt";

/// A libvirt object name (network, storage pool): letters, digits, `_`, `.`, `-`; no path
/// separators, no whitespace, at most 64 characters.
pub const LIBVIRT_NAME_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$";
/// A UUID in lowercase canonical form (`8-4-4-4-12` hex digits).
pub const UUID_PATTERN: &str = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";
/// A DNS-1123 label: lowercase alphanumerics and `-`, 1–63 characters.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// The v1beta2 contract's `status.initialization`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Initialization {
    /// True once the infrastructure is fully provisioned. Cluster API reads this to move the
    /// owning Cluster or Machine forward; it never goes back to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned: Option<bool>,
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_`, `.`, starting and ending with an
/// alphanumeric (apimachinery's rule).
pub const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// Labels and annotations applied to objects created from a template. The webhook validates them
/// exactly as Kubernetes validates an object's labels and annotations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMeta {
    /// Labels copied onto objects created from the template (at most 64; Kubernetes label
    /// syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}
    ))]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations copied onto objects created from the template (at most 64; Kubernetes
    /// annotation syntax, 256 KiB in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A reference to a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    )]
    pub name: String,
}

/// Builds the CEL rule that keeps `spec.<field>` unchanged once the object exists.
///
/// Used on the kinds themselves, never on templates: templates are immutable through the
/// validating webhook instead, which lets Cluster API's topology dry-runs through.
pub fn immutable(field: &str) -> Rule {
    Rule::new(format!(
        "has(self.spec.{field}) == has(oldSelf.spec.{field}) && \
         (!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field})"
    ))
    .message(Message::Message(format!("spec.{field} is immutable")))
    .field_path(format!(".spec.{field}"))
}

/// The rule that lets a field be set once (from empty) and never changed afterwards.
pub fn set_once(field: &str) -> Rule {
    Rule::new(format!(
        "!has(oldSelf.spec.{field}) || \
         (has(self.spec.{field}) && self.spec.{field} == oldSelf.spec.{field})"
    ))
    .message(Message::Message(format!(
        "spec.{field} can be set once and never changed"
    )))
    .field_path(format!(".spec.{field}"))
}
