//! Pure: a LibvirtMachine, its LibvirtCluster, the chosen host and the bootstrap data → the
//! backend's [`MachineRequest`], every default resolved here (pool, networks, MACs, the NoCloud
//! seed's meta-data).

use crate::api::{
    CpuMode, Firmware, ImageFormat, LibvirtCluster, LibvirtMachine, NetworkInterface, NicModel,
};
use crate::cloudinit::{MetaData, Seed};
use crate::controller::capi::{BootstrapData, BootstrapFormat};
use crate::libvirt::backend::{
    BaseImage, Bootstrap, DataDisk, HostRef, MachineRequest, Nic, NicSource,
};
use crate::libvirt::identity::{Mac, MachineIdentity};
use crate::libvirt::image::ImageRequest;

/// Storage pool and network used when neither the machine nor the cluster names one.
pub const DEFAULT_POOL: &str = "default";
/// See [`DEFAULT_POOL`].
pub const DEFAULT_NETWORK: &str = "default";
/// Name of the interface a machine without `networkInterfaces` gets (keys its MAC).
pub const DEFAULT_INTERFACE: &str = "eth0";

/// Why a spec cannot become a request (retrying does not help until the spec changes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// `libvirt://<domain uuid>`: the providerID of the machine and of its Node.
pub fn provider_id(identity: &MachineIdentity) -> String {
    format!("libvirt://{}", identity.domain_uuid())
}

/// The storage pool of the root disk.
pub fn root_pool(machine: &LibvirtMachine, cluster: &LibvirtCluster) -> String {
    machine
        .spec
        .root_volume
        .pool
        .clone()
        .or_else(|| cluster.spec.storage_pool.clone())
        .unwrap_or_else(|| DEFAULT_POOL.to_owned())
}

/// Builds the request to create `machine` on `host`.
pub fn plan(
    machine: &LibvirtMachine,
    cluster: &LibvirtCluster,
    cluster_name: &str,
    identity: &MachineIdentity,
    host: HostRef,
    bootstrap: Option<&BootstrapData>,
) -> Result<MachineRequest, PlanError> {
    let spec = &machine.spec;
    let pool = root_pool(machine, cluster);
    let image = match (&spec.image.url, &spec.image.volume) {
        (Some(url), None) => {
            let checksum = spec
                .image
                .checksum
                .as_ref()
                .ok_or_else(|| PlanError("spec.image.checksum is required with url".into()))?;
            BaseImage::Url(ImageRequest {
                url: url.clone(),
                algorithm: checksum.kind,
                digest: checksum.value.clone(),
                format: spec.image.format.unwrap_or(ImageFormat::Qcow2),
            })
        }
        (None, Some(volume)) => BaseImage::Volume {
            pool: volume.pool.clone(),
            name: volume.name.clone(),
        },
        _ => {
            return Err(PlanError(
                "spec.image needs exactly one of url or volume".into(),
            ));
        }
    };
    let data_disks = spec
        .data_volumes
        .iter()
        .flatten()
        .map(|d| DataDisk {
            name: d.name.clone(),
            size_gib: positive(d.size_gib, "dataVolumes[].sizeGiB"),
            pool: d.pool.clone().unwrap_or_else(|| pool.clone()),
        })
        .collect();
    let default_nic = [NetworkInterface {
        name: DEFAULT_INTERFACE.into(),
        ..NetworkInterface::default()
    }];
    let nics = match spec.network_interfaces.as_deref() {
        Some(nics) if !nics.is_empty() => nics,
        _ => &default_nic,
    };
    let network = cluster
        .spec
        .network
        .clone()
        .unwrap_or_else(|| DEFAULT_NETWORK.to_owned());
    let interfaces = nics
        .iter()
        .map(|nic| {
            Ok(Nic {
                source: match (&nic.network, &nic.bridge) {
                    (_, Some(bridge)) => NicSource::Bridge(bridge.clone()),
                    (Some(net), None) => NicSource::Network(net.clone()),
                    (None, None) => NicSource::Network(network.clone()),
                },
                mac: match &nic.mac_address {
                    Some(mac) => parse_mac(mac)?,
                    None => identity.mac(&nic.name),
                },
                model: nic.model.unwrap_or(NicModel::Virtio),
            })
        })
        .collect::<Result<Vec<_>, PlanError>>()?;
    let bootstrap = bootstrap.map(|data| match data.format {
        BootstrapFormat::CloudConfig => Bootstrap::CloudConfig(Seed {
            user_data: data.value.clone(),
            meta_data: MetaData {
                instance_id: identity.domain_uuid().to_string(),
                local_hostname: machine.metadata.name.clone().unwrap_or_default(),
                provider_id: provider_id(identity),
            },
            network_config: None,
        }),
        BootstrapFormat::Ignition => Bootstrap::Ignition(data.value.clone()),
    });
    Ok(MachineRequest {
        identity: identity.clone(),
        cluster: cluster_name.to_owned(),
        host,
        vcpus: positive(spec.vcpus, "vcpus") as u32,
        memory_mib: positive(spec.memory_mib, "memoryMiB"),
        cpu_mode: spec.cpu_mode.unwrap_or(CpuMode::HostPassthrough),
        firmware: spec.firmware.unwrap_or(Firmware::Bios),
        pool,
        image,
        root_gib: positive(spec.root_volume.size_gib, "rootVolume.sizeGiB"),
        data_disks,
        interfaces,
        bootstrap,
        direct_boot: None,
    })
}

/// A schema-validated positive integer as unsigned (the schema's minimum is at least 1).
fn positive(value: i32, _field: &str) -> u64 {
    u64::try_from(value.max(1)).unwrap_or(1)
}

fn parse_mac(text: &str) -> Result<Mac, PlanError> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| PlanError(format!("macAddress {text:?} is not a MAC address")))?;
    let bytes: [u8; 6] = bytes
        .try_into()
        .map_err(|_| PlanError(format!("macAddress {text:?} is not six octets")))?;
    Ok(Mac(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        LibvirtClusterSpec, LibvirtHost, LibvirtMachineSpec, RootVolume, VolumeReference,
    };
    use crate::cloudinit::Sensitive;
    use crate::libvirt::uri::{HostUri, UriPolicy};

    fn host() -> HostRef {
        HostRef {
            name: "a".into(),
            uri: HostUri::parse(
                "test:///default",
                UriPolicy {
                    allow_test_driver: true,
                },
            )
            .expect("uri"),
            domain_type: crate::api::DomainType::Kvm,
        }
    }

    fn objects() -> (LibvirtMachine, LibvirtCluster) {
        let mut machine = LibvirtMachine::new(
            "m1",
            LibvirtMachineSpec {
                vcpus: 2,
                memory_mib: 1024,
                root_volume: RootVolume {
                    size_gib: 10,
                    pool: None,
                },
                image: crate::api::ImageSource {
                    volume: Some(VolumeReference {
                        pool: "images".into(),
                        name: "base.qcow2".into(),
                    }),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        machine.metadata.namespace = Some("ns".into());
        let cluster = LibvirtCluster::new(
            "c",
            LibvirtClusterSpec {
                hosts: vec![LibvirtHost {
                    name: "a".into(),
                    uri: "test:///default".into(),
                    ..Default::default()
                }],
                network: Some("capl".into()),
                storage_pool: Some("fast".into()),
                ..Default::default()
            },
        );
        (machine, cluster)
    }

    #[test]
    fn defaults_come_from_the_cluster_and_the_identity() {
        let (machine, cluster) = objects();
        let identity = MachineIdentity::new("ns", "m1", MachineIdentity::uuid_for_uid("u"));
        let data = BootstrapData {
            format: BootstrapFormat::CloudConfig,
            value: Sensitive::new(b"#cloud-config\n".to_vec()),
        };
        let request = plan(&machine, &cluster, "c", &identity, host(), Some(&data)).expect("plan");
        assert_eq!(request.pool, "fast");
        assert_eq!(request.cpu_mode, CpuMode::HostPassthrough);
        assert_eq!(request.interfaces.len(), 1);
        assert_eq!(
            request.interfaces[0].source,
            NicSource::Network("capl".into())
        );
        assert_eq!(request.interfaces[0].mac, identity.mac(DEFAULT_INTERFACE));
        let Some(Bootstrap::CloudConfig(seed)) = &request.bootstrap else {
            panic!("a seed")
        };
        assert_eq!(seed.meta_data.instance_id, identity.uuid.to_string());
        assert_eq!(seed.meta_data.local_hostname, "m1");
        assert_eq!(
            seed.meta_data.provider_id,
            format!("libvirt://{}", identity.uuid)
        );
    }

    #[test]
    fn explicit_values_win_and_bad_macs_are_invalid() {
        let (mut machine, cluster) = objects();
        machine.spec.root_volume.pool = Some("slow".into());
        machine.spec.network_interfaces = Some(vec![NetworkInterface {
            name: "lan".into(),
            bridge: Some("br0".into()),
            mac_address: Some("52:54:00:12:34:56".into()),
            ..Default::default()
        }]);
        let identity = MachineIdentity::new("ns", "m1", MachineIdentity::uuid_for_uid("u"));
        let request = plan(&machine, &cluster, "c", &identity, host(), None).expect("plan");
        assert_eq!(request.pool, "slow");
        assert_eq!(
            request.interfaces[0].source,
            NicSource::Bridge("br0".into())
        );
        assert_eq!(request.interfaces[0].mac.to_string(), "52:54:00:12:34:56");
        machine.spec.network_interfaces.as_mut().expect("nics")[0].mac_address =
            Some("zz:54:00:12:34:56".into());
        assert!(plan(&machine, &cluster, "c", &identity, host(), None).is_err());
    }
}
