//! Leader election on a `coordination.k8s.io/v1` Lease (`--leader-elect`), with client-go's
//! semantics: webhooks serve on every replica, the controllers run only on the leader.
//!
//! - A candidate tries to acquire the Lease every retry period. It takes a Lease held by another
//!   identity only once the Lease has not changed for the Lease's duration, timed by its own clock
//!   from when it saw the last change (no trust in the holder's clock). Every write carries the
//!   `resourceVersion` it read, so two candidates never both win.
//! - The leader renews every retry period. When it cannot renew for the renew deadline, or finds
//!   another holder, it has lost: [`Leadership::lost`] resolves and the manager exits (as
//!   controller-runtime does; the pod restarts and campaigns again as a candidate). Exiting is the
//!   only way to be sure nothing of the old term (a reconcile, a libvirt call, a spawned task)
//!   keeps writing while another replica leads.
//! - On a clean shutdown the leader releases the Lease (empty holder), so a successor takes over
//!   at its next retry instead of after the Lease duration.
//!
//! Not kube-lease-manager: its leader keeps reporting leadership while renewals fail (it backs off
//! and retries forever), so a replica cut off from the apiserver would keep leading after another
//! took over; and its durations are whole seconds with no renew deadline.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::config::LeaderElectionSettings;

/// Where this replica stands in the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Campaigning: another replica leads, or nobody yet.
    Candidate,
    /// This replica leads: the controllers run.
    Leading,
    /// This replica led and lost the Lease: the controllers must stop, the manager exits.
    Lost,
    /// The election ended with the manager's shutdown (the Lease was released).
    Stopped,
}

/// This replica's view of the election; cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    role: watch::Receiver<Role>,
    /// Without an election, the sender of the constant role (kept so the role never closes).
    _constant: Option<std::sync::Arc<watch::Sender<Role>>>,
    elected: bool,
}

impl Leadership {
    /// No election (`--leader-elect=false`): this replica always leads.
    pub fn always() -> Self {
        let (tx, role) = watch::channel(Role::Leading);
        Self {
            role,
            _constant: Some(std::sync::Arc::new(tx)),
            elected: false,
        }
    }

    /// Starts campaigning on the Lease in `settings` until `stop` turns true (then releases the
    /// Lease if held).
    pub fn start(
        client: kube::Client,
        settings: LeaderElectionSettings,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let (tx, role) = watch::channel(Role::Candidate);
        let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
        tokio::spawn(campaign(api, settings, tx, stop));
        Self {
            role,
            _constant: None,
            elected: true,
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.role() == Role::Leading
    }

    /// A receiver of role changes.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Waits until this replica leads; `false` when the election ended first (shutdown).
    pub async fn acquired(&self) -> bool {
        let mut role = self.role.clone();
        let decided = role
            .wait_for(|role| *role != Role::Candidate)
            .await
            .map(|role| *role);
        matches!(decided, Ok(Role::Leading))
    }

    /// Resolves once the election has ended: after the stop signal, when the Lease has been
    /// released (so the manager waits for it before exiting); at once without an election.
    pub async fn ended(&self) {
        if !self.elected {
            return;
        }
        let mut role = self.role.clone();
        let _ = role
            .wait_for(|role| matches!(role, Role::Stopped | Role::Lost))
            .await;
    }

    /// Resolves when this replica has lost the leadership (never while it leads, never on a
    /// clean shutdown). The controllers' shutdown selects on it, next to the manager's stop.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut role = self.role.clone();
        async move {
            let lost = role.wait_for(|role| *role == Role::Lost).await.is_ok();
            if !lost {
                // The election task ended without losing (shutdown): never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// One try at the Lease.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Held,
    /// Another identity holds a Lease that has not expired.
    HeldBy(String),
    /// Someone wrote the Lease between our read and our write; try again.
    Conflict,
}

/// When this replica last saw the Lease change, by its own clock.
struct Observed {
    version: Option<String>,
    at: Instant,
}

async fn campaign(
    api: Api<Lease>,
    settings: LeaderElectionSettings,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) {
    let lease = format!("{}/{}", settings.namespace, settings.lease_name);
    tracing::info!(%lease, identity = %settings.identity, "campaigning for leadership");
    let mut observed = Observed {
        version: None,
        at: Instant::now(),
    };
    let mut last_holder = None;
    loop {
        match try_acquire_or_renew(&api, &settings, &mut observed).await {
            Ok(Attempt::Held) => break,
            Ok(Attempt::HeldBy(holder)) => {
                if last_holder.as_ref() != Some(&holder) {
                    tracing::info!(%lease, %holder, "another replica leads");
                    last_holder = Some(holder);
                }
            }
            Ok(Attempt::Conflict) => {}
            Err(error) => tracing::warn!(%lease, %error, "cannot read or write the Lease"),
        }
        if stopped_within(settings.retry_period, &mut stop).await {
            role.send_replace(Role::Stopped);
            return;
        }
    }
    tracing::info!(%lease, identity = %settings.identity, "became the leader");
    role.send_replace(Role::Leading);

    let mut renewed = Instant::now();
    loop {
        if stopped_within(settings.retry_period, &mut stop).await {
            release(&api, &settings).await;
            role.send_replace(Role::Stopped);
            return;
        }
        let left = settings.renew_deadline.saturating_sub(renewed.elapsed());
        match tokio::time::timeout(left, try_acquire_or_renew(&api, &settings, &mut observed)).await
        {
            Ok(Ok(Attempt::Held)) => renewed = Instant::now(),
            Ok(Ok(Attempt::HeldBy(holder))) => {
                tracing::error!(%lease, %holder, "another replica took the Lease");
                break;
            }
            Ok(Ok(Attempt::Conflict)) => {}
            Ok(Err(error)) => tracing::warn!(%lease, %error, "cannot renew the Lease"),
            Err(_) => tracing::warn!(%lease, "renewing the Lease timed out"),
        }
        if renewed.elapsed() >= settings.renew_deadline {
            tracing::error!(%lease, deadline = ?settings.renew_deadline, "could not renew the Lease in time");
            break;
        }
    }
    role.send_replace(Role::Lost);
}

/// Waits `period`; `true` when `stop` turned true first (or its sender is gone).
async fn stopped_within(period: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(period) => false,
        _ = stop.wait_for(|stopped| *stopped) => true,
    }
}

fn lease_seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs_f64().ceil() as i64)
        .unwrap_or(i32::MAX)
        .max(1)
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    settings: &LeaderElectionSettings,
    observed: &mut Observed,
) -> Result<Attempt, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let Some(mut lease) = api.get_opt(&settings.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.lease_name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(lease_seconds(settings.lease_duration)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Held),
            Err(error) if is_conflict(&error) => Ok(Attempt::Conflict),
            Err(error) => Err(error),
        };
    };
    if lease.metadata.resource_version != observed.version {
        observed.version = lease.metadata.resource_version.clone();
        observed.at = Instant::now();
    }
    let spec = lease.spec.take().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let ours = holder.as_deref() == Some(settings.identity.as_str());
    if let Some(holder) = holder.as_ref()
        && !ours
    {
        let valid_for = spec
            .lease_duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map(Duration::from_secs)
            .unwrap_or(settings.lease_duration);
        if observed.at.elapsed() < valid_for {
            return Ok(Attempt::HeldBy(holder.clone()));
        }
    }
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(lease_seconds(settings.lease_duration)),
        renew_time: Some(now.clone()),
        acquire_time: if ours {
            spec.acquire_time.clone()
        } else {
            Some(now)
        },
        lease_transitions: if ours {
            spec.lease_transitions
        } else {
            Some(spec.lease_transitions.unwrap_or(0).saturating_add(1))
        },
        ..spec
    });
    // The resourceVersion we read makes this write fail (409) if anyone wrote in between.
    match api
        .replace(&settings.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(written) => {
            observed.version = written.metadata.resource_version;
            observed.at = Instant::now();
            Ok(Attempt::Held)
        }
        Err(error) if is_conflict(&error) => Ok(Attempt::Conflict),
        Err(error) => Err(error),
    }
}

/// Gives the Lease up (empty holder) if this replica still holds it; best effort.
async fn release(api: &Api<Lease>, settings: &LeaderElectionSettings) {
    let lease_name = &settings.lease_name;
    let result = async {
        let Some(mut lease) = api.get_opt(lease_name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        api.replace(lease_name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
    .await;
    match result {
        Ok(()) => tracing::info!(lease = %lease_name, "released the Lease"),
        Err(error) => tracing::warn!(lease = %lease_name, %error, "could not release the Lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(lease_seconds(Duration::from_secs(15)), 15);
        assert_eq!(lease_seconds(Duration::ZERO), 1);
    }

    #[tokio::test]
    async fn always_leads_and_never_loses() {
        let leadership = Leadership::always();
        assert!(leadership.is_leader());
        assert!(leadership.acquired().await);
        let lost = tokio::time::timeout(Duration::from_millis(50), leadership.lost()).await;
        assert!(lost.is_err(), "lost() resolved without an election");
    }
}
