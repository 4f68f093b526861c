//! The metrics hooks in the libvirt pool and the image cache record into the manager's registry.

mod support;

use std::sync::Arc;

use capl::api::{ChecksumType, ImageFormat};
use capl::libvirt::hosts::Hosts;
use capl::libvirt::image::{ImageCache, ImageRequest};
use capl::libvirt::uri::{HostUri, UriPolicy};

fn test_driver() -> HostUri {
    HostUri::parse(
        "test:///default",
        UriPolicy {
            allow_test_driver: true,
        },
    )
    .expect("uri")
}

fn sample(series: &str) -> f64 {
    capl::metrics::global()
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn libvirt_calls_are_timed_by_op_and_host() {
    let hosts = Hosts::new(1);
    for _ in 0..2 {
        hosts
            .run(&test_driver(), |host| host.versions())
            .await
            .expect("versions");
    }
    let series = r#"capl_libvirt_call_duration_seconds_count{op="metrics_hooks::libvirt_calls_are_timed_by_op_and_host",host="test"}"#;
    let text = capl::metrics::global().encode();
    assert_eq!(sample(series), 2.0, "{text}");
}

#[tokio::test]
async fn refused_image_downloads_are_counted() {
    let before = sample(r#"capl_image_downloads_total{result="error"}"#);
    // A real libvirtd (the test driver refuses uploads before any download).
    let (uri, _host, _) = support::libvirtd::bed_pool("capl-metrics-images");
    let cache = ImageCache::new(Arc::new(Hosts::new(1))).expect("cache");
    let request = ImageRequest {
        url: "http://169.254.169.254/latest/image.qcow2".into(),
        algorithm: ChecksumType::Sha256,
        digest: "a".repeat(64),
        format: ImageFormat::Qcow2,
    };
    let refused = cache.ensure(&uri, "capl-metrics-images", &request).await;
    assert!(
        matches!(refused, Err(capl::libvirt::image::Error::Forbidden { .. })),
        "{refused:?}"
    );
    let after = sample(r#"capl_image_downloads_total{result="error"}"#);
    assert_eq!(after, before + 1.0);
}
