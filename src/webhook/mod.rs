//! Admission webhooks: defaulting and validation of every kind, served over TLS.
//!
//! - [`admission`]: the dispatcher and the [`admission::Admit`] trait each kind implements;
//! - [`machine`], [`cluster`]: the rules of each kind (and its template);
//! - [`checks`]: field checks shared by the rules;
//! - [`server`], [`tls`]: the HTTPS server and its hot-reloaded certificate;
//! - [`certificates`]: self-managed certificates (CA + serving pair in a Secret, CA injection);
//! - [`configs`]: the webhook configurations the binary generates into `webhooks/`.

pub mod admission;
pub mod certificates;
pub mod checks;
pub mod cluster;
pub mod configs;
pub mod machine;
pub mod server;
pub mod tls;
