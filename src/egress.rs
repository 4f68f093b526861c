//! Where user input may make the manager connect.
//!
//! Image URLs and hypervisor hosts come from LibvirtClusters and LibvirtMachines, so whoever may
//! create those objects chooses a target the manager connects to from inside the management
//! cluster. These rules keep such targets off the manager's own loopback, link-local addresses
//! (cloud metadata services at `169.254.169.254` and friends) and addresses that mean "this host".
//!
//! Checks are made on the value as the consumer parses it: image URLs through the WHATWG parser
//! (the `url` crate, which the HTTP client uses too), so every spelling of an address
//! (`2852039166`, `0x7f.1`, `[::ffff:169.254.169.254]`) is checked as the address it becomes. The
//! downloader checks the resolved address again at connect time (DNS names can point anywhere).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// Why an address may not be a target, or `None` when it may.
pub fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if a == 0 {
        // 0.0.0.0/8 means "this host": Linux connects it to the local machine.
        Some("an unspecified (this-host) address")
    } else if ip.is_link_local() {
        Some("a link-local address (cloud metadata services live there)")
    } else if ip.is_broadcast() || ip.is_multicast() {
        Some("a broadcast or multicast address")
    } else if (a, b) == (100, 100) && ip.octets()[2..] == [100, 200] {
        Some("a cloud metadata address")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_unspecified() {
        return Some("an unspecified (this-host) address");
    }
    if ip.is_unicast_link_local() {
        return Some("a link-local address (cloud metadata services live there)");
    }
    if ip.is_multicast() {
        return Some("a broadcast or multicast address");
    }
    // fd00:ec2::254: a cloud metadata service's IPv6 address.
    if segments == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254] {
        return Some("a cloud metadata address");
    }
    // IPv4 carried inside IPv6: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d) and the NAT64
    // well-known prefix (64:ff9b::/96) all reach the IPv4 address they embed.
    let embedded = Ipv4Addr::new(
        (segments[6] >> 8) as u8,
        segments[6] as u8,
        (segments[7] >> 8) as u8,
        segments[7] as u8,
    );
    let carries_v4 = matches!(segments[..6], [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0, 0])
        || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if carries_v4 {
        return forbidden_v4(embedded);
    }
    None
}

/// Why a host name may not be a target (`localhost` and its sub-domains always resolve to the
/// local machine), or `None`.
pub fn forbidden_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    (name == "localhost" || name.ends_with(".localhost")).then_some("the local machine")
}

/// An image URL the manager may download: absolute http(s), with a host that is neither
/// loopback nor link-local in any spelling, no credentials, and no control characters raw or
/// percent-encoded. Returns the URL as the HTTP client will see it.
pub fn image_url(value: &str) -> Result<Url, String> {
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    let url = Url::parse(value).map_err(|e| format!("is not an absolute URL ({e})"))?;
    check_image_url(&url)?;
    // The WHATWG parser reads `https:///a` as host `a`; what the user wrote names no host.
    let authority_empty = value
        .split_once("://")
        .is_none_or(|(_, rest)| rest.starts_with(['/', '?', '#']));
    if authority_empty {
        return Err("must name a host".into());
    }
    Ok(url)
}

/// The rules of [`image_url`] on a parsed URL (the downloader applies them to every redirect).
pub fn check_image_url(url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("must use http or https, got {:?}", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials (user:password@); serve the image without them".into(),
        );
    }
    match url.host() {
        None => return Err("must name a host".into()),
        Some(Host::Domain("")) => return Err("must name a host".into()),
        Some(Host::Domain(name)) => {
            if let Some(why) = forbidden_name(name) {
                return Err(format!("must not point at {why} ({name:?})"));
            }
        }
        Some(Host::Ipv4(ip)) => {
            if let Some(why) = forbidden_v4(ip) {
                return Err(format!("must not point at {why} ({ip})"));
            }
        }
        Some(Host::Ipv6(ip)) => {
            if let Some(why) = forbidden_v6(ip) {
                return Err(format!("must not point at {why} ({ip})"));
            }
        }
    }
    let decoded = |part: &str| percent_encoding::percent_decode_str(part).collect::<Vec<u8>>();
    for part in [url.path(), url.query().unwrap_or_default()] {
        if decoded(part).iter().any(|b| b.is_ascii_control()) {
            return Err("must not contain control characters, raw or percent-encoded".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_metadata_and_loopback_is_refused() {
        for bad in [
            "http://169.254.169.254/latest/meta-data/",
            "http://2852039166/x",
            "http://0xa9fea9fe/x",
            "http://0251.0376.0251.0376/x",
            "http://169.254.43518/x",
            "http://127.0.0.1/x",
            "http://0x7f.1/x",
            "http://127.1/x",
            "http://0/x",
            "http://0.0.0.0:8080/x",
            "http://[::1]/x",
            "http://[::]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[::127.0.0.1]/x",
            "http://[64:ff9b::a9fe:a9fe]/x",
            "http://[fe80::1]/x",
            "http://[fd00:ec2::254]/x",
            "http://100.100.100.200/x",
            "http://localhost/x",
            "http://LOCALHOST./x",
            "http://api.localhost/x",
            "http://%6c%6fcalhost/x",
        ] {
            let err = image_url(bad).expect_err(bad);
            assert!(err.contains("must not point at"), "{bad}: {err}");
        }
    }

    #[test]
    fn encoded_control_bytes_and_credentials_are_refused() {
        for (bad, why) in [
            ("https://images.example.com/a%00.qcow2", "control"),
            (
                "https://images.example.com/a.qcow2?x=%0d%0aHost:%20evil",
                "control",
            ),
            ("https://images.example.com/a%1b[31m", "control"),
            ("https://u:p@images.example.com/a", "credentials"),
            ("https://u@images.example.com/a", "credentials"),
            ("ftp://images.example.com/a", "http or https"),
            ("file:///etc/passwd", "http or https"),
            ("https://images.example.com/a b", "whitespace"),
        ] {
            let err = image_url(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn ordinary_and_private_mirrors_are_allowed() {
        for ok in [
            "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2",
            "http://10.0.0.5:8080/images/a.qcow2",
            "http://192.168.1.10/a.qcow2",
            "http://[2001:db8::1]/a.qcow2",
            "https://images.example.com/a%20b.qcow2",
        ] {
            assert!(image_url(ok).is_ok(), "{ok}: {:?}", image_url(ok));
        }
    }
}
