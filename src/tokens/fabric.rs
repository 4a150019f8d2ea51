//! The FABRIC Credential Manager token document (`~/.tokens.json`), which
//! FABlib (`fabrictestbed`) reads unchanged.

use secrecy::ExposeSecret;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::vault::Lineage;
use crate::vault::crypto::digest_hex;

/// FABRIC's timestamp format, `%Y-%m-%d %H:%M:%S %z` (`2026-06-04 13:09:25 +0000`).
pub fn timestamp(unix: i64) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]");
    OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&format)
        .expect("the format has only numeric fields")
}

/// When the ID token expires: its `exp`, else the access token's expiry.
pub fn id_token_expiry(lineage: &Lineage) -> Option<i64> {
    crate::oauth::upstream::jwt_claims(lineage.tokens.id_token.expose_secret())
        .ok()
        .and_then(|claims| claims.get("exp").and_then(Value::as_i64))
        .or(lineage.tokens.access_expires_at)
}

/// The document for a lineage. `state` is `Valid` for tokens from a login and
/// `Refreshed` once they come from a refresh, as the Credential Manager says.
pub fn document(lineage: &Lineage) -> Value {
    let id_token = lineage.tokens.id_token.expose_secret();
    let issued = lineage.refreshed_at.unwrap_or(lineage.updated_at);
    json!({
        "id_token": id_token,
        "refresh_token": lineage.tokens.refresh_token.as_ref().map(|t| t.expose_secret()),
        "access_token": lineage.tokens.access_token.expose_secret(),
        "created_at": timestamp(issued),
        "expires_at": timestamp(id_token_expiry(lineage).unwrap_or(issued)),
        "state": if lineage.refreshed_at.is_some() { "Refreshed" } else { "Valid" },
        "token_hash": digest_hex(id_token),
        "comment": format!("issued by tokenhub for {} (lineage version {})", lineage.username, lineage.version),
        "created_from": "tokenhub",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_use_fabrics_format() {
        assert_eq!(timestamp(1_780_578_565), "2026-06-04 13:09:25 +0000");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 +0000");
    }
}

/// Property tests of the token file's timestamps.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use time::PrimitiveDateTime;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Every timestamp the document carries parses back with FABRIC's
        /// `%Y-%m-%d %H:%M:%S %z` to the same instant (years 1970–9999).
        #[test]
        fn timestamps_parse_back(unix in 0i64..253_402_300_799) {
            let text = timestamp(unix);
            let format = format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
            );
            let parsed = OffsetDateTime::parse(&text, &format).unwrap();
            prop_assert_eq!(parsed.unix_timestamp(), unix);
            prop_assert_eq!(text.len(), 25);
            // Python's strptime view of it: the fields without the offset.
            let plain = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
            prop_assert!(PrimitiveDateTime::parse(&text[..19], &plain).is_ok());
            prop_assert!(text.ends_with(" +0000"));
        }

        /// Out-of-range instants do not panic (they fall back to the epoch).
        #[test]
        fn any_instant_formats(unix in any::<i64>()) {
            prop_assert_eq!(timestamp(unix).len() >= 25, true);
        }
    }
}
