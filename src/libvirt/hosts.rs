//! One connection per host URI, shared by every reconcile: calls run on tokio's blocking pool,
//! at most `per_host` at a time per host, and a connection that failed is reopened on next use.
//!
//! The per-host permit lives inside the blocking task: cancelling the caller's future (or its
//! timeout firing) never frees a permit while libvirt is still working for it. Every call has a
//! timeout; a call that times out drops the connection, so the next call reconnects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::uri::HostUri;
use super::{Error, Host, Result};

struct Slot {
    permits: Arc<Semaphore>,
    host: Mutex<Option<Arc<Host>>>,
}

/// How long one libvirt call (one closure passed to [`Hosts::run`]) may take by default.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The manager's libvirt connections.
pub struct Hosts {
    per_host: usize,
    call_timeout: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Hosts {
    /// `per_host`: how many libvirt calls may run at once against one host; calls time out after
    /// [`DEFAULT_CALL_TIMEOUT`].
    pub fn new(per_host: usize) -> Self {
        Self::with_timeout(per_host, DEFAULT_CALL_TIMEOUT)
    }

    /// Like [`Hosts::new`], with a call timeout of `call_timeout`.
    pub fn with_timeout(per_host: usize, call_timeout: Duration) -> Self {
        Self {
            per_host: per_host.max(1),
            call_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The timeout of one call.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    fn slot(&self, uri: &str) -> Arc<Slot> {
        let mut slots = match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots
            .entry(uri.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    permits: Arc::new(Semaphore::new(self.per_host)),
                    host: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Runs `f` against the host at `uri` off the async runtime, opening (or reopening) the
    /// connection as needed. A failure that looks like a lost connection drops it, so the next
    /// call reconnects.
    ///
    /// The call gives up after the call timeout with [`Error::Timeout`]; the blocking work keeps
    /// its permit until libvirt returns, so the per-host bound stays honest.
    pub async fn run<T, F>(&self, uri: &HostUri, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Host) -> Result<T> + Send + 'static,
    {
        self.run_keeping(uri, (), f).await
    }

    /// Like [`Hosts::run`], and `keep` (e.g. a machine's lock guard) stays alive until the blocking
    /// work has finished, even when the caller's future is dropped first.
    pub async fn run_keeping<T, F, K>(&self, uri: &HostUri, keep: K, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Host) -> Result<T> + Send + 'static,
        K: Send + 'static,
    {
        // Timed by op (the calling function, see `metrics::op_label`) and host, including the
        // wait for a permit: what a reconcile experiences.
        let _timer = CallTimer {
            op: std::any::type_name::<F>(),
            uri: uri.as_str(),
            started: std::time::Instant::now(),
        };
        let slot = self.slot(uri.connect_str());
        let permit = slot
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed(uri.to_string()))?;
        let owned_uri = uri.clone();
        let worker_slot = slot.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _keep = keep;
            let uri = owned_uri;
            let host = connected(&worker_slot, &uri)?;
            let result = f(&host);
            if result.as_ref().is_err_and(Error::is_connection_lost) || !host.is_alive() {
                tracing::warn!(%uri, "libvirt connection lost; reconnecting on next use");
                take(&worker_slot);
            }
            result
        });
        match tokio::time::timeout(self.call_timeout, work).await {
            Ok(joined) => joined.map_err(|e| Error::Worker(e.to_string()))?,
            Err(_) => {
                tracing::warn!(%uri, after = ?self.call_timeout, "libvirt call timed out; reconnecting on next use");
                take(&slot);
                Err(Error::Timeout {
                    uri: uri.to_string(),
                    after: self.call_timeout,
                })
            }
        }
    }

    /// How many hosts have an open connection.
    pub fn open_connections(&self) -> usize {
        let slots = match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots
            .values()
            .filter(|s| s.host.lock().map(|h| h.is_some()).unwrap_or(false))
            .count()
    }
}

/// Records one call's duration when dropped (also when the caller's future is dropped).
struct CallTimer<'a> {
    op: &'static str,
    uri: &'a str,
    started: std::time::Instant,
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        crate::metrics::global().libvirt_call(
            &crate::metrics::op_label(self.op),
            self.uri,
            self.started.elapsed(),
        );
    }
}

fn connected(slot: &Slot, uri: &HostUri) -> Result<Arc<Host>> {
    let mut guard = match slot.host.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(host) = guard.as_ref() {
        return Ok(host.clone());
    }
    let host = Arc::new(Host::open(uri)?);
    *guard = Some(host.clone());
    Ok(host)
}

fn take(slot: &Slot) {
    let mut guard = match slot.host.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    *guard = None;
}
