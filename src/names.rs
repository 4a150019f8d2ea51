//! Hub names. A name is made canonical exactly as the hub's authenticator
//! would make it (JupyterHub lower-cases; tokenhub also applies Unicode NFKC
//! first, so look-alike spellings meet in one name) before any lineage,
//! binding or code is keyed by it; and each name belongs to one upstream
//! identity (issuer, subject), bound at its first login. A claim such as
//! `preferred_username` is not an identity: it may be neither unique nor
//! stable (OIDC Core §5.7), and some IdPs let users edit it.

use unicode_normalization::UnicodeNormalization;

use crate::state::AppState;
use crate::time::now;
use crate::vault::store::StoreError;

/// Longest name the hub stores (JupyterHub's `users.name` column).
pub const MAX_NAME_CHARS: usize = 255;

/// Why a claim cannot be a hub name; the text is shown to the person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameRefused {
    /// Nothing left.
    #[error("the name is empty")]
    Empty,
    /// Longer than the hub allows.
    #[error("the name is longer than {MAX_NAME_CHARS} characters")]
    TooLong,
    /// JupyterHub refuses `/` in names (they are URL path segments).
    #[error("the name contains “/”, which JupyterHub does not allow in user names")]
    Slash,
    /// Leading or trailing white space (JupyterHub refuses it).
    #[error("the name begins or ends with a space")]
    Space,
    /// Control or format characters.
    #[error("the name contains control or invisible characters")]
    Control,
    /// Lower-casing and NFKC do not settle on one form.
    #[error("the name has no stable lower-case form")]
    Unstable,
}

/// The canonical hub name for a claim: Unicode NFKC, then lower case (as
/// JupyterHub's `normalize_username` does with Python's `str.lower`), then
/// JupyterHub's character rules. A name whose form is not a fixed point of
/// both steps, so that the hub could make something else of it, is refused.
pub fn canonical(claim: &str) -> Result<String, NameRefused> {
    let name: String = claim.nfkc().collect::<String>().to_lowercase();
    if name.is_empty() {
        return Err(NameRefused::Empty);
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(NameRefused::TooLong);
    }
    if name.contains('/') {
        return Err(NameRefused::Slash);
    }
    if name.trim() != name {
        return Err(NameRefused::Space);
    }
    // Cc (controls) and the invisible format characters (bidi overrides,
    // zero-width joiners) that would make two names look alike.
    let invisible = |c: char| {
        c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
    };
    if name.chars().any(invisible) {
        return Err(NameRefused::Control);
    }
    if name.nfkc().collect::<String>() != name || name.to_lowercase() != name {
        return Err(NameRefused::Unstable);
    }
    Ok(name)
}

/// A login by a subject other than the one the name belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTaken {
    /// The subject the name is bound to.
    pub bound_subject: String,
}

/// Binds `username` to (`issuer`, `subject`) at its first login, or checks
/// that it is bound to that subject: `Ok(Err(NameTaken))` for another
/// subject (audited with both subjects). Runs before anything of the login
/// is stored.
pub async fn claim(app: &AppState, username: &str, issuer: &str, subject: &str) -> Result<Result<(), NameTaken>, StoreError> {
    let binding = app.vault.store().bind_name(username, issuer, subject, now()).await?;
    if binding.subject == subject {
        return Ok(Ok(()));
    }
    tracing::warn!(user = %username, subject, bound_subject = %binding.subject, "login refused: the name belongs to another subject");
    let detail = format!("subject {subject:?} refused: the name belongs to subject {:?}", binding.subject);
    app.audit.record("login_refused", Some(username), None, Some(&detail));
    Ok(Err(NameTaken { bound_subject: binding.subject }))
}

/// Moves `username` to `subject` at the upstream issuer: an operator's
/// decision (`by`), audited. The lineage of the subject it leaves, and the
/// hub's tokens for it, are dropped; the new subject then signs in.
pub async fn move_name(app: &AppState, username: &str, subject: &str, by: &str) -> Result<Option<String>, StoreError> {
    let issuer = app.upstream.issuer();
    let before = app.vault.store().name_binding(username, issuer).await?.map(|b| b.subject);
    app.vault.store().move_name(username, issuer, subject, by, now()).await?;
    app.vault.forget(username, issuer);
    let detail = format!("name moved from subject {:?} to subject {subject:?} by {by}", before.as_deref().unwrap_or("(none)"));
    tracing::info!(user = %username, subject, by, "name moved to another subject");
    app.audit.record("name_moved", Some(username), None, Some(&detail));
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lower_case_nfkc() {
        assert_eq!(canonical("Alice").unwrap(), "alice");
        assert_eq!(canonical("\u{212a}ate").unwrap(), "kate", "the Kelvin sign is a K");
        assert_eq!(canonical("ﬁona").unwrap(), "fiona", "a ligature is its letters");
        assert_eq!(canonical("a b").unwrap(), "a b");
        assert_eq!(canonical("a+b").unwrap(), "a+b");
        assert_eq!(canonical("Zoë").unwrap(), "zoë");
        assert_eq!(canonical("Zoe\u{308}").unwrap(), "zoë", "composed");
    }

    #[test]
    fn names_the_hub_refuses_are_refused() {
        assert_eq!(canonical(""), Err(NameRefused::Empty));
        assert_eq!(canonical("a/b"), Err(NameRefused::Slash));
        assert_eq!(canonical(" alice"), Err(NameRefused::Space));
        assert_eq!(canonical("alice\n"), Err(NameRefused::Space));
        assert_eq!(canonical("al\u{202e}ice"), Err(NameRefused::Control));
        assert_eq!(canonical("al\u{200b}ice"), Err(NameRefused::Control));
        assert_eq!(canonical(&"a".repeat(256)), Err(NameRefused::TooLong));
    }

    proptest::proptest! {
        /// Whatever comes in, a canonical name is its own canonical form.
        #[test]
        fn canonical_is_a_fixed_point(claim in "\\PC{0,40}") {
            if let Ok(name) = canonical(&claim) {
                proptest::prop_assert_eq!(canonical(&name), Ok(name.clone()));
            }
        }
    }
}
