//! Credentials for remote hosts, from a LibvirtCluster host's `credentialsSecretRef`.
//!
//! libvirt reads credentials only from files: the manager writes the Secret's content into a
//! private directory (mode 0700, files 0600, one subdirectory per content digest, so a rotated
//! Secret gets a new connection) and adds the parameter that names it to the URI it connects
//! with. Users can never name a file themselves: [`super::uri::HostUri::parse`] refuses
//! `keyfile` and `pkipath`; only [`HostUri::with_credentials`] adds them.
//!
//! - `qemu+ssh`: Secret key `ssh-privatekey` (as in a `kubernetes.io/ssh-auth` Secret), passed
//!   as `keyfile=`. The host key is checked against the manager's own `known_hosts` (libvirt's
//!   ssh transport takes no known-hosts parameter).
//! - `qemu+tls`: Secret keys `ca.crt`, `tls.crt`, `tls.key` (as cert-manager writes them),
//!   written as libvirt's `cacert.pem`, `clientcert.pem`, `clientkey.pem` and passed as
//!   `pkipath=`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::uri::{HostUri, Transport};
use crate::cloudinit::Sensitive;

/// Largest value accepted for one credential file.
const MAX_FILE_BYTES: usize = 64 * 1024;

/// The credentials of one host. Private keys never print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// An ssh private key (`qemu+ssh`).
    Ssh {
        /// The private key, in PEM or OpenSSH format.
        private_key: Sensitive<Vec<u8>>,
    },
    /// A TLS client identity and the CA that signed the host's certificate (`qemu+tls`).
    Tls {
        /// PEM CA certificate(s) the host's certificate is checked against.
        ca: Vec<u8>,
        /// PEM client certificate.
        cert: Vec<u8>,
        /// PEM client private key.
        key: Sensitive<Vec<u8>>,
    },
}

/// A Secret that cannot serve as credentials: what is wrong, naming the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsError(pub String);

impl Credentials {
    /// Reads the credentials for `transport` from a Secret's `data`.
    pub fn from_secret(
        transport: Transport,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, CredentialsError> {
        let value = |key: &str, marker: &str| -> Result<Vec<u8>, CredentialsError> {
            let bytes = data.get(key).ok_or_else(|| {
                CredentialsError(format!("has no key {key:?} (expected for {transport:?})"))
            })?;
            if bytes.is_empty() || bytes.len() > MAX_FILE_BYTES {
                return Err(CredentialsError(format!(
                    "key {key:?} must hold 1-{MAX_FILE_BYTES} bytes, got {}",
                    bytes.len()
                )));
            }
            let text = std::str::from_utf8(bytes)
                .map_err(|_| CredentialsError(format!("key {key:?} is not PEM text")))?;
            if !text.contains("-----BEGIN ") || !text.contains(marker) || text.contains('\0') {
                return Err(CredentialsError(format!(
                    "key {key:?} is not a PEM/OpenSSH block containing {marker:?}"
                )));
            }
            Ok(bytes.clone())
        };
        match transport {
            Transport::QemuSsh => Ok(Self::Ssh {
                private_key: Sensitive::new(value("ssh-privatekey", "PRIVATE KEY-----")?),
            }),
            Transport::QemuTls => Ok(Self::Tls {
                ca: value("ca.crt", "CERTIFICATE-----")?,
                cert: value("tls.crt", "CERTIFICATE-----")?,
                key: Sensitive::new(value("tls.key", "PRIVATE KEY-----")?),
            }),
            Transport::Qemu | Transport::Test => Err(CredentialsError(
                "credentials apply to qemu+ssh:// and qemu+tls:// hosts only".into(),
            )),
        }
    }

    /// The files libvirt reads, by name.
    fn files(&self) -> Vec<(&'static str, &[u8])> {
        match self {
            Self::Ssh { private_key } => vec![("id", private_key.expose())],
            Self::Tls { ca, cert, key } => vec![
                ("cacert.pem", ca),
                ("clientcert.pem", cert),
                ("clientkey.pem", key.expose()),
            ],
        }
    }

    /// A digest of the content: the name of its directory.
    fn digest(&self) -> String {
        let mut hash = Sha256::new();
        for (name, bytes) in self.files() {
            hash.update(name.as_bytes());
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        }
        hash.finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl HostUri {
    /// This URI with the parameter that hands `credentials` (written under `dir`) to libvirt.
    /// The URI displays (and labels metrics) as written; only the connection uses the parameter.
    pub fn with_credentials(&self, credentials: &Credentials, dir: &Path) -> HostUri {
        let param = match credentials {
            Credentials::Ssh { .. } => ("keyfile", dir.join("id")),
            Credentials::Tls { .. } => ("pkipath", dir.to_path_buf()),
        };
        self.with_connect_param(param.0, &param.1.to_string_lossy())
    }
}

static GLOBAL: OnceLock<CredentialFiles> = OnceLock::new();

/// The manager's private directory of credential files.
pub struct CredentialFiles {
    root: PathBuf,
    written: Mutex<()>,
}

impl CredentialFiles {
    /// A store under `root`, created with mode 0700 when missing.
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            root,
            written: Mutex::new(()),
        })
    }

    /// The process's store: `$TMPDIR/capl-credentials-<pid>`, removed by
    /// [`CredentialFiles::remove_global`].
    pub fn global() -> std::io::Result<&'static CredentialFiles> {
        if let Some(files) = GLOBAL.get() {
            return Ok(files);
        }
        let root = std::env::temp_dir().join(format!("capl-credentials-{}", std::process::id()));
        let files = CredentialFiles::new(root)?;
        Ok(GLOBAL.get_or_init(|| files))
    }

    /// Removes the process's store, when one was made (at shutdown).
    pub fn remove_global() {
        if let Some(files) = GLOBAL.get() {
            files.remove_all();
        }
    }

    /// The directory holding `credentials` (written once per content, files mode 0600).
    pub fn write(&self, credentials: &Credentials) -> std::io::Result<PathBuf> {
        let dir = self.root.join(credentials.digest());
        let _guard = match self.written.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if dir.is_dir() {
            return Ok(dir);
        }
        // Written beside, then renamed: libvirt never sees a half-written directory.
        let partial = self.root.join(format!(".{}.partial", credentials.digest()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir(&partial)?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o700))?;
        for (name, bytes) in credentials.files() {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(partial.join(name))?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&partial, &dir)?;
        Ok(dir)
    }

    /// Removes every file (at shutdown).
    pub fn remove_all(&self) {
        if let Err(error) = std::fs::remove_dir_all(&self.root)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.root.display(), %error, "removing the credential files");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::uri::UriPolicy;

    const KEY: &[u8] =
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-marker\n-----END OPENSSH PRIVATE KEY-----\n";
    const CERT: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn data(pairs: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect()
    }

    #[test]
    fn secrets_are_read_by_transport_and_checked() {
        let ssh = Credentials::from_secret(Transport::QemuSsh, &data(&[("ssh-privatekey", KEY)]))
            .expect("ssh");
        assert!(!format!("{ssh:?}").contains("secret-marker"), "{ssh:?}");
        let tls = data(&[("ca.crt", CERT), ("tls.crt", CERT), ("tls.key", KEY)]);
        assert!(Credentials::from_secret(Transport::QemuTls, &tls).is_ok());

        let refused = [
            (
                Transport::QemuSsh,
                data(&[]),
                "has no key \"ssh-privatekey\"",
            ),
            (
                Transport::QemuSsh,
                data(&[("ssh-privatekey", b"not a key")]),
                "not a PEM/OpenSSH block",
            ),
            (
                Transport::QemuSsh,
                data(&[("ssh-privatekey", &[0xff, 0xfe])]),
                "not PEM text",
            ),
            (
                Transport::QemuTls,
                data(&[("ca.crt", CERT), ("tls.crt", KEY), ("tls.key", KEY)]),
                "\"tls.crt\" is not a PEM",
            ),
            (
                Transport::QemuTls,
                data(&[("ca.crt", CERT), ("tls.crt", CERT)]),
                "has no key \"tls.key\"",
            ),
            (
                Transport::Qemu,
                data(&[("ssh-privatekey", KEY)]),
                "qemu+ssh:// and qemu+tls:// hosts only",
            ),
            (
                Transport::QemuSsh,
                data(&[("ssh-privatekey", &vec![b'a'; MAX_FILE_BYTES + 1])]),
                "must hold 1-65536 bytes",
            ),
        ];
        for (transport, data, wanted) in refused {
            let error = Credentials::from_secret(transport, &data).expect_err(wanted);
            assert!(error.0.contains(wanted), "{error} lacks {wanted}");
            assert!(!error.0.contains("secret-marker"));
        }
    }

    #[test]
    fn files_are_private_written_once_per_content_and_named_only_in_the_connection() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = CredentialFiles::new(root.path().join("creds")).expect("store");
        let tls = Credentials::Tls {
            ca: CERT.to_vec(),
            cert: CERT.to_vec(),
            key: Sensitive::new(KEY.to_vec()),
        };
        let dir = store.write(&tls).expect("write");
        assert_eq!(
            store.write(&tls).expect("again"),
            dir,
            "same content, same dir"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&root.path().join("creds")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        for name in ["cacert.pem", "clientcert.pem", "clientkey.pem"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(std::fs::read(dir.join("clientkey.pem")).expect("key"), KEY);

        let rotated = Credentials::Tls {
            ca: CERT.to_vec(),
            cert: CERT.to_vec(),
            key: Sensitive::new(b"-----BEGIN PRIVATE KEY-----\nother\n".to_vec()),
        };
        assert_ne!(store.write(&rotated).expect("rotated"), dir);

        let policy = UriPolicy::default();
        let uri =
            HostUri::parse("qemu+tls://hv1.example.com/system?no_verify=0", policy).expect("uri");
        let connect = uri.with_credentials(&tls, &dir);
        assert_eq!(connect.to_string(), uri.to_string(), "displays as written");
        assert_eq!(
            connect.connect_str(),
            format!(
                "qemu+tls://hv1.example.com/system?no_verify=0&pkipath={}",
                dir.display()
            )
        );
        assert_ne!(connect, uri, "another connection");

        let ssh_uri =
            HostUri::parse("qemu+ssh://capl@hv1.example.com/system", policy).expect("uri");
        let ssh = Credentials::Ssh {
            private_key: Sensitive::new(KEY.to_vec()),
        };
        let dir = store.write(&ssh).expect("ssh");
        assert_eq!(
            ssh_uri.with_credentials(&ssh, &dir).connect_str(),
            format!(
                "qemu+ssh://capl@hv1.example.com/system?keyfile={}",
                dir.join("id").display()
            )
        );
        store.remove_all();
        assert!(!root.path().join("creds").exists());
    }
}
