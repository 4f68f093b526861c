//! [`FakeBackend`]: the controllers' test double. An in-memory [`Backend`] with the same
//! semantics as [`super::live::LibvirtBackend`] (lookup by UUID, ownership conflicts, idempotent
//! poll-style creation in the background, `ShuttingDown` then `Gone` on delete), plus fault
//! injection (fail or crash at any step, slow steps, unreachable hosts) and per-method call
//! counters, so controller tests run in milliseconds and can assert what was (not) called.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::backend::{
    Backend, BaseImage, Bootstrap, BootstrapDelivery, Deletion, HostRef, MachineRequest,
    MachineState, OwnedDomain, Provisioning,
};
use super::error::{BackendError, ErrorKind, Step};
use super::identity::MachineIdentity;
use super::machine::{
    AddressSource, DomainStatus, GuestAddress, HostFacts, Inventory, OwnedVolume,
};
use super::tasks::{MachineLocks, Polled, Tasks};
use super::uri::HostUri;
use super::volumes::PoolSpace;
use super::{HostVersions, Version};

/// A backend method, for call counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// [`Backend::ensure`].
    Ensure,
    /// [`Backend::status`].
    Status,
    /// [`Backend::delete`].
    Delete,
    /// [`Backend::inventory`].
    Inventory,
    /// [`Backend::addresses`].
    Addresses,
    /// [`Backend::console_tail`].
    ConsoleTail,
    /// [`Backend::capacity`].
    Capacity,
    /// [`Backend::versions`].
    Versions,
    /// [`Backend::list_machines`].
    ListMachines,
}

/// What goes wrong at a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The step fails with an error of this kind (nothing of the step is done).
    Fail(ErrorKind),
    /// The step is done, then the background work stops without a result, as if the manager
    /// died: the partial state stays and a later `ensure` completes it (creation steps only).
    Crash,
    /// The step takes this long (cancellable by delete).
    Slow(Duration),
}

/// How often an injected fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Times {
    /// The next time the step runs only.
    Once,
    /// Every time, until [`FakeBackend::clear_faults`].
    Always,
}

#[derive(Clone, Debug)]
struct Rule {
    step: Step,
    fault: Fault,
    times: Times,
}

#[derive(Clone, Debug)]
struct FakeDomain {
    namespace: String,
    name: String,
    cluster: String,
    domain_name: String,
    running: bool,
}

#[derive(Default)]
struct FakeHost {
    domains: HashMap<Uuid, FakeDomain>,
    /// (pool, volume).
    volumes: BTreeSet<(String, String)>,
}

#[derive(Default)]
struct World {
    hosts: HashMap<String, FakeHost>,
    rules: Vec<Rule>,
    unreachable: HashSet<String>,
    /// Every connection string a call used (credentials show as their parameters).
    connections: BTreeSet<String>,
    calls: HashMap<Method, usize>,
    ignores_acpi: bool,
    deadlines: HashMap<Uuid, Instant>,
}

fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    match world.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl World {
    fn host(&mut self, uri: &HostUri) -> &mut FakeHost {
        self.hosts.entry(uri.to_string()).or_default()
    }

    fn reachable(&mut self, uri: &HostUri, step: Option<Step>) -> Result<(), BackendError> {
        self.connections.insert(uri.connect_str().to_owned());
        if self.unreachable.contains(uri.as_str()) {
            return Err(BackendError::new(
                ErrorKind::HostUnreachable,
                step,
                format!("connecting to libvirt at {uri}: host unreachable (fake)"),
            ));
        }
        Ok(())
    }

    /// The fault for `step`, consuming a one-shot rule.
    fn fault(&mut self, step: Step) -> Option<Fault> {
        let index = self.rules.iter().position(|r| r.step == step)?;
        let rule = self.rules[index].clone();
        if rule.times == Times::Once {
            self.rules.remove(index);
        }
        Some(rule.fault)
    }

    /// The machine's domain, refusing one that belongs to another object.
    fn owned(
        &mut self,
        uri: &HostUri,
        identity: &MachineIdentity,
        step: Step,
    ) -> Result<Option<&mut FakeDomain>, BackendError> {
        let domain = self.host(uri).domains.get_mut(&identity.domain_uuid());
        match domain {
            Some(d) if d.namespace != identity.namespace || d.name != identity.name => {
                Err(BackendError::new(
                    ErrorKind::Conflict,
                    Some(step),
                    format!(
                        "a domain with UUID {} exists on {uri} but belongs to another object; it is left untouched",
                        identity.domain_uuid()
                    ),
                ))
            }
            other => Ok(other),
        }
    }
}

fn status_of(uuid: Uuid, domain: &FakeDomain) -> DomainStatus {
    DomainStatus {
        uuid: uuid.to_string(),
        name: domain.domain_name.clone(),
        state: if domain.running { "running" } else { "shutoff" }.into(),
    }
}

/// The in-memory backend (see the module documentation).
#[derive(Default)]
pub struct FakeBackend {
    world: Arc<Mutex<World>>,
    tasks: Tasks,
    locks: Arc<MachineLocks>,
}

impl FakeBackend {
    /// An empty fake: no domains, no volumes, no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `step` misbehave.
    pub fn inject(&self, step: Step, fault: Fault, times: Times) {
        lock(&self.world).rules.push(Rule { step, fault, times });
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        lock(&self.world).rules.clear();
    }

    /// Makes the host at `uri` unreachable (every call fails with `HostUnreachable`) or
    /// reachable again.
    pub fn set_unreachable(&self, uri: &HostUri, unreachable: bool) {
        let mut world = lock(&self.world);
        if unreachable {
            world.unreachable.insert(uri.to_string());
        } else {
            world.unreachable.remove(uri.as_str());
        }
    }

    /// Makes guests ignore ACPI shutdown requests (delete then waits for the grace deadline).
    pub fn set_guests_ignore_acpi(&self, ignore: bool) {
        lock(&self.world).ignores_acpi = ignore;
    }

    /// How often `method` was called.
    pub fn calls(&self, method: Method) -> usize {
        lock(&self.world).calls.get(&method).copied().unwrap_or(0)
    }

    /// Every connection string calls used, as libvirt would have received it.
    pub fn connections(&self) -> Vec<String> {
        lock(&self.world).connections.iter().cloned().collect()
    }

    /// How many calls were made, all methods together.
    pub fn total_calls(&self) -> usize {
        lock(&self.world).calls.values().sum()
    }

    /// Puts a volume on a host (e.g. an existing base image).
    pub fn add_volume(&self, uri: &HostUri, pool: &str, name: &str) {
        lock(&self.world)
            .host(uri)
            .volumes
            .insert((pool.to_owned(), name.to_owned()));
    }

    /// Puts a running domain owned by `namespace/name` with `uuid` on a host (e.g. another
    /// tenant's machine whose UUID someone copied).
    pub fn add_domain(&self, uri: &HostUri, uuid: Uuid, namespace: &str, name: &str) {
        lock(&self.world).host(uri).domains.insert(
            uuid,
            FakeDomain {
                namespace: namespace.into(),
                name: name.into(),
                cluster: String::new(),
                domain_name: format!("{namespace}_{name}"),
                running: true,
            },
        );
    }

    /// Whether a domain with `uuid` exists on the host, and whether it runs.
    pub fn domain_running(&self, uri: &HostUri, uuid: Uuid) -> Option<bool> {
        lock(&self.world)
            .host(uri)
            .domains
            .get(&uuid)
            .map(|d| d.running)
    }

    /// Every (pool, volume) on the host.
    pub fn volumes(&self, uri: &HostUri) -> Vec<(String, String)> {
        lock(&self.world)
            .host(uri)
            .volumes
            .iter()
            .cloned()
            .collect()
    }

    fn count(&self, method: Method) {
        *lock(&self.world).calls.entry(method).or_default() += 1;
    }
}

/// Plays the fault injected at `step` on the host at `uri`: an unreachable host or a `Fail` is
/// an error, a `Slow` step sleeps; returns the fault (a `Crash` is the caller's to play).
async fn injected(
    world: &Mutex<World>,
    uri: &HostUri,
    step: Step,
) -> Result<Option<Fault>, BackendError> {
    let fault = {
        let mut w = lock(world);
        w.reachable(uri, Some(step))?;
        w.fault(step)
    };
    match fault {
        Some(Fault::Fail(kind)) => Err(BackendError::new(
            kind,
            Some(step),
            format!("injected failure at {step}"),
        )),
        Some(Fault::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(fault)
        }
        _ => Ok(fault),
    }
}

/// Runs one creation step on the fake world; `Ok(false)` means "crashed after the step".
async fn fake_step(
    world: &Mutex<World>,
    request: &MachineRequest,
    step: Step,
) -> Result<bool, BackendError> {
    let uri = &request.host.uri;
    let fault = injected(world, uri, step).await?;
    let mut w = lock(world);
    w.reachable(uri, Some(step))?;
    let id = &request.identity;
    let exists = w.owned(uri, id, step)?.is_some();
    let host = w.host(uri);
    match step {
        Step::BaseImage => {
            if let BaseImage::Url(image) = &request.image {
                host.volumes
                    .insert((request.pool.clone(), image.volume_name()));
            }
        }
        Step::RootVolume => {
            if let BaseImage::Volume { pool, name } = &request.image
                && !host.volumes.contains(&(pool.clone(), name.clone()))
            {
                return Err(BackendError::new(
                    ErrorKind::Invalid,
                    Some(step),
                    format!("volume {pool}/{name} does not exist"),
                ));
            }
            host.volumes
                .insert((request.pool.clone(), request.root_name()));
        }
        Step::DataVolumes => {
            for disk in &request.data_disks {
                host.volumes
                    .insert((disk.pool.clone(), request.data_name(&disk.name)));
            }
        }
        Step::Bootstrap => {
            if !exists && let Some(volume) = bootstrap_volume(request) {
                host.volumes.insert((request.pool.clone(), volume));
            }
        }
        Step::Define if !exists => {
            host.domains.insert(
                id.domain_uuid(),
                FakeDomain {
                    namespace: id.namespace.clone(),
                    name: id.name.clone(),
                    cluster: request.cluster.clone(),
                    domain_name: id.domain_name(),
                    running: false,
                },
            );
        }
        Step::Start => match host.domains.get_mut(&id.domain_uuid()) {
            Some(domain) => domain.running = true,
            None => {
                return Err(BackendError::new(
                    ErrorKind::Transient,
                    Some(step),
                    "no domain to start",
                ));
            }
        },
        _ => {}
    }
    Ok(fault != Some(Fault::Crash))
}

fn bootstrap_volume(request: &MachineRequest) -> Option<String> {
    match request.bootstrap.as_ref()? {
        Bootstrap::CloudConfig(_) => Some(request.seed_name()),
        Bootstrap::Ignition(_) => Some(request.ignition_name()),
    }
}

fn fake_state(request: &MachineRequest, domain: DomainStatus) -> MachineState {
    MachineState {
        domain,
        bootstrap: bootstrap_volume(request).map(|volume| BootstrapDelivery::Delivered { volume }),
    }
}

impl Backend for FakeBackend {
    async fn ensure(&self, request: &MachineRequest) -> Result<Provisioning, BackendError> {
        self.count(Method::Ensure);
        let uuid = request.identity.domain_uuid();
        match self.tasks.poll(uuid) {
            Polled::Running(step) => return Ok(Provisioning::InProgress { step }),
            Polled::Finished(result) => return result.map(Provisioning::Ready),
            Polled::Idle => {}
        }
        {
            let _guard = self.locks.lock(uuid).await;
            let mut world = lock(&self.world);
            world.reachable(&request.host.uri, Some(Step::Lookup))?;
            if let Some(domain) = world.owned(&request.host.uri, &request.identity, Step::Lookup)?
                && domain.running
            {
                let status = status_of(uuid, domain);
                return Ok(Provisioning::Ready(fake_state(request, status)));
            }
        }
        let (world, locks, request) = (self.world.clone(), self.locks.clone(), request.clone());
        let step = self
            .tasks
            .start(uuid, Step::BaseImage, move |reporter| async move {
                let _guard = locks.lock(uuid).await;
                for step in Step::CREATE {
                    reporter.step(step);
                    match fake_step(&world, &request, step).await {
                        Ok(true) => {}
                        Ok(false) => return None,
                        Err(error) => return Some(Err(error)),
                    }
                }
                let mut w = lock(&world);
                let domain = w
                    .host(&request.host.uri)
                    .domains
                    .get(&uuid)
                    .map(|d| status_of(uuid, d));
                Some(domain.map(|d| fake_state(&request, d)).ok_or_else(|| {
                    BackendError::new(ErrorKind::Transient, Some(Step::Start), "no domain")
                }))
            });
        Ok(Provisioning::InProgress { step })
    }

    async fn status(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> Result<Option<DomainStatus>, BackendError> {
        self.count(Method::Status);
        let mut world = lock(&self.world);
        world.reachable(&host.uri, Some(Step::Lookup))?;
        Ok(world
            .owned(&host.uri, identity, Step::Lookup)?
            .map(|d| status_of(identity.domain_uuid(), d)))
    }

    async fn delete(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
        grace: Duration,
    ) -> Result<Deletion, BackendError> {
        self.count(Method::Delete);
        let uuid = identity.domain_uuid();
        self.tasks.cancel(uuid).await;
        let _guard = self.locks.lock(uuid).await;
        for step in [
            Step::Lookup,
            Step::Shutdown,
            Step::Destroy,
            Step::Undefine,
            Step::DeleteVolumes,
        ] {
            injected(&self.world, &host.uri, step).await?;
        }
        let mut world = lock(&self.world);
        let ignores_acpi = world.ignores_acpi;
        let deadline = world.deadlines.get(&uuid).copied();
        if let Some(domain) = world.owned(&host.uri, identity, Step::Lookup)?
            && domain.running
        {
            match deadline {
                None if !grace.is_zero() => {
                    domain.running = ignores_acpi;
                    let deadline = Instant::now() + grace;
                    world.deadlines.insert(uuid, deadline);
                    return Ok(Deletion::ShuttingDown { deadline });
                }
                Some(deadline) if Instant::now() < deadline => {
                    return Ok(Deletion::ShuttingDown { deadline });
                }
                _ => domain.running = false,
            }
        }
        world.deadlines.remove(&uuid);
        let prefix = identity.volume_prefix();
        let fake_host = world.host(&host.uri);
        fake_host.domains.remove(&uuid);
        fake_host
            .volumes
            .retain(|(_, name)| !name.starts_with(&prefix));
        Ok(Deletion::Gone)
    }

    async fn inventory(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> Result<Inventory, BackendError> {
        self.count(Method::Inventory);
        let mut world = lock(&self.world);
        world.reachable(&host.uri, Some(Step::Lookup))?;
        let domain = world
            .owned(&host.uri, identity, Step::Lookup)?
            .map(|d| d.domain_name.clone());
        let prefix = identity.volume_prefix();
        let volumes = world
            .host(&host.uri)
            .volumes
            .iter()
            .filter(|(_, name)| name.starts_with(&prefix))
            .map(|(pool, name)| OwnedVolume {
                pool: pool.clone(),
                name: name.clone(),
                path: format!("/fake/{pool}/{name}"),
            })
            .collect();
        Ok(Inventory { domain, volumes })
    }

    async fn addresses(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
    ) -> Result<Vec<GuestAddress>, BackendError> {
        self.count(Method::Addresses);
        let mut world = lock(&self.world);
        world.reachable(&host.uri, None)?;
        let running = world
            .owned(&host.uri, identity, Step::Lookup)?
            .is_some_and(|d| d.running);
        if !running {
            return Ok(Vec::new());
        }
        let b = identity.domain_uuid().into_bytes();
        Ok(vec![GuestAddress {
            mac: None,
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, b[0], b[1], b[2].max(2))),
            source: AddressSource::Lease,
        }])
    }

    async fn console_tail(
        &self,
        host: &HostRef,
        identity: &MachineIdentity,
        _max: u64,
    ) -> Result<String, BackendError> {
        self.count(Method::ConsoleTail);
        let mut world = lock(&self.world);
        world.reachable(&host.uri, None)?;
        world.owned(&host.uri, identity, Step::Lookup)?;
        Ok(String::new())
    }

    async fn capacity(
        &self,
        host: &HostRef,
        _pool: &str,
    ) -> Result<(HostFacts, PoolSpace), BackendError> {
        self.count(Method::Capacity);
        lock(&self.world).reachable(&host.uri, None)?;
        Ok((
            HostFacts {
                cpus: 16,
                memory_bytes: 64 << 30,
                free_memory_bytes: 48 << 30,
            },
            PoolSpace {
                capacity: 1 << 40,
                available: 1 << 39,
            },
        ))
    }

    async fn versions(&self, host: &HostRef) -> Result<HostVersions, BackendError> {
        self.count(Method::Versions);
        lock(&self.world).reachable(&host.uri, None)?;
        Ok(HostVersions {
            libvirt: Version(9_000_000),
            driver: "FAKE".into(),
            hypervisor: Version(7_002_000),
        })
    }

    async fn list_machines(&self, host: &HostRef) -> Result<Vec<OwnedDomain>, BackendError> {
        self.count(Method::ListMachines);
        let mut world = lock(&self.world);
        world.reachable(&host.uri, None)?;
        let mut found: Vec<OwnedDomain> = world
            .host(&host.uri)
            .domains
            .iter()
            .map(|(uuid, d)| OwnedDomain {
                uuid: *uuid,
                namespace: d.namespace.clone(),
                name: d.name.clone(),
                cluster: d.cluster.clone(),
            })
            .collect();
        found.sort_by_key(|d| d.uuid);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CpuMode, DomainType, Firmware};
    use crate::libvirt::backend::DataDisk;
    use crate::libvirt::uri::UriPolicy;

    fn host() -> HostRef {
        HostRef {
            name: "a".into(),
            uri: HostUri::parse("qemu+ssh://root@host-a/system", UriPolicy::default())
                .expect("uri"),
            domain_type: DomainType::Kvm,
        }
    }

    fn request(name: &str) -> MachineRequest {
        MachineRequest {
            identity: MachineIdentity::new("ns", name, MachineIdentity::uuid_for_uid(name)),
            cluster: "c".into(),
            host: host(),
            vcpus: 1,
            memory_mib: 512,
            cpu_mode: CpuMode::HostPassthrough,
            firmware: Firmware::Bios,
            pool: "default".into(),
            image: BaseImage::Volume {
                pool: "default".into(),
                name: "golden.qcow2".into(),
            },
            root_gib: 10,
            data_disks: vec![DataDisk {
                name: "etcd".into(),
                size_gib: 1,
                pool: "fast".into(),
            }],
            interfaces: vec![],
            bootstrap: Some(Bootstrap::Ignition(b"{}".to_vec().into())),
            direct_boot: None,
        }
    }

    fn backend() -> FakeBackend {
        let fake = FakeBackend::new();
        fake.add_volume(&host().uri, "default", "golden.qcow2");
        fake
    }

    /// Calls `ensure` until it stops reporting progress.
    async fn settle(
        fake: &FakeBackend,
        request: &MachineRequest,
    ) -> Result<Provisioning, BackendError> {
        for _ in 0..200 {
            match fake.ensure(request).await {
                Ok(Provisioning::InProgress { .. }) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                other => return other,
            }
        }
        panic!("ensure never settled");
    }

    #[tokio::test]
    async fn ensure_is_poll_style_idempotent_and_delete_leaves_nothing() {
        let fake = backend();
        let req = request("m1");
        assert!(matches!(
            fake.ensure(&req).await,
            Ok(Provisioning::InProgress {
                step: Step::BaseImage
            })
        ));
        let Ok(Provisioning::Ready(state)) = settle(&fake, &req).await else {
            panic!("not ready")
        };
        assert!(state.domain.is_running());
        assert!(matches!(
            state.bootstrap,
            Some(BootstrapDelivery::Delivered { .. })
        ));
        assert_eq!(
            fake.ensure(&req).await,
            Ok(Provisioning::Ready(state)),
            "a ready machine stays ready"
        );
        let owned = fake
            .inventory(&req.host, &req.identity)
            .await
            .expect("inventory");
        assert_eq!(owned.volumes.len(), 3, "root, data, ignition: {owned:?}");
        assert!(matches!(
            fake.delete(&req.host, &req.identity, Duration::from_secs(30))
                .await,
            Ok(Deletion::ShuttingDown { .. })
        ));
        assert_eq!(
            fake.delete(&req.host, &req.identity, Duration::from_secs(30))
                .await,
            Ok(Deletion::Gone),
            "the guest honoured ACPI"
        );
        assert!(
            fake.inventory(&req.host, &req.identity)
                .await
                .expect("inv")
                .is_empty()
        );
        assert_eq!(
            fake.volumes(&req.host.uri),
            vec![("default".into(), "golden.qcow2".into())]
        );
        assert_eq!(fake.calls(Method::Delete), 2);
    }

    #[tokio::test]
    async fn a_failure_is_reported_once_then_retried() {
        let fake = backend();
        let req = request("m2");
        fake.inject(Step::Define, Fault::Fail(ErrorKind::Invalid), Times::Once);
        let error = settle(&fake, &req).await.expect_err("injected");
        assert_eq!(
            (error.step, error.kind),
            (Some(Step::Define), ErrorKind::Invalid)
        );
        assert_eq!(error.reason(), "DefineInvalid");
        assert!(matches!(
            settle(&fake, &req).await,
            Ok(Provisioning::Ready(_))
        ));

        fake.inject(
            Step::RootVolume,
            Fault::Fail(ErrorKind::Transient),
            Times::Always,
        );
        let other = request("m3");
        assert!(settle(&fake, &other).await.is_err());
        assert!(settle(&fake, &other).await.is_err(), "always");
        fake.clear_faults();
        assert!(matches!(
            settle(&fake, &other).await,
            Ok(Provisioning::Ready(_))
        ));
    }

    #[tokio::test]
    async fn a_crash_leaves_partial_state_that_the_next_ensure_completes() {
        let fake = backend();
        let req = request("m4");
        fake.inject(Step::Define, Fault::Crash, Times::Once);
        fake.ensure(&req).await.expect("started");
        for _ in 0..100 {
            if fake.domain_running(&req.host.uri, req.identity.uuid) == Some(false)
                && !fake.tasks.is_running(req.identity.uuid)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            fake.domain_running(&req.host.uri, req.identity.uuid),
            Some(false),
            "defined, never started"
        );
        assert!(matches!(
            settle(&fake, &req).await,
            Ok(Provisioning::Ready(_))
        ));
        assert_eq!(fake.list_machines(&req.host).await.expect("list").len(), 1);
    }

    #[tokio::test]
    async fn a_slow_step_is_in_progress_and_delete_cancels_it() {
        let fake = backend();
        let req = request("m5");
        fake.inject(
            Step::DataVolumes,
            Fault::Slow(Duration::from_secs(60)),
            Times::Once,
        );
        fake.ensure(&req).await.expect("started");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            fake.ensure(&req).await,
            Ok(Provisioning::InProgress {
                step: Step::DataVolumes
            })
        );
        let started = Instant::now();
        assert_eq!(
            fake.delete(&req.host, &req.identity, Duration::ZERO).await,
            Ok(Deletion::Gone)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cancelled, not waited for"
        );
        assert!(
            fake.inventory(&req.host, &req.identity)
                .await
                .expect("inv")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_unreachable_host_fails_every_call_and_counts_it() {
        let fake = backend();
        let req = request("m6");
        fake.set_unreachable(&req.host.uri, true);
        let error = fake.ensure(&req).await.expect_err("unreachable");
        assert_eq!(error.kind, ErrorKind::HostUnreachable);
        assert_eq!(error.reason(), "HostUnreachable");
        assert!(fake.versions(&req.host).await.is_err());
        assert!(
            fake.delete(&req.host, &req.identity, Duration::ZERO)
                .await
                .is_err()
        );
        fake.set_unreachable(&req.host.uri, false);
        assert!(matches!(
            settle(&fake, &req).await,
            Ok(Provisioning::Ready(_))
        ));
        assert_eq!(fake.calls(Method::Versions), 1);
        assert!(fake.total_calls() >= 4);
    }

    #[tokio::test]
    async fn another_objects_domain_is_a_conflict_and_untouched() {
        let fake = backend();
        let req = request("m7");
        fake.add_domain(&req.host.uri, req.identity.uuid, "other-tenant", "their-vm");
        let error = fake.ensure(&req).await.expect_err("conflict");
        assert_eq!(error.kind, ErrorKind::Conflict);
        assert!(!error.message.contains("other-tenant"), "{error}");
        assert_eq!(
            fake.delete(&req.host, &req.identity, Duration::ZERO)
                .await
                .map_err(|e| e.kind),
            Err(ErrorKind::Conflict)
        );
        assert!(fake.status(&req.host, &req.identity).await.is_err());
        assert_eq!(
            fake.domain_running(&req.host.uri, req.identity.uuid),
            Some(true)
        );
    }

    #[tokio::test]
    async fn a_guest_ignoring_acpi_is_stopped_after_the_deadline() {
        let fake = backend();
        fake.set_guests_ignore_acpi(true);
        let req = request("m8");
        settle(&fake, &req).await.expect("ready");
        let grace = Duration::from_millis(50);
        let Ok(Deletion::ShuttingDown { deadline }) =
            fake.delete(&req.host, &req.identity, grace).await
        else {
            panic!("shutting down")
        };
        assert!(matches!(
            fake.delete(&req.host, &req.identity, grace).await,
            Ok(Deletion::ShuttingDown { deadline: d }) if d == deadline
        ));
        tokio::time::sleep(grace).await;
        assert_eq!(
            fake.delete(&req.host, &req.identity, grace).await,
            Ok(Deletion::Gone)
        );
        fake.inject(
            Step::Undefine,
            Fault::Fail(ErrorKind::Transient),
            Times::Once,
        );
        assert!(fake.delete(&req.host, &req.identity, grace).await.is_err());
    }
}
