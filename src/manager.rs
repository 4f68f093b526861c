//! Wiring of a running manager: connects to the Kubernetes API and the default libvirt host, serves
//! the health probes and runs until SIGTERM/SIGINT.

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::RunArgs;
use crate::health::{self, Readiness};
use crate::libvirt::uri::{HostUri, UriPolicy};
use crate::libvirt::{Host, HostVersions};
use crate::webhook;
use crate::webhook::tls::{CertFiles, CertStore};

/// Builds a Kubernetes client from `--kubeconfig` or the usual inference chain.
pub async fn kube_client(args: &RunArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Checks `uri` against the manager's URI policy, opens it off the async runtime and reports
/// what it runs.
pub async fn probe_libvirt(uri: &str, policy: UriPolicy) -> anyhow::Result<HostVersions> {
    let uri = HostUri::parse(uri, policy).with_context(|| format!("--libvirt-uri {uri:?}"))?;
    let versions = tokio::task::spawn_blocking(move || Host::open(&uri)?.versions()).await??;
    Ok(versions)
}

/// Runs the manager until a shutdown signal arrives.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let readiness = Readiness::default();

    let health = tokio::spawn(health::serve(
        args.health_probe_bind_address,
        readiness.clone(),
        wait_for(stop_rx.clone()),
    ));
    let mut webhooks = start_webhooks(&args, &stop_rx)?;

    let client = kube_client(&args).await?;
    let server = client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API")?;
    tracing::info!(version = %server.git_version, "connected to the Kubernetes API");
    if !args.libvirt_uri.is_empty() {
        let host = probe_libvirt(&args.libvirt_uri, args.uri_policy()).await?;
        tracing::info!(uri = %args.libvirt_uri, %host, "connected to libvirt");
    }
    readiness.set_ready();

    // Run until a signal arrives, or stop at once when the webhook server dies (a manager that
    // cannot admit would block every write of our kinds).
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        stopped = async {
            match webhooks.as_mut() {
                Some(server) => server.await,
                None => std::future::pending().await,
            }
        } => {
            let _ = stop_tx.send(true);
            return match stopped {
                Ok(Ok(())) => Err(anyhow::anyhow!("the webhook server stopped")),
                Ok(Err(error)) => Err(error.context("the webhook server failed")),
                Err(error) => Err(anyhow::anyhow!("the webhook server task failed: {error}")),
            };
        }
    }
    let _ = stop_tx.send(true);
    health.await??;
    if let Some(webhooks) = webhooks {
        webhooks.await??;
    }
    Ok(())
}

/// Loads the serving certificate (failing fast when it is missing) and starts the webhook server
/// with its certificate watcher; `None` when `--webhook-port=0`.
fn start_webhooks(
    args: &RunArgs,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    if args.webhook_port == 0 {
        tracing::info!("webhook server disabled (--webhook-port=0)");
        return Ok(None);
    }
    let files = CertFiles::in_dir(
        &args.webhook_cert_dir,
        &args.webhook_cert_name,
        &args.webhook_key_name,
    );
    let certs = CertStore::load(files).context("loading the webhook serving certificate")?;
    tokio::spawn(
        certs
            .clone()
            .watch(args.webhook_cert_reload_interval, wait_for(stop.clone())),
    );
    let addr = std::net::SocketAddr::new(args.webhook_host, args.webhook_port);
    let policy = webhook::admission::AdmissionPolicy {
        uri: args.uri_policy(),
    };
    Ok(Some(tokio::spawn(webhook::server::serve(
        addr,
        certs,
        policy,
        wait_for(stop.clone()),
    ))))
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
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
