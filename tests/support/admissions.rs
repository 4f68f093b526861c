//! A stream of admissions through the real apiserver, to count what a change (an upgrade, a
//! certificate rotation) loses: server-side dry-run creates of one object, back to back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What a stream saw.
#[derive(Debug)]
pub struct Counted {
    pub allowed: usize,
    pub failed: usize,
    /// kubectl's message of every failure.
    pub failures: Vec<String>,
}

/// Dry-run creates of one manifest until [`Stream::stop`].
pub struct Stream {
    stop: Arc<AtomicBool>,
    allowed: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Stream {
    /// Starts creating `manifest` (JSON or YAML) with `kubectl create --dry-run=server`.
    pub fn start(bed: &'static super::TestBed, manifest: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let allowed = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, allowed, failures) = (stop.clone(), allowed.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out =
                        bed.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], &manifest);
                    if out.status.success() {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    } else if let Ok(mut failures) = failures.lock() {
                        failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                }
            })
        };
        Self {
            stop,
            allowed,
            failures,
            thread: Some(thread),
        }
    }

    /// How many were allowed so far.
    pub fn allowed(&self) -> usize {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Stops the stream and returns its counts.
    pub fn stop(mut self) -> Counted {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        Counted {
            allowed: self.allowed(),
            failed: failures.len(),
            failures,
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
