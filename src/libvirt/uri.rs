//! Libvirt connection URIs, accepted only in a form every parser reads the same way.
//!
//! Libvirt hands parts of a URI to programs: `qemu+ssh://` runs `ssh` with the host, user and
//! port as arguments and a remote shell command built from `socket=` and other parameters;
//! parameters such as `command=`, `netcat=`, `keyfile=`, `pkipath=`, `known_hosts=`, `mode=`,
//! `proxy=` and `name=` pick programs, files or remote URIs. Libvirt splits the query on `&`, or
//! on `;` when the rest holds no `&`, percent-decodes names and values (a `%00` ends a C string),
//! and libxml2 percent-decodes the host and user. A check that reads the URI any other way can be
//! walked around (`?no_tty=1;command=/tmp/x`).
//!
//! So this module accepts a strict subset on which those readings cannot differ: only the
//! characters `A-Z a-z 0-9 : / ? = & @ . _ - + [ ]` (no `%`, no `;`, no quoting), a known
//! transport, a host that is a DNS name or a literal IP, a user that is a plain login name, the
//! path `/system` or `/session`, and per transport a few parameters whose values are enumerated or
//! (for `socket`) a plain absolute path to a libvirt socket. The same function runs in the
//! admission webhook and again in the backend right before a connection is opened, so objects
//! stored before this check existed (or while the webhook was down) cannot reach libvirt either.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::egress;

/// What a manager allows beyond the production transports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UriPolicy {
    /// Accept `test:///default`, libvirt's in-process test driver (`--allow-test-driver`;
    /// development and tests only). No other `test://` URI is ever accepted: the driver reads
    /// the file a `test:///<path>` URI names and quotes it in its errors.
    pub allow_test_driver: bool,
}

/// The only test-driver URI ever accepted.
pub const TEST_DRIVER_URI: &str = "test:///default";

/// Parameters each transport may carry, and the values each may take.
const PARAMETERS: [(Transport, &[(&str, Value)]); 3] = [
    (Transport::Qemu, &[("socket", Value::Socket)]),
    (
        Transport::QemuSsh,
        &[
            ("no_verify", Value::Flag),
            ("no_tty", Value::Flag),
            (
                "known_hosts_verify",
                Value::OneOf(&["normal", "auto", "ignore"]),
            ),
            ("socket", Value::Socket),
        ],
    ),
    (Transport::QemuTls, &[("no_verify", Value::Flag)]),
];

#[derive(Clone, Copy, Debug)]
enum Value {
    /// `0` or `1`.
    Flag,
    OneOf(&'static [&'static str]),
    /// An absolute path of plain segments whose file name ends in `-sock` or `-sock-ro`.
    Socket,
}

/// A libvirt transport we connect through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `qemu:///…`: the hypervisor on the manager's own machine.
    Qemu,
    /// `qemu+ssh://…`: a remote host through ssh.
    QemuSsh,
    /// `qemu+tls://…`: a remote host through TLS.
    QemuTls,
    /// `test:///default`: the in-process test driver.
    Test,
}

impl Transport {
    fn scheme(self) -> &'static str {
        match self {
            Transport::Qemu => "qemu",
            Transport::QemuSsh => "qemu+ssh",
            Transport::QemuTls => "qemu+tls",
            Transport::Test => "test",
        }
    }
}

/// A rejected URI: the rule it broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(message.into()))
}

/// A libvirt URI that passed [`HostUri::parse`]: the only kind of value the backend connects to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostUri {
    uri: String,
    transport: Transport,
    /// Query parameters in the order written.
    params: Vec<(String, String)>,
    /// The string libvirt connects with when the manager added parameters of its own
    /// (credential files); the URI as written otherwise.
    connect: Option<String>,
}

impl fmt::Display for HostUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl HostUri {
    /// Checks `value` against the allowlist described in the module docs.
    pub fn parse(value: &str, policy: UriPolicy) -> Result<Self, UriError> {
        if value.is_empty() || value.len() > 1024 {
            return err(format!("must be 1-1024 characters, got {}", value.len()));
        }
        if let Some(bad) = value.chars().find(|c| !allowed_char(*c)) {
            return err(format!(
                "must only contain letters, digits and : / ? = & @ . _ - + [ ] (no percent-encoding, ';', quotes or spaces), got {bad:?}"
            ));
        }
        let Some((scheme, rest)) = value.split_once("://") else {
            return err(
                "must be <transport>://[user@]host/system, e.g. qemu+ssh://capl@hv1.example.com/system",
            );
        };
        let transport = match scheme {
            "qemu" => Transport::Qemu,
            "qemu+ssh" => Transport::QemuSsh,
            "qemu+tls" => Transport::QemuTls,
            "test" => Transport::Test,
            other => {
                return err(format!(
                    "transport {other:?} is not supported; use qemu://, qemu+ssh:// or qemu+tls://"
                ));
            }
        };
        if transport == Transport::Test {
            if value != TEST_DRIVER_URI {
                return err(format!(
                    "the test driver is only accepted as {TEST_DRIVER_URI} (it reads and quotes the file any other test:// URI names)"
                ));
            }
            if !policy.allow_test_driver {
                return err(format!(
                    "{TEST_DRIVER_URI} (the in-process test driver) is disabled; the manager accepts it only with --allow-test-driver"
                ));
            }
            return Ok(Self {
                uri: value.to_owned(),
                transport,
                params: Vec::new(),
                connect: None,
            });
        }
        let (authority, rest) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => return err("must have the path /system or /session"),
        };
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        check_authority(transport, authority)?;
        if path != "/system" && path != "/session" {
            return err(format!("path must be /system or /session, got {path:?}"));
        }
        let params = match query {
            None => Vec::new(),
            Some(query) => parse_query(transport, query)?,
        };
        Ok(Self {
            uri: value.to_owned(),
            transport,
            params,
            connect: None,
        })
    }

    /// The URI as written: what logs, metrics and statuses show.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// What libvirt connects with: the URI as written plus the manager's own parameters.
    pub fn connect_str(&self) -> &str {
        self.connect.as_deref().unwrap_or(&self.uri)
    }

    /// This URI with a parameter only the manager sets (a path it wrote), percent-encoded the
    /// way libvirt decodes query values.
    pub(super) fn with_connect_param(&self, key: &str, value: &str) -> HostUri {
        const VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'/')
            .remove(b'-')
            .remove(b'_')
            .remove(b'.');
        let encoded = percent_encoding::utf8_percent_encode(value, VALUE);
        let base = self.connect_str();
        let separator = if base.contains('?') { '&' } else { '?' };
        HostUri {
            connect: Some(format!("{base}{separator}{key}={encoded}")),
            ..self.clone()
        }
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Whether this is the in-process test driver (no volume content, DHCP or guest agent).
    pub fn is_test_driver(&self) -> bool {
        self.transport == Transport::Test
    }

    /// The value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Risky but legal choices, for admission warnings.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut warnings = Vec::new();
        if self.param("no_verify") == Some("1") {
            warnings
                .push("no_verify=1 disables host verification: the connection can be intercepted");
        }
        if self.param("known_hosts_verify") == Some("ignore") {
            warnings.push(
                "known_hosts_verify=ignore accepts any ssh host key: the connection can be intercepted",
            );
        }
        if self.is_test_driver() {
            warnings.push(
                "the test driver keeps virtual machines in memory only; use it for development",
            );
        }
        warnings
    }
}

fn allowed_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            ':' | '/' | '?' | '=' | '&' | '@' | '.' | '_' | '-' | '+' | '[' | ']'
        )
}

fn check_authority(transport: Transport, authority: &str) -> Result<(), UriError> {
    let scheme = transport.scheme();
    if transport == Transport::Qemu {
        if !authority.is_empty() {
            return err(
                "qemu:/// is the local hypervisor and takes no host; use qemu+ssh:// or qemu+tls:// to reach a remote host",
            );
        }
        return Ok(());
    }
    let (user, host_port) = match authority.split_once('@') {
        Some((user, host_port)) => (Some(user), host_port),
        None => (None, authority),
    };
    if let Some(user) = user {
        if transport != Transport::QemuSsh {
            return err(format!(
                "{scheme}:// takes no user name; the TLS client certificate identifies the manager"
            ));
        }
        if !login_name(user) {
            return err(format!(
                "user must be a login name (a letter or '_' then up to 31 letters, digits, '_', '.' or '-'; no password), got {user:?}"
            ));
        }
    }
    let (host, port) = split_port(host_port)?;
    if host.is_empty() {
        return err(format!("{scheme}:// needs a host name"));
    }
    check_host(host)?;
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0 && !port.starts_with('0'))
    {
        return err(format!(
            "port must be a number from 1 to 65535, got {port:?}"
        ));
    }
    Ok(())
}

fn split_port(host_port: &str) -> Result<(&str, Option<&str>), UriError> {
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return err("an IPv6 host must be written as [address]");
        };
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| UriError("unexpected text after ]".into()))?,
            ),
        };
        // Keep the brackets: check_host knows them as the IPv6 form.
        return Ok((&host_port[..inner.len() + 2], port));
    }
    Ok(match host_port.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host_port, None),
    })
}

/// A DNS name whose last label starts with a letter (so that no numeric spelling of an address,
/// such as `0x7f.1` or `127.1`, passes as a name), or a literal IPv4/IPv6 address in canonical
/// form; never loopback, link-local or `localhost`.
fn check_host(host: &str) -> Result<(), UriError> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| UriError(format!("{host:?} is not an IPv6 address")))?;
        return match egress::forbidden_ip(IpAddr::V6(ip)) {
            Some(why) => err(format!("host must not be {why}, got {host:?}")),
            None => Ok(()),
        };
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return match egress::forbidden_ip(IpAddr::V4(ip)) {
            Some(why) => err(format!("host must not be {why}, got {host:?}")),
            None => Ok(()),
        };
    }
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_ok = labels
        .last()
        .is_some_and(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()));
    if host.len() > 253 || !labels.iter().all(label_ok) || !last_ok {
        return err(format!(
            "host must be a DNS name (labels of letters, digits and '-', the last starting with a letter) or an IP address, got {host:?}"
        ));
    }
    if let Some(why) = egress::forbidden_name(host) {
        return err(format!("host must not be {why}, got {host:?}"));
    }
    Ok(())
}

fn login_name(user: &str) -> bool {
    let mut chars = user.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && user.len() <= 32
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn parse_query(transport: Transport, query: &str) -> Result<Vec<(String, String)>, UriError> {
    let scheme = transport.scheme();
    let allowed = PARAMETERS
        .iter()
        .find(|(t, _)| *t == transport)
        .map(|(_, p)| *p)
        .unwrap_or_default();
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            return err(format!(
                "query parameters must be name=value joined by '&', got {pair:?}"
            ));
        };
        let Some((_, rule)) = allowed.iter().find(|(k, _)| *k == key) else {
            let names: Vec<&str> = allowed.iter().map(|(k, _)| *k).collect();
            return err(format!(
                "query parameter {key:?} is not allowed for {scheme}:// (allowed: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        };
        let value_ok = match rule {
            Value::Flag => matches!(value, "0" | "1"),
            Value::OneOf(choices) => choices.contains(&value),
            Value::Socket => socket_path(value),
        };
        if !value_ok {
            let expected = match rule {
                Value::Flag => "0 or 1".to_owned(),
                Value::OneOf(choices) => choices.join(", "),
                Value::Socket => {
                    "an absolute path of letters, digits, '.', '_' and '-' to a libvirt socket (file name ending in -sock or -sock-ro), without . or .. segments".to_owned()
                }
            };
            return err(format!("{key} must be {expected}, got {value:?}"));
        }
        if params.iter().any(|(k, _)| k == key) {
            return err(format!("query parameter {key:?} is repeated"));
        }
        params.push((key.to_owned(), value.to_owned()));
    }
    Ok(params)
}

fn socket_path(value: &str) -> bool {
    let Some(rest) = value.strip_prefix('/') else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let plain = segments.iter().all(|s| {
        !s.is_empty()
            && *s != "."
            && *s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    });
    let file = segments.last().copied().unwrap_or_default();
    value.len() <= 255 && plain && (file.ends_with("-sock") || file.ends_with("-sock-ro"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROD: UriPolicy = UriPolicy {
        allow_test_driver: false,
    };
    const DEV: UriPolicy = UriPolicy {
        allow_test_driver: true,
    };

    #[test]
    fn production_uris_pass() {
        for ok in [
            "qemu:///system",
            "qemu:///session",
            "qemu:///system?socket=/run/libvirt/libvirt-sock",
            "qemu:///system?socket=/tmp/capl-bed-1-x/libvirt/run/libvirt-sock",
            "qemu+ssh://capl@hv1.example.com/system",
            "qemu+ssh://hv1.example.com:2222/system?no_tty=1&known_hosts_verify=normal",
            "qemu+ssh://root@hv-1/system?socket=/var/run/libvirt/libvirt-sock-ro",
            "qemu+ssh://capl@192.0.2.10/system",
            "qemu+ssh://capl@[2001:db8::10]:22/system",
            "qemu+tls://hv1.example.com/system",
            "qemu+tls://hv1.example.com:16514/system?no_verify=1",
        ] {
            let parsed = HostUri::parse(ok, PROD);
            assert!(parsed.is_ok(), "{ok}: {parsed:?}");
            assert_eq!(parsed.map(|u| u.to_string()).as_deref(), Ok(ok));
        }
    }

    #[test]
    fn the_review_findings_are_refused() {
        for (bad, why) in [
            // libvirt splits on ';' when there is no '&'.
            (
                "qemu+ssh://h/system?no_tty=1;command=/tmp/x",
                "no percent-encoding, ';'",
            ),
            ("qemu+ssh://h/system?no_tty=1;keyfile=/etc/shadow", "';'"),
            ("qemu+ssh://h/system?no_tty=1;netcat=/tmp/x", "';'"),
            ("qemu+ssh://h/system?no_tty=1;pkipath=/etc", "';'"),
            ("qemu+ssh://h/system?no_tty=1;mode=legacy", "';'"),
            // The socket value reaches the remote shell.
            (
                "qemu+ssh://h/system?socket=/run/x%7Ctouch%20/tmp/pwn",
                "percent-encoding",
            ),
            ("qemu+ssh://h/system?socket=/run/$(touch)-sock", "got '$'"),
            ("qemu+ssh://h/system?socket=/run/x|touch-sock", "got '|'"),
            ("qemu+ssh://h/system?socket=/etc/passwd", "socket must be"),
            (
                "qemu+ssh://h/system?socket=/run/../etc/x-sock",
                "socket must be",
            ),
            ("qemu+ssh://h/system?socket=relative-sock", "socket must be"),
            // Parameters that pick programs, files or remote URIs.
            ("qemu+ssh://h/system?command=/bin/sh", "not allowed"),
            ("qemu+ssh://h/system?netcat=/tmp/x", "not allowed"),
            ("qemu+ssh://h/system?keyfile=/etc/shadow", "not allowed"),
            ("qemu+ssh://h/system?known_hosts=/etc/x", "not allowed"),
            ("qemu+ssh://h/system?proxy=native", "not allowed"),
            ("qemu+ssh://h/system?name=qemu:///embed", "not allowed"),
            ("qemu+tls://h/system?pkipath=/etc", "not allowed"),
            ("qemu:///system?no_tty=1", "not allowed"),
            // NUL and other encodings that end C strings or change meaning.
            ("qemu+ssh://h/system?no_tty%00=1", "percent-encoding"),
            ("qemu+ssh://h%20-oProxyCommand=x/system", "percent-encoding"),
            ("qemu+ssh://-oProxyCommand=x/system", "DNS name"),
            ("qemu+ssh://%2DoProxyCommand/system", "percent-encoding"),
            ("qemu+ssh://u:pw@h/system", "login name"),
            ("qemu+ssh://-l@h/system", "login name"),
            ("qemu+ssh://h/system?no_tty=yes", "0 or 1"),
            ("qemu+ssh://h/system?no_tty=1&no_tty=0", "repeated"),
            ("qemu+ssh://h/system?no_tty", "name=value"),
            ("qemu+ssh://h/system?", "name=value"),
            // Transports, hosts, paths.
            ("qemu+ext:///system?command=/bin/sh", "not supported"),
            ("qemu+tcp://h/system", "not supported"),
            ("qemu+unix:///system", "not supported"),
            ("QEMU:///system", "not supported"),
            ("http://h/system", "not supported"),
            ("qemu://h/system", "local hypervisor"),
            ("qemu+ssh:///system", "needs a host"),
            ("qemu:///embed", "/system or /session"),
            ("qemu:///system/../x", "/system or /session"),
            ("qemu:///system#x", "got '#'"),
            ("qemu+ssh://127.0.0.1/system", "loopback"),
            ("qemu+ssh://127.1/system", "DNS name"),
            ("qemu+ssh://0x7f.1/system", "DNS name"),
            ("qemu+ssh://2130706433/system", "DNS name"),
            ("qemu+ssh://localhost/system", "local machine"),
            ("qemu+ssh://[::1]/system", "loopback"),
            ("qemu+ssh://[::ffff:169.254.169.254]/system", "link-local"),
            ("qemu+tls://169.254.169.254/system", "link-local"),
            ("qemu+ssh://h:0/system", "port"),
            ("qemu+ssh://h:99999/system", "port"),
            ("qemu+tls://user@h/system", "takes no user"),
            ("qemu+ssh://h", "path"),
            ("qemu+ssh://h/system\n", "got '\\n'"),
        ] {
            let err = HostUri::parse(bad, DEV).expect_err(bad);
            assert!(err.0.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn only_the_default_test_driver_and_only_when_allowed() {
        assert!(HostUri::parse("test:///default", DEV).is_ok());
        let off = HostUri::parse("test:///default", PROD).expect_err("disabled");
        assert!(off.0.contains("--allow-test-driver"), "{off}");
        for bad in [
            "test:///etc/passwd",
            "test:///var/run/secrets/kubernetes.io/serviceaccount/token",
            "test:///default/../../etc/passwd",
            "test://host/default",
            "test:///default?x=1",
        ] {
            let err = HostUri::parse(bad, DEV).expect_err(bad);
            assert!(
                err.0.contains("only accepted as test:///default") || err.0.contains("got"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn warnings_name_the_risky_choices() {
        let uri = HostUri::parse(
            "qemu+ssh://h.example.com/system?no_verify=1&known_hosts_verify=ignore",
            PROD,
        )
        .expect("legal");
        assert_eq!(uri.warnings().len(), 2);
        assert_eq!(uri.param("no_verify"), Some("1"));
        assert_eq!(uri.transport(), Transport::QemuSsh);
    }
}
