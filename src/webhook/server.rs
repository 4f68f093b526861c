//! The HTTPS server: one route per kind and endpoint, AdmissionReview v1 in and out.
//!
//! Malformed bodies get a 400 with the parse error, oversized ones a 413, slow ones a 408; an
//! admission decision is always a 200 carrying `allowed` and, when denied, the reasons.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::tls_rustls::RustlsConfig;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use tower_http::timeout::TimeoutLayer;

use super::admission::{self, AdmissionPolicy, Endpoint, Kind};
use super::tls::CertStore;

/// Largest AdmissionReview accepted: an object and its old version at the apiserver's 3 MiB
/// request limit each.
pub const MAX_BODY_BYTES: usize = 7 * 1024 * 1024;
/// Per-request deadline, below the apiserver's webhook timeout (10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// The admission routes, with body limit and timeout, deciding under `policy`.
pub fn router(policy: AdmissionPolicy) -> Router {
    let mut router = Router::new();
    for kind in Kind::ALL {
        for endpoint in [Endpoint::Mutate, Endpoint::Validate] {
            router = router.route(
                &kind.path(endpoint),
                post(move |body: Bytes| async move { handle(kind, endpoint, &body, &policy) }),
            );
        }
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

/// Decodes one AdmissionReview and answers it under `policy`. Public for tests, benchmarks and
/// fuzzing.
pub fn handle(kind: Kind, endpoint: Endpoint, body: &[u8], policy: &AdmissionPolicy) -> Response {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed AdmissionReview: {error}"),
            )
                .into_response();
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return (StatusCode::BAD_REQUEST, "AdmissionReview without a request").into_response();
        }
    };
    let response = admission::review(kind, endpoint, &request, policy);
    tracing::debug!(
        kind = kind.name(),
        endpoint = endpoint.prefix(),
        namespace = request.namespace.as_deref().unwrap_or_default(),
        name = %request.name,
        operation = ?request.operation,
        allowed = response.allowed,
        "admission"
    );
    axum::Json(response.into_review()).into_response()
}

/// Serves the webhooks over TLS on `addr` until `shutdown` resolves, then drains in-flight
/// requests (up to 10 s).
pub async fn serve(
    addr: SocketAddr,
    certs: Arc<CertStore>,
    policy: AdmissionPolicy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = RustlsConfig::from_config(certs.server_config()?);
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    tracing::info!(address = %addr, "webhook server listening");
    axum_server::bind_rustls(addr, config)
        .handle(handle)
        .serve(router(policy).into_make_service())
        .await?;
    Ok(())
}
