//! `LibvirtCluster` and `LibvirtClusterTemplate`: the libvirt hosts a cluster's machines run on.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    DNS_LABEL_PATTERN, Initialization, LIBVIRT_NAME_PATTERN, SecretReference, TemplateMeta,
};

/// An IPv4 address in dotted decimal, no leading zeros.
macro_rules! ipv4_pattern {
    () => {
        "((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    };
}

/// An IPv6 address (RFC 4291 text forms, at most one `::`; an embedded IPv4 tail is matched
/// loosely).
macro_rules! ipv6_pattern {
    () => {
        concat!(
            "(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}",
            "|([0-9A-Fa-f]{1,4}:){1,7}:",
            "|([0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}",
            "|([0-9A-Fa-f]{1,4}:){1,5}(:[0-9A-Fa-f]{1,4}){1,2}",
            "|([0-9A-Fa-f]{1,4}:){1,4}(:[0-9A-Fa-f]{1,4}){1,3}",
            "|([0-9A-Fa-f]{1,4}:){1,3}(:[0-9A-Fa-f]{1,4}){1,4}",
            "|([0-9A-Fa-f]{1,4}:){1,2}(:[0-9A-Fa-f]{1,4}){1,5}",
            "|[0-9A-Fa-f]{1,4}:(:[0-9A-Fa-f]{1,4}){1,6}",
            "|:((:[0-9A-Fa-f]{1,4}){1,7}|:)",
            "|([0-9A-Fa-f]{1,4}:){6}",
            ipv4_pattern!(),
            "|::([0-9A-Fa-f]{1,4}:){0,5}",
            ipv4_pattern!(),
            "|([0-9A-Fa-f]{1,4}:){1,5}:([0-9A-Fa-f]{1,4}:){0,4}",
            ipv4_pattern!(),
            ")"
        )
    };
}

/// A URI host: a DNS name whose last label starts with a letter, an IPv4 address, or a
/// bracketed IPv6 address.
macro_rules! uri_host_pattern {
    () => {
        concat!(
            "((([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)|",
            ipv4_pattern!(),
            "|\\[",
            ipv6_pattern!(),
            "\\])"
        )
    };
}

/// A TCP port, 1-65535, no leading zeros.
macro_rules! port_pattern {
    () => {
        "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
    };
}

/// An absolute path to a libvirt socket: plain segments (never `.` or `..`), the file name ending
/// in `-sock` or `-sock-ro`.
macro_rules! socket_pattern {
    () => {
        "(/([A-Za-z0-9_-]|\\.[A-Za-z0-9_-]|\\.\\.[A-Za-z0-9._-])[A-Za-z0-9._-]*)*/[A-Za-z0-9._-]*-sock(-ro)?"
    };
}

/// One `qemu+ssh://` query parameter with an allowed value.
macro_rules! ssh_param_pattern {
    () => {
        concat!(
            "(no_verify=[01]|no_tty=[01]|known_hosts_verify=(normal|auto|ignore)|socket=",
            socket_pattern!(),
            ")"
        )
    };
}

/// Allowed libvirt connection URIs: the same syntax `capl::libvirt::uri::HostUri::parse` accepts
/// (read its module docs), as a regular expression the apiserver runs: `qemu:///system|session`
/// with an optional `socket=`, `qemu+ssh://[user@]host[:port]/system|session` with `no_verify`,
/// `no_tty`, `known_hosts_verify` and `socket`, `qemu+tls://host[:port]/system|session` with
/// `no_verify`, and exactly `test:///default`. No `%`, `;`, other parameters or values. Where a
/// regular expression cannot say it, the schema accepts more than the parser (a repeated
/// parameter, a forbidden IP literal, the test driver without `--allow-test-driver`): the webhook
/// and the backend refuse those.
pub const HOST_URI_PATTERN: &str = concat!(
    "^(test:///default",
    "|qemu:///(system|session)(\\?socket=",
    socket_pattern!(),
    ")?",
    "|qemu\\+ssh://([A-Za-z_][A-Za-z0-9_.-]{0,31}@)?",
    uri_host_pattern!(),
    "(:",
    port_pattern!(),
    ")?/(system|session)(\\?",
    ssh_param_pattern!(),
    "(&",
    ssh_param_pattern!(),
    ")*)?",
    "|qemu\\+tls://",
    uri_host_pattern!(),
    "(:",
    port_pattern!(),
    ")?/(system|session)(\\?no_verify=[01])?",
    ")$"
);

/// The control-plane endpoint's host: a DNS-1123 subdomain or a literal IPv4 or IPv6 address.
pub const ENDPOINT_HOST_PATTERN: &str = concat!(
    "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*|",
    ipv4_pattern!(),
    "|",
    ipv6_pattern!(),
    ")$"
);

/// The libvirt hosts of a workload cluster and the defaults its machines use.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha1",
    kind = "LibvirtCluster",
    doc = "The libvirt hosts (failure domains) of one Cluster API Cluster, and its machines' defaults.",
    namespaced,
    status = "LibvirtClusterStatus",
    shortname = "lvc",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha1"),
    label("cluster.x-k8s.io/provider", "infrastructure-libvirt"),
    printcolumn(
        name = "Cluster",
        type_ = "string",
        description = "Cluster this LibvirtCluster belongs to",
        json_path = ".metadata.labels['cluster\\.x-k8s\\.io/cluster-name']"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        description = "Control plane endpoint host",
        json_path = ".spec.controlPlaneEndpoint.host"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether the cluster infrastructure is ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new(
        "!has(oldSelf.spec.controlPlaneEndpoint) || \
         (has(self.spec.controlPlaneEndpoint) && self.spec.controlPlaneEndpoint == oldSelf.spec.controlPlaneEndpoint)"
    )
    .message("spec.controlPlaneEndpoint can be set once and never changed")
    .field_path(".spec.controlPlaneEndpoint")
)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtClusterSpec {
    /// Address of the workload cluster's API server (a VIP or load balancer in front of the
    /// control-plane machines). Set once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_endpoint: Option<ApiEndpoint>,

    /// The libvirt hosts machines may run on. Each host is one failure domain; Cluster API spreads
    /// control-plane machines across the hosts that allow them.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(min = 1, max = 64))]
    pub hosts: Vec<LibvirtHost>,

    /// Default libvirt network for machine interfaces that name neither a network nor a bridge.
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = LIBVIRT_NAME_PATTERN))]
    pub network: Option<String>,

    /// Default storage pool for machine disks that name none. Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = LIBVIRT_NAME_PATTERN))]
    pub storage_pool: Option<String>,
}

/// A host:port endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiEndpoint {
    /// DNS name (a lowercase RFC 1123 subdomain) or IP address (1–512 characters).
    #[schemars(length(min = 1, max = 512), regex(pattern = ENDPOINT_HOST_PATTERN))]
    pub host: String,
    /// TCP port (1–65535). Defaults to 6443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// One libvirt host: a failure domain of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(r"!self.uri.matches('^qemu\\+(ssh|tls)://([^@/]*@)?(([^/:]*\\.)?[lL][oO][cC][aA][lL][hH][oO][sS][tT]|127\\.[0-9.]*|0\\.[0-9.]*|169\\.254\\.[0-9.]*|\\[(::1?|[fF][eE][89aAbB][0-9a-fA-F]:[^\\]]*)\\])(:[0-9]+)?/')").message("uri must not name the local machine, a loopback or a link-local address").field_path(".uri")
)]
pub struct LibvirtHost {
    /// Name of the host, unique in the cluster; it is the failure domain's name (DNS label).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,

    /// Libvirt connection URI: `qemu:///system` (optionally `?socket=/path/to/libvirt-sock`),
    /// `qemu+ssh://user@host[:port]/system` (parameters `no_verify`, `no_tty`,
    /// `known_hosts_verify`, `socket`), `qemu+tls://host[:port]/system` (parameter `no_verify`),
    /// or `test:///default` (the in-process test driver; only when the manager runs with
    /// `--allow-test-driver`). No percent-encoding, `;` or other parameters. At most 1024
    /// characters.
    #[schemars(length(min = 1, max = 1024), regex(pattern = HOST_URI_PATTERN))]
    pub uri: String,

    /// Secret with the credentials for `uri` (SSH key or TLS client certificate), in this
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// Whether control-plane machines may run on this host. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<bool>,

    /// Libvirt domain type: `kvm` (hardware virtualisation) or `qemu` (software emulation, for
    /// hosts without usable KVM). Defaults to `kvm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_type: Option<DomainType>,
}

/// Libvirt domain type: `kvm` (hardware virtualisation) or `qemu` (software emulation, TCG, for
/// hosts without usable KVM). Defaults to `kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// Hardware-accelerated virtualisation.
    Kvm,
    /// Software emulation (TCG).
    Qemu,
}

/// Observed state of a LibvirtCluster. Rebuilt from the spec and the hosts on every reconcile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtClusterStatus {
    /// Cluster API v1beta2 contract: provisioning progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialization: Option<Initialization>,

    /// Deprecated v1beta1 contract field, kept for older Cluster API cores: true once provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,

    /// The failure domains (one per reachable host) Cluster API may place machines in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 64))]
    pub failure_domains: Option<Vec<FailureDomain>>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions (`Ready`, `HostsReachable`, `Paused`, …), one per type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    #[schemars(length(max = 32))]
    pub conditions: Option<Vec<Condition>>,

    /// Hosts that have machines on them, with the URI the machines were created through.
    /// Maintained by the machine controller, which records a host here before it creates a VM on
    /// it. The validating webhook keeps every host listed here in `spec.hosts` with exactly this
    /// URI: it can be neither removed nor re-added under another URI while machines run on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 64))]
    pub hosts_in_use: Option<Vec<HostInUse>>,
}

/// A host with machines on it, as the machine controller recorded it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostInUse {
    /// Name of the host in `spec.hosts`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The host's URI when its first machine was created.
    #[schemars(length(min = 1, max = 1024))]
    pub uri: String,
}

/// A failure domain as the Cluster API contract describes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureDomain {
    /// Name of the failure domain (the host's name).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Whether control-plane machines may be placed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<bool>,
    /// Free-form facts about the failure domain (e.g. the host's URI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub attributes: Option<BTreeMap<String, String>>,
}

/// A template Cluster API's ClusterClass stamps LibvirtClusters from. Its spec is immutable,
/// except for Cluster API topology dry-runs (enforced by the webhook).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha1",
    kind = "LibvirtClusterTemplate",
    doc = "A template Cluster API's ClusterClass stamps LibvirtClusters from.",
    namespaced,
    shortname = "lvct",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha1"),
    label("cluster.x-k8s.io/provider", "infrastructure-libvirt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtClusterTemplateSpec {
    /// The cluster infrastructure to stamp out.
    pub template: LibvirtClusterTemplateResource,
}

/// Metadata and spec of LibvirtClusters created from a template.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtClusterTemplateResource {
    /// Labels and annotations for the created LibvirtClusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMeta>,
    /// Spec of the created LibvirtClusters.
    pub spec: LibvirtClusterSpec,
}
