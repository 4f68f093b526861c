//! The manager's command line. Flag names follow controller-runtime's conventions so that
//! operators can carry their muscle memory (and their Helm values) over from Go providers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Cluster API infrastructure provider for libvirt/KVM hosts.
#[derive(Debug, Parser)]
// A flag given twice takes its last value (as with Go's flag package), so that wrappers can
// append overrides to a default command line.
#[command(name = "manager", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// What the binary does; running the manager is the default.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers and webhooks (the default).
    Run,
    /// Print the versions of the manager, the libvirt library and the hypervisor, then exit.
    Version,
    /// Write the webhook configurations (for the in-cluster Service) into `webhooks/`.
    Webhooks {
        /// Directory to write `manifests.yaml` into.
        #[arg(long, default_value = "webhooks")]
        out_dir: PathBuf,
    },
    /// Write the CustomResourceDefinitions generated from the API types.
    Crds {
        /// Directory to write `<group>_<plural>.yaml` files into.
        #[arg(long, default_value = "crds")]
        out_dir: PathBuf,
    },
}

/// A serving certificate's validity: at least a minute (renewal comes after two thirds of it).
fn parse_cert_validity(value: &str) -> Result<std::time::Duration, String> {
    let validity = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if validity < std::time::Duration::from_secs(60) {
        return Err(format!("must be at least 1m, got {value}"));
    }
    Ok(validity)
}

impl RunArgs {
    /// The self-managed certificate settings, when `--webhook-cert-secret` is set.
    pub fn certificate_settings(
        &self,
    ) -> Result<Option<crate::webhook::certificates::Settings>, String> {
        if self.webhook_cert_secret.is_empty() {
            return Ok(None);
        }
        let namespace = self.webhook_cert_secret_namespace.clone();
        if namespace.is_empty() {
            return Err(
                "--webhook-cert-secret needs --webhook-cert-secret-namespace (or $POD_NAMESPACE)"
                    .into(),
            );
        }
        let service_namespace = if self.webhook_service_namespace.is_empty() {
            &namespace
        } else {
            &self.webhook_service_namespace
        };
        let hosts = crate::webhook::certificates::Settings::hosts_for(
            &self.webhook_service_name,
            service_namespace,
            &self.webhook_cert_host,
        );
        if hosts.is_empty() {
            return Err(
                "--webhook-cert-secret needs --webhook-service-name or --webhook-cert-host (the names the certificate is for)"
                    .into(),
            );
        }
        Ok(Some(crate::webhook::certificates::Settings {
            namespace,
            secret: self.webhook_cert_secret.clone(),
            hosts,
            configuration: self.webhook_configuration_name.clone(),
            validity: self.webhook_cert_validity,
        }))
    }

    /// Which libvirt URIs this manager accepts beyond the production transports.
    pub fn uri_policy(&self) -> crate::libvirt::uri::UriPolicy {
        crate::libvirt::uri::UriPolicy {
            allow_test_driver: self.allow_test_driver,
        }
    }
}

/// Settings of a running manager.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Path to a kubeconfig. Without it: in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Address the health probe endpoint (/healthz, /readyz) binds to; `:9440` (the default) is
    /// every interface, where the kubelet probes the pod IP.
    #[arg(long, default_value = ":9440", value_parser = crate::health::parse_bind_address, global = true)]
    pub health_probe_bind_address: SocketAddr,

    /// Libvirt connection URI the manager checks at start-up (e.g. qemu:///system, or
    /// test:///default for the in-process test driver with --allow-test-driver). Empty: no check.
    #[arg(long, default_value = "", global = true)]
    pub libvirt_uri: String,

    /// Accept the in-process test driver (`test:///default`) as a host URI, in admission and in
    /// the backend. For development and tests only: it keeps machines in memory.
    #[arg(long, default_value_t = false, global = true)]
    pub allow_test_driver: bool,

    /// Port the admission webhook server listens on (0 disables it).
    #[arg(long, default_value_t = 9443, global = true)]
    pub webhook_port: u16,

    /// Address the admission webhook server binds to.
    #[arg(long, default_value = "0.0.0.0", global = true)]
    pub webhook_host: std::net::IpAddr,

    /// Directory holding the webhook's serving certificate and key (a mounted Secret).
    #[arg(
        long,
        default_value = "/tmp/k8s-webhook-server/serving-certs",
        global = true
    )]
    pub webhook_cert_dir: PathBuf,

    /// File name of the serving certificate in --webhook-cert-dir.
    #[arg(long, default_value = "tls.crt", global = true)]
    pub webhook_cert_name: String,

    /// File name of the serving key in --webhook-cert-dir.
    #[arg(long, default_value = "tls.key", global = true)]
    pub webhook_key_name: String,

    /// How often the serving certificate files are re-read (they are swapped in when changed).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub webhook_cert_reload_interval: std::time::Duration,

    /// Self-managed certificates: the name of a Secret in which the manager keeps its own webhook
    /// CA and serving certificate (created, renewed and injected into the webhook configurations
    /// by the manager; no cert-manager needed). Empty: serve the files in --webhook-cert-dir.
    #[arg(long, default_value = "", global = true)]
    pub webhook_cert_secret: String,

    /// Namespace of --webhook-cert-secret (default: $POD_NAMESPACE, the pod's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "", global = true)]
    pub webhook_cert_secret_namespace: String,

    /// Name of the Service in front of the webhook server: the serving certificate names
    /// `<name>.<namespace>.svc` and `<name>.<namespace>.svc.cluster.local`.
    #[arg(long, default_value = "", global = true)]
    pub webhook_service_name: String,

    /// Namespace of --webhook-service-name (default: the Secret's namespace).
    #[arg(long, default_value = "", global = true)]
    pub webhook_service_namespace: String,

    /// More DNS names or IP addresses for the self-managed serving certificate (comma-separated),
    /// e.g. for a manager the apiserver reaches by URL.
    #[arg(long, value_delimiter = ',', global = true)]
    pub webhook_cert_host: Vec<String>,

    /// Name of the Mutating- and ValidatingWebhookConfiguration the self-managed CA is injected
    /// into (`caBundle` of every webhook). Empty: inject nothing.
    #[arg(long, default_value = crate::webhook::configs::CONFIGURATION_NAME, global = true)]
    pub webhook_configuration_name: String,

    /// Validity of a self-managed serving certificate; it is renewed after two thirds of it.
    #[arg(long, default_value = "8760h", value_parser = parse_cert_validity, global = true)]
    pub webhook_cert_validity: std::time::Duration,

    /// Only watch objects in this namespace (all namespaces when empty).
    #[arg(long, default_value = "", global = true)]
    pub namespace: String,

    /// Only reconcile objects whose `cluster.x-k8s.io/watch-filter` label has this value.
    #[arg(long, default_value = "", global = true)]
    pub watch_filter: String,

    /// Address `/metrics` (Prometheus, plain HTTP) binds to; `:8080` (the default) is every
    /// interface; `0` disables the endpoint.
    #[arg(long, default_value = ":8080", value_parser = crate::health::parse_optional_bind_address, global = true)]
    pub metrics_bind_address: std::option::Option<SocketAddr>,

    /// Elect a leader among the manager's replicas on a coordination.k8s.io Lease: webhooks serve
    /// on every replica, the controllers only on the leader.
    #[arg(long, default_value_t = false, global = true)]
    pub leader_elect: bool,

    /// How long a leader's Lease stays valid without renewal (others take over after it).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, global = true)]
    pub leader_elect_lease_duration: Duration,

    /// How long the leader keeps retrying to renew before it gives up leading (and exits).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub leader_elect_renew_deadline: Duration,

    /// How often candidates try to acquire, and the leader to renew, the Lease.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub leader_elect_retry_period: Duration,

    /// Name of the Lease the replicas elect their leader on.
    #[arg(long, default_value = "capl-controller-manager", global = true)]
    pub leader_election_id: String,

    /// Namespace of the Lease; default: the pod's own namespace (from its service account), else
    /// `default`.
    #[arg(long, global = true)]
    pub leader_election_namespace: Option<String>,

    /// LibvirtMachines reconciled at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..), global = true)]
    pub libvirtmachine_concurrency: u16,

    /// LibvirtClusters reconciled at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..), global = true)]
    pub libvirtcluster_concurrency: u16,

    /// Sustained requests per second to the Kubernetes API (a token bucket on the client).
    #[arg(long, default_value_t = 20.0, value_parser = parse_qps, global = true)]
    pub kube_api_qps: f64,

    /// Requests to the Kubernetes API allowed at once above the sustained rate.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub kube_api_burst: u32,

    /// How often every object is reconciled even when nothing changed.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, global = true)]
    pub sync_period: Duration,

    /// How long a guest gets to shut down cleanly (ACPI) when its LibvirtMachine is deleted,
    /// before it is powered off.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub guest_shutdown_timeout: Duration,

    /// How long a running guest may go without an address before the tail of its serial console
    /// (redacted) is shown in its `AddressesKnown` condition and an Event.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, global = true)]
    pub guest_address_timeout: Duration,

    /// Log format: `text` (human readable) or `json` (one JSON object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `message`, fields).
    Json,
}

fn parse_qps(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(qps) if qps.is_finite() && qps > 0.0 => Ok(qps),
        _ => Err(format!("{value:?} is not a positive number")),
    }
}

/// The label that restricts the controllers to some objects (`--watch-filter`).
pub const WATCH_FILTER_LABEL: &str = "cluster.x-k8s.io/watch-filter";

/// What the controllers need from the command line, in one value for `controller::run`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerSettings {
    /// LibvirtMachines reconciled at once (`--libvirtmachine-concurrency`, at least 1).
    pub machine_concurrency: u16,
    /// LibvirtClusters reconciled at once (`--libvirtcluster-concurrency`, at least 1).
    pub cluster_concurrency: u16,
    /// How long after a successful reconcile an unchanged object is reconciled again
    /// (`--sync-period`; use it as the `Action::requeue` of a reconcile that has nothing to wait for).
    pub sync_period: Duration,
    /// Namespace to watch (`--namespace`); `None`: all namespaces.
    pub namespace: Option<String>,
    /// Value of the `cluster.x-k8s.io/watch-filter` label an object must carry to be reconciled
    /// (`--watch-filter`); `None`: every object. See [`ControllerSettings::label_selector`].
    pub watch_filter: Option<String>,
    /// Which host URIs the backend accepts (`--allow-test-driver`).
    pub uri_policy: crate::libvirt::uri::UriPolicy,
    /// How long a guest gets to shut down on delete (`--guest-shutdown-timeout`).
    pub guest_shutdown_timeout: Duration,
    /// How long a guest may go without an address before its console is shown
    /// (`--guest-address-timeout`).
    pub guest_address_timeout: Duration,
}

impl ControllerSettings {
    /// The label selector for the watches (`watcher::Config::labels`), when `--watch-filter` is
    /// set: `cluster.x-k8s.io/watch-filter=<value>`.
    pub fn label_selector(&self) -> Option<String> {
        self.watch_filter
            .as_ref()
            .map(|value| format!("{WATCH_FILTER_LABEL}={value}"))
    }
}

/// Settings of the leader election (`--leader-elect*`, `--leader-election-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderElectionSettings {
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity, written as the Lease's `holderIdentity` (`<hostname>_<uuid>`).
    pub identity: String,
    /// How long the Lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// How long the leader retries renewing before it stops leading.
    pub renew_deadline: Duration,
    /// The interval between two attempts to acquire or renew.
    pub retry_period: Duration,
}

/// Where a pod's service account tells its namespace.
pub const SERVICE_ACCOUNT_NAMESPACE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl RunArgs {
    /// The settings `controller::run` takes.
    pub fn controller_settings(&self) -> ControllerSettings {
        let non_empty = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        ControllerSettings {
            machine_concurrency: self.libvirtmachine_concurrency,
            cluster_concurrency: self.libvirtcluster_concurrency,
            sync_period: self.sync_period,
            namespace: non_empty(&self.namespace),
            watch_filter: non_empty(&self.watch_filter),
            uri_policy: self.uri_policy(),
            guest_shutdown_timeout: self.guest_shutdown_timeout,
            guest_address_timeout: self.guest_address_timeout,
        }
    }

    /// The leader election settings, checked as controller-runtime checks them
    /// (lease duration > renew deadline > retry period > 0).
    pub fn leader_election(&self) -> Result<LeaderElectionSettings, String> {
        let (lease, renew, retry) = (
            self.leader_elect_lease_duration,
            self.leader_elect_renew_deadline,
            self.leader_elect_retry_period,
        );
        if retry.is_zero() || renew <= retry || lease <= renew {
            return Err(format!(
                "--leader-elect-lease-duration ({lease:?}) must exceed --leader-elect-renew-deadline ({renew:?}), which must exceed --leader-elect-retry-period ({retry:?}) > 0"
            ));
        }
        let namespace = match &self.leader_election_namespace {
            Some(namespace) if !namespace.is_empty() => namespace.clone(),
            _ => std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|namespace| namespace.trim().to_owned())
                .filter(|namespace| !namespace.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
        };
        Ok(LeaderElectionSettings {
            lease_name: self.leader_election_id.clone(),
            namespace,
            identity: identity(),
            lease_duration: lease,
            renew_deadline: renew,
            retry_period: retry,
        })
    }
}

/// `<hostname>_<random uuid>`, as client-go names a candidate (the pod name is the hostname).
fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "manager".to_owned());
    format!("{host}_{}", uuid::Uuid::new_v4())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("manager").chain(args.iter().copied()))
            .map(|cli| cli.run)
    }

    #[test]
    fn defaults_follow_controller_runtime() {
        let args = parse(&[]).unwrap();
        assert_eq!(
            args.metrics_bind_address,
            Some("0.0.0.0:8080".parse().unwrap())
        );
        assert!(!args.leader_elect);
        let election = args.leader_election().unwrap();
        assert_eq!(election.lease_name, "capl-controller-manager");
        assert_eq!(election.lease_duration, Duration::from_secs(15));
        assert_eq!(election.renew_deadline, Duration::from_secs(10));
        assert_eq!(election.retry_period, Duration::from_secs(2));
        assert!(election.identity.contains('_'));
        assert_eq!((args.kube_api_qps, args.kube_api_burst), (20.0, 30));
        assert_eq!(args.log_format, LogFormat::Text);
        let settings = args.controller_settings();
        assert_eq!(settings.machine_concurrency, 10);
        assert_eq!(settings.cluster_concurrency, 10);
        assert_eq!(settings.sync_period, Duration::from_secs(600));
        assert_eq!(settings.namespace, None);
        assert_eq!(settings.label_selector(), None);
    }

    #[test]
    fn flags_reach_the_settings() {
        let args = parse(&[
            "--metrics-bind-address=0",
            "--leader-elect",
            "--leader-elect-lease-duration=3s",
            "--leader-elect-renew-deadline=2s",
            "--leader-elect-retry-period=500ms",
            "--leader-election-id=x",
            "--leader-election-namespace=capl-system",
            "--libvirtmachine-concurrency=3",
            "--libvirtcluster-concurrency=2",
            "--kube-api-qps=5.5",
            "--kube-api-burst=7",
            "--sync-period=1m",
            "--namespace=ns",
            "--watch-filter=mine",
            "--log-format=json",
            "--allow-test-driver",
        ])
        .unwrap();
        assert_eq!(args.metrics_bind_address, None);
        let election = args.leader_election().unwrap();
        assert_eq!(election.namespace, "capl-system");
        assert_eq!(election.lease_name, "x");
        assert_eq!(election.retry_period, Duration::from_millis(500));
        assert_eq!((args.kube_api_qps, args.kube_api_burst), (5.5, 7));
        assert_eq!(args.log_format, LogFormat::Json);
        let settings = args.controller_settings();
        assert_eq!(settings.machine_concurrency, 3);
        assert_eq!(settings.cluster_concurrency, 2);
        assert_eq!(settings.sync_period, Duration::from_secs(60));
        assert_eq!(settings.namespace.as_deref(), Some("ns"));
        assert_eq!(
            settings.label_selector().as_deref(),
            Some("cluster.x-k8s.io/watch-filter=mine")
        );
        assert!(settings.uri_policy.allow_test_driver);
    }

    #[test]
    fn the_last_of_a_repeated_flag_wins() {
        let args = parse(&[
            "--metrics-bind-address=0",
            "--metrics-bind-address=127.0.0.1:9",
        ])
        .unwrap();
        assert_eq!(
            args.metrics_bind_address,
            Some("127.0.0.1:9".parse().unwrap())
        );
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "--kube-api-qps=0",
            "--kube-api-qps=-1",
            "--kube-api-qps=NaN",
            "--kube-api-burst=0",
            "--libvirtmachine-concurrency=0",
            "--log-format=xml",
            "--metrics-bind-address=8080",
            "--sync-period=soon",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad} accepted");
        }
        let args = parse(&["--leader-elect-renew-deadline=20s"]).unwrap();
        assert!(args.leader_election().is_err(), "renew deadline > lease");
        let args = parse(&["--leader-elect-retry-period=10s"]).unwrap();
        assert!(args.leader_election().is_err(), "retry = renew deadline");
    }
}
