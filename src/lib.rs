//! cluster-api-provider-libvirt: a Cluster API infrastructure provider for libvirt/KVM hosts.
//!
//! The `manager` binary is the only entry point at run time; this library holds everything it runs,
//! one module per concern:
//!
//! - [`config`]: the command line, in controller-runtime's flag style;
//! - [`health`]: the `/healthz` and `/readyz` probe server;
//! - [`leader`]: leader election on a Lease (`--leader-elect`);
//! - [`libvirt`]: the only code that talks to hypervisors;
//! - [`manager`]: wiring of a running manager (one shutdown signal, the Kubernetes client);
//! - [`metrics`]: the Prometheus metrics on `/metrics`;
//! - [`telemetry`]: logging set-up.

pub mod api;
pub mod cloudinit;
pub mod config;
pub mod controller;
pub mod egress;
pub mod health;
pub mod leader;
pub mod libvirt;
pub mod manager;
pub mod metrics;
pub mod telemetry;
pub mod webhook;
