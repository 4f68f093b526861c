//! One connection per host URI, shared by every reconcile: calls run on tokio's blocking pool,
//! at most `per_host` at a time per host, and a connection that failed is reopened on next use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::uri::HostUri;
use super::{Error, Host, Result};

struct Slot {
    permits: Semaphore,
    host: Mutex<Option<Arc<Host>>>,
}

/// The manager's libvirt connections.
pub struct Hosts {
    per_host: usize,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Hosts {
    /// `per_host`: how many libvirt calls may run at once against one host.
    pub fn new(per_host: usize) -> Self {
        Self {
            per_host: per_host.max(1),
            slots: Mutex::new(HashMap::new()),
        }
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
                    permits: Semaphore::new(self.per_host),
                    host: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Runs `f` against the host at `uri` off the async runtime, opening (or reopening) the
    /// connection as needed. A failure that looks like a lost connection drops it, so the next
    /// call reconnects.
    pub async fn run<T, F>(&self, uri: &HostUri, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Host) -> Result<T> + Send + 'static,
    {
        let slot = self.slot(uri.as_str());
        let _permit = slot
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Closed(uri.to_string()))?;
        let uri = uri.clone();
        let worker_slot = slot.clone();
        tokio::task::spawn_blocking(move || {
            let host = connected(&worker_slot, &uri)?;
            let result = f(&host);
            if result.as_ref().is_err_and(Error::is_connection_lost) || !host.is_alive() {
                tracing::warn!(%uri, "libvirt connection lost; reconnecting on next use");
                take(&worker_slot);
            }
            result
        })
        .await
        .map_err(|e| Error::Worker(e.to_string()))?
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
