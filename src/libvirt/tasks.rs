//! Per-machine serialisation and background work keyed by machine.
//!
//! - [`MachineLocks`]: one lock per machine UUID, held across a whole create or delete. Its guard
//!   is shared ([`MachineGuard`]) with every blocking libvirt call made for the operation, so a
//!   cancelled future cannot let a delete start while a create's libvirt call is still running.
//! - [`Tasks`]: at most one background creation per machine; its progress is polled, its
//!   result is handed out once, and delete cancels it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::backend::MachineState;
use super::error::{BackendError, Step};

/// Proof that the holder may work on a machine; clone it into every blocking call.
pub type MachineGuard = Arc<OwnedMutexGuard<()>>;

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One lock per machine UUID.
#[derive(Default)]
pub struct MachineLocks {
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl MachineLocks {
    /// Waits until no one else works on the machine, then holds it until every clone of the
    /// returned guard is dropped.
    pub async fn lock(&self, uuid: Uuid) -> MachineGuard {
        let lock = {
            let mut locks = locked(&self.locks);
            // Forget locks nobody holds or waits for.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1 || lock.try_lock().is_err());
            locks.entry(uuid).or_default().clone()
        };
        Arc::new(lock.lock_owned().await)
    }
}

/// What a background creation reports.
#[derive(Debug)]
struct Progress {
    step: Step,
    outcome: Option<Result<MachineState, BackendError>>,
}

/// Lets a background creation report the step it is at.
#[derive(Clone)]
pub struct Reporter(Arc<Mutex<Progress>>);

impl Reporter {
    /// Records that the work is at `step` now.
    pub fn step(&self, step: Step) {
        locked(&self.0).step = step;
    }
}

struct Entry {
    handle: JoinHandle<()>,
    progress: Arc<Mutex<Progress>>,
    /// Turns true when the work has ended (its sender is dropped if it was aborted).
    done: tokio::sync::watch::Receiver<bool>,
}

/// What [`Tasks::poll`] found.
#[derive(Debug)]
pub enum Polled {
    /// Still running, at this step.
    Running(Step),
    /// Finished; its result (handed out once).
    Finished(Result<MachineState, BackendError>),
    /// No background work for the machine (never started, already reported, or the task
    /// stopped without a result).
    Idle,
}

/// Background creations, keyed by machine UUID.
#[derive(Default)]
pub struct Tasks {
    entries: Mutex<HashMap<Uuid, Entry>>,
}

impl Tasks {
    /// The machine's background work, taking a finished task's result out.
    pub fn poll(&self, uuid: Uuid) -> Polled {
        let mut entries = locked(&self.entries);
        let Some(entry) = entries.get(&uuid) else {
            return Polled::Idle;
        };
        let (step, outcome) = {
            let mut progress = locked(&entry.progress);
            (progress.step, progress.outcome.take())
        };
        if let Some(outcome) = outcome {
            entries.remove(&uuid);
            return Polled::Finished(outcome);
        }
        if entry.handle.is_finished() {
            entries.remove(&uuid);
            return Polled::Idle;
        }
        Polled::Running(step)
    }

    /// Starts `work` for the machine unless something already runs for it; returns the step
    /// the machine's work is at.
    pub fn start<F, Fut>(&self, uuid: Uuid, first: Step, work: F) -> Step
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = Option<Result<MachineState, BackendError>>> + Send + 'static,
    {
        let mut entries = locked(&self.entries);
        if let Some(entry) = entries.get(&uuid)
            && !entry.handle.is_finished()
        {
            return locked(&entry.progress).step;
        }
        let progress = Arc::new(Mutex::new(Progress {
            step: first,
            outcome: None,
        }));
        let reporter = Reporter(progress.clone());
        let future = work(reporter);
        let report = progress.clone();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let handle = tokio::spawn(async move {
            // `None`: the work stopped without a result (a simulated crash); the next poll
            // finds the machine idle.
            if let Some(outcome) = future.await {
                locked(&report).outcome = Some(outcome);
            }
            let _ = done_tx.send(true);
        });
        entries.insert(
            uuid,
            Entry {
                handle,
                progress,
                done,
            },
        );
        first
    }

    /// Waits until the machine's background work has ended, for at most `within` (at once when
    /// none runs). The result stays for [`Tasks::poll`].
    pub async fn wait(&self, uuid: Uuid, within: Duration) {
        let done = locked(&self.entries).get(&uuid).map(|e| e.done.clone());
        if let Some(mut done) = done {
            let _ = tokio::time::timeout(within, done.wait_for(|ended| *ended)).await;
        }
    }

    /// Cancels the machine's background work and waits until its future is gone (its blocking
    /// libvirt calls may still run: they hold the machine's lock).
    pub async fn cancel(&self, uuid: Uuid) {
        let entry = locked(&self.entries).remove(&uuid);
        if let Some(entry) = entry {
            entry.handle.abort();
            let _ = entry.handle.await;
        }
    }

    /// Whether background work runs for the machine.
    pub fn is_running(&self, uuid: Uuid) -> bool {
        locked(&self.entries)
            .get(&uuid)
            .is_some_and(|entry| !entry.handle.is_finished())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_lock_is_held_while_any_clone_lives() {
        let locks = Arc::new(MachineLocks::default());
        let uuid = Uuid::nil();
        let guard = locks.lock(uuid).await;
        let kept = guard.clone();
        drop(guard);
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(uuid).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a clone still holds the lock");
        drop(kept);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released")
            .expect("join");
    }

    #[tokio::test]
    async fn results_are_handed_out_once_and_cancel_stops_the_work() {
        let tasks = Tasks::default();
        let uuid = Uuid::nil();
        tasks.start(uuid, Step::BaseImage, |_| async {
            Some(Err(BackendError::new(
                super::super::error::ErrorKind::Transient,
                Some(Step::Define),
                "boom",
            )))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(tasks.poll(uuid), Polled::Finished(Err(_))));
        assert!(matches!(tasks.poll(uuid), Polled::Idle));

        tasks.start(uuid, Step::BaseImage, |reporter| async move {
            reporter.step(Step::RootVolume);
            tokio::time::sleep(Duration::from_secs(60)).await;
            None
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            tasks.poll(uuid),
            Polled::Running(Step::RootVolume)
        ));
        tasks.cancel(uuid).await;
        assert!(!tasks.is_running(uuid));
        assert!(matches!(tasks.poll(uuid), Polled::Idle));
    }

    #[tokio::test]
    async fn wait_returns_when_the_work_ends_or_the_bound_passes() {
        let tasks = Tasks::default();
        let uuid = Uuid::nil();
        let started = std::time::Instant::now();
        tasks.wait(uuid, Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "nothing runs");

        tasks.start(uuid, Step::BaseImage, |_| async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Some(Err(BackendError::new(
                super::super::error::ErrorKind::Transient,
                Some(Step::Define),
                "boom",
            )))
        });
        let started = std::time::Instant::now();
        tasks.wait(uuid, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "woken by the end"
        );
        assert!(matches!(tasks.poll(uuid), Polled::Finished(Err(_))));

        tasks.start(uuid, Step::BaseImage, |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            None
        });
        let started = std::time::Instant::now();
        tasks.wait(uuid, Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(50), "bounded");
        assert!(matches!(tasks.poll(uuid), Polled::Running(_)));
        tasks.cancel(uuid).await;
    }
}
