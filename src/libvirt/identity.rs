//! A machine's identity on a host: its namespace, name and a UUID persisted in the object. The
//! UUID is derived once from the object's UID ([`MachineIdentity::uuid_for_uid`]) and stored
//! before the first hypervisor side effect; from then on everything (domain name, volume prefix,
//! MACs) derives from (namespace, name, UUID), so the machine is found again after a crash and
//! after `clusterctl move` (which gives the object a new UID and no status).

use std::fmt;

use uuid::Uuid;

/// Namespace of the v5 UUIDs we derive (a fixed random UUID, never change it: domains on running
/// hosts are found by these UUIDs).
const UUID_NAMESPACE: Uuid = Uuid::from_bytes([
    0x6b, 0x2d, 0x1f, 0x0e, 0x9a, 0x41, 0x4c, 0x7e, 0x8f, 0x35, 0x2b, 0x6d, 0x90, 0xa4, 0x5c, 0x11,
]);

/// Longest domain name we generate; libvirt itself accepts more, but names show up in paths,
/// logs and `virsh list`.
const MAX_NAME: usize = 96;

/// Who a virtual machine belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MachineIdentity {
    /// Namespace of the LibvirtMachine.
    pub namespace: String,
    /// Name of the LibvirtMachine.
    pub name: String,
    /// The domain's UUID, as persisted in the object (see [`MachineIdentity::uuid_for_uid`]).
    pub uuid: Uuid,
}

impl MachineIdentity {
    /// The identity of the machine `namespace/name` whose persisted UUID is `uuid`.
    pub fn new(namespace: &str, name: &str, uuid: Uuid) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uuid,
        }
    }

    /// The UUID a new machine gets: a v5 UUID of the object's `metadata.uid` (unique across
    /// re-creations of the same name). The controller computes it once and persists it; machines
    /// created before it was persisted have exactly this UUID, so they keep being found.
    pub fn uuid_for_uid(uid: &str) -> Uuid {
        Uuid::new_v5(&UUID_NAMESPACE, uid.as_bytes())
    }

    /// The domain's UUID. Lookups by UUID make creation idempotent.
    pub fn domain_uuid(&self) -> Uuid {
        self.uuid
    }

    /// `<namespace>_<name>_<8 hex digits of the UUID>`: readable, and unique per object even when
    /// a machine is re-created under the same name while its predecessor is still being deleted.
    /// Long names are cut to fit. Kubernetes names are DNS subdomains, so the result only holds
    /// `[a-z0-9._-]`.
    pub fn domain_name(&self) -> String {
        let suffix = &self.domain_uuid().simple().to_string()[..8];
        let mut readable = format!("{}_{}", self.namespace, self.name);
        readable.truncate(MAX_NAME - suffix.len() - 1);
        format!("{readable}_{suffix}")
    }

    /// Name of a volume the machine owns (`<domain name>-<role>`), e.g. `root`, `data-etcd`, `seed`.
    pub fn volume_name(&self, role: &str, extension: &str) -> String {
        format!("{}-{role}.{extension}", self.domain_name())
    }

    /// Prefix every volume the machine owns starts with.
    pub fn volume_prefix(&self) -> String {
        format!("{}-", self.domain_name())
    }

    /// A MAC for `interface`, stable across re-creation of the VM but new for a new object, so a
    /// DHCP lease of an earlier machine is never mistaken for this one's. Locally administered
    /// unicast (`02:…`), 40 bits from the UUID.
    pub fn mac(&self, interface: &str) -> Mac {
        let id = Uuid::new_v5(&self.domain_uuid(), interface.as_bytes());
        let b = id.as_bytes();
        Mac([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_deterministic_and_distinct() {
        let uuid = |uid| MachineIdentity::uuid_for_uid(uid);
        let a = MachineIdentity::new(
            "default",
            "worker-1",
            uuid("0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c"),
        );
        let again = a.clone();
        let b = MachineIdentity::new(
            "default",
            "worker-1",
            uuid("1b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c"),
        );
        assert_eq!(a.domain_uuid(), again.domain_uuid());
        assert_ne!(
            a.domain_uuid(),
            b.domain_uuid(),
            "a re-created object gets a new VM"
        );
        assert!(
            a.domain_name().starts_with("default_worker-1_"),
            "{}",
            a.domain_name()
        );
        assert_ne!(
            a.domain_name(),
            b.domain_name(),
            "a re-created object gets a new name"
        );
        assert_eq!(a.mac("eth0"), again.mac("eth0"));
        assert_ne!(a.mac("eth0"), a.mac("eth1"));
        assert_ne!(a.mac("eth0"), b.mac("eth0"));
        let mac = a.mac("eth0");
        assert_eq!(mac.0[0], 0x02, "locally administered unicast");
        assert_eq!(mac.to_string().len(), 17);
        assert_eq!(
            a.volume_name("root", "qcow2"),
            format!("{}-root.qcow2", a.domain_name())
        );
    }

    #[test]
    fn long_names_are_shortened_but_stay_unique() {
        let long = "x".repeat(253);
        let a = MachineIdentity::new("ns", &long, MachineIdentity::uuid_for_uid("uid-a"));
        let b = MachineIdentity::new("ns", &long, MachineIdentity::uuid_for_uid("uid-b"));
        assert!(a.domain_name().len() <= MAX_NAME);
        assert_ne!(a.domain_name(), b.domain_name());
    }

    #[test]
    fn the_uuid_derivation_never_changes() {
        // Domains on running hosts were created with these UUIDs.
        assert_eq!(
            MachineIdentity::uuid_for_uid("0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c").to_string(),
            "59564898-aad4-581d-adec-745ad193770f"
        );
        let moved = MachineIdentity::new(
            "default",
            "worker-1",
            MachineIdentity::uuid_for_uid("old-uid"),
        );
        assert!(
            moved
                .domain_name()
                .ends_with(&moved.uuid.simple().to_string()[..8])
        );
    }
}
