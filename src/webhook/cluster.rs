//! Admission of `LibvirtCluster` and `LibvirtClusterTemplate`.

use std::collections::BTreeSet;

use super::admission::{AdmissionPolicy, Admit, Kind, RequestInfo, Verdict, quote, shorten_quoted};
use super::checks;
use super::machine::{template_immutable, validate_template_meta};
use crate::api::{
    DomainType, LibvirtCluster, LibvirtClusterSpec, LibvirtClusterStatus, LibvirtClusterTemplate,
};
use crate::libvirt::uri::{HostUri, Transport};

/// Port of the workload API server when the endpoint names none.
pub const DEFAULT_API_SERVER_PORT: i32 = 6443;
/// Libvirt network and storage pool every libvirt host has after installation.
pub const DEFAULT_LIBVIRT_OBJECT: &str = "default";

/// Fills the cluster defaults: endpoint port, network, storage pool, per-host settings.
pub fn default_spec(spec: &mut LibvirtClusterSpec) {
    if let Some(endpoint) = spec.control_plane_endpoint.as_mut() {
        endpoint.port.get_or_insert(DEFAULT_API_SERVER_PORT);
    }
    spec.network
        .get_or_insert_with(|| DEFAULT_LIBVIRT_OBJECT.into());
    spec.storage_pool
        .get_or_insert_with(|| DEFAULT_LIBVIRT_OBJECT.into());
    for host in &mut spec.hosts {
        host.control_plane.get_or_insert(true);
        host.domain_type.get_or_insert(DomainType::Kvm);
    }
}

/// Every semantic rule of a cluster spec; `at` is the spec's path. Host URIs are checked by the
/// same parser the backend applies before it connects ([`HostUri::parse`]), under `policy`.
pub fn validate_spec(
    spec: &LibvirtClusterSpec,
    at: &str,
    policy: &AdmissionPolicy,
    v: &mut Verdict,
) {
    if let Some(endpoint) = &spec.control_plane_endpoint {
        let here = format!("{at}.controlPlaneEndpoint");
        if let Err(message) = checks::endpoint_host(&endpoint.host) {
            v.error(format!("{here}.host"), message);
        }
        if let Some(port) = endpoint.port
            && !(1..=65535).contains(&port)
        {
            v.error(
                format!("{here}.port"),
                format!("must be between 1 and 65535, got {port}"),
            );
        }
    }
    for (field, value) in [
        ("network", &spec.network),
        ("storagePool", &spec.storage_pool),
    ] {
        if let Some(Err(message)) = value.as_deref().map(checks::libvirt_name) {
            v.error(format!("{at}.{field}"), message);
        }
    }
    if spec.hosts.is_empty() || spec.hosts.len() > 64 {
        v.error(
            format!("{at}.hosts"),
            format!("must have 1 to 64 hosts, got {}", spec.hosts.len()),
        );
    }
    let mut names = BTreeSet::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let here = format!("{at}.hosts[{i}]");
        if let Err(message) = checks::dns_label(&host.name) {
            v.error(format!("{here}.name"), message);
        }
        if !names.insert(host.name.as_str()) {
            v.error(
                format!("{here}.name"),
                format!("duplicate host name {}", quote(&host.name)),
            );
        }
        match HostUri::parse(&host.uri, policy.uri) {
            Err(error) => v.error(format!("{here}.uri"), shorten_quoted(&error.0)),
            Ok(uri) => {
                for warning in uri.warnings() {
                    v.warn(format!("{here}.uri"), warning);
                }
                let remote = matches!(uri.transport(), Transport::QemuSsh | Transport::QemuTls);
                if remote && host.credentials_secret_ref.is_none() {
                    v.warn(
                        format!("{here}.uri"),
                        "no credentialsSecretRef: the manager connects with its own SSH/TLS identity",
                    );
                }
            }
        }
        if let Some(secret) = &host.credentials_secret_ref
            && (secret.name.is_empty()
                || secret.name.len() > 253
                || !secret
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
        {
            v.error(
                format!("{here}.credentialsSecretRef.name"),
                format!("must be a Secret name, got {}", quote(&secret.name)),
            );
        }
        if host.domain_type == Some(DomainType::Qemu) {
            v.warn(
                format!("{here}.domainType"),
                "qemu is software emulation: guests run many times slower than with kvm",
            );
        }
    }
    if !spec.hosts.is_empty() && spec.hosts.iter().all(|h| h.control_plane == Some(false)) {
        v.error(
            format!("{at}.hosts"),
            "at least one host must allow control-plane machines",
        );
    }
}

/// An update may add hosts, but a host keeps its URI (machines on it would be orphaned), a host
/// with machines on it (listed in the old object's `status.hostsInUse`) can be neither removed nor
/// re-added under another URI, and the endpoint is set once.
fn validate_spec_update(
    old: &LibvirtClusterSpec,
    old_status: Option<&LibvirtClusterStatus>,
    new: &LibvirtClusterSpec,
    v: &mut Verdict,
) {
    if old.control_plane_endpoint.is_some()
        && old.control_plane_endpoint != new.control_plane_endpoint
    {
        v.error(
            "spec.controlPlaneEndpoint",
            "can be set once and never changed",
        );
    }
    for old_host in &old.hosts {
        match new.hosts.iter().position(|h| h.name == old_host.name) {
            Some(i) if new.hosts[i].uri != old_host.uri => v.error(
                format!("spec.hosts[{i}].uri"),
                format!(
                    "is immutable for host {}: its machines would be orphaned; add a new host instead",
                    quote(&old_host.name)
                ),
            ),
            Some(_) => {}
            None => v.warn(
                "spec.hosts",
                format!("host {} was removed: machines still on it are no longer placed or managed there", quote(&old_host.name)),
            ),
        }
    }
    // The hosts machines run on, as the machine controller recorded them before creating the VMs:
    // the truth that survives a host being removed from the spec and added back.
    let in_use = old_status
        .and_then(|s| s.hosts_in_use.as_deref())
        .unwrap_or_default();
    for recorded in in_use {
        let listed_before = old.hosts.iter().any(|h| h.name == recorded.name);
        match new.hosts.iter().position(|h| h.name == recorded.name) {
            None if listed_before => v.error(
                "spec.hosts",
                format!(
                    "host {} has machines on it (status.hostsInUse) and cannot be removed; delete its machines first",
                    quote(&recorded.name)
                ),
            ),
            Some(i) if new.hosts[i].uri != recorded.uri => v.error(
                format!("spec.hosts[{i}].uri"),
                format!(
                    "host {} has machines on it (status.hostsInUse) at {}; its URI cannot change",
                    quote(&recorded.name),
                    quote(&recorded.uri)
                ),
            ),
            _ => {}
        }
    }
}

impl Admit for LibvirtCluster {
    const KIND: Kind = Kind::LibvirtCluster;

    fn apply_defaults(&mut self) {
        default_spec(&mut self.spec);
    }

    fn validate(&self, policy: &AdmissionPolicy, v: &mut Verdict) {
        validate_spec(&self.spec, "spec", policy, v);
    }

    fn validate_update(&self, old: &Self, _info: &RequestInfo, v: &mut Verdict) {
        validate_spec_update(&old.spec, old.status.as_ref(), &self.spec, v);
    }
}

impl Admit for LibvirtClusterTemplate {
    const KIND: Kind = Kind::LibvirtClusterTemplate;

    fn apply_defaults(&mut self) {
        default_spec(&mut self.spec.template.spec);
    }

    fn validate(&self, policy: &AdmissionPolicy, v: &mut Verdict) {
        validate_template_meta(self.spec.template.metadata.as_ref(), v);
        validate_spec(&self.spec.template.spec, "spec.template.spec", policy, v);
    }

    fn validate_update(&self, old: &Self, info: &RequestInfo, v: &mut Verdict) {
        template_immutable(&old.spec.template, &self.spec.template, info, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HostInUse, LibvirtHost};
    use crate::libvirt::uri::UriPolicy;

    const DEV: AdmissionPolicy = AdmissionPolicy {
        uri: UriPolicy {
            allow_test_driver: true,
        },
    };

    fn spec(hosts: &[(&str, &str)]) -> LibvirtClusterSpec {
        LibvirtClusterSpec {
            hosts: hosts
                .iter()
                .map(|(name, uri)| LibvirtHost {
                    name: (*name).into(),
                    uri: (*uri).into(),
                    ..LibvirtHost::default()
                })
                .collect(),
            ..LibvirtClusterSpec::default()
        }
    }

    fn uri_errors(uri: &str, policy: &AdmissionPolicy) -> Vec<String> {
        let mut v = Verdict::default();
        validate_spec(&spec(&[("a", uri)]), "spec", policy, &mut v);
        v.errors.iter().map(ToString::to_string).collect()
    }

    /// The old webhook's URI cases, now answered by the backend's parser.
    #[test]
    fn uris() {
        for ok in [
            "qemu:///system",
            "qemu:///session",
            "qemu:///system?socket=/run/libvirt/libvirt-sock",
            "qemu+ssh://capl@hv1.example.com/system",
            "qemu+ssh://hv1.example.com:2222/system?no_tty=1&known_hosts_verify=normal",
            "qemu+tls://hv1.example.com/system",
            "test:///default",
        ] {
            assert!(
                uri_errors(ok, &DEV).is_empty(),
                "{ok}: {:?}",
                uri_errors(ok, &DEV)
            );
        }
        for (bad, why) in [
            ("http://hv1/system", "not supported"),
            ("qemu+tcp://hv1/system", "not supported"),
            ("qemu+ext:///system?command=/bin/sh", "not supported"),
            ("qemu+ssh://hv1/system?command=/bin/sh", "command"),
            ("qemu+ssh://hv1/system?keyfile=/etc/shadow", "keyfile"),
            ("qemu+ssh://u:pw@hv1/system", "login name"),
            ("qemu://hv1/system", "local hypervisor"),
            ("qemu+ssh:///system", "needs a host"),
            ("qemu:///etc", "/system or /session"),
            ("qemu:///system?socket=../x", "socket must be"),
            ("qemu:///system?socket=/a/../b-sock", "socket must be"),
            ("test://", "only accepted as test:///default"),
            (
                "test:///etc/capl/node.xml",
                "only accepted as test:///default",
            ),
            ("qemu:///system#x", "got '#'"),
            ("qemu:///system?socket=/a-sock&socket=/b-sock", "repeated"),
            ("qemu+ssh://h/system?no_tty=1;command=/tmp/x", "';'"),
        ] {
            let errors = uri_errors(bad, &DEV);
            assert!(
                errors.len() == 1
                    && errors[0].starts_with("spec.hosts[0].uri: ")
                    && errors[0].contains(why),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn the_test_driver_needs_the_flag() {
        let errors = uri_errors("test:///default", &AdmissionPolicy::default());
        assert!(errors[0].contains("--allow-test-driver"), "{errors:?}");
    }

    #[test]
    fn hosts_in_use_keep_their_uri() {
        let old = spec(&[
            ("a", "qemu+ssh://a.example.com/system"),
            ("b", "qemu:///system"),
        ]);
        let status = LibvirtClusterStatus {
            hosts_in_use: Some(vec![HostInUse {
                name: "a".into(),
                uri: "qemu+ssh://a.example.com/system".into(),
            }]),
            ..LibvirtClusterStatus::default()
        };
        let check = |new: &LibvirtClusterSpec, status: Option<&LibvirtClusterStatus>| {
            let mut v = Verdict::default();
            validate_spec_update(&old, status, new, &mut v);
            v.errors.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        // Removing a host in use is denied; removing a host without machines only warns.
        let removed = spec(&[("b", "qemu:///system")]);
        assert!(check(&removed, None).is_empty());
        assert!(check(&removed, Some(&status))[0].contains("cannot be removed"));
        assert!(
            check(
                &spec(&[("a", "qemu+ssh://a.example.com/system")]),
                Some(&status)
            )
            .is_empty()
        );
        // Step two of "remove, then re-add under another URI" is denied too.
        let old_without_a = spec(&[("b", "qemu:///system")]);
        let readded = spec(&[
            ("a", "qemu+ssh://evil.example.com/system"),
            ("b", "qemu:///system"),
        ]);
        let mut v = Verdict::default();
        validate_spec_update(&old_without_a, Some(&status), &readded, &mut v);
        assert!(
            v.errors[0]
                .to_string()
                .starts_with("spec.hosts[0].uri: host \"a\" has machines on it"),
            "{:?}",
            v.errors
        );
    }
}
