//! Child processes of the bed, and the guarantee that none outlives the test binary.
//!
//! - Children of a test binary are spawned from one long-lived "keeper" thread with
//!   `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills them when the test process dies, however it
//!   dies (panic, failed test, SIGKILL). The signal is tied to the spawning *thread*, which is why
//!   test threads (short-lived) never spawn them directly. Each gets a process group of its own,
//!   so the terminal's Ctrl-C (sent to the foreground group) reaches only the launcher, which
//!   may still need them for an orderly end (`tests/testbed run --workload` deletes its Cluster).
//! - Orderly teardown (SIGTERM, then SIGKILL; temp dirs removed) runs at process exit through
//!   [`at_exit`], because libtest exits without dropping statics such as the shared bed.
//! - `Lifetime::Detached` children (the `tests/testbed up` shell face) get their own session and
//!   outlive the launcher until `tests/testbed down`.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a process of the bed may live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Dies with the test process (the kernel sends SIGKILL when it goes).
    TestProcess,
    /// Outlives the launcher; stopped by `tests/testbed down`.
    Detached,
}

/// A running child with its log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, lifetime: Lifetime) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let described = format!("{cmd:?}");
        let child = match lifetime {
            Lifetime::TestProcess => {
                cmd.process_group(0);
                // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                spawn_from_keeper(cmd)
            }
            Lifetime::Detached => {
                // SAFETY: setsid is async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::setsid() < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd.spawn()
            }
        }
        .with_context(|| format!("starting {name} ({described})"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails with the tail of the log when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was stopped", self.name);
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Forgets the child without stopping it (for detached processes).
    pub fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            terminate(child.id(), grace);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Sends SIGTERM to `pid` and waits up to `grace` for it to go, then SIGKILL.
pub fn terminate(pid: u32, grace: Duration) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: plain syscalls on a pid we own.
    unsafe {
        if libc::kill(pid, libc::SIGTERM) != 0 {
            return;
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pid_alive(pid) {
        thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Whether a process exists (zombies of our own children count as gone once reaped).
pub fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.contains(") Z "))
            .unwrap_or(false)
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(file) = File::open(path) else {
        return format!("({} is unreadable)", path.display());
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns on the keeper thread, which lives as long as the process.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        thread::Builder::new()
            .name("testbed-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static: this loop only ends with the process.
            })
            .expect("spawning the keeper thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .map_err(|_| io::Error::other("keeper lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("keeper thread dropped the request"))?
}

type Cleanup = Box<dyn FnOnce() + Send>;

static CLEANUPS: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());

/// Runs `f` when the process exits normally (also after failed tests: libtest calls `exit`).
/// Cleanups run in reverse order of registration.
pub fn at_exit(f: impl FnOnce() + Send + 'static) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        extern "C" fn run_cleanups() {
            let cleanups = match CLEANUPS.lock() {
                Ok(mut list) => std::mem::take(&mut *list),
                Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
            };
            for cleanup in cleanups.into_iter().rev() {
                cleanup();
            }
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(run_cleanups);
        }
    });
    match CLEANUPS.lock() {
        Ok(mut list) => list.push(Box::new(f)),
        Err(poisoned) => poisoned.into_inner().push(Box::new(f)),
    }
}

/// Polls `check` every `every` until it returns `Ok(Some(_))`, fails, or `timeout` passes.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}
