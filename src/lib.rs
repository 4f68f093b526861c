//! cluster-api-provider-libvirt: a Cluster API infrastructure provider for libvirt/KVM hosts.
//!
//! The `manager` binary is the only entry point at run time; this library holds everything it runs,
//! one module per concern:
//!
//! - [`config`]: the command line, in controller-runtime's flag style;
//! - [`health`]: the `/healthz` and `/readyz` probe server;
//! - [`libvirt`]: the only code that talks to hypervisors;
//! - [`telemetry`]: logging set-up.

pub mod api;
pub mod cloudinit;
pub mod config;
pub mod controller;
pub mod egress;
pub mod health;
pub mod libvirt;
pub mod manager;
pub mod telemetry;
pub mod webhook;
