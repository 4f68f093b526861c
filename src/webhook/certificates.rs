//! Self-managed webhook certificates (`--webhook-cert-secret`): the manager keeps its own CA and
//! serving certificate in a Secret, injects the CA into its webhook configurations and renews
//! both before they expire, so that a plain `helm install` needs no cert-manager.
//!
//! The Secret holds `ca.crt` (the CAs the apiserver must trust: the current CA first, then the
//! previous one during a rotation), `ca.key`, `tls.crt` and `tls.key`. Every replica runs
//! [`Certificates::run`]: it watches the Secret and both configurations, and on every change or
//! deadline it
//!
//! 1. reads the Secret and repairs it when needed (creates it; issues a serving certificate from
//!    the CA when the current one is missing, broken, lacks a name or is in its last third of
//!    validity; issues a new CA when the CA is missing, broken or in its last year, keeping the
//!    old CA trusted for [`PREVIOUS_CA_GRACE`]). Writes carry the Secret's resourceVersion, so of
//!    replicas racing to repair it one wins and the others read its result;
//! 2. injects `ca.crt` into every webhook of both configurations (when they exist);
//! 3. only then serves the Secret's certificate, so the apiserver trusts a new CA before any
//!    replica presents a certificate from it: a rotation loses no admission request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::tls::{self, CertStore};
use crate::api::PROVIDER_LABEL_VALUE;

/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A CA with less than this left is replaced (with a trust overlap).
pub const CA_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the previous CA stays in `ca.crt` after a new CA was issued: every replica serves the
/// new certificate within seconds of the Secret's update, long before this ends.
pub const PREVIOUS_CA_GRACE: Duration = Duration::from_secs(10 * 60);
/// Annotation on the Secret: until when (RFC 3339) `ca.crt` keeps the previous CA.
pub const PREVIOUS_CA_UNTIL: &str = "infrastructure.cluster.x-k8s.io/previous-ca-until";
/// Retries of a write that lost a race with another replica, per sync.
const CONFLICT_RETRIES: usize = 5;
/// After a failed sync, the next try comes this much later.
const RETRY_AFTER: Duration = Duration::from_secs(5);

pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// Errors of the self-managed certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the Secret's certificate cannot be served: {0}")]
    Serve(#[from] tls::Error),
    #[error("another replica kept changing the Secret {0}; trying again later")]
    Contended(String),
}

/// What the manager needs to keep its certificates.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The Secret's namespace and name.
    pub namespace: String,
    pub secret: String,
    /// DNS names and IP addresses the serving certificate must carry.
    pub hosts: Vec<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration to inject the CA into (empty:
    /// none).
    pub configuration: String,
    /// How long a serving certificate is valid; it is renewed after two thirds of it.
    pub validity: Duration,
}

impl Settings {
    /// The Service's names a serving certificate carries, then the extra hosts.
    pub fn hosts_for(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
        let mut hosts = Vec::new();
        if !service.is_empty() {
            hosts.push(format!("{service}.{namespace}.svc"));
            hosts.push(format!("{service}.{namespace}.svc.cluster.local"));
        }
        hosts.extend(extra.iter().filter(|h| !h.is_empty()).cloned());
        hosts
    }
}

/// The self-managed certificates of one replica, and the store its webhook server serves from.
pub struct Certificates {
    client: Client,
    settings: Settings,
    store: Arc<CertStore>,
    /// The CA bundle this replica last served under (kept as the previous CA when the Secret
    /// loses its CA, so a rotation stays trusted).
    trusted: std::sync::Mutex<Vec<u8>>,
}

/// The Secret's contents once checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Material {
    trusted_pem: Vec<u8>,
    ca_cert_pem: Vec<u8>,
    ca_key_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    previous_until: Option<i64>,
}

/// What a look at the Secret concluded.
#[derive(Debug)]
enum Plan {
    /// Serve as it is; look again at this time (seconds since the epoch).
    Serve { next_check: i64 },
    /// The serving certificate must be (re)issued from the CA.
    NewServingCert,
    /// The CA must be (re)issued; the CAs still to trust meanwhile.
    NewCa { previous: Vec<u8> },
    /// The rotation's grace ended: drop the previous CA from `ca.crt`.
    DropPreviousCa,
}

impl Certificates {
    /// Makes sure the Secret holds a valid pair, injects the CA and returns the replica's
    /// certificates, ready to serve. Retries until it succeeds or `stop` resolves (`None`).
    pub async fn start(
        client: Client,
        settings: Settings,
        stop: impl Future<Output = ()>,
    ) -> Option<Arc<Self>> {
        let mut stop = std::pin::pin!(stop);
        loop {
            match first_material(&client, &settings).await {
                Ok(material) => {
                    let origin = format!("Secret {}/{}", settings.namespace, settings.secret);
                    match CertStore::from_pem(&material.cert_pem, &material.key_pem, &origin) {
                        Ok(store) => {
                            tracing::info!(secret = %origin, "webhook certificate loaded from its Secret");
                            return Some(Arc::new(Self {
                                client,
                                settings,
                                store,
                                trusted: std::sync::Mutex::new(material.trusted_pem),
                            }));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "webhook certificate not usable yet; retrying")
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "webhook certificate not ready yet; retrying"),
            }
            tokio::select! {
                _ = &mut stop => return None,
                _ = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }

    /// The store the webhook server serves from.
    pub fn store(&self) -> Arc<CertStore> {
        self.store.clone()
    }

    /// Keeps the certificates current until `stop` resolves: on every change of the Secret or
    /// the configurations, and at every renewal deadline.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        let by_name =
            watcher::Config::default().fields(&format!("metadata.name={}", self.settings.secret));
        let mut changes = futures::stream::select_all(vec![
            watcher::watcher(secrets, by_name)
                .map(|event| event.is_ok())
                .boxed(),
        ]);
        if !self.settings.configuration.is_empty() {
            let by_name = watcher::Config::default()
                .fields(&format!("metadata.name={}", self.settings.configuration));
            let mutating: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
            let validating: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
            changes.push(
                watcher::watcher(mutating, by_name.clone())
                    .map(|event| event.is_ok())
                    .boxed(),
            );
            changes.push(
                watcher::watcher(validating, by_name)
                    .map(|event| event.is_ok())
                    .boxed(),
            );
        }
        let mut stop = std::pin::pin!(stop);
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(next) => {}
                change = changes.next() => match change {
                    Some(true) => {}
                    // A watch error: the watcher backs off and retries on its own.
                    Some(false) => { tokio::time::sleep(Duration::from_millis(500)).await; continue; }
                    None => return,
                },
            }
            let wait = match self.sync().await {
                Ok(next_check) => until(next_check),
                Err(error) => {
                    tracing::warn!(%error, "webhook certificates not synced; retrying");
                    RETRY_AFTER
                }
            };
            next = tokio::time::Instant::now() + wait;
        }
    }

    /// One pass: repair the Secret, inject its CA, then serve its certificate. Returns when to
    /// look again (seconds since the epoch).
    async fn sync(&self) -> Result<i64, Error> {
        let previous = self.trusted_now();
        let material = ensure(&self.client, &self.settings, &previous).await?;
        inject(
            &self.client,
            &self.settings.configuration,
            &material.trusted_pem,
        )
        .await?;
        let origin = format!(
            "Secret {}/{}",
            self.settings.namespace, self.settings.secret
        );
        if self
            .store
            .replace_pem(&material.cert_pem, &material.key_pem, &origin)?
        {
            tracing::info!(secret = %origin, "webhook certificate replaced");
        }
        if let Ok(mut trusted) = self.trusted.lock() {
            trusted.clone_from(&material.trusted_pem);
        }
        match plan(&material, &self.settings, now(), &previous) {
            Plan::Serve { next_check } => Ok(next_check),
            // Just written, so already due: come back at once.
            _ => Ok(now()),
        }
    }

    fn trusted_now(&self) -> Vec<u8> {
        match self.trusted.lock() {
            Ok(trusted) => trusted.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The first valid material: ensured, then injected (a failed injection is retried by `run`;
/// the certificate is served meanwhile, since nothing can trust a CA the apiserver never saw).
async fn first_material(client: &Client, settings: &Settings) -> Result<Material, Error> {
    let material = ensure(client, settings, &[]).await?;
    if let Err(error) = inject(client, &settings.configuration, &material.trusted_pem).await {
        tracing::warn!(%error, "CA bundle not injected yet; retrying in the background");
    }
    Ok(material)
}

/// Reads the Secret and writes it until it holds valid material (or a write race is lost too
/// often).
async fn ensure(client: &Client, settings: &Settings, trusted: &[u8]) -> Result<Material, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    for _ in 0..CONFLICT_RETRIES {
        let secret = api.get_opt(&settings.secret).await?;
        let current = secret.as_ref().map(read_material).unwrap_or_default();
        let written = match plan(&current, settings, now(), trusted) {
            Plan::Serve { .. } => return Ok(current),
            Plan::NewServingCert => {
                tracing::info!(secret = %settings.secret, "issuing a webhook serving certificate");
                serving_from(&current, settings)?
            }
            Plan::DropPreviousCa => {
                tracing::info!(secret = %settings.secret, "the CA rotation's grace ended; trusting only the current CA");
                Material {
                    trusted_pem: current.ca_cert_pem.clone(),
                    previous_until: None,
                    ..current
                }
            }
            Plan::NewCa { previous } => {
                tracing::info!(secret = %settings.secret, "issuing a webhook CA and serving certificate");
                new_ca(settings, &previous)?
            }
        };
        let result = match secret {
            Some(mut secret) => {
                write_material(&mut secret, &written);
                api.replace(&settings.secret, &PostParams::default(), &secret)
                    .await
            }
            None => {
                let mut secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(settings.secret.clone()),
                        namespace: Some(settings.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "cluster.x-k8s.io/provider".to_owned(),
                            PROVIDER_LABEL_VALUE.to_owned(),
                        )])),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                write_material(&mut secret, &written);
                api.create(&PostParams::default(), &secret).await
            }
        };
        match result {
            Ok(_) => return Ok(written),
            // Another replica wrote first: read what it wrote.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::Contended(settings.secret.clone()))
}

/// What to do with the Secret's material at `now`. `trusted` is what this replica served under.
fn plan(material: &Material, settings: &Settings, now: i64, trusted: &[u8]) -> Plan {
    let ca_der = first_der(&material.ca_cert_pem);
    let Some(Ok((_, ca))) = ca_der.as_deref().map(X509Certificate::from_der) else {
        return Plan::NewCa {
            previous: trusted.to_vec(),
        };
    };
    let ca_not_after = ca.validity().not_after.timestamp();
    if !ca.is_ca()
        || !key_matches(&material.ca_key_pem, &ca)
        || now >= ca_not_after - secs(CA_RENEW_BEFORE)
    {
        return Plan::NewCa {
            previous: material.ca_cert_pem.clone(),
        };
    }
    let rotating = material.trusted_pem != material.ca_cert_pem;
    let grace_ends = material.previous_until.filter(|_| rotating);
    if grace_ends.is_some_and(|until| now >= until) {
        return Plan::DropPreviousCa;
    }
    let cert_der = first_der(&material.cert_pem);
    let Some(Ok((_, cert))) = cert_der.as_deref().map(X509Certificate::from_der) else {
        return Plan::NewServingCert;
    };
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let renew_at = not_before + (not_after - not_before) * 2 / 3;
    let sound = cert.verify_signature(Some(ca.public_key())).is_ok()
        && key_matches(&material.key_pem, &cert)
        && covers(&cert, &settings.hosts)
        // A shorter --webhook-cert-validity applies at once.
        && not_after - not_before <= secs(settings.validity) + 180;
    if !sound || now >= renew_at {
        return Plan::NewServingCert;
    }
    let mut next_check = renew_at.min(ca_not_after - secs(CA_RENEW_BEFORE));
    if let Some(until) = grace_ends {
        next_check = next_check.min(until);
    }
    Plan::Serve { next_check }
}

/// Whether the PEM private key belongs to the certificate.
fn key_matches(key_pem: &[u8], cert: &X509Certificate<'_>) -> bool {
    KeyPair::from_pem(&String::from_utf8_lossy(key_pem))
        .is_ok_and(|key| key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref())
}

/// A new serving certificate from the material's CA.
fn serving_from(material: &Material, settings: &Settings) -> Result<Material, Error> {
    let ca_key = KeyPair::from_pem(&String::from_utf8_lossy(&material.ca_key_pem))?;
    let issuer = Issuer::from_ca_cert_pem(&String::from_utf8_lossy(&material.ca_cert_pem), ca_key)?;
    let (cert_pem, key_pem) = issue_serving(&issuer, settings)?;
    Ok(Material {
        cert_pem,
        key_pem,
        ..material.clone()
    })
}

/// A new CA and a serving certificate from it; `previous` (CAs served under until now) stays
/// trusted for [`PREVIOUS_CA_GRACE`].
fn new_ca(settings: &Settings, previous: &[u8]) -> Result<Material, Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        "cluster-api-provider-libvirt webhook CA",
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (not_before, not_after) = validity_window(CA_VALIDITY);
    params.not_before = not_before;
    params.not_after = not_after;
    let ca_cert_pem = params.self_signed(&key)?.pem().into_bytes();
    let ca_key_pem = key.serialize_pem().into_bytes();
    let issuer = Issuer::new(params, key);
    let (cert_pem, key_pem) = issue_serving(&issuer, settings)?;
    // Keep only the previous CAs that still parse and are not the new one.
    let previous: Vec<u8> = pem_certificates(previous)
        .into_iter()
        .filter(|pem| pem.as_bytes() != ca_cert_pem.as_slice())
        .take(1)
        .flat_map(String::into_bytes)
        .collect();
    let (trusted_pem, previous_until) = if previous.is_empty() {
        (ca_cert_pem.clone(), None)
    } else {
        let mut trusted = ca_cert_pem.clone();
        trusted.extend_from_slice(&previous);
        (trusted, Some(now() + secs(PREVIOUS_CA_GRACE)))
    };
    Ok(Material {
        trusted_pem,
        ca_cert_pem,
        ca_key_pem,
        cert_pem,
        key_pem,
        previous_until,
    })
}

fn issue_serving(
    issuer: &Issuer<'_, KeyPair>,
    settings: &Settings,
) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(settings.hosts.clone())?;
    let common_name = settings
        .hosts
        .first()
        .map_or("capl-webhook", String::as_str);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (not_before, not_after) = validity_window(settings.validity);
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

/// From a minute ago (clock skew between replicas and the apiserver) for `validity`.
fn validity_window(validity: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let end = start + time::Duration::seconds(secs(validity)) + time::Duration::minutes(1);
    (start, end)
}

/// Puts `ca.crt` into every webhook of both configurations named `name` whose caBundle differs
/// (a configuration not created yet is skipped: it gets the bundle when it appears).
pub async fn inject(client: &Client, name: &str, bundle: &[u8]) -> Result<(), Error> {
    if name.is_empty() {
        return Ok(());
    }
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(config) = mutating.get_opt(name).await? {
        let bundles = config
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.name, w.client_config.ca_bundle));
        patch_bundles(&mutating, name, bundles, bundle).await?;
    }
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(config) = validating.get_opt(name).await? {
        let bundles = config
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.name, w.client_config.ca_bundle));
        patch_bundles(&validating, name, bundles, bundle).await?;
    }
    Ok(())
}

/// A JSON patch that tests each changed webhook's name at its index (so a concurrent reorder
/// fails instead of landing on the wrong webhook) and replaces its caBundle.
async fn patch_bundles<K>(
    api: &Api<K>,
    name: &str,
    webhooks: impl Iterator<Item = (String, Option<ByteString>)>,
    bundle: &[u8],
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut operations = Vec::new();
    for (index, (webhook, current)) in webhooks.enumerate() {
        if current.as_ref().is_some_and(|c| c.0 == bundle) {
            continue;
        }
        let encoded =
            serde_json::to_value(ByteString(bundle.to_vec())).unwrap_or(serde_json::Value::Null);
        operations.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook}));
        operations.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": encoded}));
    }
    if operations.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch =
        match serde_json::from_value(serde_json::Value::Array(operations)) {
            Ok(patch) => patch,
            Err(error) => {
                tracing::warn!(%error, "cannot build the caBundle patch");
                return Ok(());
            }
        };
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    tracing::info!(configuration = %name, kind = %K::kind(&()), "CA bundle injected");
    Ok(())
}

fn data(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret.data.as_ref()?.get(key).map(|value| value.0.clone())
}

/// The Secret's material; missing keys are empty (and [`plan`] repairs them).
fn read_material(secret: &Secret) -> Material {
    let trusted_pem = data(secret, CA_CERT_KEY).unwrap_or_default();
    let ca_cert_pem = pem_certificates(&trusted_pem)
        .into_iter()
        .next()
        .map(String::into_bytes)
        .unwrap_or_default();
    let previous_until = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREVIOUS_CA_UNTIL))
        .and_then(|value| humantime::parse_rfc3339(value).ok())
        .map(|at| at.duration_since(UNIX_EPOCH).map_or(0, secs));
    Material {
        trusted_pem,
        ca_cert_pem,
        ca_key_pem: data(secret, CA_KEY_KEY).unwrap_or_default(),
        cert_pem: data(secret, TLS_CERT_KEY).unwrap_or_default(),
        key_pem: data(secret, TLS_KEY_KEY).unwrap_or_default(),
        previous_until,
    }
}

fn write_material(secret: &mut Secret, material: &Material) {
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    for (key, value) in [
        (CA_CERT_KEY, &material.trusted_pem),
        (CA_KEY_KEY, &material.ca_key_pem),
        (TLS_CERT_KEY, &material.cert_pem),
        (TLS_KEY_KEY, &material.key_pem),
    ] {
        data.insert(key.to_owned(), ByteString(value.clone()));
    }
    secret.string_data = None;
    let annotations = secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    match material.previous_until {
        Some(until) => {
            let at = UNIX_EPOCH + Duration::from_secs(until.max(0) as u64);
            annotations.insert(
                PREVIOUS_CA_UNTIL.to_owned(),
                humantime::format_rfc3339_seconds(at).to_string(),
            );
        }
        None => {
            annotations.remove(PREVIOUS_CA_UNTIL);
        }
    }
}

/// The PEM blocks of certificates in `pem`, each re-encoded on its own.
fn pem_certificates(pem: &[u8]) -> Vec<String> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| pem_block(&block.contents))
        .collect()
}

fn pem_block(der: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The DER of the first certificate in `pem`.
fn first_der(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|block| block.label == "CERTIFICATE")
        .map(|block| block.contents)
}

/// Whether the certificate names every host (DNS names and IP addresses).
fn covers(cert: &X509Certificate<'_>, hosts: &[String]) -> bool {
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return hosts.is_empty();
    };
    hosts.iter().all(|host| {
        let ip: Option<std::net::IpAddr> = host.parse().ok();
        sans.value
            .general_names
            .iter()
            .any(|name| match (name, ip) {
                (GeneralName::DNSName(dns), None) => dns.eq_ignore_ascii_case(host),
                (GeneralName::IPAddress(bytes), Some(std::net::IpAddr::V4(v4))) => {
                    *bytes == v4.octets()
                }
                (GeneralName::IPAddress(bytes), Some(std::net::IpAddr::V6(v6))) => {
                    *bytes == v6.octets()
                }
                _ => false,
            })
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX / 4)
}

/// How long until `at` (seconds since the epoch), at least a second.
fn until(at: i64) -> Duration {
    Duration::from_secs(u64::try_from(at - now()).unwrap_or(0).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(validity: Duration) -> Settings {
        Settings {
            namespace: "capl-system".into(),
            secret: "capl-webhook-cert".into(),
            hosts: Settings::hosts_for(
                "capl-webhook-service",
                "capl-system",
                &["127.0.0.1".into()],
            ),
            configuration: String::new(),
            validity,
        }
    }

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    #[test]
    fn a_fresh_pair_is_served_until_two_thirds_of_its_validity() {
        let settings = settings(YEAR);
        let material = new_ca(&settings, &[]).unwrap();
        assert_eq!(material.trusted_pem, material.ca_cert_pem);
        assert_eq!(material.previous_until, None);
        let Plan::Serve { next_check } = plan(&material, &settings, now(), &[]) else {
            panic!("a fresh pair must be served");
        };
        let expected = now() + secs(YEAR) * 2 / 3;
        assert!(
            (next_check - expected).abs() < 120,
            "{next_check} vs {expected}"
        );
        // Past two thirds: renewed from the same CA.
        assert!(matches!(
            plan(&material, &settings, next_check + 1, &[]),
            Plan::NewServingCert
        ));
        let renewed = serving_from(&material, &settings).unwrap();
        assert_eq!(renewed.ca_cert_pem, material.ca_cert_pem);
        assert_ne!(renewed.cert_pem, material.cert_pem);
        assert!(matches!(
            plan(&renewed, &settings, now(), &[]),
            Plan::Serve { .. }
        ));
    }

    #[test]
    fn a_missing_broken_or_foreign_serving_pair_is_reissued_from_the_ca() {
        let settings = settings(YEAR);
        let material = new_ca(&settings, &[]).unwrap();
        let other = new_ca(&settings, &[]).unwrap();
        let cases = [
            (
                "no tls.crt",
                Material {
                    cert_pem: vec![],
                    ..material.clone()
                },
            ),
            (
                "garbage tls.crt",
                Material {
                    cert_pem: b"not a cert".to_vec(),
                    ..material.clone()
                },
            ),
            (
                "another CA's pair",
                Material {
                    cert_pem: other.cert_pem.clone(),
                    key_pem: other.key_pem.clone(),
                    ..material.clone()
                },
            ),
            (
                "a key of another pair",
                Material {
                    key_pem: other.key_pem.clone(),
                    ..material.clone()
                },
            ),
        ];
        for (case, material) in cases {
            assert!(
                matches!(plan(&material, &settings, now(), &[]), Plan::NewServingCert),
                "{case}"
            );
        }
        // A new Service name: the certificate no longer covers it.
        let mut renamed = settings.clone();
        renamed.hosts.push("other.capl-system.svc".into());
        assert!(matches!(
            plan(&material, &renamed, now(), &[]),
            Plan::NewServingCert
        ));
        // A shorter validity applies at once.
        let shorter = super::tests::settings(Duration::from_secs(3600));
        assert!(matches!(
            plan(&material, &shorter, now(), &[]),
            Plan::NewServingCert
        ));
    }

    #[test]
    fn a_lost_ca_is_replaced_and_the_previous_one_stays_trusted_for_the_grace() {
        let settings = settings(YEAR);
        let old = new_ca(&settings, &[]).unwrap();
        let wiped = Material::default();
        let Plan::NewCa { previous } = plan(&wiped, &settings, now(), &old.trusted_pem) else {
            panic!("a Secret without a CA needs a new one");
        };
        assert_eq!(previous, old.trusted_pem);
        let rotated = new_ca(&settings, &previous).unwrap();
        let trusted = pem_certificates(&rotated.trusted_pem);
        assert_eq!(trusted.len(), 2);
        assert_eq!(trusted[0].as_bytes(), rotated.ca_cert_pem.as_slice());
        assert_eq!(trusted[1].as_bytes(), old.ca_cert_pem.as_slice());
        let until = rotated.previous_until.unwrap();
        assert!((until - now() - secs(PREVIOUS_CA_GRACE)).abs() < 5);
        let Plan::Serve { next_check } = plan(&rotated, &settings, now(), &[]) else {
            panic!("the rotated pair must be served");
        };
        assert_eq!(next_check, until);
        assert!(matches!(
            plan(&rotated, &settings, until, &[]),
            Plan::DropPreviousCa
        ));
        // A CA key that does not match, or a CA in its last year: a new CA.
        let mismatched = Material {
            ca_key_pem: rotated.key_pem.clone(),
            ..rotated.clone()
        };
        assert!(matches!(
            plan(&mismatched, &settings, now(), &[]),
            Plan::NewCa { .. }
        ));
        let late = now() + secs(CA_VALIDITY) - secs(CA_RENEW_BEFORE) + 10;
        assert!(matches!(
            plan(&rotated, &settings, late, &[]),
            Plan::NewCa { .. }
        ));
    }

    #[test]
    fn the_secret_round_trips_and_the_certificate_names_every_host() {
        let settings = settings(YEAR);
        let material = new_ca(&settings, &old_ca()).unwrap();
        let mut secret = Secret::default();
        write_material(&mut secret, &material);
        assert_eq!(read_material(&secret), material);
        let der = first_der(&material.cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(covers(&cert, &settings.hosts));
        assert!(!covers(&cert, &["10.0.0.1".into()]));
        let store = CertStore::from_pem(&material.cert_pem, &material.key_pem, "test").unwrap();
        assert_eq!(store.certificate_pem(), material.cert_pem);
    }

    fn old_ca() -> Vec<u8> {
        new_ca(&settings(YEAR), &[]).unwrap().ca_cert_pem
    }
}
