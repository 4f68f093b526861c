//! Logging: structured `tracing` output, text or JSON lines (`--log-format`), filtered by
//! `RUST_LOG` (default `info`).
//!
//! Some crates log what a client or a server sent, at levels a debugging operator may well turn
//! on, so they are capped unless `RUST_LOG` names them explicitly:
//! - rustls at `error`: it logs client-triggerable events (an IP address as SNI, a malformed
//!   hello, a warning alert) at WARN on every handshake, so no client can write to our log at will;
//! - the Kubernetes client stack (`kube_client`, `hyper`, `hyper_util`, `h2`, `tower`, `reqwest`)
//!   at `debug`/`info`: at `trace` kube logs response bodies (a Secret's bootstrap data) and h2/hyper
//!   log header frames (the bearer token). Secrets never reach the log.
//!
//! Colours only go to a terminal.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Crates capped unless `RUST_LOG` names them, with their cap.
const CAPS: &[(&str, &str)] = &[
    ("rustls", "error"),
    ("kube_client", "debug"),
    ("kube_runtime", "debug"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("h2", "info"),
    ("tower", "info"),
    ("reqwest", "info"),
];

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = filter(std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
}

/// The filter for a `RUST_LOG` value: `info` when unset or invalid; each crate of [`CAPS`] capped
/// unless the value names it.
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let base = rust_log
        .filter(|directives| EnvFilter::try_new(directives).is_ok())
        .unwrap_or("info");
    let mut directives = base.to_owned();
    let global = global_verbosity(base);
    for (target, cap) in CAPS {
        // A cap only ever lowers a crate's level: under `info`, `kube_client=debug` would raise it.
        if !names(base, target) && verbosity(cap).is_some_and(|cap| cap < global) {
            directives.push_str(&format!(",{target}={cap}"));
        }
    }
    EnvFilter::new(directives)
}

/// How verbose a level is: `off` 0 … `trace` 5; `None` when `level` is not one.
fn verbosity(level: &str) -> Option<u8> {
    match level.trim().to_ascii_lowercase().as_str() {
        "off" => Some(0),
        "error" => Some(1),
        "warn" => Some(2),
        "info" => Some(3),
        "debug" => Some(4),
        "trace" => Some(5),
        _ => None,
    }
}

/// The level of targets the directives do not name: their last bare level (`info` in
/// `info,capl=debug`), `error` when there is none (tracing-subscriber's default).
fn global_verbosity(directives: &str) -> u8 {
    directives
        .split(',')
        .filter_map(verbosity)
        .next_back()
        .unwrap_or(1)
}

/// Whether `directives` has a directive for `target` itself (`hyper=trace`, not `hyper_util=..`).
fn names(directives: &str, target: &str) -> bool {
    directives.split(',').any(|directive| {
        let name = directive
            .split(['=', '['])
            .next()
            .unwrap_or_default()
            .trim();
        name == target || name.starts_with(&format!("{target}::"))
    })
}

#[cfg(test)]
mod tests {
    use super::filter;

    fn directives(rust_log: Option<&str>) -> Vec<String> {
        let mut all: Vec<String> = filter(rust_log)
            .to_string()
            .split(',')
            .map(str::to_owned)
            .collect();
        all.sort();
        all
    }

    #[test]
    fn noisy_crates_are_capped_unless_named() {
        let default = directives(None);
        assert!(default.contains(&"rustls=error".to_owned()));
        assert!(default.contains(&"info".to_owned()));
        assert_eq!(directives(Some("not a [filter")), default);
        assert!(
            !default.iter().any(|d| d.starts_with("kube_client")),
            "a cap never raises a crate above the global level: {default:?}"
        );
        let debug = directives(Some("debug"));
        assert!(
            !debug.iter().any(|d| d.starts_with("kube_client")),
            "{debug:?}"
        );
        assert!(debug.contains(&"hyper=info".to_owned()), "{debug:?}");
        let trace = directives(Some("trace"));
        for capped in ["kube_client=debug", "hyper=info", "h2=info", "rustls=error"] {
            assert!(trace.contains(&capped.to_owned()), "{capped}: {trace:?}");
        }
        let named = directives(Some("info,rustls=debug,hyper=trace"));
        assert!(named.contains(&"rustls=debug".to_owned()), "{named:?}");
        assert!(named.contains(&"hyper=trace".to_owned()), "{named:?}");
        assert!(!named.contains(&"hyper=info".to_owned()), "{named:?}");
        let verbose = directives(Some("trace,rustls=debug,hyper=trace"));
        assert!(
            verbose.contains(&"hyper_util=info".to_owned()),
            "{verbose:?}"
        );
    }
}
