//! Wiring of a running manager: connects to the Kubernetes API and the default libvirt host, serves
//! the health probes, `/metrics` and the webhooks, runs the controllers while it leads, and runs
//! until SIGTERM/SIGINT. One stop signal (a `watch` channel) ends every server and the controllers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::config::{ControllerSettings, RunArgs};
use crate::health::{self, Readiness};
use crate::leader::{Leadership, Role};
use crate::libvirt::uri::{HostUri, UriPolicy};
use crate::libvirt::{Host, HostVersions};
use crate::metrics::{self, Metrics};
use crate::webhook;
use crate::webhook::certificates::Certificates;
use crate::webhook::tls::{CertFiles, CertStore};

/// Builds a Kubernetes client from `--kubeconfig` or the usual inference chain, paced by
/// `--kube-api-qps`/`--kube-api-burst` ([`RateLimitLayer`]).
pub async fn kube_client(args: &RunArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&RateLimitLayer::new(args.kube_api_qps, args.kube_api_burst))
        .build();
    Ok(client)
}

/// Checks `uri` against the manager's URI policy, opens it off the async runtime and reports
/// what it runs.
pub async fn probe_libvirt(uri: &str, policy: UriPolicy) -> anyhow::Result<HostVersions> {
    let uri = HostUri::parse(uri, policy).with_context(|| format!("--libvirt-uri {uri:?}"))?;
    let started = std::time::Instant::now();
    let host = uri.to_string();
    let versions = tokio::task::spawn_blocking(move || Host::open(&uri)?.versions()).await?;
    metrics::global().libvirt_call("manager::probe_libvirt", &host, started.elapsed());
    Ok(versions?)
}

/// What the controllers get from the manager (`controller::run` takes it).
#[derive(Clone)]
pub struct ControllerContext {
    /// The rate-limited Kubernetes client.
    pub client: kube::Client,
    /// Concurrency, sync period, namespace, watch filter, URI policy.
    pub settings: ControllerSettings,
    /// Where reconciles are counted and timed ([`Metrics::reconcile_started`]).
    pub metrics: Arc<Metrics>,
    /// Readiness checks: the controllers register `caches` (false until their stores are ready)
    /// and may register `hosts`.
    pub readiness: Readiness,
    /// Turns true when the controllers must stop: the manager's shutdown signal, or this replica
    /// lost the leadership. Pass [`stopped`]`(stop.clone())` to `graceful_shutdown_on`.
    pub stop: watch::Receiver<bool>,
}

/// Runs the manager until a shutdown signal arrives (`Ok`), its webhook server dies or it loses
/// the leadership (`Err`: the pod restarts, as with controller-runtime).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let election = if args.leader_elect {
        Some(args.leader_election().map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let certificates = args.certificate_settings().map_err(anyhow::Error::msg)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let readiness = Readiness::default();
    readiness.set("kube-api", false);
    if !args.libvirt_uri.is_empty() {
        readiness.set("libvirt", false);
    }
    let metrics = metrics::global().clone();

    let health = tokio::spawn(health::serve(
        args.health_probe_bind_address,
        readiness.clone(),
        stopped(stop_rx.clone()),
    ));
    // A taken metrics port fails the start, as in controller-runtime.
    let metrics_server = match args.metrics_bind_address {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-bind-address {addr}"))?;
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                stopped(stop_rx.clone()),
            )))
        }
        None => {
            tracing::info!("metrics disabled (--metrics-bind-address=0)");
            None
        }
    };
    // Certificates from files load before anything else (a missing file fails the start at once);
    // self-managed ones need the Kubernetes API first.
    let mut webhooks = match certificates {
        None => start_webhooks(&args, None, &stop_rx)?,
        Some(_) => None,
    };

    let client = kube_client(&args).await?;
    let server = client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API")?;
    tracing::info!(version = %server.git_version, "connected to the Kubernetes API");
    readiness.set("kube-api", true);
    if let Some(settings) = certificates.filter(|_| args.webhook_port != 0) {
        readiness.set("webhook-certificate", false);
        let Some(certificates) =
            Certificates::start(client.clone(), settings, shutdown_signal()).await
        else {
            tracing::info!("shutting down");
            return Ok(());
        };
        readiness.set("webhook-certificate", true);
        tokio::spawn(certificates.clone().run(stopped(stop_rx.clone())));
        webhooks = start_webhooks(&args, Some(certificates.store()), &stop_rx)?;
    }
    if !args.libvirt_uri.is_empty() {
        let host = probe_libvirt(&args.libvirt_uri, args.uri_policy()).await?;
        tracing::info!(uri = %args.libvirt_uri, %host, "connected to libvirt");
        readiness.set("libvirt", true);
    }

    // Webhooks serve on every replica; the controllers only while this one leads.
    let leadership = match election {
        Some(settings) => Leadership::start(client.clone(), settings, stop_rx.clone()),
        None => Leadership::always(),
    };
    let (controllers_stop_tx, controllers_stop) = watch::channel(false);
    {
        let (mut stop, lost) = (stop_rx.clone(), leadership.lost());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => {},
                _ = lost => {},
            }
            let _ = controllers_stop_tx.send(true);
        });
    }
    let context = ControllerContext {
        client,
        settings: args.controller_settings(),
        metrics,
        readiness,
        stop: controllers_stop,
    };
    let mut controllers = tokio::spawn(run_controllers(context, leadership.clone()));

    // Run until a signal arrives, or stop at once when the webhook server dies (a manager that
    // cannot admit would block every write of our kinds), the leadership is lost or the
    // controllers fail.
    let failure = tokio::select! {
        biased;
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            None
        }
        _ = leadership.lost() => Some(anyhow::anyhow!("leader election lost")),
        stopped = async {
            match webhooks.as_mut() {
                Some(server) => server.await,
                None => std::future::pending().await,
            }
        } => {
            webhooks = None;
            Some(match stopped {
                Ok(Ok(())) => anyhow::anyhow!("the webhook server stopped"),
                Ok(Err(error)) => error.context("the webhook server failed"),
                Err(error) => anyhow::anyhow!("the webhook server task failed: {error}"),
            })
        }
        ended = &mut controllers => {
            let error = match ended {
                // The controllers stop because the lease was lost: say that, not their echo.
                Ok(Ok(())) if leadership.role() == Role::Lost => {
                    anyhow::anyhow!("leader election lost")
                }
                Ok(Ok(())) => anyhow::anyhow!("the controllers stopped"),
                Ok(Err(error)) => error.context("the controllers failed"),
                Err(error) => anyhow::anyhow!("the controllers task failed: {error}"),
            };
            let _ = stop_tx.send(true);
            return Err(error);
        }
    };
    let _ = stop_tx.send(true);
    // The controllers finish their reconciles in flight (bounded, so that a lost lease or a
    // stuck reconcile cannot keep the process from exiting).
    match tokio::time::timeout(CONTROLLERS_GRACE, controllers).await {
        Ok(Ok(Err(error))) => {
            tracing::warn!(error = %format!("{error:#}"), "controllers failed while stopping")
        }
        Ok(_) => {}
        Err(_) => tracing::warn!(after = ?CONTROLLERS_GRACE, "controllers did not stop in time"),
    }
    // Release the Lease (when held) before exiting, so that a successor need not wait for it
    // to expire.
    if tokio::time::timeout(RELEASE_GRACE, leadership.ended())
        .await
        .is_err()
    {
        tracing::warn!(after = ?RELEASE_GRACE, "the Lease was not released in time");
    }
    if let Some(error) = failure {
        return Err(error);
    }
    health.await??;
    if let Some(server) = metrics_server {
        server.await??;
    }
    if let Some(webhooks) = webhooks {
        webhooks.await??;
    }
    Ok(())
}

/// How long releasing the Lease may take at shutdown.
pub const RELEASE_GRACE: Duration = Duration::from_secs(5);

/// libvirt calls at once against one host.
pub const LIBVIRT_CALLS_PER_HOST: usize = 4;

/// How long the controllers may take to stop once told to.
pub const CONTROLLERS_GRACE: Duration = Duration::from_secs(10);

/// Runs the controllers once this replica leads, until `context.stop` turns true.
async fn run_controllers(context: ControllerContext, leadership: Leadership) -> anyhow::Result<()> {
    if !leadership.acquired().await {
        return Ok(());
    }
    tracing::info!("starting the controllers");
    let backend = crate::libvirt::live::LibvirtBackend::new(LIBVIRT_CALLS_PER_HOST)
        .context("starting the libvirt backend")?;
    // Ready again once the controllers' caches hold the apiserver's state.
    context.readiness.set("caches", false);
    let readiness = context.readiness.clone();
    let result = crate::controller::run_reporting(
        context.client,
        Arc::new(backend),
        crate::controller::Settings::from_manager(&context.settings),
        stopped(context.stop),
        move || readiness.set("caches", true),
    )
    .await;
    // Credentials written for libvirt do not outlive the controllers.
    crate::libvirt::credentials::CredentialFiles::remove_global();
    result
}

/// Starts the webhook server on `certs` (self-managed), or on the files in `--webhook-cert-dir`
/// (loaded now, failing fast when missing, and watched); `None` when `--webhook-port=0`.
fn start_webhooks(
    args: &RunArgs,
    certs: Option<Arc<CertStore>>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    if args.webhook_port == 0 {
        tracing::info!("webhook server disabled (--webhook-port=0)");
        return Ok(None);
    }
    let certs = match certs {
        Some(certs) => certs,
        None => {
            let files = CertFiles::in_dir(
                &args.webhook_cert_dir,
                &args.webhook_cert_name,
                &args.webhook_key_name,
            );
            let certs =
                CertStore::load(files).context("loading the webhook serving certificate")?;
            tokio::spawn(
                certs
                    .clone()
                    .watch(args.webhook_cert_reload_interval, stopped(stop.clone())),
            );
            certs
        }
    };
    let addr = std::net::SocketAddr::new(args.webhook_host, args.webhook_port);
    let policy = webhook::admission::AdmissionPolicy {
        uri: args.uri_policy(),
    };
    Ok(Some(tokio::spawn(webhook::server::serve(
        addr,
        certs,
        policy,
        stopped(stop.clone()),
    ))))
}

/// Resolves when `stop` turns true (or its sender is gone): the manager's one shutdown signal,
/// as a future for servers and `Controller::graceful_shutdown_on`.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the manager");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

// ---------------------------------------------------------------- the client's rate limit

/// A token bucket in front of the Kubernetes client (kube has no limiter of its own): `burst`
/// requests at once, then `qps` per second, like client-go's `--kube-api-qps`/`--kube-api-burst`.
/// Requests over the limit wait (in the client's queue); none is refused.
#[derive(Clone, Copy, Debug)]
pub struct RateLimitLayer {
    qps: f64,
    burst: u32,
}

impl RateLimitLayer {
    /// `qps` > 0 tokens per second, at most `burst` (≥ 1) stored.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            qps: if qps.is_finite() && qps > 0.0 {
                qps
            } else {
                1.0
            },
            burst: burst.max(1),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: TokenBucket::new(self.qps, self.burst, Instant::now()),
            sleep: None,
            reserved: false,
        }
    }
}

/// The service of [`RateLimitLayer`].
pub struct RateLimit<S> {
    inner: S,
    bucket: TokenBucket,
    sleep: Option<Pin<Box<Sleep>>>,
    reserved: bool,
}

impl<S, R> tower::Service<R> for RateLimit<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.reserved {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            let now = Instant::now();
            match self.bucket.take(now) {
                Ok(()) => self.reserved = true,
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep_until(now + wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.reserved = false;
        self.inner.call(request)
    }
}

/// Tokens refill continuously at `rate` per second up to `burst`.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    #[test]
    fn the_bucket_gives_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        let wait = bucket.take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(bucket.take(start + Duration::from_millis(100)), Ok(()));
        // Idle time refills at most `burst` tokens.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Ok(()));
        }
        assert!(bucket.take(later).is_err());
    }

    #[tokio::test]
    async fn a_burst_above_the_limit_is_paced() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_: ()| {
            seen.lock().unwrap().push(std::time::Instant::now());
            async { Ok::<_, std::convert::Infallible>(()) }
        });
        let mut service = RateLimitLayer::new(50.0, 5).layer(inner);
        let start = std::time::Instant::now();
        for _ in 0..15 {
            service.ready().await.unwrap().call(()).await.unwrap();
        }
        let calls = calls.lock().unwrap();
        // 5 at once, then 10 more at 50/s: ≥ 200 ms in all.
        assert!(calls[4].duration_since(start) < Duration::from_millis(50));
        let took = calls[14].duration_since(start);
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
}
