//! What a workload cluster on the bed's real libvirtd needs beyond the bed itself:
//!
//! - a **routed** libvirt network (`<forward mode='route'>`, no NAT) whose guests the management
//!   side reaches: a veth pair joins the host to libvirtd's network namespace, the host routes
//!   the guests' subnet over it, and the namespace has no route anywhere else, so the guests
//!   reach the host's veth address and each other, nothing beyond;
//! - an HTTP server for the Kubernetes node image ([`super::node_image`]) on the host's veth
//!   address (an address the provider's download rules accept, unlike loopback), so machines
//!   take the provider's normal download-verify-upload path.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::libvirtd::Libvirtd;
use super::process::{Lifetime, Proc, poll};

/// The host side of the veth pair (10.213.40.1/30); the namespace side is .2.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 40, 1);
const NS_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 40, 2);
/// The guests' subnet; the bridge (the guests' gateway and DNS) is .1, DHCP hands out .10-.200.
pub const SUBNET: &str = "10.213.41.0/24";
const BRIDGE_IP: &str = "10.213.41.1";
/// An address of the guests' subnet outside the DHCP range: the workload cluster's
/// control-plane endpoint, which the first control-plane machine takes as a second address.
pub const ENDPOINT_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 41, 250);
/// The host side's name: this prefix and the owner's pid.
const HOST_IF_PREFIX: &str = "cwl-";
/// The interface name inside libvirtd's namespace.
const NS_IF: &str = "cwl0";

/// A routed libvirt network reachable from the host; removed on drop (the libvirt network goes
/// with libvirtd's namespace).
pub struct RoutedNetwork {
    /// The libvirt network's name.
    pub name: String,
    host_if: String,
}

impl RoutedNetwork {
    /// Creates the veth pair into `libvirtd`'s namespace, the host route to [`SUBNET`] and the
    /// libvirt network `name` (bridge `bridge`) on `host`. Idempotent per libvirtd.
    pub fn create(
        libvirtd: &Libvirtd,
        host: &capl::libvirt::Host,
        name: &str,
        bridge: &str,
    ) -> Result<Self> {
        let host_if = format!("{HOST_IF_PREFIX}{}", std::process::id());
        let ns = libvirtd.netns.as_str();
        sweep_stale_links(&host_if);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", NS_IF, "netns", ns,
        ])?;
        let network = Self {
            name: name.to_owned(),
            host_if: host_if.clone(),
        };
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&["addr", "add", &format!("{NS_IP}/30"), "dev", NS_IF])?;
        in_ns(&["link", "set", NS_IF, "up"])?;
        ip(&["route", "replace", SUBNET, "via", &NS_IP.to_string()])?;

        let conn = host.connection();
        let defined = match conn.lookup_network_by_name(name) {
            Ok(defined) => defined,
            Err(_) => conn
                .define_network_xml(&format!(
                    "<network><name>{name}</name><forward mode='route' dev='{NS_IF}'/>\
                     <bridge name='{bridge}'/>\
                     <ip address='{BRIDGE_IP}' netmask='255.255.255.0'>\
                     <dhcp><range start='10.213.41.10' end='10.213.41.200'/></dhcp></ip>\
                     </network>"
                ))
                .context("defining the routed network")?,
        };
        if !defined.is_active().unwrap_or(false) {
            defined.create().context("starting the routed network")?;
        }
        Ok(network)
    }
}

impl Drop for RoutedNetwork {
    fn drop(&mut self) {
        // The route goes with the interface.
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Deletes `own` (left by an earlier bed of this process) and the pairs of beds whose process
/// died (their namespace may outlive them until the next bed's sweep): they hold the addresses
/// and the route.
fn sweep_stale_links(own: &str) {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        let stale = name == own
            || name
                .strip_prefix(HOST_IF_PREFIX)
                .and_then(|pid| pid.parse::<libc::pid_t>().ok())
                .is_some_and(|pid| !super::process::pid_alive(pid));
        if stale {
            let _ = ip(&["link", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An HTTP server for one directory (Python's `http.server`), listening on [`HOST_IP`].
pub struct FileServer {
    /// `http://<host ip>:<port>`.
    pub url: String,
    _proc: Proc,
}

impl FileServer {
    /// Serves `dir` on [`HOST_IP`]; logs go to `log`.
    pub fn start(dir: &Path, log: &Path) -> Result<Self> {
        let port = super::apiserver::free_port()?;
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "http.server", "--bind", &HOST_IP.to_string()])
            .arg("--directory")
            .arg(dir)
            .arg(port.to_string());
        let mut proc = Proc::spawn("image-server", cmd, log, Lifetime::TestProcess)?;
        poll(
            "the image server to listen",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                proc.check_running()?;
                Ok(std::net::TcpStream::connect((HOST_IP, port))
                    .is_ok()
                    .then_some(()))
            },
        )?;
        Ok(Self {
            url: format!("http://{HOST_IP}:{port}"),
            _proc: proc,
        })
    }
}
