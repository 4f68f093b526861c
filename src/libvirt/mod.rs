//! The only code that talks to hypervisors. Calls into libvirt are blocking FFI: callers on the
//! async runtime go through [`tokio::task::spawn_blocking`].
//!
//! - [`backend`]: the [`backend::Backend`] trait controllers use, and its typed requests and
//!   results;
//! - [`live`]: [`live::LibvirtBackend`], the backend on libvirt (real hosts and the test driver);
//! - [`fake`]: [`fake::FakeBackend`], an in-memory backend with fault injection for controller tests;
//! - [`error`]: the backend's one error type (failed step, kind, sanitised message);
//! - [`tasks`]: per-machine locks and background work keyed by machine;
//! - [`identity`]: names, MACs and volume prefixes derived from a machine's persisted UUID;
//! - [`xml`]: domain XML from typed structs;
//! - [`machine`]: idempotent create, leak-free delete and inventory of a machine on a host;
//! - [`credentials`]: credential files for `qemu+ssh`/`qemu+tls` hosts, from a Secret;
//! - [`hosts`]: one shared connection per host URI, reconnecting, with bounded concurrency;
//! - [`volumes`]: volume upload/download through libvirt streams, pool space;
//! - [`image`]: base images fetched once per host and pool, streamed and verified;
//! - [`provision`]: machine creation as idempotent, crash-safe steps.

pub mod backend;
pub mod credentials;
pub mod error;
pub mod fake;
pub mod hosts;
pub mod identity;
pub mod image;
pub mod live;
pub mod machine;
pub mod provision;
pub mod qcow2;
pub mod tasks;
pub mod uri;
pub mod volumes;
pub mod xml;

use std::fmt;
use std::sync::Once;
use std::time::Duration;

use virt::connect::Connect;

use uri::HostUri;

/// Errors of the libvirt layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to libvirt at {uri}: {error}")]
    Connect {
        uri: String,
        error: virt::error::Error,
    },
    #[error("building libvirt XML: {0}")]
    Xml(String),
    #[error("{0} does not exist")]
    Missing(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("the connection pool for {0} is closed")]
    Closed(String),
    #[error("a libvirt worker task failed: {0}")]
    Worker(String),
    #[error("libvirt call on {uri} did not return within {after:?}")]
    Timeout {
        uri: String,
        after: std::time::Duration,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("libvirt call {call} on {uri}: {error}")]
    Call {
        call: &'static str,
        uri: String,
        error: virt::error::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a libvirt call failed because the object (domain, volume, pool) is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Call { error, .. } if machine::is_not_found(error))
    }

    /// Whether the error means the connection itself is gone (the next call should reconnect).
    pub fn is_connection_lost(&self) -> bool {
        use virt::error::{ErrorDomain, ErrorNumber};
        match self {
            Error::Connect { .. } | Error::Timeout { .. } => true,
            Error::Call { error, .. } => {
                matches!(
                    error.code().known(),
                    Some(
                        ErrorNumber::SystemError
                            | ErrorNumber::NoConnect
                            | ErrorNumber::InvalidConn
                    )
                ) || matches!(error.domain().known(), Some(ErrorDomain::Rpc))
            }
            _ => false,
        }
    }
}

/// A version number as libvirt encodes it (`major * 1_000_000 + minor * 1_000 + release`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write!(f, "{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
    }
}

/// What a host runs: the libvirt library, its driver and the hypervisor behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVersions {
    /// Version of the libvirt library serving the connection.
    pub libvirt: Version,
    /// Driver name, e.g. `QEMU` or `TEST`.
    pub driver: String,
    /// Version of the hypervisor (QEMU's version for the QEMU driver).
    pub hypervisor: Version,
}

impl fmt::Display for HostVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "libvirt {} ({} driver, hypervisor {})",
            self.libvirt, self.driver, self.hypervisor
        )
    }
}

/// Seconds between keepalive probes on remote connections.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which a remote connection counts as dead.
pub const KEEPALIVE_COUNT: u32 = 3;

/// Registers libvirt's default event loop implementation and runs it on a dedicated thread.
fn start_event_loop() {
    if let Err(error) = virt::event::event_register_default_impl() {
        tracing::warn!(%error, "libvirt event loop unavailable; dead remote hosts are noticed only by call timeouts");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(|| {
            loop {
                if let Err(error) = virt::event::event_run_default_impl() {
                    tracing::warn!(%error, "libvirt event loop iteration failed");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the libvirt event loop thread");
    }
}

/// One open connection to one libvirt host.
pub struct Host {
    uri: String,
    conn: Connect,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host").field("uri", &self.uri).finish()
    }
}

impl Host {
    /// Opens a connection (blocking). Libvirt's own error printing to stderr is switched off:
    /// errors reach callers as values and are logged once, by them.
    /// Only a [`HostUri`] (checked against the allowlist) can be opened.
    ///
    /// Libvirt's default event loop runs on a thread of its own (started once, before the first
    /// connection), so keepalive probes flow and a remote peer that died is noticed; remote
    /// connections get a keepalive of [`KEEPALIVE_INTERVAL`] × [`KEEPALIVE_COUNT`].
    pub fn open(uri: &HostUri) -> Result<Self> {
        static QUIET: Once = Once::new();
        QUIET.call_once(|| {
            virt::error::clear_error_callback();
            start_event_loop();
        });
        let conn = Connect::open(Some(uri.connect_str())).map_err(|error| Error::Connect {
            uri: uri.to_string(),
            error,
        })?;
        // Local and test drivers have no keepalive; only remote transports need it.
        if let Err(error) =
            conn.set_keep_alive(KEEPALIVE_INTERVAL.as_secs() as i32, KEEPALIVE_COUNT)
        {
            tracing::debug!(%uri, %error, "no keepalive on this connection");
        }
        Ok(Self {
            uri: uri.to_string(),
            conn,
        })
    }

    /// Whether the connection still answers.
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Wraps a failed libvirt call with its name and this host's URI.
    pub(crate) fn call(&self, call: &'static str, error: virt::error::Error) -> Error {
        Error::Call {
            call,
            uri: self.uri.clone(),
            error,
        }
    }

    /// The URI this host was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The underlying connection, for the backend's own modules.
    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    /// Versions of the library, driver and hypervisor behind this connection.
    pub fn versions(&self) -> Result<HostVersions> {
        let call = |call, error| Error::Call {
            call,
            uri: self.uri.clone(),
            error,
        };
        let libvirt = self
            .conn
            .lib_version()
            .map_err(|e| call("virConnectGetLibVersion", e))?;
        let driver = self
            .conn
            .driver_type()
            .map_err(|e| call("virConnectGetType", e))?;
        let hypervisor = self
            .conn
            .hyp_version()
            .map_err(|e| call("virConnectGetVersion", e))?;
        Ok(HostVersions {
            libvirt: Version(libvirt),
            driver,
            hypervisor: Version(hypervisor),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_print_as_libvirt_encodes_them() {
        assert_eq!(Version(9_000_000).to_string(), "9.0.0");
        assert_eq!(Version(7_002_022).to_string(), "7.2.22");
    }

    #[test]
    fn a_bad_uri_is_an_error_that_names_it() {
        let uri = HostUri::parse(
            "qemu:///system?socket=/nonexistent/libvirt-sock",
            Default::default(),
        )
        .expect("a legal URI");
        let err = Host::open(&uri).expect_err("no such socket");
        assert!(
            err.to_string().contains("/nonexistent/libvirt-sock"),
            "{err}"
        );
    }
}
