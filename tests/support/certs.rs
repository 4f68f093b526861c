//! Certificates for the bed: one CA per bed, serving and client certificates signed by it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that issues the bed's certificates.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A PEM certificate and its private key.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Paths of a pair written to disk.
pub struct PairFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn server(&self, common_name: &str, sans: &[&str]) -> Result<Pair> {
        self.issue(common_name, &[], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate; Kubernetes reads the user from CN and groups from O.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<Pair> {
        self.issue(user, groups, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Pair> {
        let key = KeyPair::generate()?;
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for org in organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.cert_pem).with_context(|| format!("writing {}", path.display()))
    }
}

impl Pair {
    /// Writes `<dir>/<cert_name>` and `<dir>/<key_name>` (key readable by the owner only).
    pub fn write(&self, dir: &Path, cert_name: &str, key_name: &str) -> Result<PairFiles> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let files = PairFiles {
            cert: dir.join(cert_name),
            key: dir.join(key_name),
        };
        std::fs::write(&files.cert, &self.cert_pem)?;
        let mut key = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&files.key)?;
        std::io::Write::write_all(&mut key, self.key_pem.as_bytes())?;
        Ok(files)
    }
}

/// A bare key pair in PEM, private and public (the service-account signing key).
pub fn key_pair_pem() -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The PEM certificate a TLS server at `address` (`host:port`) presents for `server_name` (or
/// without SNI), read with openssl, trusting nothing; empty when none could be read.
pub fn served_certificate(address: &str, server_name: Option<&str>) -> String {
    let sni = server_name
        .map(|name| format!(" -servername {name}"))
        .unwrap_or_default();
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {address}{sni} </dev/null 2>/dev/null | openssl x509"
        ))
        .stderr(std::process::Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// The first certificate of a PEM bundle, as openssl prints it (comparable with
/// [`served_certificate`]); empty when `pem` holds none.
pub fn first_certificate(pem: &str) -> String {
    use std::io::Write as _;
    let Ok(mut child) = std::process::Command::new("openssl")
        .arg("x509")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return String::new();
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(pem.as_bytes());
    }
    child
        .wait_with_output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}
