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
    for (target, cap) in CAPS {
        if !names(base, target) {
            directives.push_str(&format!(",{target}={cap}"));
        }
    }
    EnvFilter::new(directives)
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
        assert!(default.contains(&"h2=info".to_owned()));
        assert_eq!(directives(Some("not a [filter")), default);
        let trace = directives(Some("trace"));
        for capped in ["kube_client=debug", "hyper=info", "h2=info", "rustls=error"] {
            assert!(trace.contains(&capped.to_owned()), "{capped}: {trace:?}");
        }
        let named = directives(Some("info,rustls=debug,hyper=trace"));
        assert!(named.contains(&"rustls=debug".to_owned()), "{named:?}");
        assert!(named.contains(&"hyper=trace".to_owned()), "{named:?}");
        assert!(!named.contains(&"hyper=info".to_owned()), "{named:?}");
        assert!(named.contains(&"hyper_util=info".to_owned()), "{named:?}");
    }
}
