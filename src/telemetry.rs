//! Logging: structured `tracing` output, filtered by `RUST_LOG` (default `info`).
//!
//! rustls logs client-triggerable events (an IP address as SNI, a malformed hello, a warning
//! alert) at WARN on every handshake; it is capped at `error` unless `RUST_LOG` names it, so that
//! no client can write to the manager's log at will. Colours only go to a terminal.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(filter(
            std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref(),
        ))
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// The filter for a `RUST_LOG` value: `info` when unset or invalid; `rustls=error` added unless
/// the value names rustls itself.
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let base = rust_log
        .filter(|directives| EnvFilter::try_new(directives).is_ok())
        .unwrap_or("info");
    if base.contains("rustls") {
        EnvFilter::new(base)
    } else {
        EnvFilter::new(format!("{base},rustls=error"))
    }
}

#[cfg(test)]
mod tests {
    use super::filter;

    #[test]
    fn rustls_is_capped_unless_named() {
        assert_eq!(filter(None).to_string(), "rustls=error,info");
        assert_eq!(filter(Some("debug")).to_string(), "rustls=error,debug");
        assert_eq!(
            filter(Some("not a [filter")).to_string(),
            "rustls=error,info"
        );
        assert_eq!(
            filter(Some("info,rustls=debug")).to_string(),
            "rustls=debug,info"
        );
    }
}
