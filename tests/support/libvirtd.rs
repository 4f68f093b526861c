//! A real libvirtd + QEMU, isolated from the machine:
//!
//! - it runs inside a network namespace the bed creates (`ip netns add`), so its bridges, dnsmasq
//!   and guests exist only there, and only isolated libvirt networks (no `<forward>`) are used;
//! - `ip netns exec` also gives it a private mount namespace, in which `/run/libvirt`,
//!   `/etc/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt` are replaced by
//!   the bed's own directories, so it never collides with (or touches) a system libvirtd;
//! - its client socket lives in the bed's temp dir, reachable from the test process as
//!   `qemu:///system?socket=<dir>/sock/libvirt-sock`.
//!
//! Guests use TCG (`<domain type='qemu'>`): `/dev/kvm` on these machines cannot boot a Linux guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::process::{Lifetime, Proc, pid_alive, poll, terminate};

/// Prefix of every network namespace the bed creates: `capl-<owner pid>-<n>`.
const NETNS_PREFIX: &str = "capl-";

/// A libvirtd running in its own network namespace.
pub struct Libvirtd {
    /// The network namespace libvirtd, its networks and its guests live in.
    pub netns: String,
    /// Client URI for the test process.
    pub uri: String,
    pub dir: PathBuf,
    proc: Option<Proc>,
    lifetime: Lifetime,
}

impl Libvirtd {
    /// Starts libvirtd under `dir` and waits until it accepts connections.
    pub fn start(dir: &Path, lifetime: Lifetime) -> Result<Self> {
        sweep_stale_namespaces();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let netns = match lifetime {
            Lifetime::TestProcess => format!(
                "{NETNS_PREFIX}{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            Lifetime::Detached => format!("{NETNS_PREFIX}dev"),
        };
        let dir = dir.to_owned();
        for sub in ["etc", "run", "lib", "log", "cache", "sock", "images"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{sock}\"\n\
                 unix_sock_ro_perms = \"0700\"\n\
                 unix_sock_rw_perms = \"0700\"\n\
                 auth_unix_ro = \"none\"\n\
                 auth_unix_rw = \"none\"\n\
                 log_outputs = \"3:file:{log}\"\n",
                sock = dir.join("sock").display(),
                log = dir.join("libvirtd.log").display(),
            ),
        )?;
        // Root-owned guests without security labelling or cgroups: the bed's guests are tests'
        // own throwaway VMs, and these machines have neither systemd nor a writable cgroup tree.
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\n\
             group = \"root\"\n\
             dynamic_ownership = 0\n\
             remember_owner = 0\n\
             security_driver = \"none\"\n\
             namespaces = [ ]\n\
             cgroup_controllers = [ ]\n\
             stdio_handler = \"file\"\n",
        )?;

        run(Command::new("ip").args(["netns", "add", &netns]))
            .with_context(|| format!("creating network namespace {netns}"))?;
        let mut this = Self {
            uri: format!(
                "qemu:///system?socket={}",
                dir.join("sock/libvirt-sock").display()
            ),
            netns,
            dir,
            proc: None,
            lifetime,
        };
        this.start_daemon()?;
        Ok(this)
    }

    /// Starts libvirtd (again) in the namespace, on the state under `dir`: a daemon started after
    /// [`Libvirtd::stop_daemon`] finds the guests and networks that kept running (their runtime
    /// state in `/run/libvirt` is a directory of the bed, not a tmpfs that dies with the daemon's
    /// mount namespace) and reconnects to them, as libvirtd does after a restart on a real host.
    pub fn start_daemon(&mut self) -> Result<()> {
        if self.proc.is_some() {
            bail!("libvirtd is already running");
        }
        let script = format!(
            r#"set -eu
for d in /run/libvirt /etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do mkdir -p "$d"; done
mount --bind '{dir}/run' /run/libvirt
mount --bind '{dir}/etc' /etc/libvirt
mount --bind '{dir}/lib' /var/lib/libvirt
mount --bind '{dir}/log' /var/log/libvirt
mount --bind '{dir}/cache' /var/cache/libvirt
ip link set lo up
exec libvirtd -f /etc/libvirt/libvirtd.conf --pid-file '{dir}/libvirtd.pid'
"#,
            dir = self.dir.display()
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "sh", "-c", &script]);
        self.proc = Some(Proc::spawn(
            "libvirtd",
            cmd,
            &self.dir.join("libvirtd.out"),
            self.lifetime,
        )?);
        self.wait_ready()
    }

    /// Stops only the libvirtd process (SIGTERM, as a service restart does): its guests, their
    /// QEMU processes and its networks' dnsmasq keep running, and clients get "connection
    /// refused" until [`Libvirtd::start_daemon`].
    pub fn stop_daemon(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop(Duration::from_secs(10));
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let uri = self.uri.clone();
        let proc = self.proc.as_mut().context("libvirtd not started")?;
        poll(
            "libvirtd to accept connections",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                proc.check_running()?;
                Ok(capl::libvirt::Host::open(&super::host_uri(&uri))
                    .ok()
                    .map(|_| ()))
            },
        )
    }

    /// Opens a connection to this libvirtd.
    /// The URI as the provider checks it.
    pub fn host_uri(&self) -> capl::libvirt::uri::HostUri {
        super::host_uri(&self.uri)
    }

    pub fn connect(&self) -> Result<capl::libvirt::Host> {
        Ok(capl::libvirt::Host::open(&self.host_uri())?)
    }

    /// Directory for disk images the tests create (visible to QEMU in the namespace).
    pub fn images(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// Pids of every process in the namespace (libvirtd, dnsmasq, QEMU).
    pub fn pids(&self) -> Vec<u32> {
        netns_pids(&self.netns)
    }

    /// Opens this libvirtd's client socket to the provider's pods, which run as a non-root uid
    /// and mount the socket's directory (the chart's `libvirt.socket.hostPath`): the socket
    /// becomes 0666 and the directories above it (up to the temp dir or `/`) get o+x. libvirtd
    /// also looks the client's uid up on this machine, so the pods must run as a uid it knows
    /// (e.g. `nobody`, 65534). For a bed's own libvirtd only. Returns the client URI and the
    /// socket's directory.
    pub fn open_socket_to_pods(&self) -> Result<(String, PathBuf)> {
        use std::os::unix::fs::PermissionsExt as _;
        let socket = self.dir.join("sock/libvirt-sock");
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("opening {}", socket.display()))?;
        for dir in socket.ancestors().skip(1) {
            if dir == Path::new("/") || dir == std::env::temp_dir() {
                break;
            }
            let mode = std::fs::metadata(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .permissions()
                .mode();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))
                .with_context(|| format!("opening {}", dir.display()))?;
        }
        let dir = socket
            .parent()
            .context("the socket has a directory")?
            .to_owned();
        Ok((self.host_uri().to_string(), dir))
    }

    /// Detaches for the shell face: `tests/testbed down` stops it by namespace.
    pub fn detach(mut self) -> String {
        if let Some(proc) = self.proc.take() {
            proc.detach();
        }
        std::mem::take(&mut self.netns)
    }

    /// Stops everything in the namespace and deletes it.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop(Duration::from_secs(10));
        }
        if !self.netns.is_empty() {
            destroy_namespace(&self.netns);
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills every process in `netns` (libvirtd first, so it restarts nothing) and deletes it.
pub fn destroy_namespace(netns: &str) {
    for pid in netns_pids(netns) {
        terminate(pid, Duration::from_secs(5));
    }
    let _ = run(Command::new("ip").args(["netns", "del", netns]));
}

fn netns_pids(netns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes namespaces left by test processes that died without cleaning up (SIGKILL).
fn sweep_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if !pid_alive(owner) {
            destroy_namespace(name);
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Defines and starts a directory pool `name` at `dir` (idempotent).
pub fn dir_pool(host: &capl::libvirt::Host, name: &str, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("pool dir");
    let xml = format!(
        "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
        dir.display()
    );
    let pool = host
        .connection()
        .define_storage_pool_xml(&xml, 0)
        .or_else(|_| host.connection().lookup_storage_pool_by_name(name))
        .expect("pool");
    if !pool.is_active().unwrap_or(false) {
        pool.create(0).expect("start pool");
    }
}

/// The bed's libvirtd URI, a connection to it, and a started directory pool `name`.
pub fn bed_pool(
    name: &str,
) -> (
    capl::libvirt::uri::HostUri,
    capl::libvirt::Host,
    std::path::PathBuf,
) {
    let (uri, dir) = {
        let bed = super::shared();
        let libvirtd = bed.libvirtd();
        let libvirtd = libvirtd.as_ref().expect("libvirtd");
        (libvirtd.host_uri(), libvirtd.images().join(name))
    };
    let host = capl::libvirt::Host::open(&uri).expect("connecting to the bed's libvirtd");
    dir_pool(&host, name, &dir);
    (uri, host, dir)
}

/// Runs qemu-img with `args`.
pub fn qemu_img(args: &[&str]) {
    let made = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        made.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// Makes an empty qcow2 image of `size` at `path` with qemu-img.
pub fn qcow2(path: &std::path::Path, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &path.display().to_string(),
        size,
    ]);
}
