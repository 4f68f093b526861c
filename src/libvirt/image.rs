//! Base images: downloaded from their URL, verified, uploaded through libvirt, and shared
//! read-only as the backing file of every machine's root disk.
//!
//! The pipeline for a URL image, per host and storage pool:
//!
//! 1. **Look**: a verified upload of the image already in the pool is used as is.
//! 2. **Download** into a temporary file on the manager's disk (never whole in memory, no host
//!    permit held): the URL and every redirect must pass the [`crate::egress`] rules, names must
//!    resolve to allowed addresses at connect time, connect and read time out, and the size is
//!    capped. The standard `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` variables are
//!    honoured; behind a proxy the proxy resolves target names, so only the URL rules apply to
//!    them. (The proxy's own name is resolved under the same rules: give a proxy that listens
//!    on loopback by its address, e.g. `http://127.0.0.1:3128`.)
//! 3. **Verify** the file: its checksum, then its header ([`super::qcow2`]): the declared format,
//!    no backing or data file.
//! 4. **Upload** into a volume of this upload's own, named with a random nonce
//!    (`capl-base-sha256-<digest:32>-<nonce:16>.qcow2`), then create its `.verified` marker
//!    volume. Only a volume with its marker is ever used.
//!
//! Several manager replicas may do this at once for the same image: each writes its own volume,
//! so none deletes another's upload in progress. Replicas racing on one image may each leave a
//! verified copy (both stay valid, none is ever deleted); once they exist, every replica picks
//! the same one (the smallest name). A replica deletes only its own failed upload.
//! An upload left without a marker by a manager that died is deleted once its modification
//! time (libvirt's `<timestamps><mtime>`) is older than [`ImageSettings::stale_upload_after`]
//! (24 h by default): an upload in progress writes continuously, so it never looks that old.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use url::Url;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::Host;
use super::hosts::Hosts;
use super::qcow2::{self, HEAD_BYTES, HeaderError};
use super::uri::HostUri;
use super::xml::VolumePlan;
use crate::api::{ChecksumType, ImageFormat};
use crate::egress;

/// Errors of fetching or checking a base image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libvirt call failed (transient as far as this layer can tell).
    #[error(transparent)]
    Libvirt(#[from] super::Error),
    /// The URL, a redirect, or the address a name resolves to is not an allowed target.
    #[error("{url} may not be downloaded: {reason}")]
    Forbidden { url: String, reason: String },
    /// The server answered with an error status.
    #[error("downloading {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    /// Connecting, a timeout, or the transfer breaking off.
    #[error("downloading {url}: {summary}")]
    Transfer {
        url: String,
        /// What went wrong, in short (the full cause is the error's source).
        summary: String,
        #[source]
        error: reqwest::Error,
    },
    /// The image is larger than the configured cap.
    #[error("{url} is larger than the {limit}-byte size limit for base images")]
    TooLarge { url: String, limit: u64 },
    /// The downloaded bytes do not match the checksum.
    #[error("{url} has {algorithm} {actual}, but the checksum says {expected}")]
    Checksum {
        url: String,
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
    /// The image's header makes it unsafe (or not what it claims to be).
    #[error("{image} is refused as a base image: {error}")]
    Header {
        image: String,
        #[source]
        error: HeaderError,
    },
    /// An existing volume has a backing store.
    #[error(
        "volume {pool}/{name} is refused as a base image: it has the backing store {backing}, \
         through which a guest could read host files"
    )]
    BackingStore {
        pool: String,
        name: String,
        backing: String,
    },
    /// An existing volume has a format other than qcow2 or raw.
    #[error("volume {pool}/{name} has format {format:?}; base images must be qcow2 or raw")]
    Format {
        pool: String,
        name: String,
        format: String,
    },
    /// The manager's own disk (the temporary download file).
    #[error("{action} a temporary download file in {dir}")]
    Disk {
        action: &'static str,
        dir: String,
        #[source]
        error: std::io::Error,
    },
}

impl Error {
    /// Whether retrying cannot help (a checksum mismatch, a forbidden target, a size over the cap,
    /// a base image that would let a guest read host files, a client error from the server): the
    /// controller reports it instead of retrying. Timeouts, server errors, connection and libvirt
    /// failures are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Forbidden { .. }
            | Error::TooLarge { .. }
            | Error::Checksum { .. }
            | Error::Header { .. }
            | Error::BackingStore { .. }
            | Error::Format { .. } => true,
            Error::Status { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            Error::Libvirt(_) | Error::Transfer { .. } | Error::Disk { .. } => false,
        }
    }
}

/// An image to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRequest {
    /// Where to download it (checked against [`crate::egress::image_url`]).
    pub url: String,
    /// The checksum's algorithm.
    pub algorithm: ChecksumType,
    /// Expected digest, hex.
    pub digest: String,
    /// The format the image must have.
    pub format: ImageFormat,
}

impl ImageRequest {
    /// The name prefix every upload of this image shares (content-addressed by the digest):
    /// `capl-base-<algorithm>-<digest:32>`. Not itself a volume: each upload adds its own nonce,
    /// and [`ImageCache::ensure`] (or [`verified_base`]) returns the path of the verified one.
    pub fn volume_name(&self) -> String {
        let digest = self.digest.to_ascii_lowercase();
        format!(
            "capl-base-{}-{}",
            self.algorithm.as_str(),
            &digest[..digest.len().min(32)]
        )
    }

    /// The volume of one upload, named by its nonce.
    fn upload_name(&self, nonce: &str) -> String {
        format!("{}-{nonce}.{}", self.volume_name(), self.format.as_str())
    }

    /// Whether `name` is an upload of this image, i.e. `<prefix>-<16 hex digits>.<format>`.
    fn is_upload(&self, name: &str) -> bool {
        name.strip_prefix(&self.volume_name())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(self.format.as_str()))
            .and_then(|rest| rest.strip_suffix('.'))
            .is_some_and(|nonce| nonce.len() == 16 && nonce.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

fn marker_name(upload: &str) -> String {
    format!("{upload}.verified")
}

/// Settings of the downloader.
#[derive(Clone, Debug)]
pub struct ImageSettings {
    /// Where images are downloaded before they are verified and uploaded (needs room for the
    /// largest image). Default: the system's temporary directory.
    pub download_dir: PathBuf,
    /// How long connecting to the image server may take. Default: 30 s.
    pub connect_timeout: Duration,
    /// How long a single read from the image server may wait. Default: 60 s.
    pub read_timeout: Duration,
    /// The largest image accepted, in bytes. Default: 64 GiB.
    pub max_bytes: u64,
    /// How many redirects are followed (each under the same URL rules). Default: 10.
    pub max_redirects: usize,
    /// After how long without a write an unverified upload counts as abandoned and is deleted.
    /// Default: 24 h.
    pub stale_upload_after: Duration,
    /// One loopback address the downloader may reach despite the ban on loopback targets.
    /// Only for tests that serve images on loopback; `None` (the default) in the manager, and no
    /// flag sets it.
    pub loopback_for_tests: Option<IpAddr>,
    /// Names resolved from this table instead of DNS (tests run offline). The address rules
    /// apply to these answers as to DNS's. Empty by default.
    pub hosts_for_tests: HashMap<String, Vec<IpAddr>>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            download_dir: std::env::temp_dir(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            max_bytes: 64 << 30,
            max_redirects: 10,
            stale_upload_after: Duration::from_secs(24 * 60 * 60),
            loopback_for_tests: None,
            hosts_for_tests: HashMap::new(),
        }
    }
}

/// A target refused by the URL rules or at connect time (travels through reqwest's errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Which URLs the downloader may fetch: the egress rules, with the one test-only exception.
#[derive(Clone, Debug)]
struct Targets {
    loopback_for_tests: Option<IpAddr>,
}

impl Targets {
    fn check(&self, value: &str) -> Result<Url, String> {
        let error = match egress::image_url(value) {
            Ok(url) => return Ok(url),
            Err(error) => error,
        };
        // Tests only: the allowed loopback address passes the host rule, nothing else does.
        let exempt = self.loopback_for_tests.and_then(|allowed| {
            let url = Url::parse(value).ok()?;
            let ip = match url.host()? {
                url::Host::Ipv4(ip) => IpAddr::V4(ip),
                url::Host::Ipv6(ip) => IpAddr::V6(ip),
                url::Host::Domain(_) => return None,
            };
            let host = url.host_str()?.to_owned();
            (ip == allowed).then(|| (url, value.replacen(&host, "loopback-for-tests.invalid", 1)))
        });
        match exempt {
            Some((url, probe)) => egress::image_url(&probe).map(|_| url),
            None => Err(error),
        }
    }

    fn allows(&self, ip: IpAddr) -> Result<(), &'static str> {
        match egress::forbidden_ip(ip) {
            Some(why) if Some(ip) != self.loopback_for_tests => Err(why),
            _ => Ok(()),
        }
    }
}

/// Resolves names (DNS, or the test table) and drops every forbidden address, so a name that
/// points at loopback or a metadata service is refused when the connection is made.
struct Resolver {
    targets: Targets,
    table: HashMap<String, Vec<IpAddr>>,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_ascii_lowercase();
        let targets = self.targets.clone();
        let table = self.table.get(&name).cloned();
        Box::pin(async move {
            if let Some(why) = egress::forbidden_name(&name) {
                return Err(Refused(format!("{name} names {why}")).into());
            }
            let found: Vec<IpAddr> = match table {
                Some(ips) => ips,
                None => tokio::net::lookup_host((name.as_str(), 0))
                    .await?
                    .map(|addr| addr.ip())
                    .collect(),
            };
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|ip| match targets.allows(*ip) {
                    Ok(()) => true,
                    Err(why) => {
                        refused = Some(format!("{name} resolves to {why} ({ip})"));
                        false
                    }
                })
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            match refused {
                Some(why) if allowed.is_empty() => Err(Refused(why).into()),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: ChecksumType) -> Self {
        match algorithm {
            ChecksumType::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            ChecksumType::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn hex(self) -> String {
        let bytes = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

type Key = (HostUri, String, String);

/// Fetches base images into hosts' pools.
pub struct ImageCache {
    hosts: Arc<Hosts>,
    http: reqwest::Client,
    settings: ImageSettings,
    targets: Targets,
    in_flight: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    /// A cache with the default [`ImageSettings`].
    pub fn new(hosts: Arc<Hosts>) -> std::io::Result<Self> {
        Self::with_settings(hosts, ImageSettings::default())
    }

    /// A cache with its own settings (timeouts, size cap, download directory).
    pub fn with_settings(hosts: Arc<Hosts>, settings: ImageSettings) -> std::io::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(std::io::Error::other)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        let targets = Targets {
            loopback_for_tests: settings.loopback_for_tests,
        };
        let (redirect_targets, max_redirects) = (targets.clone(), settings.max_redirects);
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(Refused(format!("more than {max_redirects} redirects")));
            }
            match redirect_targets.check(attempt.url().as_str()) {
                Ok(_) => attempt.follow(),
                Err(why) => {
                    let refused = Refused(format!("the redirect to {} {why}", attempt.url()));
                    attempt.error(refused)
                }
            }
        });
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .redirect(redirects)
            .dns_resolver(Arc::new(Resolver {
                targets: targets.clone(),
                table: settings
                    .hosts_for_tests
                    .iter()
                    .map(|(name, ips)| (name.to_ascii_lowercase(), ips.clone()))
                    .collect(),
            }))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            hosts,
            http,
            settings,
            targets,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    fn lock_for(&self, key: Key) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = match self.in_flight.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(key).or_default().clone()
    }

    /// Makes sure a verified copy of the image is in `pool` on the host at `uri`; returns its
    /// path (the backing file for root disks).
    pub async fn ensure(
        &self,
        uri: &HostUri,
        pool: &str,
        request: &ImageRequest,
    ) -> Result<String, Error> {
        let lock = self.lock_for((uri.clone(), pool.to_owned(), request.volume_name()));
        let _one_download_per_image = lock.lock().await;

        let (p, r, stale) = (
            pool.to_owned(),
            request.clone(),
            self.settings.stale_upload_after,
        );
        let found = self
            .hosts
            .run(uri, move |host| {
                let found = survey(host, &p, &r, Some(stale))?;
                if found.is_none() && host.is_test_driver() {
                    return Err(super::Error::Unsupported(format!(
                        "base image upload on {}: the test driver cannot store volume content; \
                         use a real libvirtd",
                        host.uri()
                    )));
                }
                Ok(found)
            })
            .await?;
        if let Some(path) = found {
            return Ok(path);
        }

        let downloaded = self.download(request).await;
        crate::metrics::global().image_download(downloaded.is_ok());
        let file = downloaded?;
        self.upload(uri, pool, request, file).await?;

        let (p, r) = (pool.to_owned(), request.clone());
        self.hosts
            .run(uri, move |host| survey(host, &p, &r, None))
            .await?
            .ok_or_else(|| {
                let what = format!(
                    "a verified base volume {}-* in {pool}",
                    request.volume_name()
                );
                Error::Libvirt(super::Error::Missing(what))
            })
    }

    /// Downloads the image into an anonymous temporary file, hashing as it streams, and checks
    /// its checksum and header. Holds no host permit.
    async fn download(&self, request: &ImageRequest) -> Result<std::fs::File, Error> {
        let url = &request.url;
        let target = self.targets.check(url).map_err(|reason| Error::Forbidden {
            url: url.clone(),
            reason,
        })?;
        let mut response = self
            .http
            .get(target)
            .send()
            .await
            .map_err(|e| transfer_error(url, e))?;
        let status = response.status();
        // A redirect reqwest did not follow (to another scheme, say) is refused as one.
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| response.url().join(value).ok());
        if let Some(location) = location.filter(|_| status.is_redirection()) {
            let reason = match self.targets.check(location.as_str()) {
                Err(why) => format!("the redirect to {location} {why}"),
                Ok(_) => format!("the redirect to {location} was not followed"),
            };
            return Err(Error::Forbidden {
                url: url.clone(),
                reason,
            });
        }
        if !status.is_success() {
            return Err(Error::Status {
                url: url.clone(),
                status: status.as_u16(),
            });
        }
        let limit = self.settings.max_bytes;
        let too_large = || Error::TooLarge {
            url: url.clone(),
            limit,
        };
        if response
            .content_length()
            .is_some_and(|length| length > limit)
        {
            return Err(too_large());
        }

        let dir = &self.settings.download_dir;
        let disk = |action, error| Error::Disk {
            action,
            dir: dir.display().to_string(),
            error,
        };
        let file = tempfile::tempfile_in(dir).map_err(|e| disk("creating", e))?;
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Hasher::new(request.algorithm);
        let mut total = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|e| transfer_error(url, e))? {
            total += chunk.len() as u64;
            if total > limit {
                return Err(too_large());
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| disk("writing", e))?;
        }
        file.flush().await.map_err(|e| disk("writing", e))?;

        let actual = hasher.hex();
        if !actual.eq_ignore_ascii_case(&request.digest) {
            return Err(Error::Checksum {
                url: url.clone(),
                algorithm: request.algorithm.as_str(),
                expected: request.digest.clone(),
                actual,
            });
        }

        file.rewind().await.map_err(|e| disk("reading", e))?;
        let mut head = Vec::with_capacity(HEAD_BYTES);
        (&mut file)
            .take(HEAD_BYTES as u64)
            .read_to_end(&mut head)
            .await
            .map_err(|e| disk("reading", e))?;
        qcow2::check(&head, request.format).map_err(|error| Error::Header {
            image: url.clone(),
            error,
        })?;
        file.rewind().await.map_err(|e| disk("reading", e))?;
        Ok(file.into_std().await)
    }

    /// Uploads the verified file into a volume of its own and marks it verified; a failed
    /// upload deletes its own volume (and nothing else).
    async fn upload(
        &self,
        uri: &HostUri,
        pool: &str,
        request: &ImageRequest,
        file: std::fs::File,
    ) -> Result<(), Error> {
        let nonce = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let name = request.upload_name(&nonce);
        // Created empty (raw) whatever the image's format: upload does not truncate, so a volume
        // created as qcow2 would keep the tail of its fresh header past a smaller image.
        // libvirt reads the real format from the content once the upload ends.
        let plan = volume_xml(&name, "raw")?;
        let marker = marker_name(&name);
        let marker_xml = volume_xml(&marker, "raw")?;
        let dir = self.settings.download_dir.display().to_string();
        let p = pool.to_owned();
        let read_error = self
            .hosts
            .run(uri, move |host| {
                let result = upload_file(host, &p, &name, &plan, file).and_then(|read| {
                    if read.is_none() {
                        host.ensure_volume(&p, &marker, &marker_xml)?;
                    }
                    Ok(read)
                });
                if !matches!(result, Ok(None)) {
                    // Only this upload's own volume and marker: never another's.
                    let _ = host.delete_volume(&p, &marker);
                    let _ = host.delete_volume(&p, &name);
                }
                result
            })
            .await?;
        match read_error {
            None => Ok(()),
            Some(error) => Err(Error::Disk {
                action: "reading",
                dir,
                error,
            }),
        }
    }
}

fn volume_xml(name: &str, format: &str) -> Result<String, Error> {
    VolumePlan {
        name: name.to_owned(),
        capacity_gib: 0,
        format: format.into(),
        backing: None,
    }
    .to_xml()
    .map_err(|e| super::Error::Xml(e.to_string()).into())
}

/// Creates `name` and streams `file` into it. Returns the error of reading the file, if any
/// (the volume then holds a prefix only).
fn upload_file(
    host: &Host,
    pool: &str,
    name: &str,
    xml: &str,
    mut file: std::fs::File,
) -> super::Result<Option<std::io::Error>> {
    host.ensure_volume(pool, name, xml)?;
    let mut read_error = None;
    let chunks = std::iter::from_fn(|| {
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(error) => {
                read_error = Some(error);
                None
            }
        }
    });
    host.upload(pool, name, chunks)?;
    Ok(read_error)
}

/// Classifies a reqwest error: a target refused by the rules is [`Error::Forbidden`]; anything
/// else keeps reqwest's error as its source.
fn transfer_error(url: &str, error: reqwest::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut root = error.to_string();
    while let Some(current) = cause {
        if let Some(refused) = current.downcast_ref::<Refused>() {
            return Error::Forbidden {
                url: url.to_owned(),
                reason: refused.to_string(),
            };
        }
        root = current.to_string();
        cause = current.source();
    }
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_redirect() {
        "redirect failed"
    } else if error.is_body() || error.is_decode() {
        "the transfer broke off"
    } else {
        "the request failed"
    };
    Error::Transfer {
        url: url.to_owned(),
        summary: format!("{kind} ({root})"),
        error,
    }
}

/// The path of the verified upload of `request` in `pool` that every replica picks (the
/// smallest name), if there is one. Blocking: run through `Hosts::run`.
pub fn verified_base(
    host: &Host,
    pool: &str,
    request: &ImageRequest,
) -> super::Result<Option<String>> {
    survey(host, pool, request, None)
}

/// Finds the verified upload every replica picks; with `stale_after`, also deletes unverified
/// uploads nobody has written to for that long.
fn survey(
    host: &Host,
    pool: &str,
    request: &ImageRequest,
    stale_after: Option<Duration>,
) -> super::Result<Option<String>> {
    let storage = host
        .connection()
        .lookup_storage_pool_by_name(pool)
        .map_err(|e| host.call("virStoragePoolLookupByName", e))?;
    let mut names = storage
        .list_volumes()
        .map_err(|e| host.call("virStoragePoolListVolumes", e))?;
    names.sort();
    let verified = |name: &String| names.binary_search(&marker_name(name)).is_ok();
    let uploads: Vec<&String> = names.iter().filter(|n| request.is_upload(n)).collect();
    if let Some(stale_after) = stale_after {
        for name in uploads.iter().filter(|n| !verified(n)) {
            if is_stale(host, pool, name, stale_after)? {
                tracing::info!(pool, volume = %name, "deleting an abandoned base image upload");
                host.delete_volume(pool, name)?;
            }
        }
    }
    match uploads.into_iter().find(|n| verified(n)) {
        Some(name) => host.volume_path(pool, name).map(Some),
        None => Ok(None),
    }
}

/// Whether an unverified upload has not been written for `stale_after` (by libvirt's mtime).
/// A volume that vanished meanwhile, or without timestamps, is not stale.
fn is_stale(host: &Host, pool: &str, name: &str, stale_after: Duration) -> super::Result<bool> {
    let Some(volume) = lookup_volume(host, pool, name)? else {
        return Ok(false);
    };
    let description = match describe(host, &volume) {
        Err(error) if error.is_not_found() => return Ok(false),
        other => other?,
    };
    let Some(mtime) = description.target.timestamps.and_then(|t| t.mtime) else {
        return Ok(false);
    };
    let seconds: u64 = match mtime.split('.').next().unwrap_or_default().parse() {
        Ok(seconds) => seconds,
        Err(_) => return Ok(false),
    };
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
    Ok(SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|age| age > stale_after))
}

fn lookup_volume(host: &Host, pool: &str, name: &str) -> super::Result<Option<StorageVol>> {
    let storage = host
        .connection()
        .lookup_storage_pool_by_name(pool)
        .map_err(|e| host.call("virStoragePoolLookupByName", e))?;
    match storage.lookup_storage_vol_by_name(name) {
        Ok(volume) => Ok(Some(volume)),
        Err(error) => {
            let error = host.call("virStorageVolLookupByName", error);
            if error.is_not_found() {
                Ok(None)
            } else {
                Err(error)
            }
        }
    }
}

/// The parts of libvirt's volume XML read here.
#[derive(Debug, Default, serde::Deserialize)]
struct VolumeDescription {
    #[serde(default)]
    target: VolumeTarget,
    #[serde(default, rename = "backingStore")]
    backing_store: Option<BackingStore>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct VolumeTarget {
    #[serde(default)]
    format: Option<FormatElement>,
    #[serde(default)]
    timestamps: Option<Timestamps>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct FormatElement {
    #[serde(rename = "@type", default)]
    kind: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct Timestamps {
    #[serde(default)]
    mtime: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct BackingStore {
    #[serde(default)]
    path: Option<String>,
}

fn describe(host: &Host, volume: &StorageVol) -> super::Result<VolumeDescription> {
    let xml = volume
        .xml_desc(0)
        .map_err(|e| host.call("virStorageVolGetXMLDesc", e))?;
    quick_xml::de::from_str(&xml).map_err(|e| super::Error::Xml(format!("reading volume XML: {e}")))
}

/// Checks an existing volume used as a machine's base image (`image.volume`) and returns its
/// real format, as libvirt reports it rather than assumed.
///
/// Refused: a volume with a backing store, a format other than qcow2 or raw (no format counts
/// as raw), and, where the driver can read volume content (a real libvirtd), a header that
/// names a backing or data file or contradicts the format ([`super::qcow2::check`] on its first
/// 64 KiB, read through libvirt). The in-process test driver stores no content, so there only
/// the volume XML is checked. Blocking: run through `Hosts::run`.
pub fn check_base_volume(host: &Host, pool: &str, name: &str) -> Result<ImageFormat, Error> {
    let volume = lookup_volume(host, pool, name)?
        .ok_or_else(|| super::Error::Missing(format!("volume {pool}/{name}")))?;
    let description = describe(host, &volume)?;
    if let Some(backing) = description.backing_store.and_then(|b| b.path) {
        return Err(Error::BackingStore {
            pool: pool.to_owned(),
            name: name.to_owned(),
            backing,
        });
    }
    let format = match description.target.format.and_then(|f| f.kind).as_deref() {
        Some("qcow2") => ImageFormat::Qcow2,
        Some("raw") | None => ImageFormat::Raw,
        Some(other) => {
            return Err(Error::Format {
                pool: pool.to_owned(),
                name: name.to_owned(),
                format: other.to_owned(),
            });
        }
    };
    if !host.is_test_driver() {
        let head = download_head(host, &volume)?;
        qcow2::check(&head, format).map_err(|error| Error::Header {
            image: format!("volume {pool}/{name}"),
            error,
        })?;
    }
    Ok(format)
}

/// The first [`HEAD_BYTES`] of a volume (fewer if it is shorter), read through libvirt.
fn download_head(host: &Host, volume: &StorageVol) -> super::Result<Vec<u8>> {
    let stream = Stream::new(host.connection(), 0).map_err(|e| host.call("virStreamNew", e))?;
    volume
        .download(&stream, 0, HEAD_BYTES as u64, 0)
        .map_err(|e| host.call("virStorageVolDownload", e))?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    let mut buf = vec![0u8; HEAD_BYTES];
    while head.len() < HEAD_BYTES {
        match stream.recv(&mut buf) {
            Ok(0) => break,
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n as usize]),
            Ok(_) => continue,
            Err(error) => {
                let _ = stream.abort();
                return Err(host.call("virStreamRecv", error));
            }
        }
    }
    head.truncate(HEAD_BYTES);
    if head.len() < HEAD_BYTES {
        stream
            .finish()
            .map_err(|e| host.call("virStreamFinish", e))?;
    } else {
        let _ = stream.abort();
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(format: ImageFormat) -> ImageRequest {
        ImageRequest {
            url: "https://images.example.com/a.qcow2".into(),
            algorithm: ChecksumType::Sha256,
            digest: "AB".repeat(32),
            format,
        }
    }

    #[test]
    fn uploads_are_named_by_digest_and_nonce() {
        let r = request(ImageFormat::Qcow2);
        let name = r.upload_name("0123456789abcdef");
        assert_eq!(
            name,
            format!(
                "capl-base-sha256-{}-0123456789abcdef.qcow2",
                "ab".repeat(16)
            )
        );
        assert!(r.is_upload(&name));
        assert!(!r.is_upload(&marker_name(&name)));
        assert!(!r.is_upload(&format!("capl-base-sha256-{}.qcow2", "ab".repeat(16))));
        assert!(!r.is_upload(&request(ImageFormat::Raw).upload_name("0123456789abcdef")));
        assert!(!r.is_upload(&r.upload_name("0123456789abcdeg")));
    }

    #[test]
    fn permanence_follows_the_cause() {
        let status = |status| Error::Status {
            url: String::new(),
            status,
        };
        assert!(status(404).is_permanent());
        assert!(status(403).is_permanent());
        assert!(!status(408).is_permanent());
        assert!(!status(429).is_permanent());
        assert!(!status(503).is_permanent());
        assert!(
            Error::Forbidden {
                url: String::new(),
                reason: String::new()
            }
            .is_permanent()
        );
        assert!(
            Error::TooLarge {
                url: String::new(),
                limit: 1
            }
            .is_permanent()
        );
        assert!(!Error::Libvirt(super::super::Error::Closed(String::new())).is_permanent());
    }

    #[test]
    fn the_test_exception_admits_one_loopback_address_only() {
        let strict = Targets {
            loopback_for_tests: None,
        };
        assert!(strict.check("http://127.0.0.1:8080/a").is_err());
        let tests = Targets {
            loopback_for_tests: Some("127.0.0.1".parse().expect("ip")),
        };
        assert!(tests.check("http://127.0.0.1:8080/a").is_ok());
        assert!(tests.check("http://127.0.0.2:8080/a").is_err());
        assert!(tests.check("http://169.254.169.254/a").is_err());
        assert!(tests.check("http://127.0.0.1:8080/a%00").is_err());
        assert!(tests.check("http://u:p@127.0.0.1:8080/a").is_err());
        assert!(tests.allows("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(tests.allows("127.0.0.2".parse().expect("ip")).is_err());
    }
}
