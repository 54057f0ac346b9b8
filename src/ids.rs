//! Typed ids and tokens. Every id from the network is parsed here, once, so handlers and
//! stores only ever see well-formed values.

use std::fmt;

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The operating system's random source failed; nothing random can be made.
#[derive(Debug, thiserror::Error)]
#[error("the OS random source failed: {0}")]
pub struct RandomError(getrandom::Error);

fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(RandomError)?;
    Ok(bytes)
}

/// Lowercase hex. By table rather than `{:02x}`: a poll hashes a token and writes ids,
/// and the formatting machinery per byte showed in its profile.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// A model-list request: 128 random bits, written as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId([u8; 16]);

impl RequestId {
    pub fn random() -> Result<Self, RandomError> {
        random_bytes().map(RequestId)
    }

    /// Only the canonical form (32 lowercase hex digits) is an id; anything else is not.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = (lower_hex_digit(pair[0])? << 4) | lower_hex_digit(pair[1])?;
        }
        Some(RequestId(out))
    }
}

fn lower_hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub struct $name(Uuid);

        impl $name {
            pub fn random() -> Result<Self, RandomError> {
                Ok($name(uuid::Builder::from_random_bytes(random_bytes()?).into_uuid()))
            }

            /// Any UUID spelling `uuid` accepts; written back in the hyphenated lowercase form.
            pub fn parse(s: &str) -> Option<Self> {
                Uuid::try_parse(s).ok().map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// One agent runtime on a user's machine, served by one daemon.
    RuntimeId
);
uuid_id!(
    /// A tenant: owns runtimes and API tokens.
    WorkspaceId
);

/// A bearer secret as the caller sent it or as we just made it. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A workspace's API token (256 random bits).
    pub fn new_api() -> Result<Self, RandomError> {
        Ok(Token(format!("mra_{}", hex(&random_bytes::<32>()?))))
    }

    /// A runtime's daemon token (256 random bits).
    pub fn new_daemon() -> Result<Self, RandomError> {
        Ok(Token(format!("mrd_{}", hex(&random_bytes::<32>()?))))
    }

    pub fn from_header(s: &str) -> Self {
        Token(s.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps: tokens are high-entropy, so a plain SHA-256 is enough to make a
    /// leaked database useless for calling the API.
    pub fn hash(&self) -> TokenHash {
        TokenHash(hex(&Sha256::digest(self.0.as_bytes())))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// SHA-256 of a token, in lowercase hex: the only form a token is stored in.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TokenHash(String);

impl TokenHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id an operator names the token by: the first 16 hex digits of its hash. Not a
    /// secret (SHA-256 cannot be walked back to the token), unique in practice (64 bits;
    /// a unique index refuses a collision), and derived rather than drawn so that a
    /// migration can give the tokens stored before ids existed the same id in both
    /// dialects, and so that whoever holds a leaked token can tell which id to revoke.
    pub fn id(&self) -> TokenId {
        TokenId(self.0[..TokenId::LEN].to_owned())
    }
}

/// An API token's public name: 16 lowercase hex digits (see [`TokenHash::id`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TokenId(String);

impl TokenId {
    const LEN: usize = 16;

    /// Only the canonical form is an id.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == Self::LEN && s.bytes().all(|c| lower_hex_digit(c).is_some()))
            .then(|| TokenId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_id_is_the_hash_prefix_and_parses_only_canonically() {
        let hash = Token::new_api().unwrap().hash();
        let id = hash.id();
        assert!(hash.as_str().starts_with(id.as_str()));
        assert_eq!(TokenId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(TokenId::parse("ABCDEF0123456789"), None);
        assert!(TokenId::parse("abcdef0123456789").is_some());
        assert_eq!(TokenId::parse(&id.as_str()[1..]), None);
        assert_eq!(TokenId::parse(hash.as_str()), None);
    }

    #[test]
    fn request_id_is_32_lowercase_hex_and_round_trips() {
        let id = RequestId::random().unwrap();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert!(
            s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_eq!(RequestId::parse(&s), Some(id));
    }

    #[test]
    fn request_id_rejects_everything_but_the_canonical_form() {
        for bad in [
            "",
            "74b0840025ec468a069fb9a23f96710",
            "74b0840025ec468a069fb9a23f9671066",
            "74B0840025EC468A069FB9A23F967106",
            "74b0840025ec468a069fb9a23f96710g",
            "74b0840025ec468a069fb9a23f96710é",
        ] {
            assert_eq!(RequestId::parse(bad), None, "{bad:?}");
        }
        assert!(RequestId::parse("74b0840025ec468a069fb9a23f967106").is_some());
    }

    #[test]
    fn runtime_id_is_a_hyphenated_uuid() {
        let id = RuntimeId::random().unwrap();
        assert_eq!(RuntimeId::parse(&id.to_string()), Some(id));
        assert_eq!(id.to_string().len(), 36);
        assert_eq!(RuntimeId::parse("not-a-uuid"), None);
    }

    #[test]
    fn tokens_differ_and_hash_stably() {
        let a = Token::new_api().unwrap();
        let b = Token::new_api().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.hash(), Token::from_header(a.expose()).hash());
        assert_ne!(a.hash(), b.hash());
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    /// Stored hashes must keep matching: the hex of SHA-256, as every version wrote it.
    #[test]
    fn token_hash_is_the_lowercase_hex_of_sha256() {
        assert_eq!(
            Token::from_header("abc").hash().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
