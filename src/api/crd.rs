//! The CRDs generated from the types, and their on-disk form in `crds/`.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{LibvirtCluster, LibvirtClusterTemplate, LibvirtMachine, LibvirtMachineTemplate};

/// Errors of CRD generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("serialising CRD {name}: {error}")]
    Serialize {
        name: String,
        error: serde_yaml::Error,
    },
    #[error("writing {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Every CRD this provider ships.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        LibvirtCluster::crd(),
        LibvirtClusterTemplate::crd(),
        LibvirtMachine::crd(),
        LibvirtMachineTemplate::crd(),
    ]
}

/// File name of a CRD in `crds/`, in kubebuilder's convention (`<group>_<plural>.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// Every CRD as (file name, YAML).
pub fn rendered() -> Result<Vec<(String, String)>, Error> {
    all()
        .iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml =
                serde_yaml::to_string(crd).map_err(|error| Error::Serialize { name, error })?;
            Ok((file_name(crd), format!("---\n{yaml}")))
        })
        .collect()
}

/// Writes every CRD into `dir`, replacing what was there.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir).map_err(|error| Error::Write {
        path: dir.to_owned(),
        error,
    })?;
    rendered()?
        .into_iter()
        .map(|(name, yaml)| {
            let path = dir.join(name);
            std::fs::write(&path, yaml).map_err(|error| Error::Write {
                path: path.clone(),
                error,
            })?;
            Ok(path)
        })
        .collect()
}
