//! Creating a machine, as a sequence of idempotent steps. Each step finds what an earlier,
//! interrupted attempt made and continues from there, so a crash between any two steps never
//! produces a second VM or an orphaned volume (every volume carries the machine's prefix and is
//! removed by [`Host::delete_machine`]).

use std::sync::Arc;

use super::backend::{BaseImage, Bootstrap, BootstrapDelivery, MachineRequest, MachineState};
use super::error::{BackendError, ErrorKind, Step};
use super::hosts::Hosts;
use super::image::{self, ImageCache};
use super::machine::DomainStatus;
use super::tasks::MachineGuard;
use super::xml::{DiskPlan, DomainPlan, Hypervisor, VolumePlan};
use super::{Error, Host};

const IGNITION_FW_CFG: &str = "opt/com.coreos/config";

/// Why the test driver cannot deliver bootstrap data.
pub const TEST_DRIVER_CANNOT_DELIVER: &str = "the test driver cannot store volume content";

impl MachineRequest {
    pub(super) fn root_name(&self) -> String {
        self.identity.volume_name("root", "qcow2")
    }

    pub(super) fn data_name(&self, disk: &str) -> String {
        self.identity.volume_name(&format!("data-{disk}"), "qcow2")
    }

    pub(super) fn seed_name(&self) -> String {
        self.identity.volume_name("seed", "iso")
    }

    pub(super) fn ignition_name(&self) -> String {
        self.identity.volume_name("ignition", "json")
    }

    /// Name of the volume the bootstrap data goes to.
    fn bootstrap_volume(&self) -> Option<String> {
        match self.bootstrap {
            Some(Bootstrap::CloudConfig(_)) => Some(self.seed_name()),
            Some(Bootstrap::Ignition(_)) => Some(self.ignition_name()),
            None => None,
        }
    }

    /// Volume name of the serial console log, kept beside the root disk so the backend can read
    /// it back through libvirt (boot diagnostics) and deletes it with the machine.
    pub fn serial_log_name(&self) -> String {
        self.identity.volume_name("serial", "log")
    }

    /// What happens to the bootstrap data on this request's host: the test driver cannot hold
    /// volume content, and the result says so.
    pub fn bootstrap_delivery(&self) -> Option<BootstrapDelivery> {
        let bootstrap = self.bootstrap.as_ref()?;
        let volume = self.bootstrap_volume()?;
        Some(if self.host.uri.is_test_driver() {
            BootstrapDelivery::NotDelivered {
                reason: TEST_DRIVER_CANNOT_DELIVER.into(),
                bytes: bootstrap.len() as u64,
            }
        } else {
            BootstrapDelivery::Delivered { volume }
        })
    }

    /// The state of the machine once its domain is `domain`.
    pub fn state(&self, domain: DomainStatus) -> MachineState {
        MachineState {
            domain,
            bootstrap: self.bootstrap_delivery(),
        }
    }

    /// The domain definition; `ignition_path` is the host path of the uploaded Ignition config,
    /// `serial_log` where the console log goes.
    fn domain_plan(
        &self,
        hypervisor: Hypervisor,
        ignition_path: Option<String>,
        serial_log: Option<String>,
    ) -> DomainPlan {
        let mut disks = vec![DiskPlan {
            pool: self.pool.clone(),
            volume: self.root_name(),
            target: "vda".into(),
            cdrom: false,
        }];
        for (i, disk) in self.data_disks.iter().enumerate() {
            disks.push(DiskPlan {
                pool: disk.pool.clone(),
                volume: self.data_name(&disk.name),
                target: format!("vd{}", char::from(b'b' + i as u8)),
                cdrom: false,
            });
        }
        if matches!(self.bootstrap, Some(Bootstrap::CloudConfig(_))) {
            disks.push(DiskPlan {
                pool: self.pool.clone(),
                volume: self.seed_name(),
                target: "sda".into(),
                cdrom: true,
            });
        }
        DomainPlan {
            identity: self.identity.clone(),
            cluster: self.cluster.clone(),
            hypervisor,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            cpu_mode: self.cpu_mode,
            firmware: self.firmware,
            disks,
            interfaces: self.interfaces.clone(),
            serial_log,
            fw_cfg: ignition_path
                .map(|path| vec![(IGNITION_FW_CFG.to_owned(), path)])
                .unwrap_or_default(),
            direct_boot: self.direct_boot.clone(),
        }
    }
}

/// Creates the machine: every step in order (no machine lock; the backend's background task
/// holds one).
pub async fn provision(
    hosts: &Arc<Hosts>,
    images: &ImageCache,
    request: &MachineRequest,
) -> Result<MachineState, BackendError> {
    let mut status = None;
    for step in Step::CREATE {
        status = run_step(hosts, images, request, step, None)
            .await?
            .or(status);
    }
    status.map(|s| request.state(s)).ok_or_else(|| {
        BackendError::new(
            ErrorKind::Transient,
            Some(Step::Start),
            "no domain after provisioning",
        )
    })
}

/// Runs one step; `Start` returns the domain's status. `guard`, when given, is kept alive by every
/// blocking libvirt call the step makes.
pub async fn run_step(
    hosts: &Arc<Hosts>,
    images: &ImageCache,
    request: &MachineRequest,
    step: Step,
    guard: Option<MachineGuard>,
) -> Result<Option<DomainStatus>, BackendError> {
    run_step_inner(hosts, images, request, step, guard)
        .await
        .map_err(|e| e.at(step))
}

async fn run_step_inner(
    hosts: &Arc<Hosts>,
    images: &ImageCache,
    request: &MachineRequest,
    step: Step,
    guard: Option<MachineGuard>,
) -> Result<Option<DomainStatus>, BackendError> {
    let uri = &request.host.uri;
    let req = request.clone();
    match step {
        Step::BaseImage => {
            if let BaseImage::Url(image) = &request.image {
                images.ensure(uri, &request.pool, image).await?;
            }
            Ok(None)
        }
        Step::RootVolume => {
            // A URL image is in the cache after the previous step: this returns its path at once.
            let cached = match &request.image {
                BaseImage::Url(image) => Some(images.ensure(uri, &request.pool, image).await?),
                BaseImage::Volume { .. } => None,
            };
            hosts
                .run_keeping(uri, guard, move |host| {
                    if host.volume_exists(&req.pool, &req.root_name())? {
                        return Ok(Ok(None));
                    }
                    let backing = match (&req.image, cached) {
                        (BaseImage::Url(image), Some(path)) => (path, image.format),
                        (BaseImage::Volume { pool, name }, _) => {
                            let format = match image::check_base_volume(host, pool, name) {
                                Ok(format) => format,
                                Err(error) => return Ok(Err(BackendError::from(error))),
                            };
                            (host.volume_path(pool, name)?, format)
                        }
                        (BaseImage::Url(_), None) => {
                            return Err(Error::Missing("the cached base image".into()));
                        }
                    };
                    let xml = VolumePlan {
                        name: req.root_name(),
                        capacity_gib: req.root_gib,
                        format: "qcow2".into(),
                        backing: Some((backing.0, backing.1.as_str().into())),
                    }
                    .to_xml()
                    .map_err(|e| Error::Xml(e.to_string()))?;
                    host.ensure_volume(&req.pool, &req.root_name(), &xml)?;
                    Ok(Ok(None))
                })
                .await?
        }
        Step::DataVolumes => Ok(hosts
            .run_keeping(uri, guard, move |host| {
                for disk in &req.data_disks {
                    let xml = VolumePlan {
                        name: req.data_name(&disk.name),
                        capacity_gib: disk.size_gib,
                        format: "qcow2".into(),
                        backing: None,
                    }
                    .to_xml()
                    .map_err(|e| Error::Xml(e.to_string()))?;
                    host.ensure_volume(&disk.pool, &req.data_name(&disk.name), &xml)?;
                }
                Ok(None)
            })
            .await?),
        Step::Bootstrap => {
            let payload = match &request.bootstrap {
                None => return Ok(None),
                Some(Bootstrap::CloudConfig(seed)) => (request.seed_name(), seed.to_iso()?),
                Some(Bootstrap::Ignition(config)) => {
                    (request.ignition_name(), config.expose().clone())
                }
            };
            Ok(hosts
                .run_keeping(uri, guard, move |host| {
                    // Once the domain exists its bootstrap data is in place: never rewrite it
                    // under a running guest.
                    if host.find_domain(&req.identity)?.is_some() {
                        return Ok(None);
                    }
                    let (name, bytes) = payload;
                    let xml = VolumePlan {
                        name: name.clone(),
                        capacity_gib: 0,
                        format: "raw".into(),
                        backing: None,
                    }
                    .to_xml()
                    .map_err(|e| Error::Xml(e.to_string()))?;
                    if host.is_test_driver() {
                        // The volume exists (the definition refers to it), its content cannot:
                        // the machine's state reports the data as not delivered.
                        host.ensure_volume(&req.pool, &name, &xml)?;
                    } else {
                        host.replace_volume_with(&req.pool, &name, &xml, bytes)?;
                    }
                    Ok(None)
                })
                .await?)
        }
        Step::Define => Ok(hosts
            .run_keeping(uri, guard, move |host| {
                define(host, &req)?;
                Ok(None)
            })
            .await?),
        Step::Start => Ok(hosts
            .run_keeping(uri, guard, move |host| {
                let plan = domain_plan_on(host, &req)?;
                host.ensure_domain(&plan).map(Some)
            })
            .await?),
        other => Err(BackendError::new(
            ErrorKind::Invalid,
            Some(other),
            "not a creation step",
        )),
    }
}

fn domain_plan_on(host: &Host, req: &MachineRequest) -> Result<DomainPlan, Error> {
    let ignition_path = match req.bootstrap {
        Some(Bootstrap::Ignition(_)) => Some(host.volume_path(&req.pool, &req.ignition_name())?),
        _ => None,
    };
    // The log lives in the root disk's directory (the root disk exists by now).
    let root = host.volume_path(&req.pool, &req.root_name())?;
    let serial_log = std::path::Path::new(&root)
        .parent()
        .map(|dir| dir.join(req.serial_log_name()).display().to_string());
    let hypervisor = if host.is_test_driver() {
        Hypervisor::Test
    } else {
        req.host.domain_type.into()
    };
    Ok(req.domain_plan(hypervisor, ignition_path, serial_log))
}

fn define(host: &Host, req: &MachineRequest) -> Result<(), Error> {
    if host.find_domain(&req.identity)?.is_some() {
        return Ok(());
    }
    let xml = domain_plan_on(host, req)?
        .to_xml()
        .map_err(|e| Error::Xml(e.to_string()))?;
    host.connection()
        .define_domain_xml(&xml)
        .map_err(|error| host.call("virDomainDefineXML", error))?;
    Ok(())
}
