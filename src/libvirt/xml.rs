//! Libvirt domain XML from typed structs (quick-xml + serde): every value is escaped by
//! construction, so nothing a user writes can add elements or attributes.

use serde::Serialize;

use super::identity::{Mac, MachineIdentity};

/// XML namespace of the metadata element recording the owning object.
pub const METADATA_NAMESPACE: &str =
    "https://cluster-api-provider-libvirt.sigs.k8s.io/machine/v1alpha1";

/// Everything that decides a domain's definition, resolved from the LibvirtMachine, its cluster
/// and its host.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainPlan {
    pub identity: MachineIdentity,
    /// Name of the owning Cluster API cluster.
    pub cluster: String,
    /// `kvm`, `qemu` or (for `test://` hosts) `test`.
    pub domain_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// `host-passthrough`, `host-model` or `maximum`.
    pub cpu_mode: String,
    pub uefi: bool,
    pub disks: Vec<DiskPlan>,
    pub interfaces: Vec<InterfacePlan>,
    /// Where the host keeps the serial console's log (boot diagnostics).
    pub serial_log: Option<String>,
    /// QEMU fw_cfg entries backed by host files: (name, path), e.g. Ignition's
    /// `opt/com.coreos/config`.
    pub fw_cfg: Vec<(String, String)>,
    /// Boot a kernel directly instead of the root disk's boot loader.
    pub direct_boot: Option<DirectBoot>,
}

/// Kernel, initrd and command line on the host, booted directly.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectBoot {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

/// A disk backed by a storage volume.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskPlan {
    pub pool: String,
    pub volume: String,
    /// Guest device name (`vda`, `vdb`, … or `sda` for the CD-ROM).
    pub target: String,
    pub cdrom: bool,
}

/// A NIC on a libvirt network or a host bridge.
#[derive(Clone, Debug, PartialEq)]
pub struct InterfacePlan {
    pub source: InterfaceSource,
    pub mac: Mac,
    pub model: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum InterfaceSource {
    Network(String),
    Bridge(String),
}

#[derive(Serialize)]
#[serde(rename = "domain")]
struct Domain {
    #[serde(rename = "@type")]
    kind: String,
    name: String,
    uuid: String,
    metadata: Metadata,
    memory: Memory,
    vcpu: u32,
    cpu: Cpu,
    os: Os,
    #[serde(skip_serializing_if = "Option::is_none")]
    sysinfo: Option<Sysinfo>,
    features: Features,
    on_poweroff: &'static str,
    on_reboot: &'static str,
    on_crash: &'static str,
    devices: Devices,
}

#[derive(Serialize)]
struct Metadata {
    #[serde(rename = "capl:machine")]
    machine: MachineMetadata,
}

#[derive(Serialize)]
struct MachineMetadata {
    #[serde(rename = "@xmlns:capl")]
    xmlns: &'static str,
    #[serde(rename = "capl:namespace")]
    namespace: String,
    #[serde(rename = "capl:name")]
    name: String,
    #[serde(rename = "capl:uid")]
    uid: String,
    #[serde(rename = "capl:cluster")]
    cluster: String,
}

#[derive(Serialize)]
struct Memory {
    #[serde(rename = "@unit")]
    unit: &'static str,
    #[serde(rename = "$text")]
    value: u64,
}

#[derive(Serialize)]
struct Cpu {
    #[serde(rename = "@mode")]
    mode: String,
}

#[derive(Serialize)]
struct Os {
    #[serde(rename = "@firmware", skip_serializing_if = "Option::is_none")]
    firmware: Option<&'static str>,
    #[serde(rename = "type")]
    kind: OsType,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
    boot: Vec<Boot>,
}

#[derive(Serialize)]
struct OsType {
    #[serde(rename = "@arch")]
    arch: &'static str,
    #[serde(rename = "$text")]
    value: &'static str,
}

#[derive(Serialize)]
struct Boot {
    #[serde(rename = "@dev")]
    dev: &'static str,
}

#[derive(Serialize)]
struct Sysinfo {
    #[serde(rename = "@type")]
    kind: &'static str,
    entry: Vec<SysinfoEntry>,
}

#[derive(Serialize)]
struct SysinfoEntry {
    #[serde(rename = "@name")]
    name: String,
    #[serde(rename = "@file")]
    file: String,
}

#[derive(Serialize)]
struct Features {
    acpi: Empty,
    apic: Empty,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Devices {
    disk: Vec<Disk>,
    interface: Vec<Interface>,
    serial: Serial,
    console: Console,
    channel: Channel,
}

#[derive(Serialize)]
struct Disk {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@device")]
    device: &'static str,
    driver: DiskDriver,
    source: VolumeSource,
    target: Target,
    #[serde(skip_serializing_if = "Option::is_none")]
    readonly: Option<Empty>,
}

#[derive(Serialize)]
struct DiskDriver {
    #[serde(rename = "@name")]
    name: &'static str,
    #[serde(rename = "@type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct VolumeSource {
    #[serde(rename = "@pool")]
    pool: String,
    #[serde(rename = "@volume")]
    volume: String,
}

#[derive(Serialize)]
struct Target {
    #[serde(rename = "@dev")]
    dev: String,
    #[serde(rename = "@bus")]
    bus: &'static str,
}

#[derive(Serialize)]
struct Interface {
    #[serde(rename = "@type")]
    kind: &'static str,
    mac: MacAddress,
    source: InterfaceSourceXml,
    model: Model,
}

#[derive(Serialize)]
struct MacAddress {
    #[serde(rename = "@address")]
    address: String,
}

#[derive(Serialize)]
struct InterfaceSourceXml {
    #[serde(rename = "@network", skip_serializing_if = "Option::is_none")]
    network: Option<String>,
    #[serde(rename = "@bridge", skip_serializing_if = "Option::is_none")]
    bridge: Option<String>,
}

#[derive(Serialize)]
struct Model {
    #[serde(rename = "@type")]
    kind: String,
}

#[derive(Serialize)]
struct Serial {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<Log>,
}

#[derive(Serialize)]
struct Log {
    #[serde(rename = "@file")]
    file: String,
    #[serde(rename = "@append")]
    append: &'static str,
}

#[derive(Serialize)]
struct Console {
    #[serde(rename = "@type")]
    kind: &'static str,
}

/// The QEMU guest agent's virtio-serial channel (one of the address sources).
#[derive(Serialize)]
struct Channel {
    #[serde(rename = "@type")]
    kind: &'static str,
    target: ChannelTarget,
}

#[derive(Serialize)]
struct ChannelTarget {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@name")]
    name: &'static str,
}

impl DomainPlan {
    /// The CPU mode libvirt can honour: software emulation (`qemu` domains) has no host CPU to
    /// pass through or model, so those modes become `maximum` there.
    pub fn effective_cpu_mode(&self) -> &str {
        match (self.domain_type.as_str(), self.cpu_mode.as_str()) {
            ("qemu", "host-passthrough" | "host-model") => "maximum",
            (_, mode) => mode,
        }
    }

    /// The domain XML for this plan.
    pub fn to_xml(&self) -> Result<String, quick_xml::SeError> {
        let domain = Domain {
            kind: self.domain_type.clone(),
            name: self.identity.domain_name(),
            uuid: self.identity.domain_uuid().to_string(),
            metadata: Metadata {
                machine: MachineMetadata {
                    xmlns: METADATA_NAMESPACE,
                    namespace: self.identity.namespace.clone(),
                    name: self.identity.name.clone(),
                    uid: self.identity.uid.clone(),
                    cluster: self.cluster.clone(),
                },
            },
            memory: Memory {
                unit: "MiB",
                value: self.memory_mib,
            },
            vcpu: self.vcpus,
            cpu: Cpu {
                mode: self.effective_cpu_mode().to_owned(),
            },
            os: Os {
                firmware: self.uefi.then_some("efi"),
                kind: OsType {
                    arch: "x86_64",
                    value: "hvm",
                },
                kernel: self.direct_boot.as_ref().map(|b| b.kernel.clone()),
                initrd: self.direct_boot.as_ref().map(|b| b.initrd.clone()),
                cmdline: self.direct_boot.as_ref().map(|b| b.cmdline.clone()),
                boot: if self.direct_boot.is_some() {
                    vec![]
                } else {
                    vec![Boot { dev: "hd" }]
                },
            },
            sysinfo: (!self.fw_cfg.is_empty()).then(|| Sysinfo {
                kind: "fwcfg",
                entry: self
                    .fw_cfg
                    .iter()
                    .map(|(name, file)| SysinfoEntry {
                        name: name.clone(),
                        file: file.clone(),
                    })
                    .collect(),
            }),
            features: Features {
                acpi: Empty {},
                apic: Empty {},
            },
            on_poweroff: "destroy",
            on_reboot: "restart",
            on_crash: "destroy",
            devices: Devices {
                disk: self.disks.iter().map(disk).collect(),
                interface: self.interfaces.iter().map(interface).collect(),
                serial: Serial {
                    kind: "pty",
                    log: self.serial_log.as_ref().map(|file| Log {
                        file: file.clone(),
                        append: "on",
                    }),
                },
                console: Console { kind: "pty" },
                channel: Channel {
                    kind: "unix",
                    target: ChannelTarget {
                        kind: "virtio",
                        name: "org.qemu.guest_agent.0",
                    },
                },
            },
        };
        let mut xml = String::new();
        let mut serializer = quick_xml::se::Serializer::new(&mut xml);
        serializer.indent(' ', 2);
        domain.serialize(serializer)?;
        Ok(xml)
    }
}

fn disk(plan: &DiskPlan) -> Disk {
    Disk {
        kind: "volume",
        device: if plan.cdrom { "cdrom" } else { "disk" },
        driver: DiskDriver {
            name: "qemu",
            kind: if plan.cdrom { "raw" } else { "qcow2" },
        },
        source: VolumeSource {
            pool: plan.pool.clone(),
            volume: plan.volume.clone(),
        },
        target: Target {
            dev: plan.target.clone(),
            bus: if plan.cdrom { "sata" } else { "virtio" },
        },
        readonly: plan.cdrom.then_some(Empty {}),
    }
}

fn interface(plan: &InterfacePlan) -> Interface {
    let (kind, source) = match &plan.source {
        InterfaceSource::Network(network) => (
            "network",
            InterfaceSourceXml {
                network: Some(network.clone()),
                bridge: None,
            },
        ),
        InterfaceSource::Bridge(bridge) => (
            "bridge",
            InterfaceSourceXml {
                network: None,
                bridge: Some(bridge.clone()),
            },
        ),
    };
    Interface {
        kind,
        mac: MacAddress {
            address: plan.mac.to_string(),
        },
        source,
        model: Model {
            kind: plan.model.clone(),
        },
    }
}

/// A storage volume to create: empty, or a copy-on-write overlay on a backing image.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumePlan {
    pub name: String,
    pub capacity_gib: u64,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Path and format of the backing image of an overlay (creation cost independent of its size).
    pub backing: Option<(String, String)>,
}

#[derive(Serialize)]
#[serde(rename = "volume")]
struct Volume {
    name: String,
    capacity: Capacity,
    target: VolumeTarget,
    #[serde(rename = "backingStore", skip_serializing_if = "Option::is_none")]
    backing_store: Option<BackingStore>,
}

#[derive(Serialize)]
struct Capacity {
    #[serde(rename = "@unit")]
    unit: &'static str,
    #[serde(rename = "$text")]
    value: u64,
}

#[derive(Serialize)]
struct VolumeTarget {
    format: Format,
}

#[derive(Serialize)]
struct Format {
    #[serde(rename = "@type")]
    kind: String,
}

#[derive(Serialize)]
struct BackingStore {
    path: String,
    format: Format,
}

impl VolumePlan {
    /// The storage volume XML for this plan.
    pub fn to_xml(&self) -> Result<String, quick_xml::SeError> {
        let volume = Volume {
            name: self.name.clone(),
            capacity: Capacity {
                unit: "GiB",
                value: self.capacity_gib,
            },
            target: VolumeTarget {
                format: Format {
                    kind: self.format.clone(),
                },
            },
            backing_store: self.backing.as_ref().map(|(path, format)| BackingStore {
                path: path.clone(),
                format: Format {
                    kind: format.clone(),
                },
            }),
        };
        quick_xml::se::to_string(&volume)
    }
}
