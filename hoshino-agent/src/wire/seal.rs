//! The AEAD envelope both v2 formats share, bundles (`bundle`) and directory records
//! (`directory::record`): XChaCha20-Poly1305, a random 24-byte nonce as the last field of the
//! clear header, the whole clear header as associated data, the 16-byte tag after the
//! ciphertext. Each format keeps its own layout, key and errors; this module only seals and
//! opens. Sans-IO apart from the nonce's randomness.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

/// Why a sealed object did not open; each format maps it onto its own error.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum OpenError {
    #[error("truncated: needed {needed} bytes at offset {offset}, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("AEAD tag does not verify (wrong key, or the object was altered)")]
    BadMac,
}

/// Fills the nonce (the last `NONCE_LEN` bytes of `head`) with fresh random bytes, then
/// encrypts `body` in place with all of `head` as associated data. The caller appends the
/// returned tag after the ciphertext. `head` is at least `NONCE_LEN` bytes.
pub fn seal(
    cipher: &XChaCha20Poly1305,
    head: &mut [u8],
    body: &mut [u8],
) -> Result<Tag, chacha20poly1305::Error> {
    let nonce_at = head.len() - NONCE_LEN;
    rand::rng().fill_bytes(&mut head[nonce_at..]);
    cipher.encrypt_in_place_detached(XNonce::from_slice(&head[nonce_at..]), head, body)
}

/// Opens `input`: its first `head_len` bytes are the clear header (ending in the nonce), its
/// last `TAG_LEN` bytes the tag, and the ciphertext between them is at least `min_body` bytes.
/// Returns the plaintext. `head_len` is at least `NONCE_LEN`.
pub fn open(
    cipher: &XChaCha20Poly1305,
    input: &[u8],
    head_len: usize,
    min_body: usize,
) -> Result<Vec<u8>, OpenError> {
    let head = input.get(..head_len).ok_or(OpenError::Truncated {
        offset: 0,
        needed: head_len,
        available: input.len(),
    })?;
    let tag_at = input
        .len()
        .checked_sub(TAG_LEN)
        .filter(|&t| t >= head_len + min_body)
        .ok_or(OpenError::Truncated {
            offset: head_len,
            needed: min_body + TAG_LEN,
            available: input.len() - head_len,
        })?;
    let mut plaintext = input[head_len..tag_at].to_vec();
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(&head[head_len - NONCE_LEN..]),
            head,
            &mut plaintext,
            Tag::from_slice(&input[tag_at..]),
        )
        .map_err(|_| OpenError::BadMac)?;
    Ok(plaintext)
}
