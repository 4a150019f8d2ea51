//! Which lineage version each running server last got in its token file,
//! and which spawning servers are being waited for. The app owns this
//! book-keeping; [`super::delivery`] does the writing. Kept apart so the
//! app's state does not depend on the code that needs the app.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

/// When a server last got the file, and which lineage version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Server name (`""` for the default server).
    pub server: String,
    /// Lineage version written.
    pub version: i64,
    /// When (unix seconds).
    pub at: i64,
}

/// What one server's file holds, as far as this process wrote it. Writers
/// of a server's file hold its lock while they write, so writes into one
/// server never overlap and never go back in time.
#[derive(Debug, Default)]
pub struct FileState {
    /// Digest of the server credential the versions below were written
    /// with: a new one means a new start of the server, whose file is new.
    pub credential: String,
    /// The newest lineage version written into the file.
    pub version: Option<i64>,
}

/// A server's file lock (see [`FileState`]).
pub type FileSlot = Arc<Mutex<FileState>>;

/// How long an unused server's slot is remembered. Forgetting one costs
/// at most one more write of the same version.
const SLOT_IDLE: Duration = Duration::from_secs(3600);

/// Book-keeping of deliveries and of servers being waited for.
#[derive(Debug)]
pub struct Deliveries {
    done: Mutex<HashMap<String, HashMap<String, Delivery>>>,
    waiting: Mutex<HashSet<(String, String)>>,
    files: moka::sync::Cache<(String, String), FileSlot>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Self {
            done: Mutex::default(),
            waiting: Mutex::default(),
            files: moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(SLOT_IDLE).build(),
        }
    }
}

impl Deliveries {
    /// What each of the user's servers last got.
    pub async fn of(&self, username: &str) -> Vec<Delivery> {
        let done = self.done.lock().await;
        let mut list: Vec<Delivery> = done.get(username).map(|m| m.values().cloned().collect()).unwrap_or_default();
        list.sort_by(|a, b| a.server.cmp(&b.server));
        list
    }

    /// Notes that one of the user's servers got the file.
    pub async fn record(&self, username: &str, delivery: Delivery) {
        self.done.lock().await.entry(username.to_string()).or_default().insert(delivery.server.clone(), delivery);
    }

    /// Claims the wait for a (user, server) pair; `false` when someone
    /// already waits for it, so each server has one waiter.
    pub async fn start_waiting(&self, key: &(String, String)) -> bool {
        self.waiting.lock().await.insert(key.clone())
    }

    /// The lock of one server's file (see [`FileState`]).
    pub fn file(&self, username: &str, server: &str) -> FileSlot {
        self.files.get_with((username.to_string(), server.to_string()), FileSlot::default)
    }

    /// Ends the wait claimed with [`Deliveries::start_waiting`].
    pub async fn stop_waiting(&self, key: &(String, String)) {
        self.waiting.lock().await.remove(key);
    }
}
