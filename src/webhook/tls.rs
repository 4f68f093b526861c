//! The webhook's serving certificate, replaced without a restart.
//!
//! Two sources feed the store. Files (`--webhook-cert-dir`, e.g. a Secret cert-manager fills and
//! the kubelet mounts): Kubernetes updates a mounted Secret by swapping the `..data` symlink, so
//! file watches go stale; the store re-reads the files on an interval instead and swaps the key in
//! when their bytes change (a half-written or mismatched pair is ignored until it settles). Or
//! memory: the self-managed certificates ([`super::certificates`]) hand each new pair over.
//! Each TLS handshake picks the current key, so in-flight connections are never dropped.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};

/// Errors of certificate loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{origin} holds no PEM certificate")]
    NoCertificate { origin: String },
    #[error("{origin} holds no PEM private key: {reason}")]
    NoKey { origin: String, reason: String },
    #[error("certificate and key do not form a usable pair: {0}")]
    Pair(#[from] rustls::Error),
}

/// Where the serving certificate lives (controller-runtime's `--webhook-cert-dir` layout).
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn in_dir(dir: &Path, cert_name: &str, key_name: &str) -> Self {
        Self {
            cert: dir.join(cert_name),
            key: dir.join(key_name),
        }
    }
}

struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    key: Arc<CertifiedKey>,
}

/// The current serving key, shared by every handshake.
pub struct CertStore {
    /// Where the pair is re-read from; `None` when it is handed over in memory.
    files: Option<CertFiles>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .finish()
    }
}

impl CertStore {
    /// Loads the pair; fails when it cannot (the manager must not start without a certificate).
    pub fn load(files: CertFiles) -> Result<Arc<Self>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = parse(
            read_file(&files.cert)?,
            read_file(&files.key)?,
            &files.cert.display().to_string(),
            &files.key.display().to_string(),
            &provider,
        )?;
        Ok(Arc::new(Self {
            files: Some(files),
            provider,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// A store serving a pair held in memory (`origin` names where it came from, for errors).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Arc<Self>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = parse(
            cert_pem.to_vec(),
            key_pem.to_vec(),
            origin,
            origin,
            &provider,
        )?;
        Ok(Arc::new(Self {
            files: None,
            provider,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Re-reads the files; swaps the key in when they changed and form a valid pair.
    /// Returns whether the served certificate changed (always `false` for a store in memory).
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let (cert_pem, key_pem) = (read_file(&files.cert)?, read_file(&files.key)?);
        self.replace(
            cert_pem,
            key_pem,
            &files.cert.display().to_string(),
            &files.key.display().to_string(),
        )
    }

    /// Swaps in a pair held in memory when it differs from the one served; a pair that does not
    /// parse or match is refused and the previous one stays. Returns whether it changed.
    pub fn replace_pem(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
        origin: &str,
    ) -> Result<bool, Error> {
        self.replace(cert_pem.to_vec(), key_pem.to_vec(), origin, origin)
    }

    /// The certificate (chain) served now, PEM.
    pub fn certificate_pem(&self) -> Vec<u8> {
        self.snapshot().cert_pem.clone()
    }

    fn replace(
        &self,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<bool, Error> {
        {
            let current = self.snapshot();
            if current.cert_pem == cert_pem && current.key_pem == key_pem {
                return Ok(false);
            }
        }
        let loaded = parse(cert_pem, key_pem, cert_origin, key_origin, &self.provider)?;
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(loaded),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(loaded),
        }
        Ok(true)
    }

    fn snapshot(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A TLS 1.2/1.3 server configuration that serves the current key on every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Polls the files every `interval` until `stop` resolves, logging reloads and failures
    /// (returns at once for a store in memory).
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: impl Future<Output = ()>) {
        let Some(files) = self.files.clone() else {
            return;
        };
        let mut stop = std::pin::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticker.tick() => {}
            }
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.reload_if_changed()).await {
                Ok(Ok(true)) => {
                    tracing::info!(cert = %files.cert.display(), "webhook certificate reloaded")
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "webhook certificate not reloaded; serving the previous one")
                }
                Err(error) => tracing::warn!(%error, "certificate reload task failed"),
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.snapshot().key.clone())
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|error| Error::Read {
        path: path.to_owned(),
        error,
    })
}

fn parse(
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    cert_origin: &str,
    key_origin: &str,
    provider: &CryptoProvider,
) -> Result<Loaded, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(Error::NoCertificate {
            origin: cert_origin.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::NoKey {
        origin: key_origin.to_owned(),
        reason: e.to_string(),
    })?;
    let key = CertifiedKey::from_der(chain, key, provider)?;
    Ok(Loaded {
        cert_pem,
        key_pem,
        key: Arc::new(key),
    })
}
