//! The backend's one error type: which step failed, what kind of failure it is (what a
//! controller does next depends on it), and a message safe to copy into a status condition.

use std::fmt;

/// Longest message a [`BackendError`] keeps (condition messages and Events stay readable).
pub const MAX_MESSAGE: usize = 512;

/// A step of a backend operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Fetching the base image into the host's pool.
    BaseImage,
    /// Creating the root disk (an overlay on the base image).
    RootVolume,
    /// Creating the data disks.
    DataVolumes,
    /// Writing the bootstrap data (NoCloud seed or Ignition config).
    Bootstrap,
    /// Defining the domain.
    Define,
    /// Starting the domain.
    Start,
    /// Finding the machine's domain and checking it is ours.
    Lookup,
    /// Asking the guest to shut down (ACPI).
    Shutdown,
    /// Stopping the domain hard.
    Destroy,
    /// Removing the domain's definition.
    Undefine,
    /// Deleting the machine's volumes.
    DeleteVolumes,
}

impl Step {
    /// The steps of creation, in order.
    pub const CREATE: [Step; 6] = [
        Step::BaseImage,
        Step::RootVolume,
        Step::DataVolumes,
        Step::Bootstrap,
        Step::Define,
        Step::Start,
    ];

    /// The CamelCase name used in condition reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::BaseImage => "BaseImage",
            Step::RootVolume => "RootVolume",
            Step::DataVolumes => "DataVolumes",
            Step::Bootstrap => "Bootstrap",
            Step::Define => "Define",
            Step::Start => "Start",
            Step::Lookup => "Lookup",
            Step::Shutdown => "Shutdown",
            Step::Destroy => "Destroy",
            Step::Undefine => "Undefine",
            Step::DeleteVolumes => "DeleteVolumes",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of failure an error is; decides whether a controller retries and what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Worth retrying as is (a busy host, a failed download, an unexpected libvirt error).
    Transient,
    /// Retrying cannot help until the spec or the host's configuration changes (a missing pool
    /// or network, a checksum mismatch, XML libvirt rejects).
    Invalid,
    /// The host did not answer (connection refused or lost, call timed out).
    HostUnreachable,
    /// The domain with the machine's UUID belongs to another object: never touched.
    Conflict,
}

/// A failed backend operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", step.map(|s| format!("{s}: ")).unwrap_or_default())]
pub struct BackendError {
    /// The step that failed, when the operation has steps.
    pub step: Option<Step>,
    /// What kind of failure it is.
    pub kind: ErrorKind,
    /// Sanitised, bounded description (safe for conditions and Events).
    pub message: String,
}

impl BackendError {
    /// An error whose message may carry libvirt or HTTP text: control characters become spaces,
    /// runs of whitespace collapse, and the message is cut to [`MAX_MESSAGE`] characters.
    pub fn new(kind: ErrorKind, step: Option<Step>, message: impl AsRef<str>) -> Self {
        Self {
            step,
            kind,
            message: sanitise(message.as_ref()),
        }
    }

    /// The same error, recorded as failing at `step` (unless it already names one).
    pub fn at(mut self, step: Step) -> Self {
        self.step.get_or_insert(step);
        self
    }

    /// A CamelCase reason for a status condition.
    pub fn reason(&self) -> String {
        match self.kind {
            ErrorKind::HostUnreachable => "HostUnreachable".into(),
            ErrorKind::Conflict => "DomainOwnedByAnotherObject".into(),
            ErrorKind::Invalid => match self.step {
                Some(step) => format!("{step}Invalid"),
                None => "Invalid".into(),
            },
            ErrorKind::Transient => match self.step {
                Some(step) => format!("{step}Failed"),
                None => "BackendFailed".into(),
            },
        }
    }
}

/// Removes control characters, collapses whitespace and bounds the length.
pub fn sanitise(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE));
    let mut count = 0;
    let mut space = false;
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if space || out.is_empty() {
                continue;
            }
            space = true;
        } else {
            space = false;
        }
        if count == MAX_MESSAGE {
            out.push('…');
            return out;
        }
        out.push(c);
        count += 1;
    }
    out.trim_end().to_owned()
}

impl From<super::Error> for BackendError {
    fn from(error: super::Error) -> Self {
        BackendError::new(kind_of(&error), None, error.to_string())
    }
}

impl From<super::image::Error> for BackendError {
    fn from(error: super::image::Error) -> Self {
        let kind = match &error {
            super::image::Error::Libvirt(inner) => kind_of(inner),
            e if e.is_permanent() => ErrorKind::Invalid,
            _ => ErrorKind::Transient,
        };
        BackendError::new(kind, None, error.to_string())
    }
}

impl From<crate::cloudinit::Error> for BackendError {
    fn from(error: crate::cloudinit::Error) -> Self {
        BackendError::new(ErrorKind::Invalid, Some(Step::Bootstrap), error.to_string())
    }
}

/// The kind of a libvirt-layer error.
pub fn kind_of(error: &super::Error) -> ErrorKind {
    use super::Error;
    use virt::error::ErrorNumber as N;
    if error.is_connection_lost() {
        return ErrorKind::HostUnreachable;
    }
    match error {
        Error::Connect { .. } | Error::Closed(_) | Error::Timeout { .. } => {
            ErrorKind::HostUnreachable
        }
        Error::Xml(_) | Error::Missing(_) | Error::Unsupported(_) => ErrorKind::Invalid,
        Error::Conflict(_) => ErrorKind::Conflict,
        Error::Worker(_) => ErrorKind::Transient,
        Error::Call { error, .. } => match error.code().known() {
            Some(
                N::NoStoragePool
                | N::NoNetwork
                | N::XmlError
                | N::XmlDetail
                | N::InvalidArg
                | N::NoSupport
                | N::ArgumentUnsupported
                | N::ConfigUnsupported
                | N::NoStorageVolume,
            ) => ErrorKind::Invalid,
            Some(N::OperationTimeout | N::AgentUnresponsive) => ErrorKind::HostUnreachable,
            _ => ErrorKind::Transient,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_text_is_sanitised_and_bounded() {
        let raw = format!(
            "internal error: process exited while connecting to monitor:\n\
             2026-11-25T10:00:00.000000Z qemu-system-x86_64: -blockdev {{\"driver\":\"file\"}}:\r\n\
             \tCould not open '/var/lib/x': Permission denied\u{1b}[31m{}",
            "x".repeat(2000)
        );
        let error = BackendError::new(ErrorKind::Transient, Some(Step::Start), &raw);
        assert!(
            !error.message.chars().any(char::is_control),
            "{:?}",
            error.message
        );
        assert!(error.message.chars().count() <= MAX_MESSAGE + 1);
        assert!(error.message.starts_with("internal error: process exited"));
        assert!(error.message.contains("monitor: 2026-11-25"));
        assert!(error.to_string().starts_with("Start: internal error"));
        assert_eq!(error.reason(), "StartFailed");
    }

    #[test]
    fn reasons_are_camel_case_per_kind() {
        let e = |kind, step| BackendError::new(kind, step, "m");
        assert_eq!(
            e(ErrorKind::HostUnreachable, Some(Step::Define)).reason(),
            "HostUnreachable"
        );
        assert_eq!(
            e(ErrorKind::Invalid, Some(Step::BaseImage)).reason(),
            "BaseImageInvalid"
        );
        assert_eq!(
            e(ErrorKind::Conflict, None).reason(),
            "DomainOwnedByAnotherObject"
        );
        assert_eq!(e(ErrorKind::Transient, None).to_string(), "m");
    }
}
