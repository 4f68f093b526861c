//! The admission dispatcher: one [`Admit`] implementation per kind, one entry point
//! ([`review`]) that decodes the object, runs defaulting or validation, and builds the response.

use std::fmt;

use kube::core::DynamicObject;
use kube::core::Status;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    GROUP, LibvirtCluster, LibvirtClusterTemplate, LibvirtMachine, LibvirtMachineTemplate, VERSION,
};

/// The kinds this provider admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LibvirtCluster,
    LibvirtClusterTemplate,
    LibvirtMachine,
    LibvirtMachineTemplate,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::LibvirtCluster,
        Kind::LibvirtClusterTemplate,
        Kind::LibvirtMachine,
        Kind::LibvirtMachineTemplate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::LibvirtCluster => "LibvirtCluster",
            Kind::LibvirtClusterTemplate => "LibvirtClusterTemplate",
            Kind::LibvirtMachine => "LibvirtMachine",
            Kind::LibvirtMachineTemplate => "LibvirtMachineTemplate",
        }
    }

    /// Lowercase plural, as in the resource path.
    pub fn plural(self) -> String {
        format!("{}s", self.name().to_lowercase())
    }

    /// controller-runtime's webhook path: `/<mutate|validate>-<group with dashes>-<version>-<kind>`.
    pub fn path(self, endpoint: Endpoint) -> String {
        format!(
            "/{}-{}-{}-{}",
            endpoint.prefix(),
            GROUP.replace('.', "-"),
            VERSION,
            self.name().to_lowercase()
        )
    }
}

/// Which half of admission an endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Defaulting (mutating webhook): answers with a JSON patch.
    Mutate,
    /// Validation (validating webhook): allows or denies, with warnings.
    Validate,
}

impl Endpoint {
    pub fn prefix(self) -> &'static str {
        match self {
            Endpoint::Mutate => "mutate",
            Endpoint::Validate => "validate",
        }
    }
}

/// A rejected field: `spec.memoryMiB: must be at least 256, got 64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What validation found: errors deny the request, warnings are shown to the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub errors: Vec<FieldError>,
    pub warnings: Vec<String>,
}

impl Verdict {
    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn warn(&mut self, path: impl fmt::Display, message: impl fmt::Display) {
        self.warnings.push(format!("{path}: {message}"));
    }
}

/// Facts about the request that validation may depend on.
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    /// The request is a dry run (`?dryRun=All`).
    pub dry_run: bool,
    /// The object carries `topology.cluster.x-k8s.io/dry-run` (Cluster API topology planning).
    pub topology_dry_run: bool,
}

/// Annotation Cluster API's topology controller sets on its server-side-apply dry-runs.
pub const TOPOLOGY_DRY_RUN_ANNOTATION: &str = "topology.cluster.x-k8s.io/dry-run";

/// One kind's admission logic.
pub trait Admit: Serialize + DeserializeOwned + Clone {
    const KIND: Kind;

    /// Fills in every default a user should not have to type. Must be idempotent.
    fn apply_defaults(&mut self);

    /// Semantic and cross-field rules, on create and update.
    fn validate(&self, verdict: &mut Verdict);

    /// What an update may not change.
    fn validate_update(&self, old: &Self, info: &RequestInfo, verdict: &mut Verdict);
}

/// Answers one admission request for `kind` at `endpoint`.
pub fn review(
    kind: Kind,
    endpoint: Endpoint,
    req: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    match kind {
        Kind::LibvirtCluster => admit::<LibvirtCluster>(endpoint, req),
        Kind::LibvirtClusterTemplate => admit::<LibvirtClusterTemplate>(endpoint, req),
        Kind::LibvirtMachine => admit::<LibvirtMachine>(endpoint, req),
        Kind::LibvirtMachineTemplate => admit::<LibvirtMachineTemplate>(endpoint, req),
    }
}

fn admit<K: Admit>(endpoint: Endpoint, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    if req.kind.group != GROUP || req.kind.kind != K::KIND.name() {
        return deny(
            response,
            &format!(
                "this webhook admits {GROUP}/{}, not {}/{}",
                K::KIND.name(),
                req.kind.group,
                req.kind.kind
            ),
        );
    }
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let Some(object) = req.object.as_ref() else {
        return deny(response, "the admission request carries no object");
    };
    let new: K = match decode(object) {
        Ok(new) => new,
        // Defaulting leaves malformed objects alone: the apiserver's schema validation, which runs
        // next, reports them with its own canonical message.
        Err(_) if endpoint == Endpoint::Mutate => return response,
        Err(error) => return deny(response, &error.to_string()),
    };
    match endpoint {
        Endpoint::Mutate => default(response, &new),
        Endpoint::Validate => {
            let mut verdict = Verdict::default();
            new.validate(&mut verdict);
            if req.operation == Operation::Update {
                match req.old_object.as_ref().map(decode::<K>) {
                    Some(Ok(old)) => {
                        let info = RequestInfo {
                            dry_run: req.dry_run,
                            topology_dry_run: object
                                .metadata
                                .annotations
                                .as_ref()
                                .is_some_and(|a| a.contains_key(TOPOLOGY_DRY_RUN_ANNOTATION)),
                        };
                        new.validate_update(&old, &info, &mut verdict);
                    }
                    Some(Err(error)) => verdict.error("oldObject", error.message),
                    None => verdict.error("oldObject", "an update must carry the old object"),
                }
            }
            conclude(response, verdict)
        }
    }
}

/// Decodes the object into its typed form; the error names the offending field.
fn decode<K: DeserializeOwned>(object: &DynamicObject) -> Result<K, FieldError> {
    let value = serde_json::to_value(object).map_err(|e| FieldError {
        path: "object".into(),
        message: e.to_string(),
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| FieldError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// Answers with the JSON patch from the object to its defaulted form (none if nothing changes).
fn default<K: Admit>(response: AdmissionResponse, object: &K) -> AdmissionResponse {
    let mut defaulted = object.clone();
    defaulted.apply_defaults();
    let (Ok(before), Ok(after)) = (
        serde_json::to_value(object),
        serde_json::to_value(&defaulted),
    ) else {
        return deny(response, "the object cannot be re-encoded as JSON");
    };
    let patch = json_patch::diff(&before, &after);
    if patch.0.is_empty() {
        return response;
    }
    match response.clone().with_patch(patch) {
        Ok(patched) => patched,
        Err(error) => deny(response, &error.to_string()),
    }
}

fn conclude(mut response: AdmissionResponse, verdict: Verdict) -> AdmissionResponse {
    if !verdict.warnings.is_empty() {
        response.warnings = Some(verdict.warnings);
    }
    if verdict.errors.is_empty() {
        return response;
    }
    let message = verdict
        .errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    deny(response, &message)
}

fn deny(mut response: AdmissionResponse, message: &str) -> AdmissionResponse {
    response.allowed = false;
    response.result = Status::failure(message, "Invalid").with_code(422);
    response
}
