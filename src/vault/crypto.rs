//! Encryption at rest: the key list and the sealed envelope.
//!
//! Keys come in JupyterHub's `JUPYTERHUB_CRYPT_KEY` format: `;`-separated
//! 32-byte keys, each hex or base64. The first key encrypts; every key
//! decrypts, so an operator rotates by putting a new key in front.
//!
//! An envelope is `version (1) | key id (4) | nonce (24) | ciphertext+tag`,
//! sealed with XChaCha20-Poly1305. The key id names the key that sealed it, so
//! opening never has to try every key. Associated data binds a ciphertext to
//! its place (the user and issuer of a vault row, the purpose of a cookie):
//! a ciphertext copied elsewhere does not open.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

/// Why a key list or an envelope was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The key list is empty.
    #[error("no encryption key given: set TOKENHUB_CRYPT_KEY or JUPYTERHUB_CRYPT_KEY (`tokenhub keygen` makes one)")]
    NoKey,
    /// One entry of the key list is not 32 bytes of hex or base64.
    #[error("encryption key #{0} is not 32 bytes as hex (64 characters) or base64 (44 characters)")]
    BadKey(usize),
    /// The envelope is too short or of an unknown version.
    #[error("ciphertext is malformed")]
    Malformed,
    /// No key in the list has the envelope's key id.
    #[error("ciphertext was sealed with a key that is no longer configured")]
    UnknownKey,
    /// Authentication failed: wrong associated data, tampering or a wrong key.
    #[error("ciphertext does not authenticate")]
    Tampered,
}

struct Key {
    id: [u8; KEY_ID_LEN],
    cipher: XChaCha20Poly1305,
}

/// The configured keys; the first one seals.
pub struct KeyRing {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.keys.iter().map(|k| hex::encode(k.id)).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

/// Decodes one key as 64 hex characters or as base64 (standard or URL-safe).
fn decode_key(text: &str) -> Option<[u8; 32]> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()?
    } else {
        [&STANDARD, &URL_SAFE, &URL_SAFE_NO_PAD].iter().find_map(|engine| engine.decode(text).ok())?
    };
    bytes.try_into().ok()
}

fn key_id(key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    let digest = Sha256::new().chain_update(b"tokenhub key id\0").chain_update(key).finalize();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    id
}

impl KeyRing {
    /// Parses a `;`-separated key list (blank entries are ignored).
    pub fn parse(list: &str) -> Result<Self, CryptoError> {
        let keys = list
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, text)| {
                let key = decode_key(text).ok_or(CryptoError::BadKey(i + 1))?;
                Ok(Key { id: key_id(&key), cipher: XChaCha20Poly1305::new(&key.into()) })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(CryptoError::NoKey);
        }
        Ok(Self { keys })
    }

    /// A new random key as 64 hex characters, the format `tokenhub keygen` prints.
    pub fn generate_key() -> String {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        hex::encode(key)
    }

    /// Seals `plaintext` with the first key, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = key
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.push(VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens an envelope sealed by any configured key with the same `aad`.
    pub fn open(&self, envelope: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if envelope.len() < HEADER_LEN + 16 || envelope[0] != VERSION {
            return Err(CryptoError::Malformed);
        }
        let id = &envelope[1..1 + KEY_ID_LEN];
        let key = self.keys.iter().find(|k| k.id == id).ok_or(CryptoError::UnknownKey)?;
        let nonce = XNonce::from_slice(&envelope[1 + KEY_ID_LEN..HEADER_LEN]);
        key.cipher.decrypt(nonce, Payload { msg: &envelope[HEADER_LEN..], aad }).map_err(|_| CryptoError::Tampered)
    }

    /// The key ids of the list, in order (hex; the first one seals).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex::encode(k.id)).collect()
    }

    /// The id of the key that sealed `envelope` (hex), if it is one.
    pub fn envelope_key_id(envelope: &[u8]) -> Option<String> {
        (envelope.len() >= HEADER_LEN && envelope[0] == VERSION).then(|| hex::encode(&envelope[1..1 + KEY_ID_LEN]))
    }

    /// `envelope` sealed again under the first key, or `None` when it
    /// already is (for `tokenhub rekey`).
    pub fn reseal(&self, envelope: &[u8], aad: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        if envelope.get(1..1 + KEY_ID_LEN) == Some(&self.keys[0].id[..]) {
            return Ok(None);
        }
        Ok(Some(self.seal(&self.open(envelope, aad)?, aad)))
    }

    /// Seals a string and encodes it for a cookie or URL (base64url).
    pub fn seal_text(&self, plaintext: &str, aad: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(self.seal(plaintext.as_bytes(), aad))
    }

    /// Opens what [`KeyRing::seal_text`] produced.
    pub fn open_text(&self, sealed: &str, aad: &[u8]) -> Result<String, CryptoError> {
        let envelope = URL_SAFE_NO_PAD.decode(sealed).map_err(|_| CryptoError::Malformed)?;
        let plain = self.open(&envelope, aad)?;
        String::from_utf8(plain).map_err(|_| CryptoError::Malformed)
    }
}

/// A new random secret for a code or token: 32 bytes, base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of `value`, hex: how codes and tokens issued to the hub are stored.
pub fn digest_hex(value: &str) -> String {
    // Into a buffer, not char by char: every notebook call digests its token.
    let mut buf = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(value.as_bytes()), &mut buf).expect("64 hex digits for 32 bytes");
    String::from_utf8(buf.to_vec()).expect("hex is ASCII")
}

/// The PKCE S256 challenge of `verifier` (RFC 7636 4.2).
pub fn pkce_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn b64_key(byte: u8) -> String {
        STANDARD.encode([byte; 32])
    }

    #[test]
    fn parses_hex_and_base64_keys_separated_by_semicolons() {
        let list = format!(" {HEX_A} ; {} ;; {}", b64_key(7), URL_SAFE.encode([9u8; 32]));
        let ring = KeyRing::parse(&list).unwrap();
        assert_eq!(ring.keys.len(), 3);
        assert_ne!(ring.keys[0].id, ring.keys[1].id);
    }

    #[test]
    fn rejects_empty_and_wrong_length_keys() {
        assert_eq!(KeyRing::parse("").unwrap_err(), CryptoError::NoKey);
        assert_eq!(KeyRing::parse(" ; ").unwrap_err(), CryptoError::NoKey);
        assert_eq!(KeyRing::parse("abcd").unwrap_err(), CryptoError::BadKey(1));
        let short = STANDARD.encode([1u8; 16]);
        assert_eq!(KeyRing::parse(&format!("{HEX_A};{short}")).unwrap_err(), CryptoError::BadKey(2));
        assert_eq!(KeyRing::parse(&"zz".repeat(32)).unwrap_err(), CryptoError::BadKey(1));
    }

    #[test]
    fn generated_key_parses() {
        let key = KeyRing::generate_key();
        assert_eq!(key.len(), 64);
        KeyRing::parse(&key).unwrap();
        assert_ne!(key, KeyRing::generate_key());
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let ring = KeyRing::parse(HEX_A).unwrap();
        let a = ring.seal(b"refresh-token-value", b"alice");
        let b = ring.seal(b"refresh-token-value", b"alice");
        assert_ne!(a, b, "every seal uses a new nonce");
        assert!(!a.windows(7).any(|w| w == b"refresh"), "plaintext must not show");
        assert_eq!(ring.open(&a, b"alice").unwrap(), b"refresh-token-value");
        let text = ring.seal_text("hello", b"cookie");
        assert_eq!(ring.open_text(&text, b"cookie").unwrap(), "hello");
    }

    #[test]
    fn tampering_is_detected() {
        let ring = KeyRing::parse(HEX_A).unwrap();
        let sealed = ring.seal(b"secret", b"alice");
        for i in [HEADER_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(ring.open(&bad, b"alice").unwrap_err(), CryptoError::Tampered);
        }
        let mut bad_nonce = sealed.clone();
        bad_nonce[1 + KEY_ID_LEN] ^= 1;
        assert_eq!(ring.open(&bad_nonce, b"alice").unwrap_err(), CryptoError::Tampered);
        let mut bad_version = sealed.clone();
        bad_version[0] = 9;
        assert_eq!(ring.open(&bad_version, b"alice").unwrap_err(), CryptoError::Malformed);
        assert_eq!(ring.open(&sealed[..10], b"alice").unwrap_err(), CryptoError::Malformed);
        assert_eq!(ring.open_text("not base64!", b"x").unwrap_err(), CryptoError::Malformed);
    }

    #[test]
    fn wrong_user_does_not_open() {
        let ring = KeyRing::parse(HEX_A).unwrap();
        let sealed = ring.seal(b"secret", b"alice");
        assert_eq!(ring.open(&sealed, b"bob").unwrap_err(), CryptoError::Tampered);
    }

    #[test]
    fn rotated_keys_still_open_old_envelopes() {
        let old = KeyRing::parse(HEX_A).unwrap();
        let sealed_old = old.seal(b"old secret", b"alice");
        let new_key = b64_key(42);
        let rotated = KeyRing::parse(&format!("{new_key};{HEX_A}")).unwrap();
        assert_eq!(rotated.open(&sealed_old, b"alice").unwrap(), b"old secret");
        let sealed_new = rotated.seal(b"new secret", b"alice");
        assert_eq!(&sealed_new[1..5], &rotated.keys[0].id, "first key seals");
        assert_eq!(old.open(&sealed_new, b"alice").unwrap_err(), CryptoError::UnknownKey);
        let only_new = KeyRing::parse(&new_key).unwrap();
        assert_eq!(only_new.open(&sealed_old, b"alice").unwrap_err(), CryptoError::UnknownKey);
    }

    #[test]
    fn pkce_s256_matches_rfc7636_example() {
        // RFC 7636 appendix B.
        assert_eq!(pkce_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
        assert_ne!(random_token(), random_token());
        assert_eq!(random_token().len(), 43);
    }

    #[test]
    fn debug_shows_key_ids_only() {
        let ring = KeyRing::parse(HEX_A).unwrap();
        let shown = format!("{ring:?}");
        assert!(!shown.contains(HEX_A));
        assert!(shown.contains(&hex::encode(ring.keys[0].id)));
    }
}

/// Property tests of the parsers: the key list and the sealed envelope.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, ..ProptestConfig::default() }
    }

    proptest! {
        #![proptest_config(config())]

        /// Any text as a key list: a key ring or an error, never a panic.
        #[test]
        fn key_list_parse_never_panics(list in ".{0,300}") {
            let _ = KeyRing::parse(&list);
        }

        /// Keys written as hex or base64, with blanks and empty entries
        /// around them, parse to as many keys, in order.
        #[test]
        fn key_lists_round_trip(keys in proptest::collection::vec(any::<[u8; 32]>(), 1..5), pad in " {0,3}", as_hex in any::<bool>()) {
            let texts: Vec<String> = keys.iter().map(|k| if as_hex { hex::encode(k) } else { STANDARD.encode(k) }).collect();
            let list = texts.iter().map(|t| format!("{pad}{t}{pad}")).collect::<Vec<_>>().join(";;");
            let ring = KeyRing::parse(&list).unwrap();
            prop_assert_eq!(ring.keys.len(), keys.len());
            for (key, parsed) in keys.iter().zip(&ring.keys) {
                prop_assert_eq!(key_id(key), parsed.id);
            }
        }

        /// Opening arbitrary bytes or text never panics and never succeeds.
        #[test]
        fn open_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200), text in ".{0,200}") {
            let ring = KeyRing::parse(&KeyRing::generate_key()).unwrap();
            prop_assert!(ring.open(&bytes, b"aad").is_err());
            prop_assert!(ring.open_text(&text, b"aad").is_err());
        }

        /// Seal then open gives the plaintext back; other associated data,
        /// any flipped byte, or a ring without the key does not open.
        #[test]
        fn seal_open_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..300), aad in proptest::collection::vec(any::<u8>(), 0..40),
                                other in proptest::collection::vec(any::<u8>(), 0..40), flip in any::<proptest::sample::Index>()) {
            let ring = KeyRing::parse(&KeyRing::generate_key()).unwrap();
            let sealed = ring.seal(&plain, &aad);
            prop_assert_eq!(ring.open(&sealed, &aad).unwrap(), plain.clone());
            if other != aad {
                prop_assert!(ring.open(&sealed, &other).is_err());
            }
            let mut tampered = sealed.clone();
            let i = flip.index(tampered.len());
            tampered[i] ^= 0x01;
            prop_assert!(ring.open(&tampered, &aad).is_err());
            let stranger = KeyRing::parse(&KeyRing::generate_key()).unwrap();
            prop_assert!(stranger.open(&sealed, &aad).is_err());
        }

        /// The same for the text form used in cookies.
        #[test]
        fn seal_text_round_trip(plain in ".{0,200}") {
            let ring = KeyRing::parse(&KeyRing::generate_key()).unwrap();
            let sealed = ring.seal_text(&plain, b"cookie");
            prop_assert_eq!(ring.open_text(&sealed, b"cookie").unwrap(), plain);
            prop_assert!(ring.open_text(&sealed, b"other").is_err());
        }
    }
}
