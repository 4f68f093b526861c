//! Machine lifecycle on one host: idempotent create (look up by UUID first, and only ever touch
//! a domain whose metadata names the machine), leak-free delete, and an inventory of everything a
//! machine owns. Blocking: run off the async runtime.

use std::time::{Duration, Instant};

use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;
use virt::sys;

use super::backend::{Deletion, OwnedDomain};
use super::error::{BackendError, Step};
use super::identity::MachineIdentity;
use super::xml::{self, DomainPlan, DomainSources, METADATA_NAMESPACE};
use super::{Error, Host, Result};

/// The observed state of a machine's domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainStatus {
    /// The domain's UUID.
    pub uuid: String,
    /// The domain's name.
    pub name: String,
    /// libvirt's state, lowercase (`running`, `shutoff`, `paused`, …).
    pub state: String,
}

impl DomainStatus {
    /// Whether the domain runs.
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// A volume a machine owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedVolume {
    /// Its pool (empty when it was found only by its path in the domain definition).
    pub pool: String,
    /// Its name (always starts with the machine's volume prefix).
    pub name: String,
    /// Its host path.
    pub path: String,
}

/// Everything a machine owns on a host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Name of the machine's domain, if defined.
    pub domain: Option<String>,
    /// Every volume carrying the machine's prefix, in any pool, or referenced by its domain.
    pub volumes: Vec<OwnedVolume>,
}

impl Inventory {
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.domain.is_none() && self.volumes.is_empty()
    }
}

/// Whether a libvirt error means "it is not there".
pub fn is_not_found(error: &virt::error::Error) -> bool {
    matches!(
        error.code().known(),
        Some(ErrorNumber::NoDomain | ErrorNumber::NoStorageVolume | ErrorNumber::NoStoragePool)
    )
}

fn state_name(state: DomainState) -> &'static str {
    match state {
        DomainState::NoState => "nostate",
        DomainState::Running => "running",
        DomainState::Blocked => "blocked",
        DomainState::Paused => "paused",
        DomainState::Shutdown => "shuttingdown",
        DomainState::Shutoff => "shutoff",
        DomainState::Crashed => "crashed",
        DomainState::PMSuspended => "pmsuspended",
    }
}

/// `VIR_DOMAIN_METADATA_ELEMENT`: custom XML under our namespace.
const METADATA_ELEMENT: i32 = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;

impl Host {
    fn call_error(&self, call: &'static str) -> impl Fn(virt::error::Error) -> Error + '_ {
        move |error| self.call(call, error)
    }

    /// The domain with the machine's UUID, whoever owns it.
    fn domain_by_uuid(&self, identity: &MachineIdentity) -> Result<Option<Domain>> {
        match self
            .connection()
            .lookup_domain_by_uuid_string(&identity.domain_uuid().to_string())
        {
            Ok(domain) => Ok(Some(domain)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.call_error("virDomainLookupByUUIDString")(e)),
        }
    }

    /// Our metadata on a domain: `None` when it has none.
    pub fn recorded_owner(&self, domain: &Domain) -> Result<Option<xml::RecordedOwner>> {
        match domain.metadata(METADATA_ELEMENT, Some(METADATA_NAMESPACE), 0) {
            Ok(element) => Ok(xml::parse_owner(&element)),
            Err(e) if matches!(e.code().known(), Some(ErrorNumber::NoDomainMetadata)) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.call_error("virDomainGetMetadata")(e)),
        }
    }

    /// The machine's domain, found by its UUID. A domain with that UUID whose metadata does not
    /// name this machine (another object's, or not ours at all) is a [`Error::Conflict`]: it is
    /// never touched.
    pub fn find_domain(&self, identity: &MachineIdentity) -> Result<Option<Domain>> {
        let Some(domain) = self.domain_by_uuid(identity)? else {
            return Ok(None);
        };
        match self.recorded_owner(&domain)? {
            Some(owner) if owner.namespace == identity.namespace && owner.name == identity.name => {
                Ok(Some(domain))
            }
            _ => Err(Error::Conflict(format!(
                "a domain with UUID {} exists on {} but belongs to another object; it is left untouched",
                identity.domain_uuid(),
                self.uri()
            ))),
        }
    }

    /// Defines the domain when it does not exist and starts it when it is not running. Running
    /// this any number of times, or after a crash between any two steps, leaves exactly one domain.
    pub fn ensure_domain(&self, plan: &DomainPlan) -> Result<DomainStatus> {
        let domain = match self.find_domain(&plan.identity)? {
            Some(domain) => domain,
            None => {
                let xml = plan.to_xml().map_err(|e| Error::Xml(e.to_string()))?;
                self.connection()
                    .define_domain_xml(&xml)
                    .map_err(self.call_error("virDomainDefineXML"))?
            }
        };
        let active = domain
            .is_active()
            .map_err(self.call_error("virDomainIsActive"))?;
        if !active {
            domain
                .create()
                .map_err(self.call_error("virDomainCreate"))?;
        }
        self.domain_status(&domain)
    }

    /// UUID, name and state of a domain.
    pub fn domain_status(&self, domain: &Domain) -> Result<DomainStatus> {
        let (state, _reason) = domain
            .state()
            .map_err(self.call_error("virDomainGetState"))?;
        Ok(DomainStatus {
            uuid: domain
                .uuid_string()
                .map_err(self.call_error("virDomainGetUUIDString"))?,
            name: domain.name().map_err(self.call_error("virDomainGetName"))?,
            state: state.known().map_or("unknown", state_name).to_owned(),
        })
    }

    /// The machine's domain status, `None` when it has no domain.
    pub fn machine_status(&self, identity: &MachineIdentity) -> Result<Option<DomainStatus>> {
        self.find_domain(identity)?
            .map(|domain| self.domain_status(&domain))
            .transpose()
    }

    /// One step of removing the machine. A running guest is asked to shut down once (when
    /// `grace` is not zero) and [`Deletion::ShuttingDown`] returned; once it is off, or
    /// `deadline` (from the earlier call) has passed, it is stopped, undefined (with managed-save,
    /// snapshot, checkpoint and NVRAM metadata), looked up again (never `Gone` while a domain
    /// with its UUID exists), and every volume it owns is deleted: those its definition refers
    /// to and those carrying its prefix in any pool. Only "not found" counts as done; every other
    /// error is returned.
    pub fn delete_machine(
        &self,
        identity: &MachineIdentity,
        grace: Duration,
        deadline: Option<Instant>,
    ) -> Result<Deletion, BackendError> {
        let at = |step| move |e: Error| BackendError::from(e).at(step);
        let mut sources = DomainSources::default();
        if let Some(domain) = self.find_domain(identity).map_err(at(Step::Lookup))? {
            let definition = domain
                .xml_desc(0)
                .map_err(|e| at(Step::Lookup)(self.call("virDomainGetXMLDesc", e)))?;
            sources = xml::parse_sources(&definition);
            // Every volume the definition refers to must be reachable before the definition goes:
            // afterwards nothing would point at it any more.
            self.owned_volumes(identity, &sources)
                .map_err(at(Step::DeleteVolumes))?;
            let active = domain
                .is_active()
                .map_err(|e| at(Step::Lookup)(self.call("virDomainIsActive", e)))?;
            if active {
                match deadline {
                    None if !grace.is_zero() => {
                        ignore_gone(domain.shutdown())
                            .map_err(|e| at(Step::Shutdown)(self.call("virDomainShutdown", e)))?;
                        return Ok(Deletion::ShuttingDown {
                            deadline: Instant::now() + grace,
                        });
                    }
                    Some(deadline) if Instant::now() < deadline => {
                        return Ok(Deletion::ShuttingDown { deadline });
                    }
                    _ => {
                        ignore_gone(domain.destroy())
                            .map_err(|e| at(Step::Destroy)(self.call("virDomainDestroy", e)))?;
                    }
                }
            }
            self.undefine(&domain).map_err(at(Step::Undefine))?;
            if self
                .domain_by_uuid(identity)
                .map_err(at(Step::Undefine))?
                .is_some()
            {
                return Err(BackendError::new(
                    super::error::ErrorKind::Transient,
                    Some(Step::Undefine),
                    format!(
                        "a domain with UUID {} still exists after undefine",
                        identity.domain_uuid()
                    ),
                ));
            }
        }
        for volume in self
            .owned_volumes(identity, &sources)
            .map_err(at(Step::DeleteVolumes))?
        {
            self.delete_volume_at(&volume)
                .map_err(at(Step::DeleteVolumes))?;
        }
        Ok(Deletion::Gone)
    }

    /// Undefines with every metadata flag; drivers that refuse a flag (the test driver has no
    /// NVRAM) are retried with fewer, explicitly, never silently skipping the undefine itself.
    fn undefine(&self, domain: &Domain) -> Result<()> {
        let full = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        let basic =
            sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        for flags in [full, basic, 0] {
            match domain.undefine_flags(flags) {
                Ok(()) => return Ok(()),
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) if is_unsupported(&e) && flags != 0 => {
                    tracing::debug!(uri = self.uri(), flags, error = %e, "undefine flags unsupported; retrying with fewer");
                }
                Err(e) => return Err(self.call_error("virDomainUndefineFlags")(e)),
            }
        }
        Ok(())
    }

    /// The machine's volumes: every volume carrying its prefix in any active pool of the host,
    /// plus those its domain definition (`sources`) refers to. A volume the definition refers to
    /// in a pool that is not active is an error (it could not be deleted).
    pub fn owned_volumes(
        &self,
        identity: &MachineIdentity,
        sources: &DomainSources,
    ) -> Result<Vec<OwnedVolume>> {
        let prefix = identity.volume_prefix();
        let mut owned = Vec::new();
        let pools = self
            .connection()
            .list_all_storage_pools(0)
            .map_err(self.call_error("virConnectListAllStoragePools"))?;
        for pool in &pools {
            let name = pool
                .name()
                .map_err(self.call_error("virStoragePoolGetName"))?;
            let active = pool
                .is_active()
                .map_err(self.call_error("virStoragePoolIsActive"))?;
            if !active {
                tracing::debug!(uri = self.uri(), pool = %name, "skipping an inactive pool");
                continue;
            }
            // Files QEMU made (the console log) become volumes on refresh. A pool busy with
            // another upload cannot refresh: that only matters for pools the definition uses.
            let referenced = sources.volumes.iter().any(|(p, _)| p == &name);
            match pool.refresh(0) {
                Err(e) if is_busy(&e) && !referenced => {
                    tracing::debug!(uri = self.uri(), pool = %name, error = %e, "pool busy; listing the volumes libvirt knows");
                }
                Err(e) if !is_not_found(&e) => {
                    return Err(self.call_error("virStoragePoolRefresh")(e));
                }
                _ => {}
            }
            let volumes = pool
                .list_all_volumes(0)
                .map_err(self.call_error("virStoragePoolListAllVolumes"))?;
            for volume in volumes {
                let volume_name = volume
                    .name()
                    .map_err(self.call_error("virStorageVolGetName"))?;
                if volume_name.starts_with(&prefix) {
                    owned.push(OwnedVolume {
                        pool: name.clone(),
                        path: volume
                            .path()
                            .map_err(self.call_error("virStorageVolGetPath"))?,
                        name: volume_name,
                    });
                }
            }
        }
        for (pool_name, volume_name) in &sources.volumes {
            if !volume_name.starts_with(&prefix)
                || owned
                    .iter()
                    .any(|v| &v.pool == pool_name && &v.name == volume_name)
            {
                continue;
            }
            let pool = match self.connection().lookup_storage_pool_by_name(pool_name) {
                Ok(pool) => pool,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(self.call_error("virStoragePoolLookupByName")(e)),
            };
            if !pool
                .is_active()
                .map_err(self.call_error("virStoragePoolIsActive"))?
            {
                return Err(Error::Unsupported(format!(
                    "pool {pool_name} holding the machine's volume {volume_name} is not active; start it so the volume can be deleted"
                )));
            }
            match pool.lookup_storage_vol_by_name(volume_name) {
                Ok(volume) => owned.push(OwnedVolume {
                    pool: pool_name.clone(),
                    name: volume_name.clone(),
                    path: volume
                        .path()
                        .map_err(self.call_error("virStorageVolGetPath"))?,
                }),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.call_error("virStorageVolLookupByName")(e)),
            }
        }
        for path in &sources.paths {
            if owned.iter().any(|v| &v.path == path) {
                continue;
            }
            match self.connection().lookup_storage_vol_by_path(path) {
                Ok(volume) => {
                    let name = volume
                        .name()
                        .map_err(self.call_error("virStorageVolGetName"))?;
                    if name.starts_with(&prefix) {
                        owned.push(OwnedVolume {
                            pool: String::new(),
                            name,
                            path: path.clone(),
                        });
                    }
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.call_error("virStorageVolLookupByPath")(e)),
            }
        }
        owned.sort();
        owned.dedup();
        Ok(owned)
    }

    fn delete_volume_at(&self, volume: &OwnedVolume) -> Result<()> {
        let found = if volume.pool.is_empty() {
            self.connection().lookup_storage_vol_by_path(&volume.path)
        } else {
            match self.connection().lookup_storage_pool_by_name(&volume.pool) {
                Ok(pool) => pool.lookup_storage_vol_by_name(&volume.name),
                Err(e) => Err(e),
            }
        };
        match found {
            Ok(found) => match found.delete(0) {
                Err(e) if !is_not_found(&e) => Err(self.call_error("virStorageVolDelete")(e)),
                _ => Ok(()),
            },
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.call_error("virStorageVolLookupByName")(e)),
        }
    }

    /// Everything the machine owns on this host (operators and tests use it to prove no leak).
    pub fn inventory(&self, identity: &MachineIdentity) -> Result<Inventory> {
        let (domain, sources) = match self.find_domain(identity)? {
            Some(domain) => (
                Some(domain.name().map_err(self.call_error("virDomainGetName"))?),
                xml::parse_sources(
                    &domain
                        .xml_desc(0)
                        .map_err(self.call_error("virDomainGetXMLDesc"))?,
                ),
            ),
            None => (None, DomainSources::default()),
        };
        Ok(Inventory {
            domain,
            volumes: self.owned_volumes(identity, &sources)?,
        })
    }

    /// Every domain carrying our metadata.
    pub fn list_machines(&self) -> Result<Vec<OwnedDomain>> {
        let mut found = Vec::new();
        for domain in self
            .connection()
            .list_all_domains(0)
            .map_err(self.call_error("virConnectListAllDomains"))?
        {
            let Some(owner) = self.recorded_owner(&domain)? else {
                continue;
            };
            let uuid = domain
                .uuid_string()
                .map_err(self.call_error("virDomainGetUUIDString"))?;
            let Ok(uuid) = uuid::Uuid::parse_str(&uuid) else {
                continue;
            };
            found.push(OwnedDomain {
                uuid,
                namespace: owner.namespace,
                name: owner.name,
                cluster: owner.cluster,
            });
        }
        found.sort_by_key(|d| d.uuid);
        Ok(found)
    }
}

fn ignore_gone(
    result: std::result::Result<(), virt::error::Error>,
) -> std::result::Result<(), virt::error::Error> {
    match result {
        Err(e) if !is_not_found(&e) && !is_not_running(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Whether a pool refused a refresh because another job (an upload) runs in it.
pub(crate) fn is_busy(error: &virt::error::Error) -> bool {
    matches!(error.code().known(), Some(ErrorNumber::InternalError))
        && error.message().contains("asynchronous jobs")
}

fn is_not_running(error: &virt::error::Error) -> bool {
    matches!(error.code().known(), Some(ErrorNumber::OperationInvalid))
}

fn is_unsupported(error: &virt::error::Error) -> bool {
    matches!(
        error.code().known(),
        Some(ErrorNumber::NoSupport | ErrorNumber::InvalidArg | ErrorNumber::ArgumentUnsupported)
    )
}

/// Where an address was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSource {
    /// The libvirt network's DHCP server.
    Lease,
    /// The QEMU guest agent inside the VM.
    Agent,
}

/// One address of a running guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestAddress {
    /// MAC of the interface holding the address, when the source says.
    pub mac: Option<String>,
    /// The address.
    pub address: std::net::IpAddr,
    /// Where it was learned.
    pub source: AddressSource,
}

/// What a host offers (placement input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Free memory in bytes.
    pub free_memory_bytes: u64,
}

impl Host {
    /// The guest's addresses from DHCP leases and the guest agent, merged (lease first). Either
    /// source may be silent (no agent installed, static addressing); the caller keeps the last
    /// known address when both are.
    pub fn addresses(&self, identity: &MachineIdentity) -> Result<Vec<GuestAddress>> {
        let Some(domain) = self.find_domain(identity)? else {
            return Ok(Vec::new());
        };
        let mut found: Vec<GuestAddress> = Vec::new();
        for (source, raw) in [
            (
                AddressSource::Lease,
                sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            ),
            (
                AddressSource::Agent,
                sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            ),
        ] {
            let interfaces = match domain.interface_addresses(raw, 0) {
                Ok(interfaces) => interfaces,
                Err(error) => {
                    tracing::debug!(uri = self.uri(), ?source, %error, "no addresses from this source");
                    continue;
                }
            };
            for interface in interfaces {
                for addr in &interface.addrs {
                    let Ok(ip) = addr.addr.parse::<std::net::IpAddr>() else {
                        continue;
                    };
                    let useful = !ip.is_loopback()
                        && !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local());
                    if useful && !found.iter().any(|f| f.address == ip) {
                        found.push(GuestAddress {
                            mac: interface.hwaddr.clone(),
                            address: ip,
                            source,
                        });
                    }
                }
            }
        }
        Ok(found)
    }

    /// CPUs and memory of the host.
    pub fn facts(&self) -> Result<HostFacts> {
        let info = self
            .connection()
            .node_info()
            .map_err(self.call_error("virNodeGetInfo"))?;
        let free = self
            .connection()
            .free_memory()
            .map_err(self.call_error("virNodeGetFreeMemory"))?;
        // The test driver's free memory is a fixed 6 MiB that nothing allocates from: it would
        // make every placement fail. Its node's total memory stands in for it.
        let free = if self.is_test_driver() {
            info.memory * 1024
        } else {
            free
        };
        Ok(HostFacts {
            cpus: info.cpus,
            memory_bytes: info.memory * 1024,
            free_memory_bytes: free,
        })
    }

    /// The last `max` bytes of the machine's serial console (boot diagnostics), read from the
    /// log file its definition names; empty when the host keeps no log for it.
    pub fn console_tail(&self, identity: &MachineIdentity, max: u64) -> Result<String> {
        let Some(domain) = self.find_domain(identity)? else {
            return Ok(String::new());
        };
        let definition = domain
            .xml_desc(0)
            .map_err(self.call_error("virDomainGetXMLDesc"))?;
        let Some(log) = xml::parse_serial_log(&definition) else {
            return Ok(String::new());
        };
        let bytes = self.download_tail_at(&log, max)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
