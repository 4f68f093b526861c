//! Which updates of a watched object matter: a watch mapper remembers a digest of the fields a
//! reconcile reads from each object and maps an update only when that digest changed. A Machine
//! or Cluster status write by the Cluster API core (many per machine) then triggers nothing,
//! where it would otherwise reconcile every LibvirtMachine of the cluster again.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Digests not seen for this long are forgotten (the object's next update then counts as a
/// change: one more reconcile, never one less).
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Forgetting runs once per this many updates.
const SWEEP_EVERY: u32 = 4096;

/// The last digest of each watched object.
#[derive(Default)]
pub struct Changes {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    digests: HashMap<String, (u64, Instant)>,
    since_sweep: u32,
}

impl Changes {
    /// Records `fields` as object `key`'s current state; true when that differs from the last
    /// recorded one (or the object is new).
    pub fn changed(&self, key: String, fields: impl Hash) -> bool {
        let mut hasher = DefaultHasher::new();
        fields.hash(&mut hasher);
        let digest = hasher.finish();
        let now = Instant::now();
        let mut seen = match self.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        seen.since_sweep += 1;
        if seen.since_sweep >= SWEEP_EVERY {
            seen.since_sweep = 0;
            seen.digests
                .retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
        }
        seen.digests
            .insert(key, (digest, now))
            .is_none_or(|(before, _)| before != digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_of_the_digested_fields_count() {
        let changes = Changes::default();
        assert!(changes.changed("ns/a".into(), ("x", false)), "new");
        assert!(!changes.changed("ns/a".into(), ("x", false)), "same");
        assert!(
            changes.changed("ns/b".into(), ("x", false)),
            "another object"
        );
        assert!(changes.changed("ns/a".into(), ("x", true)), "changed");
        assert!(!changes.changed("ns/a".into(), ("x", true)));
    }
}
