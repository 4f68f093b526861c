//! Field checks shared by the validators. Each returns `Err(message)` with the rule broken; the
//! caller adds the field path. Everything that ends up in domain XML, cloud-init, a file path or
//! a libvirt URI goes through one of these.

use std::collections::BTreeMap;

use super::admission::quote;

/// A libvirt object name (network, pool): `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn libvirt_name(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || value.len() > 64
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, got {}",
            quote(value)
        ));
    }
    Ok(())
}

/// A volume (file) name: like a libvirt name plus `+`, up to 255 characters, never `.`/`..`.
pub fn volume_name(value: &str) -> Result<(), String> {
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || value.len() > 255
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '+'))
    {
        return Err(format!(
            "must be a file name of 1-255 letters, digits, '_', '.', '-' or '+', starting with a letter or digit, got {}",
            quote(value)
        ));
    }
    Ok(())
}

/// A DNS-1123 label.
pub fn dns_label(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !ok {
        return Err(format!(
            "must be a DNS label (1-63 lowercase letters, digits or '-', not starting or ending with '-'), got {}",
            quote(value)
        ));
    }
    Ok(())
}

/// Parses a MAC address; rejects multicast and all-zero addresses.
pub fn mac(value: &str) -> Result<[u8; 6], String> {
    let octets: Vec<&str> = value.split(':').collect();
    let parsed: Option<Vec<u8>> = (octets.len() == 6)
        .then(|| {
            octets
                .iter()
                .map(|o| {
                    (o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
                        .then(|| u8::from_str_radix(o, 16).ok())
                        .flatten()
                })
                .collect()
        })
        .flatten();
    let Some(bytes) = parsed else {
        return Err(format!(
            "must be six colon-separated pairs of hex digits, got {}",
            quote(value)
        ));
    };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes);
    if mac[0] & 1 == 1 {
        return Err(format!(
            "must be a unicast address (the first octet's lowest bit clear), got {}",
            quote(value)
        ));
    }
    if mac == [0; 6] {
        return Err("must not be all zeros".into());
    }
    Ok(mac)
}

/// Whether a MAC is locally administered (cannot collide with a vendor-assigned address).
pub fn locally_administered(mac: [u8; 6]) -> bool {
    mac[0] & 0b10 != 0 || mac[..3] == [0x52, 0x54, 0x00]
}

/// Checks a hex digest against its algorithm's length.
pub fn checksum(algorithm: &str, value: &str, expected_len: usize) -> Result<(), String> {
    if !value.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("must be hex digits only for {algorithm}"));
    }
    if value.len() != expected_len {
        return Err(format!(
            "must be {expected_len} hex digits for {algorithm}, got {}",
            value.len()
        ));
    }
    Ok(())
}

/// Key types OpenSSH accepts in `authorized_keys`.
const SSH_KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Characters that end or split a line somewhere downstream: C0 and C1 controls, DEL, and the
/// Unicode line and paragraph separators (YAML, JavaScript and some editors break lines there).
pub fn line_breaking(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Parses one `authorized_keys` line (`type base64 [comment]`): the blob must decode as a public
/// key of the declared type. Returns the key type.
pub fn ssh_key(line: &str) -> Result<&str, String> {
    if let Some(bad) = line.chars().find(|c| line_breaking(*c)) {
        return Err(format!(
            "must be a single line without control characters or line separators, got {bad:?}"
        ));
    }
    let mut parts = line.splitn(3, ' ');
    let (Some(kind), Some(_)) = (parts.next(), parts.next()) else {
        return Err("must be \"<type> <base64 key> [comment]\"".into());
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!("has unknown key type {}", quote(kind)));
    }
    match ssh_key::PublicKey::from_openssh(line) {
        Ok(key) if key.algorithm().as_str() == kind => Ok(kind),
        Ok(_) | Err(ssh_key::Error::AlgorithmUnknown) => {
            Err(format!("key data does not match its type {kind:?}"))
        }
        Err(error) => Err(format!(
            "key data is not a valid {kind} public key ({error})"
        )),
    }
}

/// Why a value is not a DNS-1123 subdomain (apimachinery's `IsDNS1123Subdomain`), if it is not.
fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 253 {
        errors.push("must be no more than 253 characters".to_owned());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !value.split('.').all(label_ok) {
        errors.push("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_owned());
    }
    errors
}

/// A DNS-1123 subdomain (lowercase labels joined by '.', at most 253 characters).
pub fn dns_subdomain(value: &str) -> Result<(), String> {
    match dns1123_subdomain_errors(value).first() {
        None => Ok(()),
        Some(_) => Err(format!(
            "must be a DNS name (a lowercase RFC 1123 subdomain of at most 253 characters) or an IP address, got {}",
            quote(value)
        )),
    }
}

/// A host a client connects to: a DNS-1123 subdomain or a literal IPv4/IPv6 address (IPv6
/// without brackets).
pub fn endpoint_host(value: &str) -> Result<(), String> {
    if value.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    dns_subdomain(value)
}

/// A provider ID: 1-512 printable ASCII characters (no whitespace, controls or non-ASCII).
pub fn provider_id(value: &str) -> Result<(), String> {
    let printable = value.bytes().all(|b| b.is_ascii_graphic());
    if value.is_empty() || value.len() > 512 || !printable {
        return Err(format!(
            "must be 1-512 printable ASCII characters without whitespace or control characters, got {}",
            quote(value)
        ));
    }
    Ok(())
}

const QUALIFIED_NAME_MESSAGE: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, the name part of a qualified name and a non-empty
/// label value.
fn name_chars_ok(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// apimachinery's `IsQualifiedName`: `[prefix/]name`, prefix a DNS-1123 subdomain, name at most 63
/// characters. Returns every message apimachinery would.
pub fn qualified_name(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts[..] {
        [name] => name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else {
                errors.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            name
        }
        _ => {
            errors.push(format!("a qualified name {QUALIFIED_NAME_MESSAGE} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"));
            return errors;
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_owned());
    }
    if !name_chars_ok(name) {
        errors.push(format!("name part {QUALIFIED_NAME_MESSAGE}"));
    }
    errors
}

/// apimachinery's `IsValidLabelValue`: empty, or at most 63 name characters.
pub fn label_value(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 63 {
        errors.push("must be no more than 63 characters".to_owned());
    }
    if !value.is_empty() && !name_chars_ok(value) {
        errors.push("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".to_owned());
    }
    errors
}

/// Most labels or annotations a template may carry.
pub const MAX_TEMPLATE_METADATA_ENTRIES: usize = 64;
/// apimachinery's `TotalAnnotationSizeLimitB`: keys plus values of all annotations.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Labels as apimachinery's `ValidateLabels` checks them, as `(key, message)` pairs.
pub fn labels(labels: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    for (key, value) in labels {
        for message in qualified_name(key) {
            errors.push((key.clone(), message));
        }
        for message in label_value(value) {
            errors.push((value.clone(), message));
        }
    }
    errors
}

/// Annotations as apimachinery's `ValidateAnnotations` checks them: keys are qualified names
/// (checked lowercased, as apimachinery does) and all keys and values together are at most
/// 256 KiB. Returns `(value or "", message)` pairs.
pub fn annotations(annotations: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut total = 0usize;
    for (key, value) in annotations {
        for message in qualified_name(&key.to_lowercase()) {
            errors.push((key.clone(), message));
        }
        total = total.saturating_add(key.len()).saturating_add(value.len());
    }
    if total > MAX_ANNOTATIONS_BYTES {
        errors.push((
            String::new(),
            format!("must have at most {MAX_ANNOTATIONS_BYTES} bytes"),
        ));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert!(mac("52:54:00:12:34:56").is_ok());
        assert!(mac("01:00:5e:00:00:01").unwrap_err().contains("unicast"));
        assert!(mac("00:00:00:00:00:00").unwrap_err().contains("zeros"));
        assert!(mac("52:54:00:zz:00:01").unwrap_err().contains("hex"));
        assert!(mac("52:54:00:12:34").is_err());
        assert!(mac("52:54:00:12:34:5").is_err());
        assert!(mac("+2:54:00:12:34:56").is_err());
        assert!(locally_administered([0x52, 0x54, 0, 1, 2, 3]));
        assert!(locally_administered([0x02, 0, 0, 1, 2, 3]));
        assert!(!locally_administered([0x00, 0x1b, 0x21, 1, 2, 3]));
    }

    #[test]
    fn ssh_keys() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@example";
        assert_eq!(ssh_key(key), Ok("ssh-ed25519"));
        assert!(
            ssh_key("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
                .unwrap_err()
                .contains("does not match")
        );
        assert!(
            ssh_key("ssh-ed25519 !!!")
                .unwrap_err()
                .contains("not a valid")
        );
        assert!(
            ssh_key("ssh-ed25519 AAAA\nruncmd")
                .unwrap_err()
                .contains("single line")
        );
        for separator in ['\u{2028}', '\u{2029}', '\u{85}', '\u{9b}', '\u{1b}', '\0'] {
            let line = format!("{key}{separator}runcmd");
            let err = ssh_key(&line).unwrap_err();
            assert!(err.contains("line separators"), "{separator:?}: {err}");
        }
        // A well-formed blob of another length or structure does not pass as its type.
        let truncated =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9 x";
        assert!(ssh_key(truncated).unwrap_err().contains("not a valid"));
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDDfakeAAAA";
        assert!(ssh_key(rsa).is_err());
        // A huge key is not echoed.
        let huge = format!("ssh-ed25519x {}", "A".repeat(16384));
        assert!(ssh_key(&huge).unwrap_err().len() < 200);
        assert!(
            ssh_key("ssh-foo AAAA")
                .unwrap_err()
                .contains("unknown key type")
        );
    }

    #[test]
    fn names() {
        assert!(libvirt_name("default").is_ok());
        assert!(libvirt_name("../etc").is_err());
        assert!(libvirt_name("a'b").is_err());
        assert!(volume_name("debian-12+v1.qcow2").is_ok());
        assert!(volume_name("..").is_err());
        assert!(volume_name("a/b").is_err());
        assert!(dns_label("host-a").is_ok());
        assert!(dns_label("Host_A").is_err());
        assert!(dns_label("-a").is_err());
    }

    #[test]
    fn endpoint_hosts_and_provider_ids() {
        for ok in [
            "10.0.0.10",
            "api.example.com",
            "2001:db8::10",
            "a",
            "k8s-api.local",
        ] {
            assert!(endpoint_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "api|cluster",
            "API.example.com",
            "[2001:db8::10]",
            "a..b",
            "-a.example.com",
            "a_b.example.com",
            "host:6443",
            "exa\u{0}mple.com",
            "",
        ] {
            assert!(endpoint_host(bad).is_err(), "{bad}");
        }
        assert!(endpoint_host(&"a".repeat(254)).is_err());
        assert!(provider_id("libvirt://host-a/0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c").is_ok());
        for bad in [
            "libvirt://a/\u{0}",
            "libvirt://a/\u{1b}[31m",
            "a b",
            "caf\u{e9}",
            "\u{85}",
            "",
        ] {
            let err = provider_id(bad).unwrap_err();
            assert!(err.contains("printable ASCII"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn labels_and_annotations_follow_apimachinery() {
        assert!(qualified_name("app").is_empty());
        assert!(qualified_name("example.com/MyName").is_empty());
        assert!(qualified_name("cluster.x-k8s.io/cluster-name").is_empty());
        assert_eq!(qualified_name("/a"), vec!["prefix part must be non-empty"]);
        assert_eq!(
            qualified_name("a/"),
            vec![
                "name part must be non-empty".to_owned(),
                format!("name part {QUALIFIED_NAME_MESSAGE}"),
            ]
        );
        assert_eq!(
            qualified_name(&"a".repeat(64)),
            vec!["name part must be no more than 63 characters"]
        );
        assert!(qualified_name("a/b/c")[0].starts_with("a qualified name must consist of"));
        assert!(
            qualified_name("Example.com/a")[0]
                .starts_with("prefix part a lowercase RFC 1123 subdomain")
        );
        assert!(qualified_name("-a")[0].starts_with("name part must consist of"));
        assert!(qualified_name("a\nb")[0].starts_with("name part must consist of"));
        assert!(label_value("").is_empty());
        assert!(label_value("my_value").is_empty());
        assert_eq!(
            label_value(&"a".repeat(64)),
            vec!["must be no more than 63 characters"]
        );
        assert!(label_value("a b")[0].starts_with("a valid label must be an empty string"));
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(labels(&map(&[("pool", "workers")])).is_empty());
        assert_eq!(labels(&map(&[("pool", "a b")])).len(), 1);
        // Annotation keys are checked lowercased; values are free-form, only their size counts.
        assert!(annotations(&map(&[("Example.com/Note", "any\nthing")])).is_empty());
        assert_eq!(annotations(&map(&[("a b", "")])).len(), 1);
        let big = "x".repeat(MAX_ANNOTATIONS_BYTES);
        let errors = annotations(&map(&[("a", &big)]));
        assert_eq!(
            errors,
            vec![(String::new(), "must have at most 262144 bytes".to_owned())]
        );
    }
}
