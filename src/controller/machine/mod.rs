//! The LibvirtMachine reconciler, in the Cluster API contract's order: owner Machine → Cluster →
//! finalizer → paused → cluster infrastructure provisioned → bootstrap data → identity and
//! placement persisted in the spec (before any hypervisor side effect) → host recorded in the
//! cluster's `hostsInUse` → [`plan`] → `Backend::ensure` → providerID, addresses, status.
//! Delete: `Backend::delete` until `Gone`, then the finalizer goes. It needs neither the owner
//! Machine nor the Cluster: the persisted `spec.domainUUID` and `spec.host` name the VM, and the
//! LibvirtCluster (found through the Cluster, or by the machine's cluster-name label when the
//! Cluster is gone) gives the host's URI (from `spec.hosts`, else the URI `hostsInUse` recorded).
//! Without a persisted identity nothing was ever created, so the finalizer goes at once. When the
//! LibvirtCluster itself is gone (it normally waits for its machines, so someone removed it by
//! force), the host cannot be reached: the finalizer stays, `Deleting` says why and what to do
//! (re-create the LibvirtCluster, or remove the finalizer by hand: the re-created cluster's
//! orphan sweep deletes the domain), and the reconcile retries slowly. A paused machine (as
//! during `clusterctl move`) is never deleted from the hypervisor.
//!
//! The status is derived from the spec, the hypervisor and (for `lastTransitionTime`, the last
//! known addresses and `provisioned`, which never goes back) the previous status, so a deleted
//! status is rebuilt as it was (what `clusterctl move` relies on).

pub mod console;
pub mod plan;
pub mod triggers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::Event as Finalizer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use uuid::Uuid;

use super::cluster::{cluster_name, connectable, machine_cluster};
use super::conditions::{self as cond, reason};
use super::{
    Context, Error, Result, Settings, amend_status, capi, key, managed_elsewhere, write_status,
};
use crate::api::{
    Initialization, LibvirtCluster, LibvirtHost, LibvirtMachine, LibvirtMachineStatus,
    MachineAddress, MachineAddressType,
};
use crate::libvirt::backend::{Backend, Deletion, HostRef, Provisioning};
use crate::libvirt::error::{BackendError, ErrorKind, Step};
use crate::libvirt::identity::MachineIdentity;
use triggers::Changes;

/// Adds the LibvirtMachine's watches: its Machine (bootstrap data, failure domain, labels), its
/// Cluster (pause) and its LibvirtCluster (provisioned, `hostsInUse`). Each maps an update only
/// when the fields a reconcile reads from that object changed ([`triggers`]): the Cluster API
/// core writes Machine and Cluster statuses many times per machine.
pub fn controller(
    controller: Controller<LibvirtMachine>,
    client: &Client,
    settings: &Settings,
    machines: &Store<LibvirtMachine>,
) -> Controller<LibvirtMachine> {
    let machine_resource = capi::resource("Machine");
    let cluster_resource = capi::resource("Cluster");
    let by_cluster = machines.clone();
    let by_infra_cluster = machines.clone();
    let (machine_changes, cluster_changes, infra_changes) = (
        Arc::new(Changes::default()),
        Arc::new(Changes::default()),
        Arc::new(Changes::default()),
    );
    controller
        .watches_with(
            super::capi_api(client, settings, &machine_resource),
            machine_resource,
            watcher::Config::default(),
            move |machine: DynamicObject| {
                let namespace = machine.namespace().unwrap_or_default();
                let read = |pointer: &str| machine.data.pointer(pointer).map(|v| v.to_string());
                let fields = (
                    machine.uid(),
                    read("/spec/bootstrap"),
                    read("/spec/failureDomain"),
                    read("/spec/infrastructureRef"),
                    machine.labels().clone(),
                    machine.meta().deletion_timestamp.is_some(),
                );
                if !machine_changes.changed(key(&machine), fields) {
                    return None;
                }
                capi::string_at(&machine, "/spec/infrastructureRef/name")
                    .filter(|_| {
                        capi::string_at(&machine, "/spec/infrastructureRef/kind")
                            == Some("LibvirtMachine")
                    })
                    .map(|name| ObjectRef::new(name).within(&namespace))
            },
        )
        .watches_with(
            super::capi_api(client, settings, &cluster_resource),
            cluster_resource,
            watcher::Config::default(),
            move |cluster: DynamicObject| {
                let fields = (
                    cluster.uid(),
                    capi::paused(Some(&cluster), &cluster),
                    cluster
                        .data
                        .pointer("/spec/infrastructureRef")
                        .map(|v| v.to_string()),
                    cluster.meta().deletion_timestamp.is_some(),
                );
                if !cluster_changes.changed(key(&cluster), fields) {
                    return Vec::new();
                }
                let namespace = cluster.namespace();
                let name = cluster.name_any();
                super::refs_where(&by_cluster, |m| {
                    m.namespace() == namespace && machine_cluster(m) == Some(name.as_str())
                })
            },
        )
        .watches(
            settings.api::<LibvirtCluster>(client),
            settings.watcher_config(),
            move |infra: LibvirtCluster| {
                let status = infra.status.as_ref();
                let fields = (
                    infra.uid(),
                    infra.meta().generation,
                    status
                        .and_then(|s| s.initialization.as_ref())
                        .and_then(|i| i.provisioned),
                    status
                        .and_then(|s| s.hosts_in_use.as_ref())
                        .map(|h| serde_json::to_string(h).unwrap_or_default()),
                    infra.meta().deletion_timestamp.is_some(),
                    cluster_name(&infra),
                );
                if !infra_changes.changed(key(&infra), fields) {
                    return Vec::new();
                }
                let namespace = infra.namespace();
                let name = cluster_name(&infra);
                super::refs_where(&by_infra_cluster, |m| {
                    m.namespace() == namespace
                        && name.is_some()
                        && machine_cluster(m) == name.as_deref()
                })
            },
        )
}

/// Reconciles one LibvirtMachine.
#[tracing::instrument(skip_all, fields(object = %key(object.as_ref())))]
pub async fn reconcile<B: Backend>(
    object: Arc<LibvirtMachine>,
    ctx: Arc<Context<B>>,
) -> Result<Action> {
    if managed_elsewhere(object.as_ref()) {
        return Ok(Action::await_change());
    }
    let namespace = object
        .namespace()
        .ok_or_else(|| Error::Object("a LibvirtMachine without a namespace".into()))?;
    let api: Api<LibvirtMachine> = Api::namespaced(ctx.client.clone(), &namespace);
    let deleting = object.meta().deletion_timestamp.is_some();

    // Owner Machine, then its Cluster: wait quietly for both (their arrival triggers us); a
    // deletion goes on without them.
    let machine = match capi::owner_name(object.as_ref(), "Machine") {
        Some(name) => capi::get(&ctx.client, "Machine", &namespace, &name).await?,
        None => None,
    };
    if machine.is_none() && !deleting {
        return Ok(Action::await_change());
    }
    let cluster = match machine_cluster(&object) {
        Some(name) => capi::get(&ctx.client, "Cluster", &namespace, name).await?,
        None => None,
    };
    if cluster.is_none() && !deleting {
        return Ok(Action::await_change());
    }

    // Deleting: the finalizer helper runs the cleanup while our finalizer is on the object,
    // then removes it.
    if deleting {
        return super::with_finalizer(&api, object, |event| async {
            match event {
                Finalizer::Cleanup(object) => cleanup(&api, &object, cluster.as_ref(), &ctx).await,
                // Not reached for an object being deleted.
                Finalizer::Apply(_) => Ok(Action::await_change()),
            }
        })
        .await;
    }
    let (Some(machine), Some(cluster)) = (machine.as_ref(), cluster.as_ref()) else {
        return Ok(Action::await_change());
    };
    // The finalizer is added in `apply`, with the identity and before any side effect.
    apply(&api, object, machine, cluster, &ctx).await
}

/// Whether the object carries our finalizer.
fn has_finalizer(object: &LibvirtMachine) -> bool {
    object.finalizers().iter().any(|f| f == super::FINALIZER)
}

/// Adds our finalizer (when missing) and sets `spec` fields, in one JSON patch. Like kube's
/// finalizer helper, the patch first tests the finalizer list it extends, so that a concurrent
/// change of the list fails the patch instead of being overwritten.
async fn persist(
    api: &Api<LibvirtMachine>,
    object: &LibvirtMachine,
    spec: &[(&str, &str)],
) -> Result<LibvirtMachine> {
    let mut ops = Vec::new();
    if !has_finalizer(object) {
        if object.finalizers().is_empty() {
            ops.push(json!({"op": "test", "path": "/metadata/finalizers", "value": null}));
            ops.push(
                json!({"op": "add", "path": "/metadata/finalizers", "value": [super::FINALIZER]}),
            );
        } else {
            ops.push(
                json!({"op": "test", "path": "/metadata/finalizers", "value": object.finalizers()}),
            );
            ops.push(
                json!({"op": "add", "path": "/metadata/finalizers/-", "value": super::FINALIZER}),
            );
        }
    }
    for (field, value) in spec {
        ops.push(json!({"op": "add", "path": format!("/spec/{field}"), "value": value}));
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| Error::Object(format!("building a patch: {e}")))?;
    Ok(api
        .patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await?)
}

/// The status being built by one reconcile.
struct Draft {
    previous: LibvirtMachineStatus,
    before: Vec<Condition>,
    conditions: Vec<Condition>,
    status: LibvirtMachineStatus,
    generation: Option<i64>,
}

impl Draft {
    /// A status for `object`: identity fields from the spec, `provisioned` and the addresses
    /// carried over from the previous status.
    fn new(object: &LibvirtMachine) -> Self {
        let previous = object.status.clone().unwrap_or_default();
        let provisioned = previous
            .initialization
            .as_ref()
            .and_then(|i| i.provisioned)
            .unwrap_or(false);
        let status = LibvirtMachineStatus {
            initialization: provisioned.then_some(Initialization {
                provisioned: Some(true),
            }),
            ready: provisioned.then_some(true),
            addresses: previous.addresses.clone(),
            failure_domain: object.spec.host.clone(),
            host: object.spec.host.clone(),
            domain_uuid: object.spec.domain_uuid.clone(),
            state: previous.state.clone(),
            observed_generation: object.meta().generation,
            conditions: None,
        };
        Self {
            before: previous.conditions.clone().unwrap_or_default(),
            previous,
            conditions: Vec::new(),
            status,
            generation: object.meta().generation,
        }
    }

    fn set(&mut self, kind: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let condition = cond::new(kind, ok, reason, message, self.generation);
        cond::set(&mut self.conditions, &self.before, condition);
    }

    /// The object was patched to `generation` by this reconcile: the status describes it.
    fn observed(&mut self, generation: Option<i64>) {
        self.generation = generation;
        self.status.observed_generation = generation;
        for condition in &mut self.conditions {
            condition.observed_generation = generation;
        }
    }

    /// Whether the status being built shows addresses (the last known ones included).
    fn has_addresses(&self) -> bool {
        self.status
            .addresses
            .as_ref()
            .is_some_and(|a| !a.is_empty())
    }

    /// The VM is not there (yet): `VMProvisioned` and the summary say why.
    fn waiting(&mut self, reason: &str, message: impl Into<String>) {
        self.set(cond::VM_PROVISIONED, false, reason, message);
    }

    /// The status with the summary `Ready`: true when the VM runs and has an address, else the
    /// first unmet condition's reason.
    fn finish(mut self) -> (LibvirtMachineStatus, LibvirtMachineStatus) {
        let summary = [cond::VM_PROVISIONED, cond::ADDRESSES_KNOWN]
            .iter()
            .map(|kind| cond::find(&self.conditions, kind))
            .find(|c| c.is_none_or(|c| c.status != cond::TRUE))
            .map(|c| c.cloned());
        let ready = match summary {
            None => cond::new(cond::READY, true, reason::READY, "", self.generation),
            Some(Some(unmet)) => cond::new(
                cond::READY,
                false,
                &unmet.reason,
                unmet.message,
                self.generation,
            ),
            Some(None) => cond::new(cond::READY, false, reason::CREATING, "", self.generation),
        };
        cond::set(&mut self.conditions, &self.before, ready);
        self.status.conditions = Some(cond::sorted(self.conditions));
        (self.previous, self.status)
    }
}

async fn apply<B: Backend>(
    api: &Api<LibvirtMachine>,
    object: Arc<LibvirtMachine>,
    machine: &DynamicObject,
    cluster: &DynamicObject,
    ctx: &Context<B>,
) -> Result<Action> {
    let mut draft = Draft::new(&object);

    // Paused: only say so; no libvirt call.
    if capi::paused(Some(cluster), object.as_ref()) {
        let generation = draft.generation;
        amend_status(
            api,
            object.as_ref(),
            &object.status.clone().unwrap_or_default(),
            vec![cond::new(
                cond::PAUSED,
                true,
                reason::PAUSED,
                "reconciliation is paused",
                generation,
            )],
            ctx,
        )
        .await?;
        return Ok(Action::await_change());
    }
    draft.set(cond::PAUSED, false, reason::NOT_PAUSED, "");

    // After a failure this object rests (its own status write must not retry at once).
    let k = key(object.as_ref());
    if let Some(left) = ctx.parked(&k, draft.generation) {
        return Ok(Action::requeue(left));
    }
    let generation = draft.generation;
    let invalid = || Action::requeue(ctx.park(&k, generation, ctx.settings.invalid_requeue));

    // Cluster infrastructure provisioned.
    let cluster_name = cluster.name_any();
    let infra = infra_cluster(ctx, &object, Some(cluster)).await?;
    let Some(infra) = infra.filter(|c| {
        c.status
            .as_ref()
            .and_then(|s| s.initialization.as_ref())
            .and_then(|i| i.provisioned)
            == Some(true)
    }) else {
        draft.waiting(
            reason::WAITING_FOR_CLUSTER_INFRASTRUCTURE,
            "the LibvirtCluster is not provisioned yet",
        );
        return finish(api, &object, draft, ctx, Action::await_change()).await;
    };

    // Bootstrap data: creation needs it. A machine whose VM was made (its providerID is set) goes
    // on without it: `clusterctl move` leaves behind Secrets nothing owns, and the VM has its data.
    let data = match capi::bootstrap_data(&ctx.client, machine).await? {
        Ok(data) => Some(data),
        Err(_) if object.spec.provider_id.is_some() => None,
        Err(problem) => {
            let (message, next) = match problem {
                capi::BootstrapProblem::NotNamed => (
                    "the Machine has no spec.bootstrap.dataSecretName yet".to_owned(),
                    Action::await_change(),
                ),
                capi::BootstrapProblem::Missing(name) => (
                    format!("bootstrap data Secret {name} does not exist yet"),
                    Action::requeue(ctx.settings.poll_interval * 5),
                ),
                capi::BootstrapProblem::Invalid(message) => (message, invalid()),
            };
            draft.waiting(reason::WAITING_FOR_BOOTSTRAP_DATA, message);
            return finish(api, &object, draft, ctx, next).await;
        }
    };

    // Identity and placement, persisted before any side effect.
    let object = if object.spec.domain_uuid.is_none() || object.spec.host.is_none() {
        let host = match &object.spec.host {
            Some(host) => host.clone(),
            None => match place(&object, machine, &infra, ctx).await {
                Ok(host) => host,
                Err((reason, message, next)) => {
                    draft.waiting(reason, message);
                    return finish(api, &object, draft, ctx, next).await;
                }
            },
        };
        let uuid = match &object.spec.domain_uuid {
            Some(uuid) => uuid.clone(),
            None => MachineIdentity::uuid_for_uid(object.uid().as_deref().unwrap_or_default())
                .to_string(),
        };
        // With the finalizer: from here on, deleting the object goes through the cleanup.
        let patched = persist(api, &object, &[("domainUUID", &uuid), ("host", &host)]).await?;
        draft.observed(patched.meta().generation);
        draft.status.host = patched.spec.host.clone();
        draft.status.failure_domain = patched.spec.host.clone();
        draft.status.domain_uuid = patched.spec.domain_uuid.clone();
        Arc::new(patched)
    } else {
        object
    };
    let (Some(identity), Some(host_name)) = (identity(&object), object.spec.host.clone()) else {
        draft.waiting(reason::INVALID_SPEC, "spec.domainUUID is not a UUID");
        return finish(api, &object, draft, ctx, invalid()).await;
    };
    // An identity persisted without our finalizer (a moved object, a finalizer removed by hand):
    // the finalizer first, before anything is created.
    let object = if has_finalizer(&object) {
        object
    } else {
        Arc::new(persist(api, &object, &[]).await?)
    };

    // The host, and its record in the cluster's hostsInUse (made before anything is created).
    let host = match resolve_host(&infra, &host_name, ctx).await {
        Ok(host) => host,
        Err(message) => {
            draft.waiting(reason::INVALID_SPEC, message);
            return finish(api, &object, draft, ctx, invalid()).await;
        }
    };
    if !host_recorded(&infra, &host_name) && !host_recorded_soon(&infra, &host_name, ctx).await {
        draft.waiting(
            reason::WAITING_FOR_HOST_RECORD,
            format!(
                "waiting for host {host_name} to be recorded in the LibvirtCluster's hostsInUse"
            ),
        );
        return finish(
            api,
            &object,
            draft,
            ctx,
            Action::requeue(ctx.settings.poll_interval),
        )
        .await;
    }

    // Without bootstrap data only an existing VM is looked after: a VM that is gone is not made
    // again without its data.
    if data.is_none() && matches!(ctx.backend.status(&host, &identity).await, Ok(None)) {
        draft.waiting(
            reason::WAITING_FOR_BOOTSTRAP_DATA,
            format!(
                "the VM is gone from host {host_name} and the Machine's bootstrap data Secret is missing: it is made again once the Secret exists"
            ),
        );
        return finish(
            api,
            &object,
            draft,
            ctx,
            Action::requeue(ctx.settings.poll_interval * 5),
        )
        .await;
    }

    // The request, then the backend.
    let request = match plan::plan(
        &object,
        &infra,
        &cluster_name,
        &identity,
        host.clone(),
        data.as_ref(),
    ) {
        Ok(request) => request,
        Err(error) => {
            draft.waiting(reason::INVALID_SPEC, error.to_string());
            return finish(api, &object, draft, ctx, invalid()).await;
        }
    };
    let state = match ctx.backend.ensure(&request).await {
        Ok(Provisioning::InProgress { step }) => {
            let reason = match step {
                Step::BaseImage => reason::IMAGE_DOWNLOADING,
                Step::Start => reason::BOOTING,
                _ => reason::CREATING,
            };
            draft.waiting(
                reason,
                format!("creating the VM on host {host_name}: {step}"),
            );
            return finish(
                api,
                &object,
                draft,
                ctx,
                Action::requeue(ctx.settings.poll_interval),
            )
            .await;
        }
        Ok(Provisioning::Ready(state)) => state,
        Err(error) => {
            let next = failed(&mut draft, &error, &k, ctx);
            return finish(api, &object, draft, ctx, next).await;
        }
    };
    ctx.succeeded(&k);

    // The VM exists: providerID, then what the hypervisor reports.
    let provider_id = plan::provider_id(&identity);
    if object.spec.provider_id.is_none() {
        let patch = json!({"spec": {"providerID": provider_id}});
        let patched = api
            .patch(
                &object.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        draft.observed(patched.meta().generation);
    }
    draft.status.state = Some(state.domain.state.clone());
    if !state.domain.is_running() {
        draft.waiting(
            reason::BOOTING,
            format!("the domain is {}", state.domain.state),
        );
        return finish(
            api,
            &object,
            draft,
            ctx,
            Action::requeue(ctx.settings.poll_interval),
        )
        .await;
    }
    draft.set(cond::VM_PROVISIONED, true, reason::READY, "");
    draft.status.initialization = Some(Initialization {
        provisioned: Some(true),
    });
    draft.status.ready = Some(true);
    let next = match ctx.backend.addresses(&host, &identity).await {
        Ok(found) if !found.is_empty() => {
            let mut addresses: Vec<MachineAddress> = found
                .iter()
                .map(|a| MachineAddress {
                    kind: MachineAddressType::InternalIp,
                    address: a.address.to_string(),
                })
                .collect();
            addresses.push(MachineAddress {
                kind: MachineAddressType::Hostname,
                address: object.name_any(),
            });
            draft.status.addresses = Some(addresses);
            draft.set(cond::ADDRESSES_KNOWN, true, reason::READY, "");
            Action::requeue(ctx.settings.resync)
        }
        Ok(_) => {
            // The guest reports none: keep the last known ones.
            if draft.has_addresses() {
                draft.set(
                    cond::ADDRESSES_KNOWN,
                    true,
                    reason::READY,
                    "the guest reports no address now; showing the last known",
                );
            } else if let Some(waited) = waiting_since(&draft.before, ctx.settings.address_timeout)
            {
                // Too long without an address: show what the guest printed.
                let tail = match ctx
                    .backend
                    .console_tail(&host, &identity, console::TAIL_BYTES)
                    .await
                {
                    Ok(text) => console::summary(
                        &text,
                        data.as_ref()
                            .map_or(&[][..], |d| d.value.expose().as_slice()),
                    ),
                    Err(error) => format!("(unavailable: {error})"),
                };
                draft.set(
                    cond::ADDRESSES_KNOWN,
                    false,
                    reason::NO_ADDRESS_TIMEOUT,
                    format!(
                        "no address {} s after boot; serial console tail: {tail}",
                        waited.as_secs()
                    ),
                );
            } else {
                draft.set(
                    cond::ADDRESSES_KNOWN,
                    false,
                    reason::WAITING_FOR_ADDRESS,
                    "the guest has not reported an address yet",
                );
            }
            Action::requeue(ctx.settings.poll_interval)
        }
        Err(error) => {
            let known = draft.has_addresses();
            draft.set(
                cond::ADDRESSES_KNOWN,
                known,
                &error.reason(),
                error.to_string(),
            );
            Action::requeue(ctx.backoff(&k))
        }
    };
    finish(api, &object, draft, ctx, next).await
}

/// Whether the cluster's `hostsInUse` records host `name`.
fn host_recorded(infra: &LibvirtCluster, name: &str) -> bool {
    infra
        .status
        .as_ref()
        .and_then(|s| s.hosts_in_use.as_ref())
        .is_some_and(|used| used.iter().any(|h| h.name == name))
}

/// How long a machine placed on a host not yet in `hostsInUse` waits inline for the cluster
/// controller to record it (it reacts to the placement within moments) before it says so in its
/// status and requeues: the first machines on a host then cost no extra status write.
const HOST_RECORD_WAIT: Duration = Duration::from_secs(2);

/// Whether host `name` shows up in the cluster's `hostsInUse` (read from the shared store)
/// within [`HOST_RECORD_WAIT`].
async fn host_recorded_soon<B: Backend>(
    infra: &LibvirtCluster,
    name: &str,
    ctx: &Context<B>,
) -> bool {
    let key = ObjectRef::from_obj(infra);
    let deadline = Instant::now() + HOST_RECORD_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if ctx
            .clusters
            .get(&key)
            .is_some_and(|current| host_recorded(&current, name))
        {
            return true;
        }
    }
    false
}

/// How long the machine has waited for an address, when that is longer than `timeout`.
fn waiting_since(before: &[Condition], timeout: Duration) -> Option<Duration> {
    let waiting = cond::find(before, cond::ADDRESSES_KNOWN).filter(|c| c.status == cond::FALSE)?;
    let waited = k8s_openapi::jiff::Timestamp::now().duration_since(waiting.last_transition_time.0);
    Duration::try_from(waited).ok().filter(|w| *w > timeout)
}

/// Records a backend failure in the draft and picks the requeue by its kind.
fn failed<B: Backend>(
    draft: &mut Draft,
    error: &BackendError,
    key: &str,
    ctx: &Context<B>,
) -> Action {
    draft.waiting(&error.reason(), error.to_string());
    let delay = match error.kind {
        ErrorKind::Invalid | ErrorKind::Conflict => ctx.settings.invalid_requeue,
        ErrorKind::Transient | ErrorKind::HostUnreachable => ctx.backoff(key),
    };
    Action::requeue(ctx.park(key, draft.generation, delay))
}

async fn finish<B: Backend>(
    api: &Api<LibvirtMachine>,
    object: &LibvirtMachine,
    draft: Draft,
    ctx: &Context<B>,
    next: Action,
) -> Result<Action> {
    let (previous, status) = draft.finish();
    write_status(api, object, &previous, &status, ctx).await?;
    Ok(next)
}

/// The machine's persisted identity (`spec.domainUUID`), when it has one.
fn identity(object: &LibvirtMachine) -> Option<MachineIdentity> {
    let uuid = Uuid::parse_str(object.spec.domain_uuid.as_deref()?).ok()?;
    Some(MachineIdentity::new(
        object.namespace().as_deref()?,
        &object.name_any(),
        uuid,
    ))
}

/// The machine's LibvirtCluster: the Cluster's `infrastructureRef`, else (the Cluster being
/// gone) the one whose cluster name matches the machine's label.
async fn infra_cluster<B: Backend>(
    ctx: &Context<B>,
    object: &LibvirtMachine,
    cluster: Option<&DynamicObject>,
) -> Result<Option<LibvirtCluster>> {
    let namespace = object.namespace().unwrap_or_default();
    let api: Api<LibvirtCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(cluster) = cluster
        && capi::string_at(cluster, "/spec/infrastructureRef/kind") == Some("LibvirtCluster")
        && let Some(name) = capi::string_at(cluster, "/spec/infrastructureRef/name")
    {
        return Ok(api.get_opt(name).await?);
    }
    let Some(wanted) = machine_cluster(object) else {
        return Ok(None);
    };
    Ok(ctx
        .clusters
        .state()
        .into_iter()
        .find(|c| {
            c.namespace().as_deref() == Some(namespace.as_str())
                && cluster_name(c).as_deref() == Some(wanted)
        })
        .map(|c| c.as_ref().clone()))
}

/// The host `name` of the cluster: from `spec.hosts`, else (removed from the spec) the URI
/// recorded in `hostsInUse`.
async fn resolve_host<B: Backend>(
    infra: &LibvirtCluster,
    name: &str,
    ctx: &Context<B>,
) -> std::result::Result<HostRef, String> {
    let host = infra
        .spec
        .hosts
        .iter()
        .find(|h| h.name == name)
        .cloned()
        .or_else(|| {
            infra
                .status
                .as_ref()?
                .hosts_in_use
                .as_ref()?
                .iter()
                .find(|h| h.name == name)
                .map(|h| LibvirtHost {
                    name: h.name.clone(),
                    uri: h.uri.clone(),
                    ..LibvirtHost::default()
                })
        })
        .ok_or_else(|| format!("host {name} is not one of the LibvirtCluster's hosts"))?;
    let namespace = infra.namespace().unwrap_or_default();
    connectable(&host, &namespace, ctx)
        .await
        .map_err(|e| format!("host {name}: {e}"))
}

/// Chooses a host: the Machine's failure domain, else among the eligible hosts (control-plane
/// machines only on control-plane hosts) whose free memory fits the machine, see [`choose`].
/// Spreading reads the shared store: machines of one deployment placed at the same instant may
/// still land together.
async fn place<B: Backend>(
    object: &LibvirtMachine,
    machine: &DynamicObject,
    infra: &LibvirtCluster,
    ctx: &Context<B>,
) -> std::result::Result<String, (&'static str, String, Action)> {
    let k = key(object);
    let generation = object.meta().generation;
    let invalid = |message: String| {
        (
            reason::INVALID_SPEC,
            message,
            Action::requeue(ctx.park(&k, generation, ctx.settings.invalid_requeue)),
        )
    };
    if let Some(domain) = capi::string_at(machine, "/spec/failureDomain") {
        return if infra.spec.hosts.iter().any(|h| h.name == domain) {
            Ok(domain.to_owned())
        } else {
            Err(invalid(format!(
                "the Machine's failureDomain {domain} is not a host of the LibvirtCluster"
            )))
        };
    }
    let control_plane = machine.labels().contains_key(capi::CONTROL_PLANE_LABEL)
        || object.labels().contains_key(capi::CONTROL_PLANE_LABEL);
    let pool = plan::root_pool(object, infra);
    let needed = u64::try_from(object.spec.memory_mib.max(0)).unwrap_or(0) << 20;
    // Machines of one MachineDeployment spread over the hosts.
    let deployment = machine
        .labels()
        .get(capi::DEPLOYMENT_NAME_LABEL)
        .or_else(|| object.labels().get(capi::DEPLOYMENT_NAME_LABEL))
        .cloned();
    let namespace = object.namespace();
    let peers_on = |host: &str| match &deployment {
        Some(deployment) => ctx
            .machines
            .state()
            .iter()
            .filter(|m| {
                m.namespace() == namespace
                    && m.name_any() != object.name_any()
                    && m.spec.host.as_deref() == Some(host)
                    && m.labels().get(capi::DEPLOYMENT_NAME_LABEL) == Some(deployment)
            })
            .count(),
        None => 0,
    };
    let mut candidates = Vec::new();
    let mut problems = Vec::new();
    for host in &infra.spec.hosts {
        if control_plane && host.control_plane == Some(false) {
            continue;
        }
        let href = match connectable(host, &namespace.clone().unwrap_or_default(), ctx).await {
            Ok(href) => href,
            Err(error) => {
                problems.push(format!("{}: {error}", host.name));
                continue;
            }
        };
        match ctx.backend.capacity(&href, &pool).await {
            Ok((facts, _)) if facts.free_memory_bytes >= needed => candidates.push(Candidate {
                host: host.name.clone(),
                free_memory: facts.free_memory_bytes,
                peers: peers_on(&host.name),
            }),
            Ok(_) => problems.push(format!("{}: not enough free memory", host.name)),
            Err(error) => problems.push(format!("{}: {error}", host.name)),
        }
    }
    let best = choose(&candidates);
    best.ok_or_else(|| {
        (
            reason::NO_HOST_AVAILABLE,
            format!(
                "no {}host can take the machine: {}",
                if control_plane { "control-plane " } else { "" },
                problems.join("; ")
            ),
            Action::requeue(ctx.park(&k, generation, ctx.backoff(&k))),
        )
    })
}

/// A host that can take a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The host's name.
    pub host: String,
    /// Its free memory in bytes.
    pub free_memory: u64,
    /// Machines of the same MachineDeployment already on it.
    pub peers: usize,
}

/// The host with the fewest machines of the same MachineDeployment, then the most free memory,
/// then the first in the cluster's list.
pub fn choose(candidates: &[Candidate]) -> Option<String> {
    candidates
        .iter()
        .enumerate()
        .min_by_key(|(index, c)| (c.peers, std::cmp::Reverse(c.free_memory), *index))
        .map(|(_, c)| c.host.clone())
}

async fn cleanup<B: Backend>(
    api: &Api<LibvirtMachine>,
    object: &LibvirtMachine,
    cluster: Option<&DynamicObject>,
    ctx: &Context<B>,
) -> Result<Action> {
    let generation = object.meta().generation;
    let deleting = |ok: bool, reason: &str, message: String| {
        vec![
            cond::new(cond::DELETING, ok, reason, message.clone(), generation),
            cond::new(cond::READY, false, reason, message, generation),
        ]
    };
    // Paused (e.g. during `clusterctl move`): nothing is deleted.
    if capi::paused(cluster, object) {
        let paused = cond::new(
            cond::PAUSED,
            true,
            reason::PAUSED,
            "reconciliation is paused",
            generation,
        );
        amend_status(
            api,
            object,
            &object.status.clone().unwrap_or_default(),
            vec![paused],
            ctx,
        )
        .await?;
        return Err(Error::Wait(ctx.settings.resync));
    }
    // The identity is persisted before anything is created: without it, nothing exists.
    let (Some(identity), Some(host_name)) = (identity(object), object.spec.host.clone()) else {
        return Ok(Action::await_change());
    };
    let host = match infra_cluster(ctx, object, cluster).await? {
        Some(infra) => resolve_host(&infra, &host_name, ctx).await,
        None => Err(format!(
            "the LibvirtCluster is gone, so host {host_name} cannot be reached to delete domain {}; \
             re-create the LibvirtCluster (the VM is then deleted), or remove the finalizer by hand \
             (the orphan sweep of a re-created LibvirtCluster deletes the domain)",
            identity.uuid
        )),
    };
    let host = match host {
        Ok(host) => host,
        Err(message) => {
            amend_status(
                api,
                object,
                &object.status.clone().unwrap_or_default(),
                deleting(false, reason::DELETION_FAILED, message),
                ctx,
            )
            .await?;
            return Err(Error::Wait(ctx.settings.invalid_requeue));
        }
    };
    let k = key(object);
    match ctx
        .backend
        .delete(&host, &identity, ctx.settings.shutdown_grace)
        .await
    {
        Ok(Deletion::Gone) => {
            ctx.succeeded(&k);
            ctx.event(
                object,
                EventType::Normal,
                "Deleted",
                format!(
                    "deleted domain {} and its volumes on host {host_name}",
                    identity.uuid
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Ok(Deletion::ShuttingDown { deadline }) => {
            let message = format!("the guest on host {host_name} is shutting down");
            amend_status(
                api,
                object,
                &object.status.clone().unwrap_or_default(),
                deleting(true, reason::DELETING, message),
                ctx,
            )
            .await?;
            let left = deadline.saturating_duration_since(Instant::now());
            Err(Error::Wait(left.clamp(
                Duration::from_millis(100),
                ctx.settings.poll_interval,
            )))
        }
        Err(error) if error.kind == ErrorKind::Conflict => {
            // The UUID belongs to another object's domain: nothing of ours exists under it.
            ctx.event(
                object,
                EventType::Warning,
                &error.reason(),
                error.to_string(),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(error) => {
            let failed = deleting(false, reason::DELETION_FAILED, error.to_string());
            amend_status(
                api,
                object,
                &object.status.clone().unwrap_or_default(),
                failed,
                ctx,
            )
            .await?;
            Err(Error::Wait(ctx.backoff(&k)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LibvirtMachineSpec;

    fn object() -> LibvirtMachine {
        let mut m = LibvirtMachine::new("m1", LibvirtMachineSpec::default());
        m.metadata.namespace = Some("ns".into());
        m.metadata.generation = Some(4);
        m.spec.host = Some("a".into());
        m.spec.domain_uuid = Some(MachineIdentity::uuid_for_uid("u").to_string());
        m
    }

    fn ready(status: &LibvirtMachineStatus) -> (String, String) {
        let c = cond::find(
            status.conditions.as_deref().unwrap_or_default(),
            cond::READY,
        )
        .expect("Ready");
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn the_summary_names_the_first_unmet_condition() {
        let mut draft = Draft::new(&object());
        draft.set(cond::VM_PROVISIONED, true, reason::READY, "");
        draft.set(
            cond::ADDRESSES_KNOWN,
            false,
            reason::WAITING_FOR_ADDRESS,
            "none yet",
        );
        let (_, status) = draft.finish();
        assert_eq!(
            ready(&status),
            ("False".into(), reason::WAITING_FOR_ADDRESS.into())
        );
        assert_eq!(status.host.as_deref(), Some("a"));
        assert_eq!(status.failure_domain.as_deref(), Some("a"));
        assert_eq!(status.observed_generation, Some(4));

        let mut draft = Draft::new(&object());
        draft.waiting(reason::IMAGE_DOWNLOADING, "BaseImage");
        let (_, status) = draft.finish();
        assert_eq!(
            ready(&status),
            ("False".into(), reason::IMAGE_DOWNLOADING.into())
        );
        assert_eq!(status.initialization, None, "not provisioned yet");

        let mut draft = Draft::new(&object());
        draft.set(cond::VM_PROVISIONED, true, reason::READY, "");
        draft.set(cond::ADDRESSES_KNOWN, true, reason::READY, "");
        draft.observed(Some(5));
        let (_, status) = draft.finish();
        assert_eq!(ready(&status), ("True".into(), reason::READY.into()));
        assert!(
            status
                .conditions
                .iter()
                .flatten()
                .all(|c| c.observed_generation == Some(5))
        );
    }

    #[test]
    fn placement_spreads_a_deployment_then_prefers_free_memory() {
        let c = |host: &str, free_memory, peers| Candidate {
            host: host.into(),
            free_memory,
            peers,
        };
        assert_eq!(choose(&[]), None);
        assert_eq!(
            choose(&[c("a", 8, 0), c("b", 16, 0)]).as_deref(),
            Some("b"),
            "most free memory"
        );
        assert_eq!(
            choose(&[c("a", 8, 0), c("b", 16, 1)]).as_deref(),
            Some("a"),
            "fewest machines of the deployment first"
        );
        assert_eq!(
            choose(&[c("a", 8, 1), c("b", 8, 1)]).as_deref(),
            Some("a"),
            "the first of equals"
        );
    }

    #[test]
    fn the_console_is_shown_only_after_the_address_timeout() {
        let timeout = Duration::from_secs(600);
        let mut waiting = cond::new(
            cond::ADDRESSES_KNOWN,
            false,
            reason::WAITING_FOR_ADDRESS,
            "",
            None,
        );
        assert_eq!(
            waiting_since(&[waiting.clone()], timeout),
            None,
            "just started"
        );
        waiting.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        assert!(waiting_since(&[waiting.clone()], timeout).is_some_and(|w| w > timeout));
        waiting.status = cond::TRUE.into();
        assert_eq!(waiting_since(&[waiting], timeout), None, "has an address");
        assert_eq!(waiting_since(&[], timeout), None);
    }

    #[test]
    fn provisioned_and_the_last_addresses_are_carried_over() {
        let mut m = object();
        m.status = Some(LibvirtMachineStatus {
            initialization: Some(Initialization {
                provisioned: Some(true),
            }),
            addresses: Some(vec![MachineAddress {
                kind: MachineAddressType::InternalIp,
                address: "10.0.0.7".into(),
            }]),
            ..LibvirtMachineStatus::default()
        });
        let (_, status) = Draft::new(&m).finish();
        assert_eq!(status.ready, Some(true), "never goes back");
        assert_eq!(status.addresses.expect("kept")[0].address, "10.0.0.7");
    }
}
