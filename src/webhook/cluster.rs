//! Admission of `LibvirtCluster` and `LibvirtClusterTemplate`.

use std::collections::{BTreeMap, BTreeSet};

use url::Url;

use super::admission::{Admit, Kind, RequestInfo, Verdict};
use super::checks;
use super::machine::template_immutable;
use crate::api::{DomainType, LibvirtCluster, LibvirtClusterSpec, LibvirtClusterTemplate};

/// Port of the workload API server when the endpoint names none.
pub const DEFAULT_API_SERVER_PORT: i32 = 6443;
/// Libvirt network and storage pool every libvirt host has after installation.
pub const DEFAULT_LIBVIRT_OBJECT: &str = "default";

/// Libvirt URI transports we connect through, and the query parameters each may carry. Anything
/// else (`command=`, `netcat=`, `keyfile=`, `proxy=`, …) could make the manager run programs or
/// read files it was not meant to: credentials come from `credentialsSecretRef` instead.
pub const URI_QUERY_ALLOWLIST: [(&str, &[&str]); 4] = [
    ("qemu", &["socket"]),
    (
        "qemu+ssh",
        &["no_verify", "no_tty", "known_hosts_verify", "socket"],
    ),
    ("qemu+tls", &["no_verify"]),
    ("test", &[]),
];

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

/// Every semantic rule of a cluster spec; `at` is the spec's path.
pub fn validate_spec(spec: &LibvirtClusterSpec, at: &str, v: &mut Verdict) {
    if let Some(endpoint) = &spec.control_plane_endpoint {
        let here = format!("{at}.controlPlaneEndpoint");
        let host_ok = endpoint.host.parse::<std::net::IpAddr>().is_ok()
            || matches!(url::Host::parse(&endpoint.host), Ok(url::Host::Domain(_)));
        if !host_ok {
            v.error(
                format!("{here}.host"),
                format!(
                    "must be a DNS name or an IP address, got {:?}",
                    endpoint.host
                ),
            );
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
                format!("duplicate host name {:?}", host.name),
            );
        }
        match libvirt_uri(&host.uri) {
            Err(message) => v.error(format!("{here}.uri"), message),
            Ok(uri) => {
                for warning in uri_warnings(&uri, host.credentials_secret_ref.is_some()) {
                    v.warn(format!("{here}.uri"), warning);
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
                format!("must be a Secret name, got {:?}", secret.name),
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

/// Parses a libvirt connection URI and holds it to the transports and parameters we support.
pub fn libvirt_uri(value: &str) -> Result<Url, String> {
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    let url = Url::parse(value).map_err(|e| format!("is not a libvirt URI ({e})"))?;
    let scheme = url.scheme();
    let Some((_, allowed)) = URI_QUERY_ALLOWLIST.iter().find(|(s, _)| *s == scheme) else {
        return Err(format!(
            "transport {scheme:?} is not supported; use qemu://, qemu+ssh://, qemu+tls:// or test://"
        ));
    };
    if url.password().is_some() {
        return Err("must not carry a password; put credentials in credentialsSecretRef".into());
    }
    if url.fragment().is_some() {
        return Err("must not have a fragment".into());
    }
    let host = url.host_str().unwrap_or_default();
    let path = url.path();
    match scheme {
        "qemu" if !host.is_empty() => {
            return Err("qemu:/// is the local hypervisor; use qemu+ssh:// or qemu+tls:// to reach a remote host".into());
        }
        "qemu+ssh" | "qemu+tls" if host.is_empty() => {
            return Err(format!("{scheme}:// needs a host name"));
        }
        "test" if !path.starts_with('/') || path.len() < 2 || path.contains("..") => {
            return Err(
                "test:// needs an absolute path: test:///default or test:///path/to/node.xml"
                    .into(),
            );
        }
        "test" => {}
        _ if path != "/system" && path != "/session" => {
            return Err(format!("path must be /system or /session, got {path:?}"));
        }
        _ => {}
    }
    let mut seen = BTreeMap::new();
    for (key, val) in url.query_pairs() {
        if !allowed.contains(&key.as_ref()) {
            return Err(format!(
                "query parameter {key:?} is not allowed for {scheme}:// (allowed: {})",
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            ));
        }
        if val.chars().any(char::is_control) {
            return Err(format!("query parameter {key:?} has control characters"));
        }
        if key == "socket" && (!val.starts_with('/') || val.split('/').any(|s| s == "..")) {
            return Err("socket must be an absolute path without '..'".into());
        }
        if seen.insert(key.to_string(), ()).is_some() {
            return Err(format!("query parameter {key:?} is repeated"));
        }
    }
    Ok(url)
}

fn uri_warnings(uri: &Url, has_credentials: bool) -> Vec<&'static str> {
    let mut warnings = Vec::new();
    if uri.query_pairs().any(|(k, v)| k == "no_verify" && v != "0") {
        warnings.push("no_verify disables host verification: the connection can be intercepted");
    }
    if uri.scheme() == "test" {
        warnings
            .push("the test driver keeps virtual machines in memory only; use it for development");
    }
    if matches!(uri.scheme(), "qemu+ssh" | "qemu+tls") && !has_credentials {
        warnings
            .push("no credentialsSecretRef: the manager connects with its own SSH/TLS identity");
    }
    warnings
}

/// An update may add hosts, but a host keeps its URI (machines on it would be orphaned), and the
/// endpoint is set once.
fn validate_spec_update(old: &LibvirtClusterSpec, new: &LibvirtClusterSpec, v: &mut Verdict) {
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
                    "is immutable for host {:?}: its machines would be orphaned; add a new host instead",
                    old_host.name
                ),
            ),
            Some(_) => {}
            None => v.warn(
                "spec.hosts",
                format!("host {:?} was removed: machines still on it are no longer placed or managed there", old_host.name),
            ),
        }
    }
}

impl Admit for LibvirtCluster {
    const KIND: Kind = Kind::LibvirtCluster;

    fn apply_defaults(&mut self) {
        default_spec(&mut self.spec);
    }

    fn validate(&self, v: &mut Verdict) {
        validate_spec(&self.spec, "spec", v);
    }

    fn validate_update(&self, old: &Self, _info: &RequestInfo, v: &mut Verdict) {
        validate_spec_update(&old.spec, &self.spec, v);
    }
}

impl Admit for LibvirtClusterTemplate {
    const KIND: Kind = Kind::LibvirtClusterTemplate;

    fn apply_defaults(&mut self) {
        default_spec(&mut self.spec.template.spec);
    }

    fn validate(&self, v: &mut Verdict) {
        validate_spec(&self.spec.template.spec, "spec.template.spec", v);
    }

    fn validate_update(&self, old: &Self, info: &RequestInfo, v: &mut Verdict) {
        template_immutable(&old.spec.template, &self.spec.template, info, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "test:///etc/capl/node.xml",
        ] {
            assert!(libvirt_uri(ok).is_ok(), "{ok}: {:?}", libvirt_uri(ok));
        }
        for (bad, why) in [
            ("http://hv1/system", "not supported"),
            ("qemu+tcp://hv1/system", "not supported"),
            ("qemu+ext:///system?command=/bin/sh", "not supported"),
            ("qemu+ssh://hv1/system?command=/bin/sh", "command"),
            ("qemu+ssh://hv1/system?keyfile=/etc/shadow", "keyfile"),
            ("qemu+ssh://u:pw@hv1/system", "password"),
            ("qemu://hv1/system", "local hypervisor"),
            ("qemu+ssh:///system", "needs a host"),
            ("qemu:///etc", "/system or /session"),
            ("qemu:///system?socket=../x", "absolute path"),
            ("qemu:///system?socket=/a/../b", "without '..'"),
            ("test://", "absolute path"),
            ("qemu:///system#x", "fragment"),
            ("qemu:///system?socket=/a&socket=/b", "repeated"),
        ] {
            let err = libvirt_uri(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
