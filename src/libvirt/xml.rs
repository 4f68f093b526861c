//! Libvirt domain XML from typed structs (quick-xml + serde): every value is escaped by
//! construction, so nothing a user writes can add elements or attributes.

use serde::Serialize;

use super::identity::{Mac, MachineIdentity};
use crate::api::{CpuMode, DomainType, Firmware, NicModel};

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
    /// The hypervisor the domain runs on.
    pub hypervisor: Hypervisor,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The CPU model exposed to the guest (TCG turns host modes into `maximum`).
    pub cpu_mode: CpuMode,
    /// Boot firmware.
    pub firmware: Firmware,
    /// Disks, in target order.
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

/// The domain type: the API's [`DomainType`] on real hosts, `test` on libvirt's test driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (TCG).
    Qemu,
    /// Libvirt's in-process test driver.
    Test,
}

impl From<DomainType> for Hypervisor {
    fn from(value: DomainType) -> Self {
        match value {
            DomainType::Kvm => Hypervisor::Kvm,
            DomainType::Qemu => Hypervisor::Qemu,
        }
    }
}

impl Hypervisor {
    fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Kvm => "kvm",
            Hypervisor::Qemu => "qemu",
            Hypervisor::Test => "test",
        }
    }
}

fn cpu_mode_str(mode: CpuMode) -> &'static str {
    match mode {
        CpuMode::HostPassthrough => "host-passthrough",
        CpuMode::HostModel => "host-model",
        CpuMode::Maximum => "maximum",
    }
}

fn nic_model_str(model: NicModel) -> &'static str {
    match model {
        NicModel::Virtio => "virtio",
        NicModel::E1000 => "e1000",
        NicModel::E1000e => "e1000e",
        NicModel::Rtl8139 => "rtl8139",
    }
}

/// Kernel, initrd and command line on the host, booted directly.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectBoot {
    /// Host path of the kernel.
    pub kernel: String,
    /// Host path of the initrd.
    pub initrd: String,
    /// Kernel command line.
    pub cmdline: String,
}

/// A disk backed by a storage volume.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskPlan {
    /// Pool of the volume.
    pub pool: String,
    /// Name of the volume.
    pub volume: String,
    /// Guest device name (`vda`, `vdb`, … or `sda` for the CD-ROM).
    pub target: String,
    /// A read-only CD-ROM (the NoCloud seed) instead of a virtio disk.
    pub cdrom: bool,
}

/// A NIC on a libvirt network or a host bridge.
#[derive(Clone, Debug, PartialEq)]
pub struct InterfacePlan {
    /// What the NIC is plugged into.
    pub source: InterfaceSource,
    /// Its MAC address.
    pub mac: Mac,
    /// The emulated device.
    pub model: NicModel,
}

/// What a NIC is plugged into.
#[derive(Clone, Debug, PartialEq)]
pub enum InterfaceSource {
    /// A libvirt network, by name.
    Network(String),
    /// A host bridge, by name.
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
    pub fn effective_cpu_mode(&self) -> &'static str {
        match (self.hypervisor, self.cpu_mode) {
            (Hypervisor::Qemu, CpuMode::HostPassthrough | CpuMode::HostModel) => "maximum",
            (_, mode) => cpu_mode_str(mode),
        }
    }

    /// The domain XML for this plan.
    pub fn to_xml(&self) -> Result<String, quick_xml::SeError> {
        let domain = Domain {
            kind: self.hypervisor.as_str().to_owned(),
            name: self.identity.domain_name(),
            uuid: self.identity.domain_uuid().to_string(),
            metadata: Metadata {
                machine: MachineMetadata {
                    xmlns: METADATA_NAMESPACE,
                    namespace: self.identity.namespace.clone(),
                    name: self.identity.name.clone(),
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
                firmware: (self.firmware == Firmware::Uefi).then_some("efi"),
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
            kind: nic_model_str(plan.model).to_owned(),
        },
    }
}

/// A storage volume to create: empty, or a copy-on-write overlay on a backing image.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumePlan {
    /// Volume name.
    pub name: String,
    /// Capacity in GiB.
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

/// The owner recorded in a domain's `capl:machine` metadata element.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedOwner {
    /// Namespace of the LibvirtMachine.
    pub namespace: String,
    /// Name of the LibvirtMachine.
    pub name: String,
    /// Name of the Cluster API cluster.
    pub cluster: String,
}

/// Reads our metadata element (as `virDomainGetMetadata` returns it, or anywhere in a whole
/// domain XML); `None` when the domain has none.
pub fn parse_owner(xml: &str) -> Option<RecordedOwner> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut inside = false;
    let mut field: Option<Vec<u8>> = None;
    let mut owner = RecordedOwner::default();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                let local = e.local_name().as_ref().as_bytes().to_vec();
                if local == b"machine" {
                    inside = true;
                } else if inside {
                    field = Some(local);
                }
            }
            Ok(Event::End(e)) => {
                if e.local_name().as_ref() == "machine" && inside {
                    return (!owner.name.is_empty()).then_some(owner);
                }
                field = None;
            }
            Ok(Event::Text(t)) => {
                if let (true, Some(f)) = (inside, field.as_deref()) {
                    let text = t.xml10_content().into_owned();
                    match f {
                        b"namespace" => owner.namespace.push_str(&text),
                        b"name" => owner.name.push_str(&text),
                        b"cluster" => owner.cluster.push_str(&text),
                        _ => {}
                    }
                }
            }
            Ok(Event::GeneralRef(r)) => {
                if let (true, Some(f)) = (inside, field.as_deref()) {
                    let name = r.xml10_content().into_owned();
                    let text = quick_xml::escape::unescape(&format!("&{name};"))
                        .map(|c| c.into_owned())
                        .unwrap_or_default();
                    match f {
                        b"namespace" => owner.namespace.push_str(&text),
                        b"name" => owner.name.push_str(&text),
                        b"cluster" => owner.cluster.push_str(&text),
                        _ => {}
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => return None,
            _ => {}
        }
    }
}

/// Host files and volumes a domain definition refers to: where its volumes are, whatever pools
/// a caller knows about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainSources {
    /// (pool, volume) of `type='volume'` disks.
    pub volumes: Vec<(String, String)>,
    /// Host paths: file disks, fw_cfg entries, the serial console log.
    pub paths: Vec<String>,
    /// The serial console's log file.
    pub serial_log: Option<String>,
}

/// The serial console's log file named in a domain XML.
pub fn parse_serial_log(xml: &str) -> Option<String> {
    parse_sources(xml).serial_log
}

/// Parses the sources out of a domain XML.
pub fn parse_sources(xml: &str) -> DomainSources {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut sources = DomainSources::default();
    let mut stack: Vec<Vec<u8>> = Vec::new();
    loop {
        let event = reader.read_event();
        let (element, empty) = match &event {
            Ok(Event::Start(e)) => (Some(e.clone()), false),
            Ok(Event::Empty(e)) => (Some(e.clone()), true),
            Ok(Event::End(_)) => {
                stack.pop();
                continue;
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => continue,
        };
        let Some(e) = element else { continue };
        let name = e.local_name().as_ref().as_bytes().to_vec();
        let parent = stack.last().map(Vec::as_slice);
        let value = |key: &[u8]| -> Option<String> {
            e.attributes().flatten().find_map(|a| {
                (a.key.as_ref().as_bytes() == key).then(|| {
                    a.normalized_value(quick_xml::XmlVersion::default())
                        .map(|v| v.into_owned())
                        .unwrap_or_default()
                })
            })
        };
        match (parent, name.as_slice()) {
            (Some(b"disk"), b"source") => {
                if let (Some(pool), Some(volume)) = (value(b"pool"), value(b"volume")) {
                    sources.volumes.push((pool, volume));
                } else if let Some(file) = value(b"file") {
                    sources.paths.push(file);
                }
            }
            (Some(b"serial"), b"log") => {
                if let Some(file) = value(b"file") {
                    sources.serial_log.get_or_insert(file.clone());
                    sources.paths.push(file);
                }
            }
            (Some(b"sysinfo"), b"entry") | (Some(b"console"), b"log") => {
                if let Some(file) = value(b"file") {
                    sources.paths.push(file);
                }
            }
            _ => {}
        }
        if !empty {
            stack.push(name);
        }
    }
    sources.paths.sort();
    sources.paths.dedup();
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_sources_read_back_from_libvirt_xml() {
        let owner = parse_owner(&format!(
            "<capl:machine xmlns:capl=\"{METADATA_NAMESPACE}\"><capl:namespace>ns</capl:namespace>\
             <capl:name>m&amp;1</capl:name><capl:uid>old</capl:uid><capl:cluster>c</capl:cluster></capl:machine>"
        ))
        .expect("owner");
        assert_eq!(
            (
                owner.namespace.as_str(),
                owner.name.as_str(),
                owner.cluster.as_str()
            ),
            ("ns", "m&1", "c")
        );
        assert_eq!(parse_owner("<other/>"), None);

        let sources = parse_sources(
            "<domain><devices>\
               <disk type='volume'><source pool='p' volume='v-root'/></disk>\
               <disk type='file'><source file='/img/v-data'/></disk>\
               <serial type='pty'><log file='/img/v-serial.log' append='on'/></serial>\
             </devices><sysinfo type='fwcfg'><entry name='opt/com.coreos/config' file='/img/v-ign'/></sysinfo></domain>",
        );
        assert_eq!(sources.volumes, vec![("p".into(), "v-root".into())]);
        assert_eq!(
            sources.paths,
            vec!["/img/v-data", "/img/v-ign", "/img/v-serial.log"]
        );
        assert_eq!(sources.serial_log.as_deref(), Some("/img/v-serial.log"));
    }
}
