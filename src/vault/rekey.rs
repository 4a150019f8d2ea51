//! Key rotation at rest: which key sealed each stored value (`tokenhub
//! keys`), and sealing every value again under the first key of the list
//! (`tokenhub rekey`), so an operator knows when an old key can go.
//!
//! Rekeying is safe while replicas serve: each lineage is written back only
//! if it is still at the version read (its version is kept: the tokens did
//! not change), each server token only if it is still the value read; a row
//! that moved meanwhile is read again and retried. Values a replica seals
//! meanwhile use that replica's first key: run rekey after every replica
//! has the new key first.

use std::collections::BTreeMap;

use super::crypto::{CryptoError, KeyRing};
use super::narrow::{NarrowRow, narrow_aad};
use super::store::{LineageRow, Store, StoreError};
use super::{aad, server_aad};

/// Rows read at a time.
const BATCH: i64 = 200;
/// Tries for a row that keeps moving under the rekey.
const TRIES: u32 = 5;

/// Why a rekey or a count stopped.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A value does not open with the key list (its key is not in it, or it
    /// is damaged): named by its place, never its content.
    #[error("{place}: {error}")]
    Crypto {
        /// Which row and field.
        place: String,
        /// Why.
        error: CryptoError,
    },
}

/// How many stored values each key id sealed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    /// Sealed values by key id (hex); ids not in the key list included.
    pub by_key: BTreeMap<String, u64>,
}

impl KeyUsage {
    fn count(&mut self, envelope: &[u8]) {
        let id = KeyRing::envelope_key_id(envelope).unwrap_or_else(|| "malformed".into());
        *self.by_key.entry(id).or_default() += 1;
    }

    /// The report, a line per key of the list (in order) and per unknown
    /// key id: which may be removed.
    pub fn report(&self, keys: &KeyRing) -> String {
        let ids = keys.key_ids();
        let mut lines = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let n = self.by_key.get(id).copied().unwrap_or(0);
            let role = if i == 0 {
                "seals new values"
            } else if n == 0 {
                "seals nothing stored: it can be removed"
            } else {
                "still needed"
            };
            lines.push(format!("key #{} ({id}): {n} stored values; {role}", i + 1));
        }
        for (id, n) in self.by_key.iter().filter(|(id, _)| !ids.contains(id)) {
            lines.push(format!("key {id}, not in the key list: {n} stored values cannot be opened"));
        }
        lines.join("\n")
    }
}

/// What a rekey did.
#[derive(Debug, Default, Clone)]
pub struct Rekeyed {
    /// Rows written back (lineages, server tokens, narrower tokens).
    pub rows_changed: u64,
    /// Sealed values under each key afterwards.
    pub usage: KeyUsage,
}

fn lineage_fields(row: &mut LineageRow) -> impl Iterator<Item = (&'static str, &mut Vec<u8>)> {
    [("access_token", Some(&mut row.access_token)), ("id_token", Some(&mut row.id_token)), ("claims", Some(&mut row.claims))]
        .into_iter()
        .chain([
            ("refresh_token", row.refresh_token.as_mut()),
            ("pending_id_token", row.pending_id_token.as_mut()),
            ("fabric_token", row.fabric_token.as_mut()),
        ])
        .filter_map(|(name, value)| value.map(|v| (name, v)))
}

/// A stored row with sealed values.
enum Sealed {
    Lineage(Box<LineageRow>),
    ServerToken { user: String, server: String, token: Vec<u8> },
    Narrow(NarrowRow),
}

/// Visits every row with sealed values, a batch at a time: the lineages,
/// the servers' hub tokens, then the narrower tokens.
async fn each_sealed(store: &Store, mut visit: impl AsyncFnMut(Sealed) -> Result<(), RekeyError>) -> Result<(), RekeyError> {
    let mut after = (String::new(), String::new());
    loop {
        let page = store.sealed_lineages(&after, BATCH).await?;
        let Some(last) = page.last() else { break };
        after = (last.username.clone(), last.issuer.clone());
        for row in page {
            visit(Sealed::Lineage(Box::new(row))).await?;
        }
    }
    let mut after = (String::new(), String::new());
    loop {
        let page = store.sealed_server_credentials(&after, BATCH).await?;
        let Some((user, server, _)) = page.last() else { break };
        after = (user.clone(), server.clone());
        for (user, server, token) in page {
            visit(Sealed::ServerToken { user, server, token }).await?;
        }
    }
    let mut after = (String::new(), String::new(), String::new());
    loop {
        let page = store.sealed_narrow_tokens(&after, BATCH).await?;
        let Some(last) = page.last() else { break };
        after = (last.username.clone(), last.issuer.clone(), last.request_key.clone());
        for row in page {
            visit(Sealed::Narrow(row)).await?;
        }
    }
    Ok(())
}

/// Counts the stored values by the key that sealed them.
pub async fn usage(store: &Store) -> Result<KeyUsage, RekeyError> {
    let mut usage = KeyUsage::default();
    each_sealed(store, async |row| {
        match row {
            Sealed::Lineage(mut row) => lineage_fields(&mut row).for_each(|(_, value)| usage.count(value)),
            Sealed::ServerToken { token, .. } => usage.count(&token),
            Sealed::Narrow(row) => usage.count(&row.access_token),
        }
        Ok(())
    })
    .await?;
    Ok(usage)
}

/// Seals every stored value again under the first key, in batches.
pub async fn rekey(store: &Store, keys: &KeyRing) -> Result<Rekeyed, RekeyError> {
    let mut changed = 0;
    each_sealed(store, async |row| {
        match row {
            Sealed::Lineage(row) => changed += rekey_lineage(store, keys, *row).await? as u64,
            Sealed::ServerToken { user, server, token } => {
                let place = format!("the hub token of server {server:?} of {user}");
                let new =
                    keys.reseal(&token, &server_aad(&user, &server)).map_err(|error| RekeyError::Crypto { place, error })?;
                if let Some(new) = new {
                    // A server token replaced meanwhile was sealed by its writer.
                    changed += store.reseal_server_credential(&user, &server, &token, &new).await? as u64;
                }
            }
            Sealed::Narrow(row) => {
                let place = format!("a narrower token of {} at {}", row.username, row.issuer);
                let aad = narrow_aad(&row.username, &row.issuer, &row.request_key);
                let new = keys.reseal(&row.access_token, &aad).map_err(|error| RekeyError::Crypto { place, error })?;
                if let Some(new) = new {
                    // One obtained again meanwhile was sealed by its writer.
                    changed += store.reseal_narrow_token(&row, &row.access_token, &new).await? as u64;
                }
            }
        }
        Ok(())
    })
    .await?;
    Ok(Rekeyed { rows_changed: changed, usage: usage(store).await? })
}

/// Reseals one lineage, read again while it moves under us.
async fn rekey_lineage(store: &Store, keys: &KeyRing, mut row: LineageRow) -> Result<bool, RekeyError> {
    for _ in 0..TRIES {
        let (user, issuer) = (row.username.clone(), row.issuer.clone());
        let mut any = false;
        for (field, value) in lineage_fields(&mut row) {
            let crypto = |error| RekeyError::Crypto { place: format!("the {field} of {user} at {issuer}"), error };
            if let Some(new) = keys.reseal(value, &aad(&user, &issuer, field)).map_err(crypto)? {
                *value = new;
                any = true;
            }
        }
        if !any {
            return Ok(false);
        }
        if store.reseal_lineage(&row).await? {
            return Ok(true);
        }
        match store.lineage(&user, &issuer).await? {
            Some(current) => row = current,
            None => return Ok(false), // deleted meanwhile
        }
    }
    tracing::warn!(user = %row.username, "a lineage kept changing during the rekey; run it again");
    Ok(false)
}
