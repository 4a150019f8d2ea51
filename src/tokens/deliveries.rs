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
    /// Whether the file holds the note of a shared server instead.
    pub withheld: bool,
    /// The narrower-token files written ([`super::files`]): the digest of
    /// the token each holds, by path.
    pub narrow: std::collections::HashMap<String, String>,
    /// Directories made in the server for those files.
    pub directories: HashSet<String>,
    /// Whether the server's `fabric_rc` was looked at since its start.
    pub rc_checked: bool,
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
    /// Servers whose tokens are withheld (shared), by user.
    withheld: Mutex<HashMap<String, HashSet<String>>>,
    /// Which server a hub token is the own token of, by the token's digest.
    server_tokens: moka::sync::Cache<String, Option<String>>,
    /// Servers whose `fabric_rc` was pointed at the broker, by user: the
    /// host each named before.
    rc_changes: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Self {
            done: Mutex::default(),
            waiting: Mutex::default(),
            files: moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(SLOT_IDLE).build(),
            withheld: Mutex::default(),
            server_tokens: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(60)).build(),
            rc_changes: Mutex::default(),
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

    /// Notes that a server's `fabric_rc` was pointed at the broker.
    pub async fn note_rc_change(&self, username: &str, server: &str, named: String) {
        self.rc_changes.lock().await.entry(username.to_string()).or_default().insert(server.to_string(), named);
    }

    /// The user's servers whose `fabric_rc` was pointed at the broker, with
    /// the host each named before, by server name.
    pub async fn rc_changes(&self, username: &str) -> Vec<(String, String)> {
        let changes = self.rc_changes.lock().await;
        let mut list: Vec<(String, String)> = changes.get(username).map(|m| m.clone().into_iter().collect()).unwrap_or_default();
        list.sort();
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

    /// The users whose servers this process has written files into (or
    /// withheld them from).
    pub async fn users(&self) -> Vec<String> {
        let mut users: HashSet<String> = self.done.lock().await.keys().cloned().collect();
        users.extend(self.withheld.lock().await.keys().cloned());
        users.into_iter().collect()
    }

    /// Forgets a user whose servers are all gone.
    pub async fn forget_user(&self, username: &str) {
        self.done.lock().await.remove(username);
        self.withheld.lock().await.remove(username);
    }

    /// Notes whether one of the user's servers has its tokens withheld.
    pub async fn set_withheld(&self, username: &str, server: &str, withheld: bool) {
        let mut all = self.withheld.lock().await;
        if withheld {
            all.entry(username.to_string()).or_default().insert(server.to_string());
            if let Some(done) = self.done.lock().await.get_mut(username) {
                done.remove(server);
            }
        } else if let Some(servers) = all.get_mut(username) {
            servers.remove(server);
            if servers.is_empty() {
                all.remove(username);
            }
        }
    }

    /// The user's servers whose tokens are withheld, sorted.
    pub async fn withheld(&self, username: &str) -> Vec<String> {
        let mut servers: Vec<String> =
            self.withheld.lock().await.get(username).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        servers.sort();
        servers
    }

    /// The server a hub token (by digest) was found to be the own token of
    /// (`Some(None)`: of none), if remembered.
    pub fn server_of_token(&self, digest: &str) -> Option<Option<String>> {
        self.server_tokens.get(digest)
    }

    /// Remembers what [`Deliveries::server_of_token`] answers.
    pub fn remember_server_of_token(&self, digest: String, server: Option<String>) {
        self.server_tokens.insert(digest, server);
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
