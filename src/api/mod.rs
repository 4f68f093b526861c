//! The provider's API: `infrastructure.cluster.x-k8s.io/v1alpha1`.
//!
//! Doc comments on every field become the CRD's descriptions (what `kubectl explain` prints);
//! bounds and CEL rules become server-side validation. `crds/` is generated from these types by
//! `manager crds` and a test fails when it is stale.

pub mod cluster;
pub mod common;
pub mod crd;
pub mod machine;

pub use cluster::{
    ApiEndpoint, DomainType, FailureDomain, HostInUse, LibvirtCluster, LibvirtClusterSpec,
    LibvirtClusterStatus, LibvirtClusterTemplate, LibvirtClusterTemplateResource,
    LibvirtClusterTemplateSpec, LibvirtHost,
};
pub use common::{
    GROUP, Initialization, PROVIDER_LABEL_VALUE, SecretReference, TemplateMeta, VERSION,
};
pub use machine::{
    Checksum, ChecksumType, CpuMode, DataVolume, Firmware, ImageFormat, ImageSource,
    LibvirtMachine, LibvirtMachineSpec, LibvirtMachineStatus, LibvirtMachineTemplate,
    LibvirtMachineTemplateResource, LibvirtMachineTemplateSpec, LibvirtMachineTemplateStatus,
    MachineAddress, MachineAddressType, NetworkInterface, NicModel, RootVolume, VolumeReference,
};
