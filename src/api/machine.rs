//! `LibvirtMachine` and `LibvirtMachineTemplate`: one virtual machine on one libvirt host.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    DNS_LABEL_PATTERN, Initialization, LIBVIRT_NAME_PATTERN, TemplateMeta, UUID_PATTERN, immutable,
    set_once,
};

/// One OpenSSH `authorized_keys` line: a known key type, base64 key data and an optional comment
/// free of C0/C1 control characters and DEL. (The Unicode line and paragraph separators are
/// refused by a CEL rule: regular expression syntaxes disagree on how to write them.)
pub const SSH_KEY_PATTERN: &str = r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\x00-\x1F\x7F-\x9F]*)?$";

/// The desired virtual machine. Every field but `providerID` is fixed once the machine exists:
/// Cluster API replaces machines rather than changing them.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha1",
    kind = "LibvirtMachine",
    doc = "A virtual machine on a libvirt host, the infrastructure of one Cluster API Machine.",
    namespaced,
    status = "LibvirtMachineStatus",
    shortname = "lvm",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha1"),
    label("cluster.x-k8s.io/provider", "infrastructure-libvirt"),
    printcolumn(
        name = "Cluster",
        type_ = "string",
        description = "Cluster this machine belongs to",
        json_path = ".metadata.labels['cluster\\.x-k8s\\.io/cluster-name']"
    ),
    printcolumn(
        name = "Host",
        type_ = "string",
        description = "Libvirt host (failure domain) running the machine",
        json_path = ".status.host"
    ),
    printcolumn(
        name = "State",
        type_ = "string",
        description = "State of the virtual machine on its host",
        json_path = ".status.state"
    ),
    printcolumn(
        name = "Address",
        type_ = "string",
        description = "First address of the machine",
        json_path = ".status.addresses[0].address"
    ),
    printcolumn(
        name = "ProviderID",
        type_ = "string",
        description = "Provider ID, equal to the Node's",
        json_path = ".spec.providerID"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = set_once("providerID"),
    validation = set_once("domainUUID"),
    validation = set_once("host"),
    validation = immutable("vcpus"),
    validation = immutable("cpuMode"),
    validation = immutable("memoryMiB"),
    validation = immutable("image"),
    validation = immutable("rootVolume"),
    validation = immutable("dataVolumes"),
    validation = immutable("networkInterfaces"),
    validation = immutable("firmware"),
    validation = immutable("sshAuthorizedKeys")
)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtMachineSpec {
    /// Unique identifier of the machine, equal to the `spec.providerID` of the Kubernetes Node it
    /// becomes (`libvirt://<domain UUID>`). Set by the provider once the VM exists; can be
    /// set once and never changed. 1–512 printable ASCII characters (no whitespace or control
    /// characters).
    #[serde(
        default,
        rename = "providerID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[\x21-\x7E]+$"))]
    pub provider_id: Option<String>,

    /// UUID of the machine's libvirt domain. The provider derives it once from the object's UID
    /// and records it here before it creates anything, so the machine keeps its VM through
    /// `clusterctl move` (which gives objects new UIDs and no status). Set once; leave it empty
    /// on new objects. A domain with this UUID whose metadata names another object is never
    /// touched.
    #[serde(
        default,
        rename = "domainUUID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 36, max = 36), regex(pattern = UUID_PATTERN))]
    pub domain_uuid: Option<String>,

    /// Name of the LibvirtCluster host (failure domain) the machine runs on. The provider records
    /// it when it places the machine, before it creates anything there, and finds and deletes
    /// the machine on that host from then on. Set once; leave it empty and use the Machine's
    /// `failureDomain` to choose a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub host: Option<String>,

    /// Number of virtual CPUs (1–255; QEMU's i440fx and q35 machines both boot up to 255).
    #[schemars(range(min = 1, max = 255))]
    pub vcpus: i32,

    /// Guest CPU mode (see the type's description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_mode: Option<CpuMode>,

    /// Memory of the virtual machine in MiB (256 MiB to 4 TiB). Kubernetes nodes need at least
    /// 2048 in practice.
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = 256, max = 4194304))]
    pub memory_mib: i32,

    /// The image the root disk starts from: an http(s) URL (downloaded once per host and pool, then
    /// shared as the backing file of every machine's root disk) or an existing libvirt volume.
    pub image: ImageSource,

    /// Size and storage pool of the root disk.
    pub root_volume: RootVolume,

    /// Additional empty data disks, attached after the root disk in list order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 16))]
    pub data_volumes: Option<Vec<DataVolume>>,

    /// Network interfaces, in guest PCI order. Without any, the machine gets one virtio
    /// interface on the cluster's default network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 8))]
    pub network_interfaces: Option<Vec<NetworkInterface>>,

    /// Boot firmware. Defaults to `bios`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,

    /// SSH public keys (OpenSSH `authorized_keys` lines, one key each) added to the default user
    /// through cloud-init. The key data must decode as a key of the declared type; no control
    /// characters or Unicode line separators anywhere in the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.all(k, !k.matches('[\u2028\u2029]'))").message("sshAuthorizedKeys must not contain Unicode line or paragraph separators (U+2028, U+2029)"))]
    #[schemars(
        length(max = 32),
        inner(
            length(min = 1, max = 16384),
            regex(
                pattern = SSH_KEY_PATTERN
            )
        )
    )]
    pub ssh_authorized_keys: Option<Vec<String>>,
}

/// How the guest CPU model relates to the host's: `host-passthrough` exposes the host CPU exactly
/// (best performance; guests are tied to identical hosts), `host-model` the closest named model
/// plus the host's features, `maximum` every feature the hypervisor can offer. Defaults to
/// `host-passthrough`: Cluster API replaces machines instead of migrating them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// Expose the host CPU exactly (best performance; guests are tied to identical hosts).
    HostPassthrough,
    /// Expose the closest named CPU model plus the host's features.
    HostModel,
    /// Expose every feature the hypervisor can offer.
    Maximum,
}

/// Boot firmware: `bios` (SeaBIOS) or `uefi` (OVMF, with per-machine NVRAM). Defaults to `bios`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS.
    Bios,
    /// OVMF (UEFI), with per-machine NVRAM.
    Uefi,
}

/// Where the root disk's content comes from: exactly one of `url` or `volume`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.url) != has(self.volume)").message("exactly one of image.url or image.volume must be set"),
    validation = Rule::new("!has(self.url) || has(self.checksum)").message("image.checksum is required with image.url").field_path(".checksum"),
    validation = Rule::new("has(self.url) || (!has(self.checksum) && !has(self.format))").message("image.checksum and image.format apply only to image.url"),
    validation = Rule::new("!has(self.url) || (isURL(self.url) && url(self.url).getScheme() in ['http', 'https'] && url(self.url).getHostname() != '')").message("image.url must be an absolute http or https URL with a host").field_path(".url"),
    validation = Rule::new("!has(self.url) || !self.url.matches('%(0[0-9a-fA-F]|1[0-9a-fA-F]|7[fF])')").message("image.url must not contain percent-encoded control characters (%00-%1F, %7F)").field_path(".url"),
    validation = Rule::new(r"!has(self.url) || !self.url.matches('^[hH][tT][tT][pP][sS]?://(([^/?#:]*\\.)?[lL][oO][cC][aA][lL][hH][oO][sS][tT]\\.?|127\\.[0-9.]*|0\\.[0-9.]*|169\\.254\\.[0-9.]*|\\[(::1?|[fF][eE][89aAbB][0-9a-fA-F]:[^\\]]*|::[fF][fF][fF][fF]:((127|0|169\\.254)\\.[0-9.]*|(7[fF][0-9a-fA-F]{2}|[aA]9[fF][eE]|[0-9a-fA-F]{1,2}):[0-9a-fA-F]{1,4}))\\])([:/?#]|$)')").message("image.url must not point at the local machine, a loopback or a link-local address").field_path(".url")
)]
pub struct ImageSource {
    /// http(s) URL of a disk image (up to 2048 characters, no credentials, no whitespace or
    /// control characters, raw or percent-encoded). The manager downloads it from inside the
    /// management cluster, so it must not point at the local machine, a loopback or a link-local
    /// address (cloud metadata services) in any spelling. Each host downloads it once per storage
    /// pool, verifies `checksum`, and reuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 2048),
        regex(
            pattern = r"^[hH][tT][tT][pP][sS]?://[^/?#@\x00-\x20\x7F]+([/?#][^\x00-\x20\x7F]*)?$"
        )
    )]
    pub url: Option<String>,

    /// Expected digest of the file at `url`; the download is rejected when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,

    /// Disk format (see the type's description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,

    /// An existing volume on the host, used read-only as the backing image of the root disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeReference>,
}

/// A digest of an image file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.value) == (self.type == 'sha256' ? 64 : 128)").message("checksum.value must be 64 hex digits for sha256 and 128 for sha512").field_path(".value"))]
pub struct Checksum {
    /// Digest algorithm.
    #[serde(rename = "type")]
    pub kind: ChecksumType,
    /// Hex-encoded digest (64 digits for sha256, 128 for sha512).
    #[schemars(length(min = 64, max = 128), regex(pattern = r"^[0-9a-fA-F]+$"))]
    pub value: String,
}

/// Digest algorithm: `sha256` (64 hex digits) or `sha512` (128 hex digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumType {
    /// SHA-256 (64 hex digits).
    Sha256,
    /// SHA-512 (128 hex digits).
    Sha512,
}

impl ChecksumType {
    /// The algorithm's name as written in the API (`sha256`, `sha512`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumType::Sha256 => "sha256",
            ChecksumType::Sha512 => "sha512",
        }
    }
}

/// Disk format of the file at `url`: `qcow2` or `raw`. Defaults to `qcow2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// QEMU copy-on-write v2.
    Qcow2,
    /// Raw disk image.
    Raw,
}

impl ImageFormat {
    /// The format's name as libvirt and QEMU spell it (`qcow2`, `raw`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// An existing libvirt storage volume.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReference {
    /// Storage pool holding the volume.
    #[schemars(length(min = 1, max = 64), regex(pattern = LIBVIRT_NAME_PATTERN))]
    pub pool: String,
    /// Volume name within the pool (a file name: no `/`, at most 255 characters).
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}$")
    )]
    pub name: String,
}

/// The machine's root disk: a copy-on-write overlay on the image, grown to `sizeGiB`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootVolume {
    /// Size in GiB (1–65536). Must be at least the image's virtual size.
    #[serde(rename = "sizeGiB")]
    #[schemars(range(min = 1, max = 65536))]
    pub size_gib: i32,
    /// Storage pool for the root disk. Defaults to the LibvirtCluster's `storagePool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = LIBVIRT_NAME_PATTERN))]
    pub pool: Option<String>,
}

/// An additional, empty disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolume {
    /// Name of the disk, unique within the machine (DNS label); part of the volume's name.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// Size in GiB (1–65536).
    #[serde(rename = "sizeGiB")]
    #[schemars(range(min = 1, max = 65536))]
    pub size_gib: i32,
    /// Storage pool for the disk. Defaults to the root disk's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = LIBVIRT_NAME_PATTERN))]
    pub pool: Option<String>,
}

/// A virtual NIC attached to a libvirt network or a host bridge (at most one of the two; with
/// neither, the LibvirtCluster's network).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.network) && has(self.bridge))").message("at most one of network or bridge may be set (neither means the LibvirtCluster's network)"),
    validation = Rule::new("!has(self.macAddress) || self.macAddress.matches('^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$')").message("macAddress must be six colon-separated pairs of hex digits").field_path(".macAddress"),
    validation = Rule::new("!has(self.macAddress) || self.macAddress.matches('^[0-9a-fA-F][02468aceACE]')").message("macAddress must be a unicast address (least significant bit of the first octet clear)").field_path(".macAddress"),
    validation = Rule::new("!has(self.macAddress) || self.macAddress != '00:00:00:00:00:00'").message("macAddress must not be all zeros").field_path(".macAddress")
)]
pub struct NetworkInterface {
    /// Name of the interface, unique within the machine (1–15 lowercase characters, like a Linux
    /// interface name); it keys the list and the generated MAC address.
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[a-z][a-z0-9-]{0,14}$"))]
    pub name: String,
    /// Libvirt network to attach to. Defaults to the LibvirtCluster's `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = LIBVIRT_NAME_PATTERN))]
    pub network: Option<String>,
    /// Host bridge to attach to (a Linux interface name, at most 15 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
    )]
    pub bridge: Option<String>,
    /// MAC address (`52:54:00:12:34:56`). Unicast only. Derived from the machine's UID and the
    /// interface name when omitted, so it is stable across re-creation of the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 17, max = 17))]
    pub mac_address: Option<String>,
    /// Device model. Defaults to `virtio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<NicModel>,
}

/// Emulated NIC model: `virtio` (paravirtualised, fastest, supported by every cloud image),
/// `e1000`, `e1000e` or `rtl8139`. Defaults to `virtio`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// Paravirtualised NIC (fastest; needs virtio drivers, present in every cloud image).
    Virtio,
    /// Intel 82540EM.
    E1000,
    /// Intel 82574L.
    E1000e,
    /// Realtek 8139.
    Rtl8139,
}

/// Observed state of a LibvirtMachine. Everything here can be rebuilt from the spec and the
/// hypervisor (what `clusterctl move` relies on).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtMachineStatus {
    /// Cluster API v1beta2 contract: provisioning progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialization: Option<Initialization>,

    /// Deprecated v1beta1 contract field, kept for older Cluster API cores: true once provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,

    /// Addresses of the machine; the last known address is kept when a source goes quiet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub addresses: Option<Vec<MachineAddress>>,

    /// The failure domain (libvirt host name) the machine runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub failure_domain: Option<String>,

    /// Name of the LibvirtCluster host running the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub host: Option<String>,

    /// UUID of the libvirt domain.
    #[serde(
        default,
        rename = "domainUUID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 36))]
    pub domain_uuid: Option<String>,

    /// State of the domain as libvirt reports it (e.g. `running`, `shutoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub state: Option<String>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions (`Ready`, `VMProvisioned`, `Paused`, …), one per type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    #[schemars(length(max = 32))]
    pub conditions: Option<Vec<Condition>>,
}

/// One address of a machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineAddress {
    /// Kind of address.
    #[serde(rename = "type")]
    pub kind: MachineAddressType,
    /// The address (an IP or a DNS name).
    #[schemars(length(min = 1, max = 256))]
    pub address: String,
}

/// Kind of address: `Hostname`, `ExternalIP`, `InternalIP`, `ExternalDNS` or `InternalDNS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum MachineAddressType {
    /// The machine's host name.
    Hostname,
    /// An IP reachable from outside the cluster.
    #[serde(rename = "ExternalIP")]
    ExternalIp,
    /// An IP reachable within the cluster.
    #[serde(rename = "InternalIP")]
    InternalIp,
    /// A DNS name reachable from outside the cluster.
    #[serde(rename = "ExternalDNS")]
    ExternalDns,
    /// A DNS name reachable within the cluster.
    #[serde(rename = "InternalDNS")]
    InternalDns,
}

/// A template Cluster API stamps LibvirtMachines from (MachineDeployments, control planes).
/// Its spec is immutable, except for Cluster API topology dry-runs (enforced by the webhook).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha1",
    kind = "LibvirtMachineTemplate",
    doc = "A template Cluster API stamps LibvirtMachines from (MachineDeployments, control planes).",
    namespaced,
    status = "LibvirtMachineTemplateStatus",
    shortname = "lvmt",
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
pub struct LibvirtMachineTemplateSpec {
    /// The machine to stamp out.
    pub template: LibvirtMachineTemplateResource,
}

/// Metadata and spec of machines created from a template. The per-machine fields `providerID`,
/// `domainUUID` and `host` stay empty: the provider sets them on each machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.spec.providerID) && !has(self.spec.domainUUID) && !has(self.spec.host)").message("spec.providerID, spec.domainUUID and spec.host are set by the provider on each machine; a template must leave them empty").field_path(".spec")
)]
pub struct LibvirtMachineTemplateResource {
    /// Labels and annotations for the created machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMeta>,
    /// Spec of the created machines.
    pub spec: LibvirtMachineSpec,
}

/// Observed state of a LibvirtMachineTemplate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtMachineTemplateStatus {
    /// Resources of one machine (`cpu`, `memory`), for the cluster autoscaler's scale from zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub capacity: Option<BTreeMap<String, Quantity>>,
}
