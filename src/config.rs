//! The manager's command line. Flag names follow controller-runtime's conventions so that
//! operators can carry their muscle memory (and their Helm values) over from Go providers.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Cluster API infrastructure provider for libvirt/KVM hosts.
#[derive(Debug, Parser)]
#[command(name = "manager", version, about)]
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

impl RunArgs {
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

    /// Only watch objects in this namespace (all namespaces when empty).
    #[arg(long, default_value = "", global = true)]
    pub namespace: String,

    /// Only reconcile objects whose `cluster.x-k8s.io/watch-filter` label has this value.
    #[arg(long, default_value = "", global = true)]
    pub watch_filter: String,
}
