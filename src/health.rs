//! The probe server: `/healthz` answers while the process runs, `/readyz` once every readiness
//! check passes: the Kubernetes API answered, the libvirt host (`--libvirt-uri`) answered, and,
//! on the replica running the controllers, their caches synced.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

/// Parses a bind address, also in controller-runtime's `:<port>` spelling (all IPv4 interfaces).
pub fn parse_bind_address(value: &str) -> Result<SocketAddr, String> {
    let spelled = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => value.to_owned(),
    };
    spelled
        .parse()
        .map_err(|error| format!("{value:?} is not an address:port or :port ({error})"))
}

/// Named readiness checks (e.g. `kube-api`, `libvirt`, `caches`), set by whoever owns each
/// dependency. Ready when at least one check is registered and every check passes; a check that
/// is registered but not yet passing (`set(name, false)`) keeps the manager unready.
#[derive(Clone, Default, Debug)]
pub struct Readiness(Arc<Mutex<BTreeMap<String, bool>>>);

impl Readiness {
    /// Registers (or updates) the check `name`.
    pub fn set(&self, name: &str, passing: bool) {
        self.checks().insert(name.to_owned(), passing);
    }

    /// Removes the check `name` (e.g. the controllers' caches on a replica that stopped leading).
    pub fn remove(&self, name: &str) {
        self.checks().remove(name);
    }

    /// Whether every registered check passes (and there is at least one).
    pub fn is_ready(&self) -> bool {
        let checks = self.checks();
        !checks.is_empty() && checks.values().all(|passing| *passing)
    }

    /// The names of the checks that do not pass, in name order.
    pub fn failing(&self) -> Vec<String> {
        self.checks()
            .iter()
            .filter(|(_, passing)| !**passing)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn checks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        match self.0.lock() {
            Ok(checks) => checks,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The probe routes.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

/// 200 `ok`, or 503 naming the failing checks (`not ready: caches, kube-api`).
async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, String) {
    if readiness.is_ready() {
        return (StatusCode::OK, "ok".to_owned());
    }
    let failing = readiness.failing();
    let why = if failing.is_empty() {
        "no check has run yet".to_owned()
    } else {
        failing.join(", ")
    };
    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"))
}

/// Serves the probe routes until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "health probes listening");
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Parses `--metrics-bind-address`: an address as for [`parse_bind_address`], or `0` to disable
/// the endpoint (controller-runtime's spelling).
pub fn parse_optional_bind_address(value: &str) -> Result<Option<SocketAddr>, String> {
    if value == "0" {
        return Ok(None);
    }
    parse_bind_address(value).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_named_check() {
        let readiness = Readiness::default();
        assert!(!readiness.is_ready(), "no check yet");
        readiness.set("kube-api", false);
        readiness.set("caches", false);
        assert_eq!(readiness.failing(), ["caches", "kube-api"]);
        readiness.set("kube-api", true);
        assert!(!readiness.is_ready());
        readiness.set("caches", true);
        assert!(readiness.is_ready());
        readiness.set("libvirt", false);
        assert_eq!(readiness.failing(), ["libvirt"]);
        readiness.remove("libvirt");
        assert!(readiness.is_ready());
    }

    #[tokio::test]
    async fn readyz_lists_the_failing_checks() {
        let readiness = Readiness::default();
        readiness.set("kube-api", true);
        readiness.set("caches", false);
        let (status, body) = readyz(State(readiness.clone())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not ready: caches");
        readiness.set("caches", true);
        assert_eq!(readyz(State(readiness)).await.0, StatusCode::OK);
    }

    #[test]
    fn bind_addresses_parse_in_controller_runtime_spelling() {
        assert_eq!(
            parse_bind_address(":8080"),
            Ok("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            parse_optional_bind_address("127.0.0.1:9"),
            Ok(Some("127.0.0.1:9".parse().unwrap()))
        );
        assert_eq!(parse_optional_bind_address("0"), Ok(None));
        assert!(parse_optional_bind_address("8080").is_err());
    }
}
