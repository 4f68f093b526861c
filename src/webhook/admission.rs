//! The admission dispatcher: one [`Admit`] implementation per kind, one entry point
//! ([`review`]) that decodes the object, runs defaulting or validation, and builds the response.

use std::collections::BTreeSet;
use std::fmt;

use kube::core::DynamicObject;
use kube::core::Status;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::{
    GROUP, LibvirtCluster, LibvirtClusterTemplate, LibvirtMachine, LibvirtMachineTemplate, VERSION,
};
use crate::libvirt::uri::UriPolicy;

/// What admission depends on beyond the object itself: the manager's own settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionPolicy {
    /// Which libvirt URIs hosts may use (`--allow-test-driver`).
    pub uri: UriPolicy,
}

/// Longest user value echoed in a message, in characters.
pub const MAX_ECHOED_CHARS: usize = 64;
/// Longest message of one field error, in characters.
pub const MAX_MESSAGE_CHARS: usize = 512;
/// Longest field path in a message, in characters (map keys are part of paths).
pub const MAX_PATH_CHARS: usize = 256;
/// Most field errors listed in one denial; the rest are counted.
pub const MAX_LISTED_ERRORS: usize = 20;

/// A user value as messages quote it: Debug-escaped (control and invisible characters show as
/// escapes) and cut after [`MAX_ECHOED_CHARS`] characters, so a 16 KiB key never comes back whole.
pub fn quote(value: &str) -> String {
    let count = value.chars().count();
    if count <= MAX_ECHOED_CHARS {
        return format!("{value:?}");
    }
    let prefix: String = value.chars().take(MAX_ECHOED_CHARS).collect();
    format!("{prefix:?}… ({count} characters)")
}

/// Cuts `text` after `max` characters, marking the cut with an ellipsis.
fn bounded(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text,
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

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
    /// Path of the field (`spec.hosts[0].uri`).
    pub path: String,
    /// The rule the value broke.
    pub message: String,
}

impl FieldError {
    /// A field error with path and message bounded in length and control characters escaped.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: bounded(escape_controls(&path.into()), MAX_PATH_CHARS),
            message: bounded(escape_controls(&message.into()), MAX_MESSAGE_CHARS),
        }
    }
}

/// `text` with every control character written as its escape (`\u{1b}`), so that no message
/// carries a raw terminal or line control.
fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Shortens every `` `quoted` `` or `"quoted"` span of a message written elsewhere (serde's
/// decoder, the URI parser: they quote the offending value either way) to [`MAX_ECHOED_CHARS`]
/// characters.
pub fn shorten_quoted(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len().min(1024));
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        out.push(c);
        i += 1;
        if c != '`' && c != '"' {
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i] != c {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        let end = i.min(chars.len());
        let span = &chars[start..end];
        if span.len() > MAX_ECHOED_CHARS {
            out.extend(&span[..MAX_ECHOED_CHARS]);
            out.push('…');
        } else {
            out.extend(span);
        }
        if i < chars.len() {
            out.push(c);
            i += 1;
        }
    }
    out
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What validation found: errors deny the request, warnings are shown to the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Broken rules: any one denies the request.
    pub errors: Vec<FieldError>,
    /// Risky but legal values, shown to the user.
    pub warnings: Vec<String>,
}

impl Verdict {
    /// Records a broken rule at `path`.
    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    /// Records a warning at `path`.
    pub fn warn(&mut self, path: impl fmt::Display, message: impl fmt::Display) {
        self.warnings.push(bounded(
            format!("{}: {message}", bounded(path.to_string(), MAX_PATH_CHARS)),
            MAX_MESSAGE_CHARS,
        ));
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

    /// Semantic and cross-field rules, on create and update. On update, an error on a top-level
    /// spec field that did not change is reported as a warning instead (see [`review`]).
    fn validate(&self, policy: &AdmissionPolicy, verdict: &mut Verdict);

    /// What an update may not change.
    fn validate_update(&self, old: &Self, info: &RequestInfo, verdict: &mut Verdict);
}

/// Answers one admission request for `kind` at `endpoint`.
///
/// Updates never wedge on what is already stored: defaulting on UPDATE touches only top-level
/// spec fields that differ from the old object (a metadata-only update, a finalizer removal or
/// setting `providerID` leaves a stored object missing a newer default exactly as it is), and a
/// validation error on a top-level spec field that is unchanged from the old object is reported
/// as a warning rather than denying (the backend checks everything again before acting).
pub fn review(
    kind: Kind,
    endpoint: Endpoint,
    req: &AdmissionRequest<DynamicObject>,
    policy: &AdmissionPolicy,
) -> AdmissionResponse {
    match kind {
        Kind::LibvirtCluster => admit::<LibvirtCluster>(endpoint, req, policy),
        Kind::LibvirtClusterTemplate => admit::<LibvirtClusterTemplate>(endpoint, req, policy),
        Kind::LibvirtMachine => admit::<LibvirtMachine>(endpoint, req, policy),
        Kind::LibvirtMachineTemplate => admit::<LibvirtMachineTemplate>(endpoint, req, policy),
    }
}

fn admit<K: Admit>(
    endpoint: Endpoint,
    req: &AdmissionRequest<DynamicObject>,
    policy: &AdmissionPolicy,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    if req.kind.group != GROUP || req.kind.kind != K::KIND.name() {
        return deny(
            response,
            &bounded(
                format!(
                    "this webhook admits {GROUP}/{}, not {}/{}",
                    K::KIND.name(),
                    req.kind.group,
                    req.kind.kind
                ),
                MAX_MESSAGE_CHARS,
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
    let is_update = req.operation == Operation::Update;
    match endpoint {
        Endpoint::Mutate => {
            // An old object that does not decode gets no protection: default as on create.
            let old = is_update
                .then(|| req.old_object.as_ref().and_then(|o| decode::<K>(o).ok()))
                .flatten();
            default(response, &new, old.as_ref())
        }
        Endpoint::Validate => {
            let mut verdict = Verdict::default();
            new.validate(policy, &mut verdict);
            if is_update {
                match req.old_object.as_ref().map(decode::<K>) {
                    Some(Ok(old)) => {
                        ratchet(&old, &new, &mut verdict);
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
    let value =
        serde_json::to_value(object).map_err(|e| FieldError::new("object", e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        FieldError::new(
            shorten_quoted(&e.path().to_string()),
            shorten_quoted(&e.inner().to_string()),
        )
    })
}

/// The top-level spec fields (`image`, `hosts`, `template`, …) present in either object whose JSON
/// is the same in both (present in one and absent in the other counts as changed).
fn spec_fields_unchanged(old: &Value, new: &Value) -> BTreeSet<String> {
    let empty = Map::new();
    let spec = |v: &Value| v.get("spec").and_then(Value::as_object).cloned();
    let (old, new) = (spec(old), spec(new));
    let (old, new) = (
        old.as_ref().unwrap_or(&empty),
        new.as_ref().unwrap_or(&empty),
    );
    old.keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) == new.get(*k))
        .cloned()
        .collect()
}

/// The top-level spec field an error path points into (`spec.image.url` → `image`).
fn spec_field_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("spec.")?;
    let end = rest.find(['.', '[']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// On update, turns errors on unchanged top-level spec fields into warnings: an object stored
/// before a rule tightened must still take metadata changes (a finalizer removal above all).
fn ratchet<K: Serialize>(old: &K, new: &K, verdict: &mut Verdict) {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return;
    };
    let unchanged = spec_fields_unchanged(&old, &new);
    let (kept, ratcheted): (Vec<FieldError>, Vec<FieldError>) = std::mem::take(&mut verdict.errors)
        .into_iter()
        .partition(|e| spec_field_of(&e.path).is_none_or(|f| !unchanged.contains(f)));
    verdict.errors = kept;
    for error in ratcheted {
        verdict.warn(
            &error.path,
            format!(
                "{} (not enforced: the field is unchanged since it was stored; it must pass when it next changes)",
                error.message
            ),
        );
    }
}

/// Answers with the JSON patch from the object to its defaulted form (none if nothing changes).
/// On update (`old` given), top-level spec fields equal to the old object's stay as they are.
fn default<K: Admit>(
    response: AdmissionResponse,
    object: &K,
    old: Option<&K>,
) -> AdmissionResponse {
    let mut defaulted = object.clone();
    defaulted.apply_defaults();
    let (Ok(before), Ok(mut after)) = (
        serde_json::to_value(object),
        serde_json::to_value(&defaulted),
    ) else {
        return deny(response, "the object cannot be re-encoded as JSON");
    };
    if let Some(old) = old.and_then(|o| serde_json::to_value(o).ok()) {
        let field_of = |v: &Value, k: &str| v.get("spec").and_then(|s| s.get(k)).cloned();
        if let Some(spec) = after.get_mut("spec").and_then(Value::as_object_mut) {
            let mut keys: BTreeSet<String> = spec.keys().cloned().collect();
            if let Some(stored) = before.get("spec").and_then(Value::as_object) {
                keys.extend(stored.keys().cloned());
            }
            for field in keys {
                let written = field_of(&before, &field);
                if written != field_of(&old, &field) {
                    continue;
                }
                match written {
                    Some(value) => spec.insert(field, value),
                    None => spec.remove(&field),
                };
            }
        }
    }
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
    let mut listed: Vec<String> = verdict
        .errors
        .iter()
        .take(MAX_LISTED_ERRORS)
        .map(ToString::to_string)
        .collect();
    if verdict.errors.len() > MAX_LISTED_ERRORS {
        listed.push(format!(
            "and {} more errors",
            verdict.errors.len() - MAX_LISTED_ERRORS
        ));
    }
    deny(response, &listed.join("; "))
}

fn deny(mut response: AdmissionResponse, message: &str) -> AdmissionResponse {
    response.allowed = false;
    response.result = Status::failure(message, "Invalid").with_code(422);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_escaped_and_cut() {
        assert_eq!(quote("a\u{1b}b"), "\"a\\u{1b}b\"");
        let long = "x".repeat(16 * 1024);
        let quoted = quote(&long);
        assert!(
            quoted.len() < 100 && quoted.ends_with("… (16384 characters)"),
            "{quoted}"
        );
        let message = shorten_quoted(&format!("unknown variant `{long}`, expected `kvm`"));
        assert_eq!(
            message,
            format!(
                "unknown variant `{}…`, expected `kvm`",
                "x".repeat(MAX_ECHOED_CHARS)
            )
        );
        let message = shorten_quoted(&format!("got \"a\\\"{long}\" here"));
        assert!(
            message.len() < 100 && message.ends_with("…\" here"),
            "{message}"
        );
        let error = FieldError::new("spec.x", format!("raw \u{1b}[2J {long}"));
        assert!(
            error.message.starts_with("raw \\u{1b}[2J x"),
            "{}",
            error.message
        );
        assert_eq!(error.message.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn errors_point_into_top_level_spec_fields() {
        assert_eq!(spec_field_of("spec.image.url"), Some("image"));
        assert_eq!(spec_field_of("spec.hosts[0].uri"), Some("hosts"));
        assert_eq!(spec_field_of("spec.providerID"), Some("providerID"));
        assert_eq!(
            spec_field_of("spec.template.metadata.labels"),
            Some("template")
        );
        assert_eq!(spec_field_of("metadata.name"), None);
    }
}
