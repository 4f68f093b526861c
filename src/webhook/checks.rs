//! Field checks shared by the validators. Each returns `Err(message)` with the rule broken; the
//! caller adds the field path. Everything that ends up in domain XML, cloud-init, a file path or
//! a libvirt URI goes through one of these.

use base64::Engine as _;
use url::Url;

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
            "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, got {value:?}"
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
            "must be a file name of 1-255 letters, digits, '_', '.', '-' or '+', starting with a letter or digit, got {value:?}"
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
            "must be a DNS label (1-63 lowercase letters, digits or '-', not starting or ending with '-'), got {value:?}"
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
            "must be six colon-separated pairs of hex digits, got {value:?}"
        ));
    };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes);
    if mac[0] & 1 == 1 {
        return Err(format!(
            "must be a unicast address (the first octet's lowest bit clear), got {value:?}"
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

/// An image URL: absolute http(s), with a host, without credentials.
pub fn image_url(value: &str) -> Result<Url, String> {
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    let url = Url::parse(value).map_err(|e| format!("is not an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("must use http or https, got {:?}", url.scheme()));
    }
    let authority_empty = value
        .split_once("://")
        .is_none_or(|(_, rest)| rest.starts_with(['/', '?', '#']));
    if authority_empty || url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials (user:password@); serve the image without them".into(),
        );
    }
    Ok(url)
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

/// Parses one `authorized_keys` line (`type base64 [comment]`); returns the key type.
pub fn ssh_key(line: &str) -> Result<&str, String> {
    if line.chars().any(|c| c.is_control()) {
        return Err("must be a single line without control characters".into());
    }
    let mut parts = line.splitn(3, ' ');
    let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
        return Err("must be \"<type> <base64 key> [comment]\"".into());
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!("has unknown key type {kind:?}"));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("key is not valid base64 ({e})"))?;
    // The blob starts with the key type as an SSH string: u32 length + bytes.
    let embedded = blob.get(4..).zip(blob.get(..4)).and_then(|(rest, len)| {
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        rest.get(..len)
    });
    if embedded != Some(kind.as_bytes()) {
        return Err(format!("key data does not match its type {kind:?}"));
    }
    Ok(kind)
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
    fn urls() {
        assert!(image_url("https://images.example.com/a.qcow2").is_ok());
        assert!(image_url("HTTP://images.example.com/a.qcow2").is_ok());
        assert!(image_url("ftp://x/a").unwrap_err().contains("http"));
        assert!(image_url("/a.qcow2").unwrap_err().contains("absolute"));
        assert!(
            image_url("https://u:p@x/a")
                .unwrap_err()
                .contains("credentials")
        );
        assert!(
            image_url("https://x/a b")
                .unwrap_err()
                .contains("whitespace")
        );
        assert!(image_url("https:///a").is_err());
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
        assert!(ssh_key("ssh-ed25519 !!!").unwrap_err().contains("base64"));
        assert!(
            ssh_key("ssh-ed25519 AAAA\nruncmd")
                .unwrap_err()
                .contains("single line")
        );
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
}
