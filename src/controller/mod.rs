//! The LibvirtCluster and LibvirtMachine controllers, on kube-runtime.
//!
//! [`run`] builds both [`Controller`]s: each watches its own kind and the Cluster API objects it
//! depends on (Machines and Clusters as [`DynamicObject`]s of `cluster.x-k8s.io/v1beta2`, mapped
//! to the objects they concern), shares its reflector store with the other controller (the
//! cluster controller rebuilds `hostsInUse`, waits for machines on delete and sweeps orphans
//! from the machine store), and stops when the shutdown future resolves. Each reconcile reads
//! like the Cluster API contract flow: see [`cluster`] and [`machine`].
//!
//! Errors: backend failures are written into conditions inside the reconcile and requeued by
//! kind (an `Invalid` spec waits long, a transient failure backs off exponentially per object);
//! Kubernetes API errors go to the error policy, which backs off the same way.

pub mod capi;
pub mod cluster;
pub mod conditions;
pub mod machine;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use self::conditions::{self as cond, StatusConditions, reason};
use crate::api::{LibvirtCluster, LibvirtMachine};
use crate::libvirt::backend::Backend;
use crate::libvirt::uri::UriPolicy;

/// Finalizer both kinds carry while the provider still has work to do on delete.
pub const FINALIZER: &str = "infrastructure.cluster.x-k8s.io/libvirt";
/// How long reconciles in flight may take to finish once the controllers are told to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// Field manager of the controllers' server-side applies.
pub const FIELD_MANAGER: &str = "capl-controller";
/// Label that hands an object to another controller: objects carrying it are skipped.
pub const MANAGED_BY_LABEL: &str = "cluster.x-k8s.io/managed-by";
/// Label selecting which objects this manager reconciles (`--watch-filter`).
pub const WATCH_FILTER_LABEL: &str = "cluster.x-k8s.io/watch-filter";

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object cannot be handled (no namespace, a broken reference).
    #[error("{0}")]
    Object(String),
    /// Not a failure: the cleanup is waiting (e.g. for a guest to shut down) and must keep the
    /// finalizer; retried after this long.
    #[error("waiting {0:?}")]
    Wait(Duration),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// Result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a manager configures about the controllers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Which libvirt URIs hosts may use (`--allow-test-driver`).
    pub uri_policy: UriPolicy,
    /// Only this namespace (`--namespace`); all when `None`.
    pub namespace: Option<String>,
    /// Only objects whose `cluster.x-k8s.io/watch-filter` label has this value
    /// (`--watch-filter`); all when `None`.
    pub watch_filter: Option<String>,
    /// LibvirtMachine reconciles running at once (0: unbounded).
    pub concurrency: u16,
    /// LibvirtCluster reconciles running at once (0: unbounded).
    pub cluster_concurrency: u16,
    /// How long a guest gets to shut down on delete before it is stopped hard.
    pub shutdown_grace: Duration,
    /// Requeue while the backend works (creation in progress, a guest shutting down).
    pub poll_interval: Duration,
    /// Requeue after an error retrying cannot fix (the spec or the host must change first).
    pub invalid_requeue: Duration,
    /// First delay of the exponential backoff of transient failures.
    pub backoff_base: Duration,
    /// Longest delay of that backoff.
    pub backoff_max: Duration,
    /// How long a running guest may go without an address before the tail of its serial
    /// console is shown in its `AddressesKnown` condition.
    pub address_timeout: Duration,
    /// Periodic re-check of a ready object (host reachability, addresses).
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            uri_policy: UriPolicy::default(),
            namespace: None,
            watch_filter: None,
            concurrency: 0,
            cluster_concurrency: 0,
            shutdown_grace: Duration::from_secs(60),
            poll_interval: Duration::from_secs(2),
            invalid_requeue: Duration::from_secs(300),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            address_timeout: Duration::from_secs(600),
            resync: Duration::from_secs(300),
        }
    }
}

impl Settings {
    /// The settings the manager's command line asks for (`--allow-test-driver`, `--namespace`,
    /// `--watch-filter`, `--sync-period`, `--libvirtmachine-concurrency`,
    /// `--libvirtcluster-concurrency`, `--guest-shutdown-timeout`, `--guest-address-timeout`);
    /// everything else keeps its default.
    pub fn from_manager(settings: &crate::config::ControllerSettings) -> Self {
        Self {
            uri_policy: settings.uri_policy,
            namespace: settings.namespace.clone(),
            watch_filter: settings.watch_filter.clone(),
            concurrency: settings.machine_concurrency,
            cluster_concurrency: settings.cluster_concurrency,
            resync: settings.sync_period,
            shutdown_grace: settings.guest_shutdown_timeout,
            address_timeout: settings.guest_address_timeout,
            ..Self::default()
        }
    }

    /// The watcher configuration every watch of our kinds uses (`--watch-filter`).
    fn watcher_config(&self) -> watcher::Config {
        match &self.watch_filter {
            Some(value) => {
                watcher::Config::default().labels(&format!("{WATCH_FILTER_LABEL}={value}"))
            }
            None => watcher::Config::default(),
        }
    }

    /// An `Api` of `K` in the watched namespace (or all).
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// Everything a reconcile needs, shared by the reconciles of one controller.
pub struct Context<B> {
    /// The Kubernetes client.
    pub client: Client,
    /// The only way to a hypervisor.
    pub backend: Arc<B>,
    /// The controllers' settings.
    pub settings: Settings,
    /// Events of this controller.
    pub recorder: Recorder,
    /// Every LibvirtMachine (the machine controller's store).
    pub machines: Store<LibvirtMachine>,
    /// Every LibvirtCluster (the cluster controller's store).
    pub clusters: Store<LibvirtCluster>,
    failures: Mutex<HashMap<String, Failures>>,
}

/// An object's consecutive failures, and until when it rests after the last one.
#[derive(Clone, Copy, Debug, Default)]
struct Failures {
    count: u32,
    /// The generation that failed and when it may be retried: triggers before then (our own
    /// status write, a watched object's update) do not call the backend again.
    parked: Option<(Option<i64>, std::time::Instant)>,
}

impl<B: Backend> Context<B> {
    /// A context for one controller.
    pub fn new(
        client: Client,
        backend: Arc<B>,
        settings: Settings,
        controller: &str,
        machines: Store<LibvirtMachine>,
        clusters: Store<LibvirtCluster>,
    ) -> Self {
        let reporter = Reporter {
            controller: controller.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            backend,
            settings,
            machines,
            clusters,
            failures: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        match self.failures.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The next delay of the object's exponential backoff (and counts the failure).
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures();
        let entry = failures.entry(key.to_owned()).or_default();
        let delay = backoff_delay(
            self.settings.backoff_base,
            self.settings.backoff_max,
            entry.count,
        );
        entry.count = entry.count.saturating_add(1);
        delay
    }

    /// Rests the object at `generation` for `delay`: until then (or a spec change) reconciles
    /// make no backend call. Returns `delay`.
    pub fn park(&self, key: &str, generation: Option<i64>, delay: Duration) -> Duration {
        let until = std::time::Instant::now() + delay;
        self.failures().entry(key.to_owned()).or_default().parked = Some((generation, until));
        delay
    }

    /// How much longer the object rests, when it was parked at this generation.
    pub fn parked(&self, key: &str, generation: Option<i64>) -> Option<Duration> {
        let (parked_at, until) = self.failures().get(key)?.parked?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        (parked_at == generation && !left.is_zero()).then_some(left)
    }

    /// Forgets the object's failures (after a successful step).
    pub fn succeeded(&self, key: &str) {
        self.failures().remove(key);
    }

    /// Publishes an Event about `object` (failures to publish are logged, never fatal).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        kind: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: kind,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::debug!(%error, reason, "publishing an event failed");
        }
    }
}

/// The delay after `failures` consecutive failures: `base`, doubling, at most `max`.
pub fn backoff_delay(base: Duration, max: Duration, failures: u32) -> Duration {
    base.saturating_mul(1u32 << failures.min(16)).min(max)
}

/// Key of an object for the backoff table.
pub fn key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Whether the object belongs to another controller (`cluster.x-k8s.io/managed-by`).
pub fn managed_elsewhere<K: Resource>(object: &K) -> bool {
    object.labels().contains_key(MANAGED_BY_LABEL)
}

/// The error policy of both controllers: a waiting cleanup is retried as asked; anything else
/// backs off exponentially per object.
fn error_policy<K: Resource, B: Backend>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context<B>>,
) -> Action {
    if let Some(wait) = waiting(error) {
        return Action::requeue(wait);
    }
    let delay = ctx.backoff(&key(object.as_ref()));
    tracing::warn!(object = %key(object.as_ref()), %error, ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay of a waiting cleanup, when the error is one.
fn waiting(error: &Error) -> Option<Duration> {
    match error {
        Error::Wait(delay) => Some(*delay),
        Error::Finalizer(inner) => match inner.as_ref() {
            kube::runtime::finalizer::Error::CleanupFailed(Error::Wait(delay))
            | kube::runtime::finalizer::Error::ApplyFailed(Error::Wait(delay)) => Some(*delay),
            _ => None,
        },
        _ => None,
    }
}

/// Runs the finalizer helper on `object`, keeping our own error type.
pub async fn with_finalizer<K, F, Fut>(api: &Api<K>, object: Arc<K>, reconcile: F) -> Result<Action>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    F: FnOnce(kube::runtime::finalizer::Event<K>) -> Fut,
    Fut: Future<Output = Result<Action>>,
{
    kube::runtime::finalizer::finalizer(api, FINALIZER, object, reconcile)
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(inner)
            | kube::runtime::finalizer::Error::CleanupFailed(inner)
                if !matches!(inner, Error::Wait(_)) =>
            {
                inner
            }
            other => Error::Finalizer(Box::new(other)),
        })
}

/// Runs both controllers with `backend` until `shutdown` resolves.
pub async fn run<B: Backend>(
    client: Client,
    backend: Arc<B>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    run_reporting(client, backend, settings, shutdown, || {}).await
}

/// [`run`], calling `synced` once both controllers' caches (reflector stores) hold the
/// apiserver's state: the manager's `caches` readiness check.
pub async fn run_reporting<B: Backend>(
    client: Client,
    backend: Arc<B>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    synced: impl FnOnce() + Send + 'static,
) -> anyhow::Result<()> {
    let wc = settings.watcher_config();
    let machine_api: Api<LibvirtMachine> = settings.api(&client);
    let cluster_api: Api<LibvirtCluster> = settings.api(&client);
    // Fail fast (and clearly) when the CRDs are not installed.
    machine_api.list(&ListParams::default().limit(1)).await?;
    cluster_api.list(&ListParams::default().limit(1)).await?;

    let (machine_controller, machines) = lean_controller(machine_api, wc.clone());
    let (cluster_controller, clusters) = lean_controller(cluster_api, wc.clone());
    let caches = {
        let (machines, clusters) = (machines.clone(), clusters.clone());
        tokio::spawn(async move {
            if synced_store(&machines).await && synced_store(&clusters).await {
                synced();
            }
        })
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let machine_config = kube::runtime::Config::default().concurrency(settings.concurrency);
    let cluster_config = kube::runtime::Config::default().concurrency(settings.cluster_concurrency);
    let resync = settings.resync;

    let machine_ctx = Arc::new(Context::new(
        client.clone(),
        backend.clone(),
        settings.clone(),
        "libvirtmachine-controller",
        machines.clone(),
        clusters.clone(),
    ));
    let machine_run = machine::controller(machine_controller, &client, &settings, &machines)
        .with_config(machine_config)
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(
            move |object, ctx| measured("LibvirtMachine", resync, machine::reconcile(object, ctx)),
            error_policy,
            machine_ctx,
        );

    let cluster_ctx = Arc::new(Context::new(
        client.clone(),
        backend,
        settings.clone(),
        "libvirtcluster-controller",
        machines.clone(),
        clusters.clone(),
    ));
    let cluster_run = cluster::controller(cluster_controller, &client, &settings, &clusters)
        .with_config(cluster_config)
        .graceful_shutdown_on(stopped(stop_rx))
        .run(
            move |object, ctx| measured("LibvirtCluster", resync, cluster::reconcile(object, ctx)),
            error_policy,
            cluster_ctx,
        );

    let stopping = stop_tx.subscribe();
    let stop = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // Reconciles in flight finish after the stop; but a runner still waiting for a store that
    // never syncs (a watched kind whose CRD is missing) would hold the shutdown forever.
    let drained = async {
        tokio::join!(
            drain(machine_run, "LibvirtMachine"),
            drain(cluster_run, "LibvirtCluster")
        )
    };
    tokio::select! {
        _ = drained => {}
        () = async {
            stopped(stopping).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => tracing::warn!(after = ?STOP_GRACE, "controllers stopped with work still waiting (a watch that never synced?)"),
    }
    stop.abort();
    caches.abort();
    Ok(())
}

/// A controller of `K` whose store keeps objects without what no reconcile reads: their
/// `managedFields` and kubectl's last-applied annotation (together often larger than the rest of
/// the object). Reconciles never write whole objects back (merge patches, and server-side apply
/// on the status), so nothing stripped is lost.
fn lean_controller<K>(api: Api<K>, wc: watcher::Config) -> (Controller<K>, Store<K>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = kube::runtime::reflector::store();
    let stream = kube::runtime::reflector(
        writer,
        watcher(api, wc).modify(|object: &mut K| {
            object.managed_fields_mut().clear();
            object
                .annotations_mut()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
        }),
    )
    .applied_objects();
    let controller =
        Controller::for_stream(stream, store.clone()).trigger_backoff(WatchBackoff::default());
    (controller, store)
}

/// Whether `store` got the apiserver's state (false: its writer is gone). Polled afresh every
/// 50 ms: a store's readiness wakes only its latest waiter, and the controller's runner waits
/// on it too.
pub(crate) async fn synced_store<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(ready) =
            tokio::time::timeout(Duration::from_millis(50), store.wait_until_ready()).await
        {
            return ready.is_ok();
        }
    }
}

/// Runs one reconcile of `kind`, recording it in `capl_reconcile_total` (result `success`: done
/// or resting until the sync period; `requeue`: waiting for something on purpose; `error`) and
/// `capl_reconcile_duration_seconds`.
async fn measured(
    kind: &'static str,
    resync: Duration,
    reconcile: impl Future<Output = Result<Action>>,
) -> Result<Action> {
    use crate::metrics::ReconcileResult;
    let timer = crate::metrics::global().reconcile_started(kind);
    let result = reconcile.await;
    timer.finish(match &result {
        Ok(action) if *action == Action::await_change() || *action == Action::requeue(resync) => {
            ReconcileResult::Success
        }
        Ok(_) => ReconcileResult::Requeue,
        Err(error) if waiting(error).is_some() => ReconcileResult::Requeue,
        Err(_) => ReconcileResult::Error,
    });
    result
}

/// First pause of a controller's watches after a watch error.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause of a controller's watches after watch errors.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The backoff of a controller's watches: 100 ms, doubling up to 2 s, reset by the next event.
/// kube-runtime pauses *all* of a controller's watches (its own kind and every `watches`) after
/// an error of any one of them, with one shared backoff; its default (0.8 s doubling to 30 s,
/// jittered up to 60 s, reset only by an event) grows with every error of every watch, so after an
/// apiserver restart (connection refused, then "410 too old resource version" once per watch) the
/// controllers stay deaf for minutes. Retrying a watch every 2 s at most is cheap.
#[derive(Clone, Debug)]
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: WATCH_BACKOFF_MIN,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(WATCH_BACKOFF_MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

/// Applies `status` (server-side apply, our field manager, forced) when it differs from
/// `previous`, and publishes an Event when the summary `Ready` condition changed.
pub(crate) async fn write_status<K, S, B>(
    api: &Api<K>,
    object: &K,
    previous: &S,
    status: &S,
    ctx: &Context<B>,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: StatusConditions,
    B: Backend,
{
    if previous == status {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await?;
    transition_event(object, previous.conditions(), status.conditions(), ctx).await;
    Ok(())
}

/// Sets `changes` on the conditions of `previous` (the stored status, everything else kept)
/// and writes the result.
pub(crate) async fn amend_status<K, S, B>(
    api: &Api<K>,
    object: &K,
    previous: &S,
    changes: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    ctx: &Context<B>,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: StatusConditions,
    B: Backend,
{
    let before = previous.conditions().unwrap_or_default().to_vec();
    let mut conditions = before.clone();
    for condition in changes {
        cond::set(&mut conditions, &before, condition);
    }
    let mut status = previous.clone();
    status.set_conditions(cond::sorted(conditions));
    write_status(api, object, previous, &status, ctx).await
}

/// Publishes an Event when the summary condition's status or reason changed.
pub async fn transition_event<K: Resource<DynamicType = ()>, B: Backend>(
    object: &K,
    before: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    after: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    ctx: &Context<B>,
) {
    let old = before.and_then(|c| cond::find(c, cond::READY));
    let Some(new) = after.and_then(|c| cond::find(c, cond::READY)) else {
        return;
    };
    if old.is_some_and(|o| o.status == new.status && o.reason == new.reason) {
        return;
    }
    let kind = if new.status == cond::TRUE
        || [
            reason::CREATING,
            reason::IMAGE_DOWNLOADING,
            reason::BOOTING,
            reason::WAITING_FOR_ADDRESS,
            reason::WAITING_FOR_BOOTSTRAP_DATA,
            reason::WAITING_FOR_CLUSTER_INFRASTRUCTURE,
            reason::WAITING_FOR_HOST_RECORD,
            reason::PAUSED,
            reason::DELETING,
        ]
        .contains(&new.reason.as_str())
    {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let note = if new.message.is_empty() {
        format!("Ready={}", new.status)
    } else {
        format!("Ready={}: {}", new.status, new.message)
    };
    ctx.event(object, kind, &new.reason, note).await;
}

/// Drives a controller's stream to its end, logging failed reconciles. (The `Stream` trait is
/// reached through [`WatchStreamExt`], its blanket extension; the crate has no `futures`
/// dependency.)
async fn drain<S, K, E1, E2>(stream: S, kind: &'static str)
where
    S: WatchStreamExt<
        Item = std::result::Result<
            (ObjectRef<K>, Action),
            kube::runtime::controller::Error<E1, E2>,
        >,
    >,
    K: Resource,
    E1: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    let mut stream = Box::pin(stream);
    while let Some(item) = std::future::poll_fn(|cx| Pin::as_mut(&mut stream).poll_next(cx)).await {
        if let Err(error) = item {
            tracing::debug!(kind, %error, "reconcile did not complete");
        }
    }
}

/// The object references of `store`'s objects that `select` keeps.
fn refs_where<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    select: impl Fn(&K) -> bool,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|o| select(o))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// A CAPI object watch (Machines or Clusters) in the watched namespace.
fn capi_api(
    client: &Client,
    settings: &Settings,
    resource: &kube::core::ApiResource,
) -> Api<DynamicObject> {
    match &settings.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn watch_backoff_is_short_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut backoff = WatchBackoff::default();
        let delays: Vec<u128> = backoff.by_ref().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (base, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let delays: Vec<u128> = (0..8)
            .map(|n| backoff_delay(base, max, n).as_millis())
            .collect();
        assert_eq!(delays, vec![200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(backoff_delay(base, max, u32::MAX), max);
    }

    #[test]
    fn settings_follow_the_command_line() {
        let cli = crate::config::Cli::parse_from([
            "manager",
            "--namespace=tenant-a",
            "--watch-filter=mine",
            "--allow-test-driver",
        ]);
        let settings = Settings::from_manager(&cli.run.controller_settings());
        assert_eq!(settings.namespace.as_deref(), Some("tenant-a"));
        assert_eq!(settings.watch_filter.as_deref(), Some("mine"));
        assert!(settings.uri_policy.allow_test_driver);
        let concurrency = Settings::from_manager(
            &crate::config::Cli::parse_from([
                "manager",
                "--libvirtmachine-concurrency=7",
                "--libvirtcluster-concurrency=2",
                "--guest-shutdown-timeout=5s",
                "--guest-address-timeout=20s",
            ])
            .run
            .controller_settings(),
        );
        assert_eq!(
            (concurrency.concurrency, concurrency.cluster_concurrency),
            (7, 2)
        );
        assert_eq!(concurrency.shutdown_grace, Duration::from_secs(5));
        assert_eq!(concurrency.address_timeout, Duration::from_secs(20));
        let defaults = Settings::from_manager(
            &crate::config::Cli::parse_from(["manager"])
                .run
                .controller_settings(),
        );
        assert_eq!((defaults.namespace, defaults.watch_filter), (None, None));
        assert!(!defaults.uri_policy.allow_test_driver);
    }
}
