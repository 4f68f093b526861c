//! The interface the controllers use: async, per host URI, the same for the in-process test
//! driver and a real libvirtd + QEMU.

use std::sync::Arc;
use std::time::Duration;

use super::hosts::Hosts;
use super::identity::MachineIdentity;
use super::image::ImageCache;
use super::machine::{DomainStatus, GuestAddress, HostFacts, Inventory};
use super::provision::{self, MachineRequest, ProvisionError};
use super::uri::HostUri;
use super::volumes::PoolSpace;
use super::{HostVersions, Result};

/// Every hypervisor operation a reconcile needs.
pub struct Backend {
    hosts: Arc<Hosts>,
    images: ImageCache,
}

impl Backend {
    /// `per_host`: how many libvirt calls may run at once against one host.
    pub fn new(per_host: usize) -> std::io::Result<Self> {
        let hosts = Arc::new(Hosts::new(per_host));
        Ok(Self {
            images: ImageCache::new(hosts.clone())?,
            hosts,
        })
    }

    /// The shared connections, for calls beyond this interface (on the test driver, state lives
    /// in the connection: use these, never a second `Host::open`).
    pub fn hosts(&self) -> &Arc<Hosts> {
        &self.hosts
    }

    /// Creates (or finishes creating) the machine and starts it.
    pub async fn create(
        &self,
        uri: &HostUri,
        request: &MachineRequest,
    ) -> Result<DomainStatus, ProvisionError> {
        provision::provision(&self.hosts, &self.images, uri, request).await
    }

    /// The machine's domain status, `None` when it has no domain on the host.
    pub async fn status(
        &self,
        uri: &HostUri,
        identity: &MachineIdentity,
    ) -> Result<Option<DomainStatus>> {
        let identity = identity.clone();
        self.hosts
            .run(uri, move |host| {
                host.find_domain(&identity)?
                    .map(|domain| host.domain_status(&domain))
                    .transpose()
            })
            .await
    }

    /// Removes the machine and everything it owns in `pools`.
    pub async fn delete(
        &self,
        uri: &HostUri,
        identity: &MachineIdentity,
        pools: &[String],
        grace: Duration,
    ) -> Result<()> {
        let (identity, pools) = (identity.clone(), pools.to_vec());
        self.hosts
            .run(uri, move |host| {
                host.delete_machine(&identity, &pools, grace)
            })
            .await
    }

    /// Everything the machine owns on the host.
    pub async fn inventory(
        &self,
        uri: &HostUri,
        identity: &MachineIdentity,
        pools: &[String],
    ) -> Result<Inventory> {
        let (identity, pools) = (identity.clone(), pools.to_vec());
        self.hosts
            .run(uri, move |host| host.inventory(&identity, &pools))
            .await
    }

    /// The guest's addresses (DHCP leases and guest agent).
    pub async fn addresses(
        &self,
        uri: &HostUri,
        identity: &MachineIdentity,
    ) -> Result<Vec<GuestAddress>> {
        let identity = identity.clone();
        self.hosts
            .run(uri, move |host| host.addresses(&identity))
            .await
    }

    /// The last `max` bytes of the machine's serial console.
    pub async fn console_tail(
        &self,
        uri: &HostUri,
        identity: &MachineIdentity,
        pool: &str,
        max: u64,
    ) -> Result<String> {
        let (identity, pool) = (identity.clone(), pool.to_owned());
        self.hosts
            .run(uri, move |host| host.console_tail(&identity, &pool, max))
            .await
    }

    /// CPUs, memory and the free space of `pool` on the host (placement input).
    pub async fn capacity(&self, uri: &HostUri, pool: &str) -> Result<(HostFacts, PoolSpace)> {
        let pool = pool.to_owned();
        self.hosts
            .run(uri, move |host| {
                Ok((host.facts()?, host.pool_space(&pool)?))
            })
            .await
    }

    /// Library, driver and hypervisor versions of the host.
    pub async fn versions(&self, uri: &HostUri) -> Result<HostVersions> {
        self.hosts.run(uri, |host| host.versions()).await
    }
}
