//! Which lineage version each running server last got in its token file,
//! and which spawning servers are being waited for. The app owns this
//! book-keeping; [`super::delivery`] does the writing. Kept apart so the
//! app's state does not depend on the code that needs the app.

use std::collections::{HashMap, HashSet};

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

/// Book-keeping of deliveries and of servers being waited for.
#[derive(Debug, Default)]
pub struct Deliveries {
    done: Mutex<HashMap<String, HashMap<String, Delivery>>>,
    waiting: Mutex<HashSet<(String, String)>>,
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

    /// Ends the wait claimed with [`Deliveries::start_waiting`].
    pub async fn stop_waiting(&self, key: &(String, String)) {
        self.waiting.lock().await.remove(key);
    }
}
