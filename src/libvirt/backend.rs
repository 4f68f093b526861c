//! The seam controllers stand on: the [`Backend`] trait with typed requests and results, the
//! same for libvirt ([`super::live::LibvirtBackend`], real hosts and the test driver) and the
//! in-memory [`super::fake::FakeBackend`].
//!
//! Creation and deletion are poll-style: a call starts (or continues) the work and returns at
//! once; the controller requeues and calls again. Long work (image download, a guest's graceful
//! shutdown) never holds a call or a host permit while it waits.

use std::future::Future;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::HostVersions;
use super::error::{BackendError, Step};
use super::identity::MachineIdentity;
use super::image::ImageRequest;
use super::machine::{DomainStatus, GuestAddress, HostFacts, Inventory};
use super::uri::HostUri;
use super::volumes::PoolSpace;
use super::xml::DirectBoot;
use crate::api::{CpuMode, DomainType, Firmware};
use crate::cloudinit::{Seed, Sensitive};

pub use super::xml::{InterfacePlan as Nic, InterfaceSource as NicSource};

/// A host a machine runs on, validated: the URI passed the allowlist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRef {
    /// The host's name in the LibvirtCluster (also its failure domain).
    pub name: String,
    /// Its libvirt URI.
    pub uri: HostUri,
    /// The domain type machines on it get (`test` is used instead on libvirt's test driver).
    pub domain_type: DomainType,
}

/// Where the root disk's content comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum BaseImage {
    /// Downloaded once per host and pool, verified by its checksum.
    Url(ImageRequest),
    /// A volume already on the host.
    Volume {
        /// Pool holding the volume.
        pool: String,
        /// Volume name.
        name: String,
    },
}

/// An empty data disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDisk {
    /// Name of the disk in the spec (part of the volume name).
    pub name: String,
    /// Size in GiB.
    pub size_gib: u64,
    /// Pool the volume is created in.
    pub pool: String,
}

/// Bootstrap data in the format the bootstrap provider wrote. Never printed.
#[derive(Clone, Debug, PartialEq)]
pub enum Bootstrap {
    /// `cloud-config`: delivered on a NoCloud seed ISO attached as a CD-ROM.
    CloudConfig(Seed),
    /// `ignition`: delivered through QEMU fw_cfg `opt/com.coreos/config`.
    Ignition(Sensitive<Vec<u8>>),
}

impl Bootstrap {
    /// Size of the bootstrap data in bytes.
    pub fn len(&self) -> usize {
        match self {
            Bootstrap::CloudConfig(seed) => seed.user_data.expose().len(),
            Bootstrap::Ignition(config) => config.expose().len(),
        }
    }

    /// Whether the bootstrap data is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything needed to create one machine on one host.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineRequest {
    /// Who the machine belongs to (its persisted UUID included).
    pub identity: MachineIdentity,
    /// Name of the Cluster API cluster (recorded in the domain's metadata).
    pub cluster: String,
    /// The host to create it on.
    pub host: HostRef,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// CPU model exposed to the guest.
    pub cpu_mode: CpuMode,
    /// Boot firmware.
    pub firmware: Firmware,
    /// Pool of the root disk and the bootstrap volume.
    pub pool: String,
    /// The root disk's base image.
    pub image: BaseImage,
    /// Root disk size in GiB.
    pub root_gib: u64,
    /// Data disks, in order (`vdb`, `vdc`, …).
    pub data_disks: Vec<DataDisk>,
    /// Network interfaces, in order.
    pub interfaces: Vec<Nic>,
    /// Bootstrap data, if any.
    pub bootstrap: Option<Bootstrap>,
    /// Boot a kernel directly (tests and appliance images); `None` boots the root disk.
    pub direct_boot: Option<DirectBoot>,
}

/// What happened to a machine's bootstrap data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootstrapDelivery {
    /// Written to this volume, attached to the domain.
    Delivered {
        /// Name of the volume holding it.
        volume: String,
    },
    /// Not written, and why; the guest did not get it.
    NotDelivered {
        /// Why (e.g. the test driver cannot store volume content).
        reason: String,
        /// How many bytes would have been written.
        bytes: u64,
    },
}

/// The state of a created machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    /// The domain as libvirt reports it.
    pub domain: DomainStatus,
    /// What happened to the bootstrap data (`None` when the request had none).
    pub bootstrap: Option<BootstrapDelivery>,
}

/// Progress of [`Backend::ensure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provisioning {
    /// Creation runs in the background; this is the step it is at. Call again later.
    InProgress {
        /// The step being worked on.
        step: Step,
    },
    /// The machine exists and runs.
    Ready(MachineState),
}

/// Progress of [`Backend::delete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// The guest was asked to shut down; call again after it is off or after `deadline`, when it
    /// is stopped hard. The deadline is kept in memory: after a manager restart the grace period
    /// starts again.
    ShuttingDown {
        /// When the guest is stopped hard.
        deadline: Instant,
    },
    /// No domain and no volume of the machine is left on the host.
    Gone,
}

/// A domain carrying our metadata (input of an orphan sweep).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedDomain {
    /// The domain's UUID.
    pub uuid: Uuid,
    /// Namespace of the owning LibvirtMachine.
    pub namespace: String,
    /// Name of the owning LibvirtMachine.
    pub name: String,
    /// Cluster API cluster it was created for.
    pub cluster: String,
}

/// Every hypervisor operation a reconcile needs. A domain found by the machine's UUID whose
/// metadata names another object is never touched: every method fails with
/// [`super::error::ErrorKind::Conflict`] instead.
pub trait Backend: Send + Sync + 'static {
    /// Starts (or continues) creating the machine in the background and returns at once. A
    /// background attempt's error is returned once, by the next call; the call after that starts
    /// a new attempt.
    fn ensure(
        &self,
        request: &MachineRequest,
    ) -> impl Future<Output = Result<Provisioning, BackendError>> + Send;

    /// The machine's domain, `None` when it has none on the host.
    fn status(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> impl Future<Output = Result<Option<DomainStatus>, BackendError>> + Send;

    /// Removes the machine: cancels its background work, asks a running guest to shut down
    /// (once) and returns [`Deletion::ShuttingDown`]; once the guest is off or `grace` has passed,
    /// stops it, removes the definition and every volume it owns in any pool and returns
    /// [`Deletion::Gone`]. Never returns `Gone` while a domain with the machine's UUID exists.
    fn delete(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
        grace: Duration,
    ) -> impl Future<Output = Result<Deletion, BackendError>> + Send;

    /// Everything the machine owns on the host (its domain, its volumes in every pool).
    fn inventory(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> impl Future<Output = Result<Inventory, BackendError>> + Send;

    /// The guest's addresses (DHCP leases and guest agent).
    fn addresses(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> impl Future<Output = Result<Vec<GuestAddress>, BackendError>> + Send;

    /// The last `max` bytes of the machine's serial console.
    fn console_tail(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
        max: u64,
    ) -> impl Future<Output = Result<String, BackendError>> + Send;

    /// CPUs, memory and the free space of `pool` on the host (placement input).
    fn capacity(
        &self,
        host: &HostRef,
        pool: &str,
    ) -> impl Future<Output = Result<(HostFacts, PoolSpace), BackendError>> + Send;

    /// Library, driver and hypervisor versions of the host.
    fn versions(
        &self,
        host: &HostRef,
    ) -> impl Future<Output = Result<HostVersions, BackendError>> + Send;

    /// Every domain on the host that carries our metadata.
    fn list_machines(
        &self,
        host: &HostRef,
    ) -> impl Future<Output = Result<Vec<OwnedDomain>, BackendError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_never_print_bootstrap_data() {
        let identity = MachineIdentity::new("ns", "m", MachineIdentity::uuid_for_uid("uid"));
        let request = MachineRequest {
            identity: identity.clone(),
            cluster: "c".into(),
            host: HostRef {
                name: "h".into(),
                uri: HostUri::parse(
                    "test:///default",
                    super::super::uri::UriPolicy {
                        allow_test_driver: true,
                    },
                )
                .expect("uri"),
                domain_type: DomainType::Kvm,
            },
            vcpus: 1,
            memory_mib: 64,
            cpu_mode: CpuMode::Maximum,
            firmware: Firmware::Bios,
            pool: "p".into(),
            image: BaseImage::Volume {
                pool: "p".into(),
                name: "v".into(),
            },
            root_gib: 1,
            data_disks: vec![],
            interfaces: vec![],
            bootstrap: Some(Bootstrap::CloudConfig(Seed {
                user_data: Sensitive::new(b"#cloud-config\ntoken: marker-c10ud".to_vec()),
                meta_data: crate::cloudinit::MetaData {
                    instance_id: "i".into(),
                    local_hostname: "h".into(),
                    provider_id: "p".into(),
                },
                network_config: None,
            })),
            direct_boot: None,
        };
        let printed = format!("{request:?}");
        assert!(!printed.contains("marker-c10ud"), "{printed}");
        let ignition = MachineRequest {
            bootstrap: Some(Bootstrap::Ignition(Sensitive::new(
                b"{\"marker-1gn\":1}".to_vec(),
            ))),
            ..request
        };
        let printed = format!("{ignition:#?}");
        assert!(!printed.contains("marker-1gn"), "{printed}");
        assert!(printed.contains("[redacted]"));
    }
}
