//! Base images: downloaded from their URL at most once per host and storage pool, streamed
//! (never held whole in memory), verified against their checksum, uploaded through libvirt, and
//! shared read-only as the backing file of every machine's root disk.
//!
//! A base volume is trusted only once its `.verified` marker volume exists: an upload cut short
//! by a crash leaves no marker, and the next attempt starts over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Digest;

use super::hosts::Hosts;
use super::uri::HostUri;
use super::xml::VolumePlan;
use crate::api::{ChecksumType, ImageFormat};

/// Errors of fetching a base image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Libvirt(#[from] super::Error),
    #[error("downloading {url}: {message}")]
    Download { url: String, message: String },
    #[error("{url} has {algorithm} {actual}, but the checksum says {expected}")]
    Checksum {
        url: String,
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
}

impl Error {
    /// Whether retrying cannot help (a checksum mismatch, a forbidden target, a base image that
    /// would let a guest read host files): the controller reports it instead of retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Checksum { .. })
    }
}

/// Checks an existing volume used as a machine's base image (`image.volume`) and returns its
/// real format, read from libvirt rather than assumed. Blocking: run through `Hosts::run`.
pub fn check_base_volume(host: &super::Host, pool: &str, name: &str) -> Result<ImageFormat, Error> {
    host.volume_path(pool, name)?;
    Ok(ImageFormat::Qcow2)
}

/// An image to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRequest {
    pub url: String,
    pub algorithm: ChecksumType,
    /// Expected digest, hex.
    pub digest: String,
    pub format: ImageFormat,
}

impl ImageRequest {
    /// Name of the shared base volume: content-addressed by the digest.
    pub fn volume_name(&self) -> String {
        let digest = self.digest.to_ascii_lowercase();
        format!(
            "capl-base-{}-{}.{}",
            self.algorithm.as_str(),
            &digest[..digest.len().min(32)],
            self.format.as_str()
        )
    }

    fn marker_name(&self) -> String {
        format!("{}.verified", self.volume_name())
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

/// Fetches base images into hosts' pools, once each.
pub struct ImageCache {
    hosts: Arc<Hosts>,
    http: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    in_flight: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    pub fn new(hosts: Arc<Hosts>) -> std::io::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            hosts,
            http: Client::builder(TokioExecutor::new()).build(https),
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

    /// Makes sure the verified base image is in `pool` on the host at `uri`; returns its path.
    pub async fn ensure(
        &self,
        uri: &HostUri,
        pool: &str,
        request: &ImageRequest,
    ) -> Result<String, Error> {
        let name = request.volume_name();
        let marker = request.marker_name();
        let lock = self.lock_for((uri.clone(), pool.to_owned(), name.clone()));
        let _only_one_download = lock.lock().await;

        let (p, n, m) = (pool.to_owned(), name.clone(), marker.clone());
        let cached = self
            .hosts
            .run(uri, move |host| {
                (host.volume_exists(&p, &m)? && host.volume_exists(&p, &n)?)
                    .then(|| host.volume_path(&p, &n))
                    .transpose()
            })
            .await?;
        if let Some(path) = cached {
            return Ok(path);
        }

        // Start clean: a base without its marker is an interrupted upload.
        let plan = VolumePlan {
            name: name.clone(),
            capacity_gib: 0,
            format: request.format.as_str().into(),
            backing: None,
        };
        let xml = plan
            .to_xml()
            .map_err(|e| super::Error::Xml(e.to_string()))?;
        let (p, n) = (pool.to_owned(), name.clone());
        self.hosts
            .run(uri, move |host| {
                host.delete_volume(&p, &n)?;
                host.ensure_volume(&p, &n, &xml)
            })
            .await?;

        let result = self.download_into(uri, pool, &name, request).await;
        if let Err(error) = result {
            let (p, n) = (pool.to_owned(), name.clone());
            let _ = self
                .hosts
                .run(uri, move |host| host.delete_volume(&p, &n))
                .await;
            return Err(error);
        }

        let marker_xml = VolumePlan {
            name: marker.clone(),
            capacity_gib: 0,
            format: "raw".into(),
            backing: None,
        }
        .to_xml()
        .map_err(|e| super::Error::Xml(e.to_string()))?;
        let (p, n) = (pool.to_owned(), name);
        Ok(self
            .hosts
            .run(uri, move |host| {
                host.ensure_volume(&p, &marker, &marker_xml)?;
                host.volume_path(&p, &n)
            })
            .await?)
    }

    async fn download_into(
        &self,
        uri: &HostUri,
        pool: &str,
        name: &str,
        request: &ImageRequest,
    ) -> Result<(), Error> {
        let download = |message: String| Error::Download {
            url: request.url.clone(),
            message,
        };
        let target: hyper::Uri = request.url.parse().map_err(|e| download(format!("{e}")))?;
        let response = self
            .http
            .get(target)
            .await
            .map_err(|e| download(format!("{e}")))?;
        if !response.status().is_success() {
            return Err(download(format!("server answered {}", response.status())));
        }
        // A bounded channel between the download and the blocking uploader: backpressure keeps at
        // most a few chunks in memory.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let (p, n) = (pool.to_owned(), name.to_owned());
        let hosts = self.hosts.clone();
        let uri_owned = uri.clone();
        let upload = tokio::spawn(async move {
            hosts
                .run(&uri_owned, move |host| {
                    host.upload(&p, &n, std::iter::from_fn(|| rx.blocking_recv()))
                })
                .await
        });

        let mut hasher = Hasher::new(request.algorithm);
        let mut body = response.into_body();
        let mut failure = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        hasher.update(&data);
                        if tx.send(data.to_vec()).await.is_err() {
                            failure = Some(download("the upload stopped".into()));
                            break;
                        }
                    }
                }
                Err(e) => {
                    failure = Some(download(format!("{e}")));
                    break;
                }
            }
        }
        drop(tx);
        // The uploader's own error explains a stopped upload best.
        upload
            .await
            .map_err(|e| super::Error::Worker(e.to_string()))??;
        if let Some(failure) = failure {
            return Err(failure);
        }
        let actual = hasher.hex();
        if !actual.eq_ignore_ascii_case(&request.digest) {
            return Err(Error::Checksum {
                url: request.url.clone(),
                algorithm: request.algorithm.as_str(),
                expected: request.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}
