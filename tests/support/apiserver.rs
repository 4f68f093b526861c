//! A real Kubernetes control plane on loopback: etcd + kube-apiserver, built from the pinned Go
//! modules, with generated certificates and an admin kubeconfig.
//!
//! In node mode ([`PlaneOptions::node_address`]) the apiserver listens on the host side of the
//! node's veth pair instead (so the kubelet and Pods reach it), and kube-controller-manager and
//! kube-scheduler run beside it (so Deployments get Pods and Pods get the node).

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::certs::{self, Ca};
use super::process::{Lifetime, Proc, poll};
use super::tools::Tools;

/// How the control plane is started. The default is the plain bed: everything on 127.0.0.1, no
/// controllers, no nodes.
#[derive(Debug, Clone, Default)]
pub struct PlaneOptions {
    /// Node mode: the address the apiserver binds to and advertises (the host side of the node's
    /// veth pair). Also keeps the `kubernetes` Service's endpoints, authorizes kubelets (Node
    /// authorizer), reaches webhook Services through their endpoint IPs
    /// (`--enable-aggregator-routing`), and starts kube-controller-manager and kube-scheduler.
    pub node_address: Option<Ipv4Addr>,
}

/// The first IP of the service CIDR: the `kubernetes` Service's ClusterIP.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The service CIDR of every bed.
pub const SERVICE_CIDR: &str = "10.96.0.0/24";

/// etcd and kube-apiserver, listening on 127.0.0.1 only (node mode: on the node's host-side
/// address, with kube-controller-manager and kube-scheduler).
pub struct ControlPlane {
    /// `https://<address>:<port>`
    pub url: String,
    /// The address the apiserver listens on (127.0.0.1 unless in node mode).
    pub address: Ipv4Addr,
    /// Admin kubeconfig (user `admin` in group `system:masters`).
    pub kubeconfig: PathBuf,
    /// The CA every certificate of the bed chains to.
    pub ca: Ca,
    pub ca_file: PathBuf,
    pub dir: PathBuf,
    kubectl: PathBuf,
    /// Stopped in reverse order: apiserver first, then etcd.
    procs: Vec<Proc>,
    /// How kube-apiserver was started (for [`ControlPlane::start_apiserver`]).
    apiserver: (PathBuf, Vec<String>, Lifetime),
}

/// Ports [`free_port`] hands out: below Linux's ephemeral range (32768–60999), so that no
/// outgoing connection takes one between the check and the server's own bind (a port the OS
/// picked for `:0` is in that range, and lost that race under load: "bind: address already in
/// use").
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A TCP port free on every address, never handed out twice by this process. Each process
/// starts at its own offset, so concurrent beds rarely probe the same ports.
pub fn free_port() -> Result<u16> {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let span = PORTS.end - PORTS.start;
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..span {
        let offset = next.unwrap_or_else(|| (std::process::id() % u32::from(span)) as u16);
        *next = Some((offset + 1) % span);
        let port = PORTS.start + offset;
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port in {PORTS:?}")
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver under `dir` and waits until `/readyz` answers.
    pub fn start(tools: &Tools, dir: &Path, lifetime: Lifetime) -> Result<Self> {
        Self::start_with(tools, dir, lifetime, &PlaneOptions::default())
    }

    /// [`ControlPlane::start`] with options (node mode).
    pub fn start_with(
        tools: &Tools,
        dir: &Path,
        lifetime: Lifetime,
        options: &PlaneOptions,
    ) -> Result<Self> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        let ca = Ca::new("capl-testbed-ca")?;
        let ca_file = pki.join("ca.crt");
        ca.write(&ca_file)?;
        let address = options.node_address.unwrap_or(Ipv4Addr::LOCALHOST);
        let address_text = address.to_string();
        let mut sans = vec!["127.0.0.1", "localhost", "kubernetes.default.svc"];
        if options.node_address.is_some() {
            sans.extend([
                address_text.as_str(),
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc.cluster.local",
            ]);
        }
        let serving =
            ca.server("kube-apiserver", &sans)?
                .write(&pki, "apiserver.crt", "apiserver.key")?;
        let admin =
            ca.client("admin", &["system:masters"])?
                .write(&pki, "admin.crt", "admin.key")?;
        let (sa_private, sa_public) = certs::key_pair_pem()?;
        let (sa_key, sa_pub) = (pki.join("sa.key"), pki.join("sa.pub"));
        std::fs::write(&sa_key, sa_private)?;
        std::fs::write(&sa_pub, sa_public)?;

        let (etcd_client, etcd_peer, secure_port) = (free_port()?, free_port()?, free_port()?);
        let mut procs = Vec::new();

        let mut etcd = Command::new(&tools.etcd);
        let client_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        etcd.arg("--name=capl")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=capl={peer_url}"))
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        procs.push(Proc::spawn("etcd", etcd, &dir.join("etcd.log"), lifetime)?);

        let mut apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={client_url}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={secure_port}"),
            format!("--cert-dir={}", pki.display()),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-private-key-file={}", serving.key.display()),
            format!("--client-ca-file={}", ca_file.display()),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        if options.node_address.is_some() {
            // The kubelet's own identity (system:node:<name>) is authorized by the Node
            // authorizer; the apiserver reaches kubelets (logs, exec) with a client certificate
            // and webhook Services through their endpoint IPs; the `kubernetes` Service keeps
            // its endpoint (the lease reconciler is the default).
            let kubelet_client = ca
                .client("kube-apiserver-kubelet-client", &["system:masters"])?
                .write(&pki, "kubelet-client.crt", "kubelet-client.key")?;
            apiserver_args.extend([
                "--authorization-mode=Node,RBAC".into(),
                "--enable-aggregator-routing=true".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    kubelet_client.cert.display()
                ),
                format!("--kubelet-client-key={}", kubelet_client.key.display()),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]);
        } else {
            apiserver_args.extend([
                "--authorization-mode=RBAC".into(),
                "--endpoint-reconciler-type=none".into(),
            ]);
        }
        let mut apiserver = Command::new(&tools.kube_apiserver);
        apiserver.args(&apiserver_args);
        procs.push(Proc::spawn(
            "kube-apiserver",
            apiserver,
            &dir.join("kube-apiserver.log"),
            lifetime,
        )?);

        let url = format!("https://{address}:{secure_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            client_kubeconfig(&url, &ca_file, "admin", &admin.cert, &admin.key),
        )?;

        let mut plane = Self {
            url,
            address,
            kubeconfig,
            ca,
            ca_file,
            dir: dir.to_owned(),
            kubectl: tools.kubectl.clone(),
            procs,
            apiserver: (tools.kube_apiserver.clone(), apiserver_args, lifetime),
        };
        plane.wait_ready()?;
        if options.node_address.is_some() {
            plane.start_controllers(tools, &sa_key)?;
        }
        Ok(plane)
    }

    /// Node mode: kube-controller-manager (per-controller service-account credentials, as kubeadm
    /// runs it) and kube-scheduler, on loopback ports, without leader election.
    fn start_controllers(&mut self, tools: &Tools, sa_key: &Path) -> Result<()> {
        let (Some(kcm), Some(scheduler)) = (
            tools.kube_controller_manager.as_ref(),
            tools.kube_scheduler.as_ref(),
        ) else {
            bail!(
                "node mode needs kube-controller-manager and kube-scheduler; run `tests/tools/install.sh`"
            );
        };
        let lifetime = self.apiserver.2;
        let kcm_kubeconfig =
            self.write_kubeconfig("system:kube-controller-manager", &[], "controller-manager")?;
        let mut cmd = Command::new(kcm);
        cmd.arg(format!("--kubeconfig={}", kcm_kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kcm_kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kcm_kubeconfig.display()
            ))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()?))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kcm-certs").display()
            ))
            .arg("--use-service-account-credentials=true")
            .arg(format!("--root-ca-file={}", self.ca_file.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                sa_key.display()
            ))
            .arg("--leader-elect=false")
            // Its default (/usr/libexec/kubernetes/...) would be created on the machine.
            .arg(format!(
                "--flex-volume-plugin-dir={}",
                self.dir.join("flexvolume").display()
            ))
            .arg("--v=1");
        self.procs.push(Proc::spawn(
            "kube-controller-manager",
            cmd,
            &self.dir.join("kube-controller-manager.log"),
            lifetime,
        )?);
        let scheduler_kubeconfig =
            self.write_kubeconfig("system:kube-scheduler", &[], "scheduler")?;
        let mut cmd = Command::new(scheduler);
        cmd.arg(format!("--kubeconfig={}", scheduler_kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                scheduler_kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                scheduler_kubeconfig.display()
            ))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()?))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("scheduler-certs").display()
            ))
            .arg("--leader-elect=false")
            .arg("--v=1");
        self.procs.push(Proc::spawn(
            "kube-scheduler",
            cmd,
            &self.dir.join("kube-scheduler.log"),
            lifetime,
        )?);
        Ok(())
    }

    /// Issues a client certificate for `user` in `groups` from the bed's CA and writes a
    /// kubeconfig for it at `<dir>/<name>.kubeconfig` (certificate and key beside it).
    pub fn write_kubeconfig(&self, user: &str, groups: &[&str], name: &str) -> Result<PathBuf> {
        let pki = self.dir.join("pki");
        let pair = self.ca.client(user, groups)?.write(
            &pki,
            &format!("{name}.crt"),
            &format!("{name}.key"),
        )?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            client_kubeconfig(&self.url, &self.ca_file, user, &pair.cert, &pair.key),
        )?;
        Ok(path)
    }

    /// Fails with the log tail of the first component that exited.
    pub fn check_running(&mut self) -> Result<()> {
        for proc in &mut self.procs {
            proc.check_running()?;
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        poll(
            "kube-apiserver /readyz",
            Duration::from_secs(90),
            Duration::from_millis(250),
            || {
                for proc in &mut self.procs {
                    proc.check_running()?;
                }
                let out = self.kubectl(&["get", "--raw", "/readyz"])?;
                Ok(out.status.success().then_some(()))
            },
        )
    }

    /// Runs the real `kubectl` against this plane.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        kubectl(&self.kubectl, &self.kubeconfig, args, None)
    }

    /// Runs `kubectl` with `stdin` piped in.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<Output> {
        kubectl(&self.kubectl, &self.kubeconfig, args, Some(stdin))
    }

    /// Runs `kubectl` and fails with its stderr unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Pids of the processes, in start order (for the shell face's state file).
    pub fn detach(mut self) -> Vec<(String, u32)> {
        std::mem::take(&mut self.procs)
            .into_iter()
            .map(|proc| (proc.name().to_owned(), proc.detach()))
            .collect()
    }

    /// Kills kube-apiserver (SIGKILL: no graceful shutdown, its connections just break); etcd
    /// keeps running. Clients get "connection refused" until [`ControlPlane::start_apiserver`].
    pub fn kill_apiserver(&mut self) -> Result<()> {
        let Some(index) = self.procs.iter().position(|p| p.name() == "kube-apiserver") else {
            bail!("kube-apiserver is not running");
        };
        let mut proc = self.procs.remove(index);
        let pid = libc::pid_t::try_from(proc.pid())?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        proc.stop(Duration::ZERO);
        Ok(())
    }

    /// Starts kube-apiserver again, with the same flags (port, certificates, etcd), and waits until
    /// it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.procs.iter().any(|p| p.name() == "kube-apiserver") {
            bail!("kube-apiserver is already running");
        }
        let (binary, args, lifetime) = &self.apiserver;
        let mut cmd = Command::new(binary);
        cmd.args(args);
        self.procs.push(Proc::spawn(
            "kube-apiserver",
            cmd,
            &self.dir.join("kube-apiserver.log"),
            *lifetime,
        )?);
        self.wait_ready()
    }

    /// Stops the apiserver, then etcd.
    pub fn stop(&mut self) {
        while let Some(mut proc) = self.procs.pop() {
            proc.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the real `kubectl` with a kubeconfig.
pub fn kubectl(
    kubectl: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output> {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new(kubectl);
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Some(input) = stdin else {
        return cmd.output().context("running kubectl");
    };
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().context("running kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

fn client_kubeconfig(server: &str, ca: &Path, user: &str, cert: &Path, key: &Path) -> String {
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {server}
    certificate-authority: {ca}
contexts:
- name: testbed
  context:
    cluster: testbed
    user: {user}
    namespace: default
current-context: testbed
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
"#,
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}
