//! The LibvirtCluster reconciler: owner Cluster → finalizer → paused → hosts probed → failure
//! domains, `hostsInUse` (rebuilt from the LibvirtMachines that record a host) and the orphan
//! sweep → provisioned and `Ready`. Delete waits until the cluster's LibvirtMachines are gone.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::Event as Finalizer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use super::conditions::{self as cond, reason};
use super::{
    Context, Error, Result, Settings, amend_status, capi, key, managed_elsewhere, write_status,
};
use crate::api::{
    DomainType, FailureDomain, HostInUse, Initialization, LibvirtCluster, LibvirtClusterStatus,
    LibvirtHost, LibvirtMachine,
};
use crate::libvirt::backend::{Backend, Deletion, HostRef};
use crate::libvirt::credentials::{CredentialFiles, Credentials};
use crate::libvirt::identity::MachineIdentity;
use crate::libvirt::uri::{HostUri, UriPolicy};

/// The Cluster API cluster a LibvirtCluster belongs to: its `cluster.x-k8s.io/cluster-name`
/// label, else its owner Cluster.
pub fn cluster_name(object: &LibvirtCluster) -> Option<String> {
    object
        .labels()
        .get(capi::CLUSTER_NAME_LABEL)
        .cloned()
        .or_else(|| capi::owner_name(object, "Cluster"))
}

/// The cluster a LibvirtMachine belongs to (its `cluster.x-k8s.io/cluster-name` label).
pub fn machine_cluster(machine: &LibvirtMachine) -> Option<&str> {
    machine
        .labels()
        .get(capi::CLUSTER_NAME_LABEL)
        .map(String::as_str)
}

/// The host `name` of the cluster as the backend addresses it, checked against `policy`.
pub fn host_ref(host: &LibvirtHost, policy: UriPolicy) -> std::result::Result<HostRef, String> {
    let uri = HostUri::parse(&host.uri, policy).map_err(|e| e.to_string())?;
    Ok(HostRef {
        name: host.name.clone(),
        uri,
        domain_type: host.domain_type.unwrap_or(DomainType::Kvm),
    })
}

/// The host as the backend connects to it: [`host_ref`], plus the credentials of its
/// `credentialsSecretRef` (a Secret in `namespace`) written where libvirt reads them (see
/// [`crate::libvirt::credentials`]). Errors name the Secret and the key at fault, never a value.
pub async fn connectable<B: Backend>(
    host: &LibvirtHost,
    namespace: &str,
    ctx: &Context<B>,
) -> std::result::Result<HostRef, String> {
    let mut href = host_ref(host, ctx.settings.uri_policy)?;
    let Some(secret_ref) = &host.credentials_secret_ref else {
        return Ok(href);
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = match secrets.get_opt(&secret_ref.name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(format!(
                "credentials Secret {} does not exist",
                secret_ref.name
            ));
        }
        Err(error) => {
            return Err(format!(
                "reading credentials Secret {}: {error}",
                secret_ref.name
            ));
        }
    };
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let credentials = Credentials::from_secret(href.uri.transport(), &data)
        .map_err(|e| format!("credentials Secret {}: {e}", secret_ref.name))?;
    let dir = CredentialFiles::global()
        .and_then(|files| files.write(&credentials))
        .map_err(|e| format!("writing the credentials of Secret {}: {e}", secret_ref.name))?;
    href.uri = href.uri.with_credentials(&credentials, &dir);
    Ok(href)
}

/// The LibvirtMachines of cluster `cluster` in `namespace`, from the shared store.
pub fn machines_of(
    store: &Store<LibvirtMachine>,
    namespace: &str,
    cluster: &str,
) -> Vec<Arc<LibvirtMachine>> {
    store
        .state()
        .into_iter()
        .filter(|m| {
            m.namespace().as_deref() == Some(namespace) && machine_cluster(m) == Some(cluster)
        })
        .collect()
}

/// Adds the LibvirtCluster's watches: its Cluster (pause, deletion) and its LibvirtMachines
/// (`hostsInUse`, deletion waits for them).
pub fn controller(
    controller: Controller<LibvirtCluster>,
    client: &Client,
    settings: &Settings,
    clusters: &Store<LibvirtCluster>,
) -> Controller<LibvirtCluster> {
    let resource = capi::resource("Cluster");
    let by_machine = clusters.clone();
    controller
        .watches_with(
            super::capi_api(client, settings, &resource),
            resource,
            watcher::Config::default(),
            |cluster: DynamicObject| {
                let namespace = cluster.namespace().unwrap_or_default();
                capi::string_at(&cluster, "/spec/infrastructureRef/name")
                    .filter(|_| {
                        capi::string_at(&cluster, "/spec/infrastructureRef/kind")
                            == Some("LibvirtCluster")
                    })
                    .map(|name| ObjectRef::new(name).within(&namespace))
            },
        )
        .watches(
            settings.api::<LibvirtMachine>(client),
            settings.watcher_config(),
            move |machine: LibvirtMachine| {
                let namespace = machine.namespace();
                let cluster = machine_cluster(&machine).map(str::to_owned);
                super::refs_where(&by_machine, |c| {
                    c.namespace() == namespace && cluster.is_some() && cluster_name(c) == cluster
                })
            },
        )
}

/// Reconciles one LibvirtCluster.
#[tracing::instrument(skip_all, fields(object = %key(object.as_ref())))]
pub async fn reconcile<B: Backend>(
    object: Arc<LibvirtCluster>,
    ctx: Arc<Context<B>>,
) -> Result<Action> {
    if managed_elsewhere(object.as_ref()) {
        return Ok(Action::await_change());
    }
    let namespace = object
        .namespace()
        .ok_or_else(|| Error::Object("a LibvirtCluster without a namespace".into()))?;
    let api: Api<LibvirtCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let deleting = object.meta().deletion_timestamp.is_some();

    // Owner Cluster: until Cluster API sets it, wait quietly (its arrival triggers us).
    let cluster = match capi::owner_name(object.as_ref(), "Cluster") {
        Some(name) => capi::get(&ctx.client, "Cluster", &namespace, &name).await?,
        None => None,
    };
    if cluster.is_none() && !deleting {
        return Ok(Action::await_change());
    }

    super::with_finalizer(&api, object, |event| async {
        match event {
            Finalizer::Apply(object) => apply(&api, &object, cluster.as_ref(), &ctx).await,
            Finalizer::Cleanup(object) => cleanup(&api, &object, &ctx).await,
        }
    })
    .await
}

async fn apply<B: Backend>(
    api: &Api<LibvirtCluster>,
    object: &LibvirtCluster,
    cluster: Option<&DynamicObject>,
    ctx: &Context<B>,
) -> Result<Action> {
    let previous = object.status.clone().unwrap_or_default();
    let before = previous.conditions.clone().unwrap_or_default();
    let generation = object.meta().generation;

    // Paused: only say so; no libvirt call.
    if capi::paused(cluster, object) {
        let paused = cond::new(
            cond::PAUSED,
            true,
            reason::PAUSED,
            "reconciliation is paused",
            generation,
        );
        amend_status(api, object, &previous, vec![paused], ctx).await?;
        return Ok(Action::await_change());
    }
    let mut conditions = Vec::new();
    cond::set(
        &mut conditions,
        &before,
        cond::new(cond::PAUSED, false, reason::NOT_PAUSED, "", generation),
    );

    // Hosts: each URI checked against the policy, then asked for its versions.
    let mut reachable = Vec::new();
    let mut problems = Vec::new();
    let mut versions = Vec::new();
    let mut failure_domains = Vec::new();
    let namespace = object.namespace().unwrap_or_default();
    for host in &object.spec.hosts {
        let href = match connectable(host, &namespace, ctx).await {
            Ok(href) => href,
            Err(error) => {
                problems.push(format!("{}: {error}", host.name));
                continue;
            }
        };
        match ctx.backend.versions(&href).await {
            Ok(v) => {
                versions.push(format!("{}: {v}", host.name));
                failure_domains.push(FailureDomain {
                    name: host.name.clone(),
                    control_plane: Some(host.control_plane.unwrap_or(true)),
                    attributes: None,
                });
                reachable.push(href);
            }
            Err(error) => problems.push(format!("{}: {error}", host.name)),
        }
    }
    let hosts_ok = problems.is_empty();
    cond::set(
        &mut conditions,
        &before,
        if hosts_ok {
            cond::new(
                cond::HOSTS_REACHABLE,
                true,
                reason::READY,
                versions.join("; "),
                generation,
            )
        } else {
            cond::new(
                cond::HOSTS_REACHABLE,
                false,
                reason::HOST_UNREACHABLE,
                problems.join("; "),
                generation,
            )
        },
    );

    // Provisioned once a host answered; it never goes back.
    let provisioned = previous
        .initialization
        .as_ref()
        .and_then(|i| i.provisioned)
        .unwrap_or(false)
        || !reachable.is_empty();

    let cluster_name = cluster_name(object);
    let hosts_in_use = hosts_in_use(object, &previous, ctx, cluster_name.as_deref());

    // Orphans: domains of this cluster whose LibvirtMachine no longer exists.
    let mut sweeping = false;
    if let Some(cluster_name) = &cluster_name {
        for host in &reachable {
            sweeping |= sweep(object, host, cluster_name, ctx).await;
        }
    }

    cond::set(
        &mut conditions,
        &before,
        if provisioned && hosts_ok {
            cond::new(cond::READY, true, reason::READY, "", generation)
        } else if provisioned {
            cond::new(
                cond::READY,
                false,
                reason::HOST_UNREACHABLE,
                problems.join("; "),
                generation,
            )
        } else {
            cond::new(
                cond::READY,
                false,
                reason::HOST_UNREACHABLE,
                format!("no host answered: {}", problems.join("; ")),
                generation,
            )
        },
    );
    let status = LibvirtClusterStatus {
        initialization: Some(Initialization {
            provisioned: Some(provisioned),
        }),
        ready: Some(provisioned),
        failure_domains: Some(failure_domains),
        observed_generation: generation,
        conditions: Some(cond::sorted(conditions)),
        hosts_in_use,
    };
    write_status(api, object, &previous, &status, ctx).await?;

    let k = key(object);
    Ok(if !hosts_ok {
        Action::requeue(ctx.backoff(&k))
    } else if sweeping {
        ctx.succeeded(&k);
        Action::requeue(ctx.settings.poll_interval)
    } else {
        ctx.succeeded(&k);
        Action::requeue(ctx.settings.resync)
    })
}

/// `hostsInUse`, rebuilt from the LibvirtMachines that record a host (deleting ones included:
/// their VMs may still exist). A host keeps the URI recorded before.
fn hosts_in_use<B: Backend>(
    object: &LibvirtCluster,
    previous: &LibvirtClusterStatus,
    ctx: &Context<B>,
    cluster: Option<&str>,
) -> Option<Vec<HostInUse>> {
    let namespace = object.namespace()?;
    let cluster = cluster?;
    let mut used = BTreeMap::new();
    for machine in machines_of(&ctx.machines, &namespace, cluster) {
        let Some(host) = machine.spec.host.as_deref() else {
            continue;
        };
        let recorded = previous
            .hosts_in_use
            .iter()
            .flatten()
            .find(|h| h.name == host)
            .map(|h| h.uri.clone());
        let current = object
            .spec
            .hosts
            .iter()
            .find(|h| h.name == host)
            .map(|h| h.uri.clone());
        if let Some(uri) = recorded.or(current) {
            used.insert(host.to_owned(), uri);
        }
    }
    (!used.is_empty()).then(|| {
        used.into_iter()
            .map(|(name, uri)| HostInUse { name, uri })
            .collect()
    })
}

/// Deletes the domains on `host` that carry this cluster's name and our metadata but whose
/// LibvirtMachine is gone (or is a newer object under the same name). Returns whether a
/// deletion is still under way.
async fn sweep<B: Backend>(
    object: &LibvirtCluster,
    host: &HostRef,
    cluster: &str,
    ctx: &Context<B>,
) -> bool {
    let Some(namespace) = object.namespace() else {
        return false;
    };
    // An unsynced store would make every machine look deleted. (Not `wait_until_ready`: its
    // readiness wakes only the latest waiter, so this reconcile could hang forever beside the
    // machine controller's runner.)
    if !super::synced_store(&ctx.machines).await {
        return false;
    }
    let domains = match ctx.backend.list_machines(host).await {
        Ok(domains) => domains,
        Err(error) => {
            tracing::warn!(host = %host.name, %error, "listing domains for the orphan sweep");
            return false;
        }
    };
    let mut pending = false;
    for domain in domains {
        if domain.namespace != namespace || domain.cluster != cluster {
            continue;
        }
        let owned = |machine: Option<&LibvirtMachine>| match machine {
            None => false,
            Some(machine) => machine
                .spec
                .domain_uuid
                .as_deref()
                .is_none_or(|uuid| uuid == domain.uuid.to_string()),
        };
        let cached = ctx
            .machines
            .get(&ObjectRef::new(&domain.name).within(&domain.namespace));
        if owned(cached.as_deref()) {
            continue;
        }
        // Confirm with the API server before deleting anything (the store may lag, or a
        // watch filter may hide the machine).
        let api: Api<LibvirtMachine> = Api::namespaced(ctx.client.clone(), &domain.namespace);
        match api.get_opt(&domain.name).await {
            Ok(current) if !owned(current.as_ref()) => {}
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(machine = %domain.name, %error, "checking a possible orphan");
                continue;
            }
        }
        let identity = MachineIdentity::new(&domain.namespace, &domain.name, domain.uuid);
        match ctx
            .backend
            .delete(host, &identity, ctx.settings.shutdown_grace)
            .await
        {
            Ok(Deletion::ShuttingDown { .. }) => pending = true,
            Ok(Deletion::Gone) => {
                tracing::info!(host = %host.name, machine = %domain.name, uuid = %domain.uuid, "deleted an orphaned domain");
                ctx.event(
                    object,
                    EventType::Normal,
                    "OrphanDeleted",
                    format!(
                        "deleted domain {} of LibvirtMachine {}/{} (no longer exists) on host {}",
                        domain.uuid, domain.namespace, domain.name, host.name
                    ),
                )
                .await;
            }
            Err(error) => {
                tracing::warn!(host = %host.name, machine = %domain.name, %error, "deleting an orphaned domain");
                pending = true;
            }
        }
    }
    pending
}

async fn cleanup<B: Backend>(
    api: &Api<LibvirtCluster>,
    object: &LibvirtCluster,
    ctx: &Context<B>,
) -> Result<Action> {
    let namespace = object.namespace().unwrap_or_default();
    // Asked of the API server, not the store: a store lagging behind must not hold the
    // cluster's deletion, and this runs once per delete attempt.
    let remaining = match cluster_name(object) {
        Some(cluster) => {
            let machines: Api<LibvirtMachine> = Api::namespaced(ctx.client.clone(), &namespace);
            let selector = format!("{}={cluster}", capi::CLUSTER_NAME_LABEL);
            machines
                .list_metadata(&kube::api::ListParams::default().labels(&selector))
                .await?
                .items
                .len()
        }
        None => 0,
    };
    if remaining == 0 {
        return Ok(Action::await_change());
    }
    let waiting = cond::new(
        cond::DELETING,
        true,
        reason::WAITING_FOR_MACHINES,
        format!("waiting for {remaining} LibvirtMachine(s) to be deleted"),
        object.meta().generation,
    );
    let previous = object.status.clone().unwrap_or_default();
    amend_status(api, object, &previous, vec![waiting], ctx).await?;
    Err(Error::Wait(ctx.settings.poll_interval))
}
