//! Prometheus metrics of the manager, served on `/metrics` (`--metrics-bind-address`).
//!
//! One process-wide [`Metrics`] ([`global`]) holds the registry; the webhook server, the libvirt
//! connection pool and the image cache record into it directly, the controllers through the
//! `Arc<Metrics>` they are given. Families (all prefixed `capl_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `capl_reconcile_total` | counter | `kind`, `result` (`success`, `error`, `requeue`) |
//! | `capl_reconcile_duration_seconds` | histogram | `kind` |
//! | `capl_libvirt_call_duration_seconds` | histogram | `op`, `host` |
//! | `capl_admission_total` | counter | `kind`, `operation`, `allowed` |
//! | `capl_image_downloads_total` | counter | `result` (`success`, `error`) |
//!
//! The reconcile and image download series of [`KINDS`] and results exist from the start (at
//! zero); the libvirt call and admission series appear with their first event.
//!
//! Label values are bounded: kinds and operations are fixed sets, `op` is the name of the code
//! that made the libvirt call, and `host` is a host URI's host name only (never its user, port or
//! query parameters, which may name key files).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindResult {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    op: String,
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    kind: String,
    operation: String,
    allowed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// The kinds the controllers reconcile (the `kind` label of the reconcile families).
pub const KINDS: [&str; 2] = ["LibvirtCluster", "LibvirtMachine"];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Reconciles take milliseconds to minutes: 5 ms .. ~164 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// Libvirt calls take sub-milliseconds (test driver) to a minute (the call timeout): 0.5 ms .. ~65 s.
fn libvirt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// How one reconcile ended, as the `result` label of `capl_reconcile_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileResult {
    /// Done; nothing to do until the next change (or the sync period).
    Success,
    /// Failed; the controller retries with back-off.
    Error,
    /// Waiting for something (a boot, an address, a download); requeued on purpose.
    Requeue,
}

impl ReconcileResult {
    fn label(self) -> &'static str {
        match self {
            ReconcileResult::Success => "success",
            ReconcileResult::Error => "error",
            ReconcileResult::Requeue => "requeue",
        }
    }
}

/// The manager's metrics registry and families.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindResult, Counter>,
    reconcile_duration: Histograms<KindLabel>,
    libvirt_calls: Histograms<CallLabels>,
    admissions: Family<AdmissionLabels, Counter>,
    image_downloads: Family<ResultLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process-wide metrics that `/metrics` serves.
pub fn global() -> &'static Arc<Metrics> {
    static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
    GLOBAL.get_or_init(|| Arc::new(Metrics::new()))
}

impl Metrics {
    /// A fresh registry with every family registered (and empty). The manager uses [`global`];
    /// separate instances are for tests.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("capl");
        let reconciles = Family::<KindResult, Counter>::default();
        registry.register(
            "reconcile",
            "Reconciles finished, by kind and result",
            reconciles.clone(),
        );
        let reconcile_duration: Histograms<KindLabel> =
            Family::new_with_constructor(reconcile_histogram);
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took, by kind",
            reconcile_duration.clone(),
        );
        let libvirt_calls: Histograms<CallLabels> = Family::new_with_constructor(libvirt_histogram);
        registry.register(
            "libvirt_call_duration_seconds",
            "Time one libvirt call took (including waiting for the connection), by operation and host",
            libvirt_calls.clone(),
        );
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admission",
            "Admission reviews answered, by kind, operation and decision",
            admissions.clone(),
        );
        let image_downloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "image_downloads",
            "Base image downloads, by result",
            image_downloads.clone(),
        );
        // Known series start at zero, so that they are visible (and `rate()` works) before the
        // first event, as controller-runtime does for its reconcile counters.
        for kind in KINDS {
            for result in [
                ReconcileResult::Success,
                ReconcileResult::Error,
                ReconcileResult::Requeue,
            ] {
                let _ = reconciles.get_or_create(&KindResult {
                    kind: kind.to_owned(),
                    result: result.label().to_owned(),
                });
            }
            let _ = reconcile_duration.get_or_create(&KindLabel {
                kind: kind.to_owned(),
            });
        }
        for result in ["success", "error"] {
            let _ = image_downloads.get_or_create(&ResultLabel {
                result: result.to_owned(),
            });
        }
        Self {
            registry,
            reconciles,
            reconcile_duration,
            libvirt_calls,
            admissions,
            image_downloads,
        }
    }

    /// Starts timing one reconcile of `kind` (e.g. `LibvirtMachine`); the returned timer records
    /// the duration and the result when finished (or dropped: then the result is `error`).
    pub fn reconcile_started(&self, kind: &str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            kind: kind.to_owned(),
            started: Instant::now(),
            result: None,
        }
    }

    /// Records one finished reconcile of `kind`.
    pub fn reconcile_finished(&self, kind: &str, result: ReconcileResult, took: Duration) {
        self.reconciles
            .get_or_create(&KindResult {
                kind: kind.to_owned(),
                result: result.label().to_owned(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one libvirt call `op` against the host at `uri` (labelled by [`host_label`]).
    pub fn libvirt_call(&self, op: &str, uri: &str, took: Duration) {
        self.libvirt_calls
            .get_or_create(&CallLabels {
                op: op.to_owned(),
                host: host_label(uri),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one admission decision; `operation` as the apiserver spells it (`CREATE`, ...).
    pub fn admission(&self, kind: &str, operation: &str, allowed: bool) {
        self.admissions
            .get_or_create(&AdmissionLabels {
                kind: kind.to_owned(),
                operation: operation.to_owned(),
                allowed: allowed.to_string(),
            })
            .inc();
    }

    /// Records one finished base image download.
    pub fn image_download(&self, succeeded: bool) {
        let result = if succeeded { "success" } else { "error" };
        self.image_downloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The registry in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encoding metrics");
        }
        out
    }
}

/// Times one reconcile; see [`Metrics::reconcile_started`].
#[must_use = "finish the timer with the reconcile's result"]
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: String,
    started: Instant,
    result: Option<ReconcileResult>,
}

impl ReconcileTimer<'_> {
    /// Records the reconcile with `result`.
    pub fn finish(mut self, result: ReconcileResult) {
        self.result = Some(result);
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let result = self.result.unwrap_or(ReconcileResult::Error);
        self.metrics
            .reconcile_finished(&self.kind, result, self.started.elapsed());
    }
}

/// The `host` label of a libvirt URI: its host name only, without user, port, path or query
/// (`qemu+ssh://capl@hv1:2222/system?keyfile=..` → `hv1`); `localhost` for a local URI
/// (`qemu:///system`) and `test` for the test driver.
pub fn host_label(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "unknown".to_owned();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host.split(':').next().unwrap_or_default()
    };
    match (host, scheme) {
        ("", "test") => "test".to_owned(),
        ("", _) => "localhost".to_owned(),
        (host, _) => host.to_owned(),
    }
}

/// The `op` label for a closure passed to the libvirt pool: the name of the function that wrote
/// it (`capl::libvirt::live::Live::create::{{closure}}` → `Live::create`), so that every call site
/// is its own bounded label without changing the pool's callers.
pub fn op_label(closure_type: &str) -> String {
    let mut name = closure_type;
    while let Some(stripped) = name.strip_suffix("::{{closure}}") {
        name = stripped;
    }
    // Drop generic arguments, which may be long and vary per caller.
    let name = name.split('<').next().unwrap_or(name);
    let parts: Vec<&str> = name.rsplitn(3, "::").collect();
    match parts.as_slice() {
        [function, owner, _] | [function, owner] => format!("{owner}::{function}"),
        _ => name.to_owned(),
    }
}

/// The `/metrics` route over `metrics`.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>| async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        metrics.encode(),
                    )
                },
            ),
        )
        .with_state(metrics)
}

/// Serves `/metrics` (plain HTTP) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "metrics listening");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_names_and_labels() {
        let metrics = Metrics::new();
        metrics
            .reconcile_started("LibvirtMachine")
            .finish(ReconcileResult::Success);
        drop(metrics.reconcile_started("LibvirtCluster"));
        metrics.libvirt_call(
            "Live::create",
            "qemu+ssh://capl@hv1.example.com:2222/system?keyfile=/secret/key",
            Duration::from_millis(3),
        );
        metrics.admission("LibvirtMachine", "CREATE", false);
        metrics.admission("LibvirtMachine", "CREATE", false);
        metrics.image_download(true);
        let text = metrics.encode();
        for expected in [
            "# TYPE capl_reconcile counter",
            r#"capl_reconcile_total{kind="LibvirtMachine",result="success"} 1"#,
            r#"capl_reconcile_total{kind="LibvirtCluster",result="error"} 1"#,
            "# TYPE capl_reconcile_duration_seconds histogram",
            r#"capl_reconcile_duration_seconds_count{kind="LibvirtMachine"} 1"#,
            "# TYPE capl_libvirt_call_duration_seconds histogram",
            r#"capl_libvirt_call_duration_seconds_count{op="Live::create",host="hv1.example.com"} 1"#,
            r#"capl_admission_total{kind="LibvirtMachine",operation="CREATE",allowed="false"} 2"#,
            r#"capl_image_downloads_total{result="success"} 1"#,
            "# EOF",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
        assert!(
            !text.contains("keyfile") && !text.contains("capl@"),
            "{text}"
        );
    }

    #[test]
    fn host_label_keeps_only_the_host_name() {
        assert_eq!(host_label("qemu:///system"), "localhost");
        assert_eq!(host_label("test:///default"), "test");
        assert_eq!(host_label("qemu+tls://hv2/system?pkipath=/x"), "hv2");
        assert_eq!(host_label("qemu+ssh://u@[fd00::1]:22/system"), "fd00::1");
        assert_eq!(host_label("qemu+ssh://u@10.0.0.5/system"), "10.0.0.5");
        assert_eq!(host_label("nonsense"), "unknown");
    }

    #[test]
    fn op_label_names_the_calling_function() {
        assert_eq!(
            op_label("capl::libvirt::live::Live::create::{{closure}}::{{closure}}"),
            "Live::create"
        );
        assert_eq!(
            op_label("capl::libvirt::image::ImageCache::ensure::{{closure}}"),
            "ImageCache::ensure"
        );
        assert_eq!(op_label("manager::main::{{closure}}"), "manager::main");
        assert_eq!(op_label("probe"), "probe");
    }
}
