//! What the refresher keeps in this process: one lock per lineage in
//! flight, the refresh answers the database did not take, and the name this
//! replica holds the database lease under. The refresh itself is
//! [`super::refresh`]; this part needs nothing of the app, so the app's
//! state can own it without depending on the code that needs the app.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use secrecy::SecretString;
use tokio::sync::Mutex;

use crate::vault::crypto::random_token;
use crate::vault::{Lineage, TokenSet};

/// A refresh answer the database did not take: it is stored by the next
/// caller before anything else happens (the refresh token it replaced is
/// spent at the IdP, so this is the only copy of the lineage's future).
pub(super) struct Unsaved {
    /// The lineage the refresh started from.
    pub(super) base: Lineage,
    /// The tokens the IdP answered with.
    pub(super) tokens: TokenSet,
    /// The answer's ID token, not verified yet.
    pub(super) pending_id_token: Option<SecretString>,
}

/// What this process knows about one lineage, under its lock.
#[derive(Default)]
pub(super) struct Slot {
    /// When the last refresh attempt failed, and whether for an outage:
    /// callers that queued behind it share the failure instead of asking
    /// the IdP again.
    pub(super) failed: Option<(Instant, bool)>,
    /// A refresh answer still to be stored.
    pub(super) unsaved: Option<Unsaved>,
}

/// The per-lineage locks of this process and its lease-holder name.
pub struct Refresher {
    slots: std::sync::Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    /// How many slots hold an unsaved answer: while any do, no caller takes
    /// the hot path past them (it would serve the spent refresh token).
    pub(super) unsaved: AtomicUsize,
    /// The name this replica takes the database's refresh lease under.
    pub(super) holder: String,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher").field("holder", &self.holder).finish()
    }
}

impl Default for Refresher {
    fn default() -> Self {
        Self { slots: Default::default(), unsaved: AtomicUsize::new(0), holder: format!("replica-{}", &random_token()[..12]) }
    }
}

impl Refresher {
    /// The lock of the lineage named by `key`, made on first use.
    pub(super) fn slot_for(&self, key: &str) -> Arc<Mutex<Slot>> {
        let mut slots = self.slots.lock().expect("slot map is never poisoned");
        slots.entry(key.to_string()).or_default().clone()
    }

    /// Drops the slots nobody holds or waits for and that keep no unsaved
    /// answer, so the map stays as small as the lineages in flight (it runs
    /// every second). Under the map's lock nobody can take a new handle, so a
    /// slot whose only handle is the map's is not in use: removing it never
    /// gives two callers two locks for one lineage. Its `failed_at` only
    /// matters to callers already waiting, and they hold handles.
    pub fn sweep(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |s| s.unsaved.is_some()));
    }

    /// How many lineage slots the map holds.
    pub fn slot_count(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot map is bounded by the lineages in flight, and a held slot
    /// is never swept and handed out a second time.
    #[tokio::test]
    async fn a_held_slot_is_never_handed_out_twice() {
        let refresher = Refresher::default();
        let held = refresher.slot_for("alice\0issuer");
        let guard = held.clone().lock_owned().await;
        let waiting = refresher.slot_for("bob\0issuer"); // a caller queued, not yet locked
        for i in 0..500 {
            let _ = refresher.slot_for(&format!("user{i}\0issuer"));
        }
        assert_eq!(refresher.slot_count(), 502);
        refresher.sweep();
        assert_eq!(refresher.slot_count(), 2, "only the slots in use are kept");
        let again = refresher.slot_for("alice\0issuer");
        assert!(Arc::ptr_eq(&held, &again), "a second caller gets the same lock");
        assert!(again.try_lock().is_err(), "and it is held");
        assert!(Arc::ptr_eq(&waiting, &refresher.slot_for("bob\0issuer")));
        drop((guard, held, again, waiting));
        refresher.sweep();
        assert_eq!(refresher.slot_count(), 0, "the map shrinks when nobody uses a slot");
    }
}
