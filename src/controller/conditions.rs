//! Status conditions: the types and reasons both controllers write, setting a condition while
//! keeping its `lastTransitionTime` when its status did not change (a new timestamp on every
//! reconcile would re-trigger the controller forever), and the summary `Ready`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The summary condition Cluster API mirrors (`InfrastructureReady`, `InfrastructureReady` of a
/// Machine).
pub const READY: &str = "Ready";
/// Whether the owning Cluster (or the object itself) is paused.
pub const PAUSED: &str = "Paused";
/// LibvirtCluster: whether every host answered.
pub const HOSTS_REACHABLE: &str = "HostsReachable";
/// LibvirtMachine: whether the virtual machine exists and runs.
pub const VM_PROVISIONED: &str = "VMProvisioned";
/// LibvirtMachine: whether the guest reported an address.
pub const ADDRESSES_KNOWN: &str = "AddressesKnown";
/// Both kinds: deletion progress.
pub const DELETING: &str = "Deleting";

/// Condition status strings.
pub const TRUE: &str = "True";
/// Condition status strings.
pub const FALSE: &str = "False";

/// Reasons used by both controllers.
pub mod reason {
    /// All is well.
    pub const READY: &str = "Ready";
    /// Not paused.
    pub const NOT_PAUSED: &str = "NotPaused";
    /// Paused (Cluster.spec.paused or the `cluster.x-k8s.io/paused` annotation).
    pub const PAUSED: &str = "Paused";
    /// The LibvirtCluster is not provisioned yet.
    pub const WAITING_FOR_CLUSTER_INFRASTRUCTURE: &str = "WaitingForClusterInfrastructure";
    /// The Machine's bootstrap data Secret is not there yet.
    pub const WAITING_FOR_BOOTSTRAP_DATA: &str = "WaitingForBootstrapData";
    /// The host the machine was placed on is not yet recorded in the cluster's `hostsInUse`.
    pub const WAITING_FOR_HOST_RECORD: &str = "WaitingForHostRecord";
    /// The base image is being downloaded.
    pub const IMAGE_DOWNLOADING: &str = "ImageDownloading";
    /// Volumes and the domain are being created.
    pub const CREATING: &str = "Creating";
    /// The domain is defined but not running.
    pub const BOOTING: &str = "Booting";
    /// The guest runs but reported no address yet.
    pub const WAITING_FOR_ADDRESS: &str = "WaitingForAddress";
    /// The guest runs but reported no address within the timeout (the message carries the tail
    /// of its serial console).
    pub const NO_ADDRESS_TIMEOUT: &str = "NoAddressTimeout";
    /// A host did not answer.
    pub const HOST_UNREACHABLE: &str = "HostUnreachable";
    /// No host can take the machine.
    pub const NO_HOST_AVAILABLE: &str = "NoHostAvailable";
    /// The spec cannot be turned into a machine (retrying does not help until it changes).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Deletion is under way.
    pub const DELETING: &str = "Deleting";
    /// Deletion failed (the message says why); it is retried.
    pub const DELETION_FAILED: &str = "DeletionFailed";
    /// Waiting for the cluster's machines to be deleted.
    pub const WAITING_FOR_MACHINES: &str = "WaitingForMachinesDeleted";
}

/// A condition of `kind` with `status`, `reason` and `message`, observed at `generation`.
pub fn new(
    kind: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: kind.to_owned(),
        status: if status { TRUE } else { FALSE }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Replaces (or adds) the condition of the same type in `conditions`, keeping the earlier
/// `lastTransitionTime` when the status is unchanged.
pub fn set(conditions: &mut Vec<Condition>, previous: &[Condition], mut condition: Condition) {
    if let Some(old) = previous.iter().find(|c| c.type_ == condition.type_)
        && old.status == condition.status
    {
        condition.last_transition_time = old.last_transition_time.clone();
    }
    conditions.retain(|c| c.type_ != condition.type_);
    conditions.push(condition);
}

/// The condition of type `kind`, if any.
pub fn find<'a>(conditions: &'a [Condition], kind: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == kind)
}

/// Whether the condition `kind` is `True`.
pub fn is_true(conditions: &[Condition], kind: &str) -> bool {
    find(conditions, kind).is_some_and(|c| c.status == TRUE)
}

/// Sorts conditions by type (a stable order keeps status patches comparable).
pub fn sorted(mut conditions: Vec<Condition>) -> Vec<Condition> {
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    conditions
}

/// A status with a `conditions` list (both kinds' statuses), for the shared status writers.
pub trait StatusConditions: Clone + Default + PartialEq + serde::Serialize {
    /// The conditions, if any.
    fn conditions(&self) -> Option<&[Condition]>;
    /// Replaces the conditions.
    fn set_conditions(&mut self, conditions: Vec<Condition>);
}

impl StatusConditions for crate::api::LibvirtClusterStatus {
    fn conditions(&self) -> Option<&[Condition]> {
        self.conditions.as_deref()
    }
    fn set_conditions(&mut self, conditions: Vec<Condition>) {
        self.conditions = Some(conditions);
    }
}

impl StatusConditions for crate::api::LibvirtMachineStatus {
    fn conditions(&self) -> Option<&[Condition]> {
        self.conditions.as_deref()
    }
    fn set_conditions(&mut self, conditions: Vec<Condition>) {
        self.conditions = Some(conditions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_the_status_stays() {
        let mut first = new(READY, false, reason::CREATING, "a", Some(1));
        first.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let previous = vec![first.clone()];
        let mut out = Vec::new();
        set(
            &mut out,
            &previous,
            new(READY, false, reason::BOOTING, "b", Some(1)),
        );
        assert_eq!(out[0].last_transition_time, first.last_transition_time);
        assert_eq!(out[0].reason, reason::BOOTING);
        let mut out = Vec::new();
        set(
            &mut out,
            &previous,
            new(READY, true, reason::READY, "", Some(1)),
        );
        assert_ne!(out[0].last_transition_time, first.last_transition_time);
        assert!(is_true(&out, READY));
    }
}
