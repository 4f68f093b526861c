//! Bootstrap data for guests: the NoCloud seed (an ISO 9660 filesystem labelled `cidata`, with
//! Joliet and Rock Ridge names, built in-process) for `cloud-config`.

use std::io::Cursor;
use std::sync::Arc;

use hadris_iso::read::PathSeparator;
use hadris_iso::write::options::{CreationFeatures, IsoFormatOptions};
use hadris_iso::write::{File, InputFiles, IsoImageWriter};
use serde::Serialize;

/// Errors of seed generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("encoding meta-data: {0}")]
    MetaData(#[from] serde_yaml::Error),
    #[error("writing the NoCloud ISO: {0}")]
    Iso(String),
}

/// The NoCloud `meta-data` document. `instance-id` changes with every new machine (so cloud-init
/// runs again on a re-created VM), `provider-id` is what kubelet must report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetaData {
    pub instance_id: String,
    pub local_hostname: String,
    pub provider_id: String,
}

/// A value that must never be logged (bootstrap data, credentials): its `Debug` prints
/// `[redacted]`, and it has no `Display`. Read it through [`Sensitive::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sensitive<T>(T);

impl<T> Sensitive<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value, for the one place that writes it where it belongs.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> From<T> for Sensitive<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T> std::fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// What goes on the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    /// The bootstrap provider's `cloud-config` (the Secret's `value`), passed through untouched.
    /// Never printed.
    pub user_data: Sensitive<Vec<u8>>,
    pub meta_data: MetaData,
    /// Optional NoCloud network-config (v2).
    pub network_config: Option<String>,
}

/// Volume label cloud-init looks for.
pub const LABEL: &str = "cidata";

impl Seed {
    /// The seed as an ISO 9660 image.
    pub fn to_iso(&self) -> Result<Vec<u8>, Error> {
        let mut files = vec![
            file("user-data", self.user_data.expose().clone()),
            file(
                "meta-data",
                serde_yaml::to_string(&self.meta_data)?.into_bytes(),
            ),
        ];
        if let Some(network) = &self.network_config {
            files.push(file("network-config", network.clone().into_bytes()));
        }
        let options = IsoFormatOptions {
            volume_name: LABEL.into(),
            system_id: None,
            volume_set_id: None,
            publisher_id: None,
            preparer_id: None,
            application_id: Some("cluster-api-provider-libvirt".into()),
            sector_size: 2048,
            features: CreationFeatures {
                joliet: Some(hadris_iso::joliet::JolietLevel::Level3),
                ..CreationFeatures::rock_ridge()
            },
            path_separator: PathSeparator::ForwardSlash,
            strict_charset: false,
        };
        let mut image = Cursor::new(Vec::new());
        IsoImageWriter::create(
            &mut image,
            InputFiles {
                path_separator: PathSeparator::ForwardSlash,
                files,
            },
            options,
        )
        .map_err(|e| Error::Iso(format!("{e:?}")))?;
        // Whole sectors, as block devices read them.
        let mut bytes = image.into_inner();
        bytes.resize(bytes.len().div_ceil(2048) * 2048, 0);
        Ok(bytes)
    }
}

fn file(name: &str, contents: Vec<u8>) -> File {
    File::File {
        name: Arc::new(name.to_owned()),
        contents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_never_prints() {
        let seed = Seed {
            user_data: Sensitive::new(b"#cloud-config\ntoken: s3cr3t-marker\n".to_vec()),
            meta_data: MetaData {
                instance_id: "i".into(),
                local_hostname: "h".into(),
                provider_id: "p".into(),
            },
            network_config: None,
        };
        let printed = format!("{seed:?} {seed:#?}");
        assert!(!printed.contains("s3cr3t-marker"), "{printed}");
        assert!(printed.contains("[redacted]"), "{printed}");
        assert_eq!(seed.user_data.expose().len(), 35);
    }
}
