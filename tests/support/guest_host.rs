//! A libvirt host ready for machines made by the controllers: a directory storage pool, an
//! isolated network with DHCP (no `<forward>`: no NAT, no route out of the bed's namespace) and
//! the bootable test guest ([`guest_disk`]) as a volume machines name in `spec.image.volume`
//! (the manager refuses loopback image URLs, so the bed cannot serve it over HTTP).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Name of the guest image volume in the pool.
pub const GUEST_VOLUME: &str = "capl-test-guest.img";

/// Builds (once, cached) the bootable raw disk image of the test guest; returns its path.
pub fn guest_disk() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/disk.sh");
    let out = std::process::Command::new(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "building the guest disk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// What [`prepare`] made on a host.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The storage pool (machines' disks and the guest image).
    pub pool: String,
    /// The isolated network machines attach to.
    pub network: String,
    /// The network's subnet prefix, e.g. `10.213.9.`.
    pub subnet: String,
}

/// Defines and starts pool `name` in `pool_dir` and isolated network `name` (bridge `bridge`,
/// subnet `10.213.<octet>.0/24`), and puts the guest image into the pool as [`GUEST_VOLUME`].
/// Idempotent.
pub fn prepare(
    host: &capl::libvirt::Host,
    name: &str,
    pool_dir: &Path,
    bridge: &str,
    octet: u8,
) -> Result<Prepared> {
    super::libvirtd::dir_pool(host, name, pool_dir);
    let disk = guest_disk()?;
    let target = pool_dir.join(GUEST_VOLUME);
    if !target.exists() {
        std::fs::copy(&disk, &target)
            .with_context(|| format!("copying {} into the pool", disk.display()))?;
    }
    let pool = host
        .connection()
        .lookup_storage_pool_by_name(name)
        .context("the pool")?;
    pool.refresh(0).context("refreshing the pool")?;
    let conn = host.connection();
    let network = match conn.lookup_network_by_name(name) {
        Ok(network) => network,
        Err(_) => conn
            .define_network_xml(&format!(
                "<network><name>{name}</name><bridge name='{bridge}'/>\
                 <ip address='10.213.{octet}.1' netmask='255.255.255.0'>\
                 <dhcp><range start='10.213.{octet}.10' end='10.213.{octet}.200'/></dhcp></ip></network>"
            ))
            .context("defining the network")?,
    };
    if !network.is_active().unwrap_or(false) {
        network.create().context("starting the network")?;
    }
    Ok(Prepared {
        pool: name.to_owned(),
        network: name.to_owned(),
        subnet: format!("10.213.{octet}."),
    })
}

/// Names of the volumes in `pool`, sorted.
pub fn volumes(host: &capl::libvirt::Host, pool: &str) -> Result<Vec<String>> {
    let pool = host
        .connection()
        .lookup_storage_pool_by_name(pool)
        .context("the pool")?;
    pool.refresh(0).context("refreshing the pool")?;
    let mut names = pool.list_volumes().context("listing volumes")?;
    names.sort();
    Ok(names)
}

/// Names of the domains on the host, sorted.
pub fn domains(host: &capl::libvirt::Host) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for domain in host
        .connection()
        .list_all_domains(0)
        .context("listing domains")?
    {
        names.push(domain.name().context("a domain's name")?);
    }
    names.sort();
    Ok(names)
}
