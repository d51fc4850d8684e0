//! Peer identity: an ed25519 keypair per peer, and the [`PeerId`] that names it.
//!
//! A `PeerId` *is* the peer's ed25519 public key, so anything signed by the peer can be checked against its
//! id with no other lookup. Its printable form is base58 (44 characters or so) and parses back; `short()`
//! gives the first characters for logs.
//!
//! Key files hold the private key as PEM-encoded PKCS#8 (`-----BEGIN PRIVATE KEY-----`), the format
//! `openssl pkey` reads. They are written with mode 0600 and refused when group or world can read them.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::rand::SecureRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Length in bytes of an ed25519 public key, and so of a [`PeerId`].
pub const PEER_ID_LEN: usize = 32;
/// Length in bytes of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length in bytes of the secret seed of an ed25519 key.
const SEED_LEN: usize = 32;

/// The fixed DER prefix of a PKCS#8 v1 document that wraps a 32-byte ed25519 seed (RFC 8410 §7).
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const PEM_TAG: &str = "PRIVATE KEY";

/// The identity of a peer: its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; PEER_ID_LEN]);

impl PeerId {
    /// Wraps raw public-key bytes. Any 32 bytes are accepted here; a key that is not a valid curve point
    /// simply never verifies a signature.
    pub const fn from_bytes(bytes: [u8; PEER_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a `PeerId` from a slice, which must be exactly 32 bytes long.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, IdentityError> {
        let array: [u8; PEER_ID_LEN] = bytes.try_into().map_err(|_| IdentityError::InvalidPeerId {
            text: format!("{} bytes", bytes.len()),
            reason: format!("a peer id is {PEER_ID_LEN} bytes"),
        })?;
        Ok(Self(array))
    }

    /// The raw public-key bytes.
    pub fn as_bytes(&self) -> &[u8; PEER_ID_LEN] {
        &self.0
    }

    /// The first eight characters of the printable form, for logs.
    pub fn short(&self) -> String {
        let full = self.to_string();
        full.chars().take(8).collect()
    }

    /// Checks that `signature` is this peer's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), IdentityError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| IdentityError::BadSignature { peer: *self })
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(&self.0).into_string())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| IdentityError::InvalidPeerId {
            text: text.to_owned(),
            reason,
        };
        let mut bytes = [0u8; PEER_ID_LEN];
        let written = bs58::decode(text)
            .onto(&mut bytes[..])
            .map_err(|e| invalid(format!("not base58: {e}")))?;
        if written != PEER_ID_LEN {
            return Err(invalid(format!(
                "decodes to {written} bytes, a peer id is {PEER_ID_LEN}"
            )));
        }
        Ok(Self(bytes))
    }
}

/// A peer's ed25519 keypair. It signs; its public half is the [`PeerId`].
pub struct Keypair {
    seed: [u8; SEED_LEN],
    inner: Ed25519KeyPair,
    peer_id: PeerId,
}

impl Keypair {
    /// Generates a fresh keypair from the operating system's random source.
    pub fn generate() -> Self {
        let mut seed = [0u8; SEED_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .expect("the operating system random source must be available to create a peer key");
        Self::from_seed(seed)
    }

    /// Builds the keypair whose secret seed is `seed`. Useful for deterministic tests.
    pub fn from_seed(seed: [u8; SEED_LEN]) -> Self {
        let inner =
            Ed25519KeyPair::from_seed_unchecked(&seed).expect("every 32-byte seed is a valid ed25519 secret key");
        let peer_id = PeerId::try_from_slice(inner.public_key().as_ref()).expect("an ed25519 public key is 32 bytes");
        Self { seed, inner, peer_id }
    }

    /// This keypair's peer id (its public key).
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.inner.sign(message).as_ref());
        out
    }

    /// The private key as a PKCS#8 v1 DER document (what TLS libraries load).
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(PKCS8_ED25519_PREFIX.len() + SEED_LEN);
        der.extend_from_slice(&PKCS8_ED25519_PREFIX);
        der.extend_from_slice(&self.seed);
        der
    }

    /// Reads a PKCS#8 DER document holding an ed25519 key (v1, or v2 with the public key).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        if der.len() == PKCS8_ED25519_PREFIX.len() + SEED_LEN && der.starts_with(&PKCS8_ED25519_PREFIX) {
            let mut seed = [0u8; SEED_LEN];
            seed.copy_from_slice(&der[PKCS8_ED25519_PREFIX.len()..]);
            return Ok(Self::from_seed(seed));
        }
        // Anything else must still be a well-formed ed25519 PKCS#8 document; ring checks the structure and,
        // for v2, that the embedded public key belongs to the secret key.
        let parsed =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| format!("not an ed25519 PKCS#8 key: {e}"))?;
        // ring cannot hand the seed back, but a v2 document stores it at the same offset as v1, after the same
        // algorithm identifier and octet-string headers.
        let seed_start = PKCS8_ED25519_PREFIX.len();
        if der.len() < seed_start + SEED_LEN || der[5..seed_start] != PKCS8_ED25519_PREFIX[5..] {
            return Err("unsupported PKCS#8 layout for an ed25519 key".into());
        }
        let mut seed = [0u8; SEED_LEN];
        seed.copy_from_slice(&der[seed_start..seed_start + SEED_LEN]);
        let keypair = Self::from_seed(seed);
        if keypair.peer_id().as_bytes() != parsed.public_key().as_ref() {
            return Err("the public key in the document does not belong to its secret key".into());
        }
        Ok(keypair)
    }

    /// Writes the key to `path` as PEM PKCS#8, readable by its owner only (mode 0600). An existing file is
    /// replaced atomically.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let io_err = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = pem::encode(&pem::Pem::new(PEM_TAG, self.to_pkcs8_der()));
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = path.file_name().ok_or_else(|| IdentityError::InvalidKeyFile {
            path: path.to_path_buf(),
            reason: "the path names no file".into(),
        })?;
        let tmp = dir.join(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(io_err)?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    }

    /// Loads a key written by [`Keypair::save`] (or any PEM PKCS#8 ed25519 key). Refuses files that group or
    /// world can read, and files that are truncated or malformed, naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let invalid = |reason: String| IdentityError::InvalidKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let metadata = std::fs::metadata(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "its permissions {mode:04o} let group or others read it; run `chmod 600` on it"
                )));
            }
        }
        const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;
        if metadata.len() > MAX_KEY_FILE_BYTES {
            return Err(invalid(format!("{} bytes is too large for a key file", metadata.len())));
        }
        let text = std::fs::read(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed = pem::parse(&text).map_err(|e| invalid(format!("not a PEM file: {e}")))?;
        if parsed.tag() != PEM_TAG {
            return Err(invalid(format!(
                "PEM block is '{}', expected '{PEM_TAG}'",
                parsed.tag()
            )));
        }
        Self::from_pkcs8_der(parsed.contents()).map_err(invalid)
    }

    /// Loads the key at `path`, or generates one and saves it there when the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, IdentityError> {
        if path.exists() {
            Self::load(path)
        } else {
            let keypair = Self::generate();
            keypair.save(path)?;
            Ok(keypair)
        }
    }
}

impl Clone for Keypair {
    fn clone(&self) -> Self {
        Self::from_seed(self.seed)
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

/// What can go wrong with keys, key files and peer ids.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("key file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The key file exists but cannot be used.
    #[error("key file {} refused: {reason}", path.display())]
    InvalidKeyFile { path: PathBuf, reason: String },
    /// A printed peer id did not parse.
    #[error("invalid peer id '{text}': {reason}")]
    InvalidPeerId { text: String, reason: String },
    /// A signature did not verify against the peer's key.
    #[error("signature does not verify against the key of peer {peer}")]
    BadSignature { peer: PeerId },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_prints_and_parses_back() {
        let id = Keypair::generate().peer_id();
        let text = id.to_string();
        assert!(text.len() <= 44, "{text}");
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        assert!(text.starts_with(&id.short()));
    }

    #[test]
    fn bad_peer_ids_are_refused() {
        assert!("".parse::<PeerId>().is_err());
        assert!("0OIl".parse::<PeerId>().is_err(), "not base58");
        assert!("abc".parse::<PeerId>().is_err(), "too short");
        let long = bs58::encode([7u8; 33]).into_string();
        assert!(long.parse::<PeerId>().is_err(), "too long");
    }

    #[test]
    fn sign_and_verify() {
        let keypair = Keypair::from_seed([3; 32]);
        let signature = keypair.sign(b"hello");
        keypair.peer_id().verify(b"hello", &signature).unwrap();
        assert!(keypair.peer_id().verify(b"hellO", &signature).is_err());
        let other = Keypair::from_seed([4; 32]);
        assert!(other.peer_id().verify(b"hello", &signature).is_err());
        assert!(keypair.peer_id().verify(b"hello", &signature[..63]).is_err());
    }

    #[test]
    fn pkcs8_round_trip_and_ring_agrees() {
        let keypair = Keypair::generate();
        let der = keypair.to_pkcs8_der();
        let ring_pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).unwrap();
        assert_eq!(ring_pair.public_key().as_ref(), keypair.peer_id().as_bytes());
        assert_eq!(Keypair::from_pkcs8_der(&der).unwrap().peer_id(), keypair.peer_id());
        // A v2 document (with the public key) from ring loads to the same identity.
        let v2 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let from_v2 = Keypair::from_pkcs8_der(v2.as_ref()).unwrap();
        let ring_v2 = Ed25519KeyPair::from_pkcs8(v2.as_ref()).unwrap();
        assert_eq!(from_v2.peer_id().as_bytes(), ring_v2.public_key().as_ref());
    }

    #[cfg(unix)]
    #[test]
    fn key_file_round_trip_and_refusals() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        let keypair = Keypair::generate();
        keypair.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Keypair::load(&path).unwrap().peer_id(), keypair.peer_id());
        assert_eq!(Keypair::load_or_generate(&path).unwrap().peer_id(), keypair.peer_id());

        // Readable by others: refused, naming the file and the fix.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keypair::load(&path).unwrap_err().to_string();
        assert!(err.contains("peer.key") && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        // Truncated.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let err = Keypair::load(&path).unwrap_err().to_string();
        assert!(err.contains("peer.key") && err.contains("not a PEM file"), "{err}");

        // Well-formed PEM, wrong contents.
        std::fs::write(&path, pem::encode(&pem::Pem::new(PEM_TAG, vec![1, 2, 3]))).unwrap();
        let err = Keypair::load(&path).unwrap_err().to_string();
        assert!(err.contains("not an ed25519 PKCS#8 key"), "{err}");

        // Another kind of PEM block.
        std::fs::write(&path, pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]))).unwrap();
        let err = Keypair::load(&path).unwrap_err().to_string();
        assert!(err.contains("CERTIFICATE"), "{err}");

        // Missing.
        let err = Keypair::load(&dir.path().join("absent.key")).unwrap_err().to_string();
        assert!(err.contains("absent.key"), "{err}");

        // load_or_generate creates a missing file.
        let fresh = dir.path().join("fresh.key");
        let created = Keypair::load_or_generate(&fresh).unwrap();
        assert_eq!(Keypair::load(&fresh).unwrap().peer_id(), created.peer_id());
    }
}
