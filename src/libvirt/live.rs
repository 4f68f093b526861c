//! [`LibvirtBackend`]: the [`Backend`] on libvirt, for real hosts and the in-process test driver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::HostVersions;
use super::backend::{Backend, Deletion, HostRef, MachineRequest, OwnedDomain, Provisioning};
use super::error::{BackendError, Step};
use super::hosts::Hosts;
use super::identity::MachineIdentity;
use super::image::ImageCache;
use super::machine::{DomainStatus, GuestAddress, HostFacts, Inventory};
use super::provision;
use super::tasks::{MachineLocks, Polled, Tasks};
use super::volumes::PoolSpace;

/// Every hypervisor operation a reconcile needs, on libvirt.
pub struct LibvirtBackend {
    hosts: Arc<Hosts>,
    images: Arc<ImageCache>,
    locks: Arc<MachineLocks>,
    tasks: Tasks,
    /// When a guest asked to shut down gets stopped hard, per machine (in memory only).
    deadlines: Mutex<HashMap<Uuid, Instant>>,
    /// How long `ensure` waits for a background creation before reporting it in progress.
    quick_wait: Duration,
}

/// How long the manager's backend lets `ensure` wait for a quick creation (a machine from a
/// cached image is made in well under this): the reconcile then reports the VM at once instead
/// of writing a `Creating` status first and coming back.
pub const QUICK_WAIT: Duration = Duration::from_millis(1500);

impl LibvirtBackend {
    /// The manager's backend: `per_host` is how many libvirt calls may run at once against one
    /// host; `ensure` waits up to [`QUICK_WAIT`] for a creation.
    pub fn new(per_host: usize) -> std::io::Result<Self> {
        Ok(Self::with_hosts(Arc::new(Hosts::new(per_host)))?.with_quick_wait(QUICK_WAIT))
    }

    /// `ensure` waits up to `wait` for the machine's background creation to end before it
    /// reports it in progress.
    pub fn with_quick_wait(mut self, wait: Duration) -> Self {
        self.quick_wait = wait;
        self
    }

    /// A backend on existing connections (e.g. with another call timeout); its `ensure`
    /// returns at once while a creation runs (see [`LibvirtBackend::with_quick_wait`]).
    pub fn with_hosts(hosts: Arc<Hosts>) -> std::io::Result<Self> {
        Ok(Self {
            images: Arc::new(ImageCache::new(hosts.clone())?),
            hosts,
            locks: Arc::new(MachineLocks::default()),
            tasks: Tasks::default(),
            deadlines: Mutex::new(HashMap::new()),
            quick_wait: Duration::ZERO,
        })
    }

    /// The shared connections, for calls beyond this interface (on the test driver, state lives
    /// in the connection: use these, never a second `Host::open`).
    pub fn hosts(&self) -> &Arc<Hosts> {
        &self.hosts
    }

    /// The per-machine locks every create and delete takes.
    pub fn locks(&self) -> &Arc<MachineLocks> {
        &self.locks
    }

    fn deadline(&self, uuid: Uuid) -> Option<Instant> {
        match self.deadlines.lock() {
            Ok(map) => map.get(&uuid).copied(),
            Err(poisoned) => poisoned.into_inner().get(&uuid).copied(),
        }
    }

    fn set_deadline(&self, uuid: Uuid, deadline: Option<Instant>) {
        let mut map = match self.deadlines.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        match deadline {
            Some(deadline) => map.insert(uuid, deadline),
            None => map.remove(&uuid),
        };
    }

    async fn run<T, F>(&self, host: &HostRef, step: Option<Step>, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&super::Host) -> super::Result<T> + Send + 'static,
    {
        self.hosts.run(&host.uri, f).await.map_err(|e| {
            let error = BackendError::from(e);
            match step {
                Some(step) => error.at(step),
                None => error,
            }
        })
    }
}

impl Backend for LibvirtBackend {
    async fn ensure(&self, request: &MachineRequest) -> Result<Provisioning, BackendError> {
        let uuid = request.identity.domain_uuid();
        if !self.quick_wait.is_zero() && self.tasks.is_running(uuid) {
            self.tasks.wait(uuid, self.quick_wait).await;
        }
        match self.tasks.poll(uuid) {
            Polled::Running(step) => return Ok(Provisioning::InProgress { step }),
            Polled::Finished(result) => return result.map(Provisioning::Ready),
            Polled::Idle => {}
        }
        // A machine that already runs needs no background work.
        let guard = self.locks.lock(uuid).await;
        let identity = request.identity.clone();
        let observed = self
            .hosts
            .run_keeping(&request.host.uri, guard, move |host| {
                host.machine_status(&identity)
            })
            .await
            .map_err(|e| BackendError::from(e).at(Step::Lookup))?;
        if let Some(domain) = observed.filter(DomainStatus::is_running) {
            return Ok(Provisioning::Ready(request.state(domain)));
        }
        let (hosts, images, locks, request) = (
            self.hosts.clone(),
            self.images.clone(),
            self.locks.clone(),
            request.clone(),
        );
        let step = self.tasks.start(uuid, Step::BaseImage, move |reporter| async move {
            let guard = locks.lock(uuid).await;
            let mut status = None;
            for step in Step::CREATE {
                reporter.step(step);
                match provision::run_step(&hosts, &images, &request, step, Some(guard.clone()))
                    .await
                {
                    Ok(found) => status = found.or(status),
                    Err(error) => {
                        tracing::debug!(machine = %request.identity.name, %error, "provisioning step failed");
                        return Some(Err(error));
                    }
                }
            }
            Some(status.map(|s| request.state(s)).ok_or_else(|| {
                BackendError::new(
                    super::error::ErrorKind::Transient,
                    Some(Step::Start),
                    "no domain after provisioning",
                )
            }))
        });
        if self.quick_wait.is_zero() {
            return Ok(Provisioning::InProgress { step });
        }
        // A quick creation is reported as done right away.
        self.tasks.wait(uuid, self.quick_wait).await;
        match self.tasks.poll(uuid) {
            Polled::Finished(result) => result.map(Provisioning::Ready),
            Polled::Running(step) => Ok(Provisioning::InProgress { step }),
            Polled::Idle => Ok(Provisioning::InProgress { step }),
        }
    }

    async fn status(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> Result<Option<DomainStatus>, BackendError> {
        let identity = identity.clone();
        self.run(host, Some(Step::Lookup), move |h| {
            h.machine_status(&identity)
        })
        .await
    }

    async fn delete(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
        grace: Duration,
    ) -> Result<Deletion, BackendError> {
        let uuid = identity.domain_uuid();
        self.tasks.cancel(uuid).await;
        // Waits for every blocking call a cancelled creation still runs.
        let guard = self.locks.lock(uuid).await;
        let deadline = self.deadline(uuid);
        let owned = identity.clone();
        let outcome = self
            .hosts
            .run_keeping(&host.uri, guard, move |h| {
                Ok(h.delete_machine(&owned, grace, deadline))
            })
            .await
            .map_err(|e| BackendError::from(e).at(Step::Lookup))??;
        match outcome {
            Deletion::ShuttingDown { deadline } => self.set_deadline(uuid, Some(deadline)),
            Deletion::Gone => self.set_deadline(uuid, None),
        }
        Ok(outcome)
    }

    async fn inventory(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> Result<Inventory, BackendError> {
        let identity = identity.clone();
        self.run(host, Some(Step::Lookup), move |h| h.inventory(&identity))
            .await
    }

    async fn addresses(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> Result<Vec<GuestAddress>, BackendError> {
        let identity = identity.clone();
        self.run(host, None, move |h| h.addresses(&identity)).await
    }

    async fn console_tail(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
        max: u64,
    ) -> Result<String, BackendError> {
        let identity = identity.clone();
        self.run(host, None, move |h| h.console_tail(&identity, max))
            .await
    }

    async fn capacity(
        &self,
        host: &HostRef,
        pool: &str,
    ) -> Result<(HostFacts, PoolSpace), BackendError> {
        let pool = pool.to_owned();
        self.run(host, None, move |h| Ok((h.facts()?, h.pool_space(&pool)?)))
            .await
    }

    async fn versions(&self, host: &HostRef) -> Result<HostVersions, BackendError> {
        self.run(host, None, |h| h.versions()).await
    }

    async fn list_machines(&self, host: &HostRef) -> Result<Vec<OwnedDomain>, BackendError> {
        self.run(host, None, |h| h.list_machines()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::backend::BaseImage;
    use crate::libvirt::uri::{HostUri, UriPolicy};

    fn request(uri: &HostUri, name: &str) -> MachineRequest {
        MachineRequest {
            identity: MachineIdentity::new("ns", name, MachineIdentity::uuid_for_uid(name)),
            cluster: "c".into(),
            host: HostRef {
                name: "a".into(),
                uri: uri.clone(),
                domain_type: crate::api::DomainType::Kvm,
            },
            vcpus: 1,
            memory_mib: 256,
            cpu_mode: crate::api::CpuMode::Maximum,
            firmware: crate::api::Firmware::Bios,
            pool: "default-pool".into(),
            image: BaseImage::Volume {
                pool: "default-pool".into(),
                name: "quick-golden.qcow2".into(),
            },
            root_gib: 1,
            data_disks: vec![],
            interfaces: vec![],
            bootstrap: None,
            direct_boot: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ensure_reports_a_quick_creation_at_once_and_a_zero_wait_returns_in_progress() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let uri = HostUri::parse(
            "test:///default",
            UriPolicy {
                allow_test_driver: true,
            },
        )
        .expect("uri");
        let hosts = Arc::new(Hosts::new(4));
        let golden = crate::libvirt::xml::VolumePlan {
            name: "quick-golden.qcow2".into(),
            capacity_gib: 1,
            format: "qcow2".into(),
            backing: None,
        }
        .to_xml()
        .expect("xml");
        hosts
            .run(&uri, move |host| {
                host.ensure_volume("default-pool", "quick-golden.qcow2", &golden)
            })
            .await
            .expect("golden volume");

        let quick = LibvirtBackend::with_hosts(hosts.clone())
            .expect("backend")
            .with_quick_wait(Duration::from_secs(10));
        let first = quick.ensure(&request(&uri, "quick")).await.expect("ensure");
        assert!(
            matches!(&first, Provisioning::Ready(state) if state.domain.is_running()),
            "a quick creation is done within the wait: {first:?}"
        );

        let at_once = LibvirtBackend::with_hosts(hosts).expect("backend");
        assert_eq!(
            at_once
                .ensure(&request(&uri, "at-once"))
                .await
                .expect("ensure"),
            Provisioning::InProgress {
                step: Step::BaseImage
            },
            "without a wait the call returns at once"
        );
    }
}
