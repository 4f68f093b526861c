//! Creating a machine, as a sequence of idempotent steps. Each step finds what an earlier,
//! interrupted attempt made and continues from there, so a crash between any two steps never
//! produces a second VM or an orphaned volume (every volume carries the machine's prefix and is
//! removed by [`Host::delete_machine`]).

use std::sync::Arc;

use super::hosts::Hosts;
use super::identity::MachineIdentity;
use super::image::{self, ImageCache, ImageRequest};
use super::machine::DomainStatus;
use super::uri::HostUri;
use super::xml::{DirectBoot, DiskPlan, DomainPlan, InterfacePlan, VolumePlan};
use super::{Error, Host};
use crate::cloudinit::Seed;

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Libvirt(#[from] Error),
    #[error(transparent)]
    Image(#[from] image::Error),
    #[error(transparent)]
    Bootstrap(#[from] crate::cloudinit::Error),
}

/// Where the root disk's content comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum BaseImage {
    /// Downloaded once per host and pool.
    Url(ImageRequest),
    /// A volume already on the host.
    Volume { pool: String, name: String },
}

/// Bootstrap data in the format the bootstrap provider wrote.
#[derive(Clone, Debug, PartialEq)]
pub enum Bootstrap {
    /// `cloud-config`: delivered on a NoCloud seed ISO attached as a CD-ROM.
    CloudConfig(Seed),
    /// `ignition`: delivered through QEMU fw_cfg `opt/com.coreos/config`.
    Ignition(Vec<u8>),
}

/// Everything needed to create one machine on one host.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineRequest {
    pub identity: MachineIdentity,
    pub cluster: String,
    pub domain_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cpu_mode: String,
    pub uefi: bool,
    /// Pool of the root disk and the bootstrap volume.
    pub pool: String,
    pub image: BaseImage,
    pub root_gib: u64,
    /// (name, GiB, pool) of each data disk.
    pub data_volumes: Vec<(String, u64, String)>,
    pub interfaces: Vec<InterfacePlan>,
    pub bootstrap: Option<Bootstrap>,
    /// Boot a kernel directly (tests and appliance images); `None` boots the root disk.
    pub direct_boot: Option<DirectBoot>,
}

/// The steps of creation, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    BaseImage,
    RootVolume,
    DataVolumes,
    Bootstrap,
    Define,
    Start,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::BaseImage,
        Step::RootVolume,
        Step::DataVolumes,
        Step::Bootstrap,
        Step::Define,
        Step::Start,
    ];
}

const IGNITION_FW_CFG: &str = "opt/com.coreos/config";

impl MachineRequest {
    fn root_name(&self) -> String {
        self.identity.volume_name("root", "qcow2")
    }

    fn data_name(&self, disk: &str) -> String {
        self.identity.volume_name(&format!("data-{disk}"), "qcow2")
    }

    fn seed_name(&self) -> String {
        self.identity.volume_name("seed", "iso")
    }

    fn ignition_name(&self) -> String {
        self.identity.volume_name("ignition", "json")
    }

    /// Volume name of the serial console log, kept beside the root disk so the backend can read
    /// it back through libvirt (boot diagnostics) and deletes it with the machine.
    pub fn serial_log_name(&self) -> String {
        self.identity.volume_name("serial", "log")
    }

    /// Every pool the machine may own volumes in (for delete and inventory).
    pub fn pools(&self) -> Vec<String> {
        let mut pools = vec![self.pool.clone()];
        pools.extend(self.data_volumes.iter().map(|(_, _, pool)| pool.clone()));
        pools.sort();
        pools.dedup();
        pools
    }

    /// The domain definition; `ignition_path` is the host path of the uploaded Ignition config,
    /// `serial_log` where the console log goes.
    fn domain_plan(&self, ignition_path: Option<String>, serial_log: Option<String>) -> DomainPlan {
        let mut disks = vec![DiskPlan {
            pool: self.pool.clone(),
            volume: self.root_name(),
            target: "vda".into(),
            cdrom: false,
        }];
        for (i, (name, _, pool)) in self.data_volumes.iter().enumerate() {
            disks.push(DiskPlan {
                pool: pool.clone(),
                volume: self.data_name(name),
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
            domain_type: self.domain_type.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            cpu_mode: self.cpu_mode.clone(),
            uefi: self.uefi,
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

/// Creates the machine: every step in order.
pub async fn provision(
    hosts: &Arc<Hosts>,
    images: &ImageCache,
    uri: &HostUri,
    request: &MachineRequest,
) -> Result<DomainStatus, ProvisionError> {
    let mut status = None;
    for step in Step::ALL {
        status = run_step(hosts, images, uri, request, step)
            .await?
            .or(status);
    }
    status.ok_or_else(|| Error::Missing("the domain after provisioning".into()).into())
}

/// Runs one step; `Start` returns the domain's status.
pub async fn run_step(
    hosts: &Arc<Hosts>,
    images: &ImageCache,
    uri: &HostUri,
    request: &MachineRequest,
    step: Step,
) -> Result<Option<DomainStatus>, ProvisionError> {
    let req = request.clone();
    match step {
        Step::BaseImage => {
            if let BaseImage::Url(image) = &request.image {
                images.ensure(uri, &request.pool, image).await?;
            }
            Ok(None)
        }
        Step::RootVolume => {
            let backing = match &request.image {
                BaseImage::Url(image) => (request.pool.clone(), image.volume_name(), image.format),
                BaseImage::Volume { pool, name } => {
                    (pool.clone(), name.clone(), crate::api::ImageFormat::Qcow2)
                }
            };
            hosts
                .run(uri, move |host| {
                    if host.volume_exists(&req.pool, &req.root_name())? {
                        return Ok(None);
                    }
                    let (pool, name, format) = backing;
                    let path = host.volume_path(&pool, &name)?;
                    let xml = VolumePlan {
                        name: req.root_name(),
                        capacity_gib: req.root_gib,
                        format: "qcow2".into(),
                        backing: Some((path, format.as_str().into())),
                    }
                    .to_xml()
                    .map_err(|e| Error::Xml(e.to_string()))?;
                    host.ensure_volume(&req.pool, &req.root_name(), &xml)?;
                    Ok(None)
                })
                .await
                .map_err(Into::into)
        }
        Step::DataVolumes => hosts
            .run(uri, move |host| {
                for (disk, gib, pool) in &req.data_volumes {
                    let xml = VolumePlan {
                        name: req.data_name(disk),
                        capacity_gib: *gib,
                        format: "qcow2".into(),
                        backing: None,
                    }
                    .to_xml()
                    .map_err(|e| Error::Xml(e.to_string()))?;
                    host.ensure_volume(pool, &req.data_name(disk), &xml)?;
                }
                Ok(None)
            })
            .await
            .map_err(Into::into),
        Step::Bootstrap => {
            let payload = match &request.bootstrap {
                None => return Ok(None),
                Some(Bootstrap::CloudConfig(seed)) => (request.seed_name(), seed.to_iso()?),
                Some(Bootstrap::Ignition(config)) => (request.ignition_name(), config.clone()),
            };
            hosts
                .run(uri, move |host| {
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
                    host.replace_volume_with(&req.pool, &name, &xml, bytes)?;
                    Ok(None)
                })
                .await
                .map_err(Into::into)
        }
        Step::Define => hosts
            .run(uri, move |host| {
                define(host, &req)?;
                Ok(None)
            })
            .await
            .map_err(Into::into),
        Step::Start => hosts
            .run(uri, move |host| {
                let plan = domain_plan_on(host, &req)?;
                host.ensure_domain(&plan).map(Some)
            })
            .await
            .map_err(Into::into),
    }
}

fn domain_plan_on(host: &Host, req: &MachineRequest) -> Result<DomainPlan, Error> {
    let ignition_path = match req.bootstrap {
        Some(Bootstrap::Ignition(_)) => Some(host.volume_path(&req.pool, &req.ignition_name())?),
        _ => None,
    };
    // The log lives in the root disk's directory when the pool is a directory.
    let serial_log = host
        .volume_path(&req.pool, &req.root_name())
        .ok()
        .and_then(|root| {
            let dir = std::path::Path::new(&root).parent()?.to_owned();
            Some(dir.join(req.serial_log_name()).display().to_string())
        });
    Ok(req.domain_plan(ignition_path, serial_log))
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
