//! Membership certificates: an authority's signature that a peer may take part in a run until a given time.
//!
//! A certificate names the authority (its ed25519 public key, which is also how the run names its
//! authority), the peer, the run id and a validity window in Unix seconds. The authority signs a
//! domain-separated encoding of all of them, so a certificate cannot be moved to another peer, run or
//! authority, nor stretched in time, without the signature failing.
//!
//! Binary form (what travels in the access exchange and in the `access` record), all integers little
//! endian, and nothing after the signature:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CLNYCERT` |
//! | 1 | version, 1 |
//! | 32 | authority (public key) |
//! | 32 | peer (public key) |
//! | 8 | not before, Unix seconds |
//! | 8 | not after, Unix seconds (exclusive; later than not before) |
//! | 1 | run id length, 1..=128 |
//! | n | run id, UTF-8 |
//! | 64 | ed25519 signature of the authority |
//!
//! The signature covers `colony/membership-certificate/1` followed by every field above from the authority
//! to the run id (the magic and version excepted). The text form, for files, is that binary form in a PEM
//! block tagged `COLONY MEMBERSHIP CERTIFICATE`, preceded by `#` comment lines that say what it holds for
//! people; the comments are not read back.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::identity::{Keypair, PEER_ID_LEN, PeerId, SIGNATURE_LEN};

/// First bytes of every encoded certificate.
pub const CERTIFICATE_MAGIC: [u8; 8] = *b"CLNYCERT";
/// The encoding's version.
pub const CERTIFICATE_VERSION: u8 = 1;
/// Longest run id a certificate can name (the same bound as membership's run ids).
pub const MAX_RUN_ID_BYTES: usize = 128;
/// Longest encoded certificate.
pub const MAX_CERTIFICATE_BYTES: usize = FIXED_BYTES + MAX_RUN_ID_BYTES;
/// The PEM tag of a certificate file.
pub const PEM_TAG: &str = "COLONY MEMBERSHIP CERTIFICATE";

/// Every byte of an encoding except the run id.
const FIXED_BYTES: usize = 8 + 1 + PEER_ID_LEN + PEER_ID_LEN + 8 + 8 + 1 + SIGNATURE_LEN;
const SIGNING_DOMAIN: &[u8] = b"colony/membership-certificate/1";
/// Largest certificate file read.
const MAX_FILE_BYTES: u64 = 16 * 1024;

/// A membership certificate. Build one with [`Certificate::issue`]; read one with [`Certificate::decode`],
/// [`Certificate::from_text`] or [`Certificate::load`]. Decoding checks the form, not the signature or the
/// time: that is [`Certificate::verify_signature`] and the access policy's business.
///
/// ```
/// use colony_transports::Keypair;
/// use colony_transports::access::Certificate;
/// let authority = Keypair::generate();
/// let peer = Keypair::generate().peer_id();
/// let certificate = Certificate::issue(&authority, peer, "my-run", 1_000, 2_000).unwrap();
/// let decoded = Certificate::decode(&certificate.encode()).unwrap();
/// assert_eq!(decoded, certificate);
/// decoded.verify_signature().unwrap();
/// assert_eq!(decoded.authority(), authority.peer_id());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate {
    authority: PeerId,
    peer: PeerId,
    run_id: String,
    not_before: u64,
    not_after: u64,
    signature: [u8; SIGNATURE_LEN],
}

/// What is wrong with a certificate, its text or its file.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The bytes are not a certificate.
    #[error("malformed membership certificate: {0}")]
    Malformed(String),
    /// The run id cannot go into a certificate.
    #[error("run id {run_id:?} cannot be certified: {reason}")]
    InvalidRunId { run_id: String, reason: String },
    /// The validity window is empty.
    #[error("a certificate valid from Unix time {not_before} must end later, not at {not_after}")]
    EmptyValidity { not_before: u64, not_after: u64 },
    /// The signature is not the named authority's.
    #[error("the certificate's signature is not one of its authority {authority}")]
    BadSignature { authority: PeerId },
    /// The file could not be read or written.
    #[error("certificate file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The file exists but holds no usable certificate.
    #[error("certificate file {} refused: {reason}", path.display())]
    InvalidFile { path: PathBuf, reason: String },
}

fn check_run_id(run_id: &str) -> Result<(), CertificateError> {
    let invalid = |reason: String| CertificateError::InvalidRunId {
        run_id: run_id.to_owned(),
        reason,
    };
    if run_id.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if run_id.len() > MAX_RUN_ID_BYTES {
        return Err(invalid(format!(
            "it is {} bytes, at most {MAX_RUN_ID_BYTES} are allowed",
            run_id.len()
        )));
    }
    Ok(())
}

impl Certificate {
    /// A certificate signed by `authority` admitting `peer` to `run_id` from `not_before` (inclusive) until
    /// `not_after` (exclusive), both Unix seconds.
    pub fn issue(
        authority: &Keypair,
        peer: PeerId,
        run_id: &str,
        not_before: u64,
        not_after: u64,
    ) -> Result<Self, CertificateError> {
        check_run_id(run_id)?;
        if not_after <= not_before {
            return Err(CertificateError::EmptyValidity { not_before, not_after });
        }
        let mut certificate = Self {
            authority: authority.peer_id(),
            peer,
            run_id: run_id.to_owned(),
            not_before,
            not_after,
            signature: [0; SIGNATURE_LEN],
        };
        certificate.signature = authority.sign(&certificate.signed_bytes());
        Ok(certificate)
    }

    /// The authority that signed it (by its claim; see [`Certificate::verify_signature`]).
    pub fn authority(&self) -> PeerId {
        self.authority
    }

    /// The peer it admits.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The run it admits the peer to.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The first Unix second it is valid.
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// The Unix second from which it is no longer valid.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// Whether it is valid at Unix second `now` (by time only).
    pub fn valid_at(&self, now: u64) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The bytes the authority signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 2 * PEER_ID_LEN + 17 + self.run_id.len());
        out.extend_from_slice(SIGNING_DOMAIN);
        out.extend_from_slice(self.authority.as_bytes());
        out.extend_from_slice(self.peer.as_bytes());
        out.extend_from_slice(&self.not_before.to_le_bytes());
        out.extend_from_slice(&self.not_after.to_le_bytes());
        // The run id is at most 128 bytes (checked at issue and decode), so its length fits a byte.
        out.push(self.run_id.len() as u8);
        out.extend_from_slice(self.run_id.as_bytes());
        out
    }

    /// Checks that the certificate is signed by the authority it names.
    pub fn verify_signature(&self) -> Result<(), CertificateError> {
        self.authority
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| CertificateError::BadSignature {
                authority: self.authority,
            })
    }

    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_BYTES + self.run_id.len());
        out.extend_from_slice(&CERTIFICATE_MAGIC);
        out.push(CERTIFICATE_VERSION);
        out.extend_from_slice(&self.signed_bytes()[SIGNING_DOMAIN.len()..]);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads the binary form. Every field is checked; trailing bytes are refused; nothing panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, CertificateError> {
        let malformed = |reason: String| CertificateError::Malformed(reason);
        if bytes.len() < FIXED_BYTES {
            return Err(malformed(format!(
                "{} bytes, a certificate has at least {FIXED_BYTES}",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_CERTIFICATE_BYTES {
            return Err(malformed(format!(
                "{} bytes, a certificate has at most {MAX_CERTIFICATE_BYTES}",
                bytes.len()
            )));
        }
        let mut reader = Reader(bytes);
        if reader.take(8)? != CERTIFICATE_MAGIC {
            return Err(malformed("it does not start with CLNYCERT".into()));
        }
        let version = reader.take(1)?[0];
        if version != CERTIFICATE_VERSION {
            return Err(malformed(format!(
                "version {version}, this peer reads version {CERTIFICATE_VERSION}"
            )));
        }
        let authority = reader.peer_id()?;
        let peer = reader.peer_id()?;
        let not_before = reader.u64()?;
        let not_after = reader.u64()?;
        let run_len = usize::from(reader.take(1)?[0]);
        let run_id = std::str::from_utf8(reader.take(run_len)?)
            .map_err(|_| malformed("the run id is not UTF-8".into()))?
            .to_owned();
        check_run_id(&run_id).map_err(|e| malformed(e.to_string()))?;
        if not_after <= not_before {
            return Err(malformed(format!(
                "its validity ends (Unix {not_after}) no later than it starts (Unix {not_before})"
            )));
        }
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(reader.take(SIGNATURE_LEN)?);
        if !reader.0.is_empty() {
            return Err(malformed(format!("{} bytes follow the signature", reader.0.len())));
        }
        Ok(Self {
            authority,
            peer,
            run_id,
            not_before,
            not_after,
            signature,
        })
    }

    /// The text form: comment lines for people, then the binary form as PEM.
    pub fn to_text(&self) -> String {
        format!(
            "# Colony membership certificate (the lines starting with # are not read)\n\
             # peer:      {}\n# run:       {}\n# authority: {}\n# valid:     {} to {}\n{}",
            self.peer,
            self.run_id,
            self.authority,
            format_unix_time(self.not_before),
            format_unix_time(self.not_after),
            pem::encode(&pem::Pem::new(PEM_TAG, self.encode()))
        )
    }

    /// Reads the text form (comments and blank lines around the PEM block are skipped).
    pub fn from_text(text: &str) -> Result<Self, CertificateError> {
        let malformed = |reason: String| CertificateError::Malformed(reason);
        let begin = format!("-----BEGIN {PEM_TAG}-----");
        let start = text
            .find(&begin)
            .ok_or_else(|| malformed(format!("no `{begin}` line")))?;
        let block = pem::parse(&text[start..]).map_err(|e| malformed(format!("not a PEM block: {e}")))?;
        if block.tag() != PEM_TAG {
            return Err(malformed(format!(
                "PEM block is '{}', expected '{PEM_TAG}'",
                block.tag()
            )));
        }
        Self::decode(block.contents())
    }

    /// Writes the text form to `path`.
    pub fn save(&self, path: &Path) -> Result<(), CertificateError> {
        std::fs::write(path, self.to_text()).map_err(|source| CertificateError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a certificate file written by [`Certificate::save`] (or `colony authority issue`).
    pub fn load(path: &Path) -> Result<Self, CertificateError> {
        let io = |source| CertificateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |reason: String| CertificateError::InvalidFile {
            path: path.to_path_buf(),
            reason,
        };
        let length = std::fs::metadata(path).map_err(io)?.len();
        if length > MAX_FILE_BYTES {
            return Err(invalid(format!("{length} bytes is too large for a certificate file")));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let text = String::from_utf8(bytes).map_err(|_| invalid("it is not UTF-8 text".into()))?;
        Self::from_text(&text).map_err(|e| invalid(e.to_string()))
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("authority", &self.authority)
            .field("peer", &self.peer)
            .field("run_id", &self.run_id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Bounds-checked reads from a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], CertificateError> {
        if self.0.len() < len {
            return Err(CertificateError::Malformed(format!(
                "it ends {} bytes early",
                len - self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn peer_id(&mut self) -> Result<PeerId, CertificateError> {
        PeerId::try_from_slice(self.take(PEER_ID_LEN)?).map_err(|e| CertificateError::Malformed(e.to_string()))
    }

    fn u64(&mut self) -> Result<u64, CertificateError> {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(bytes))
    }
}

/// `secs` (Unix seconds) as an RFC 3339 UTC time, `2025-01-31T12:00:00Z`.
pub fn format_unix_time(secs: u64) -> String {
    // Days to a civil date in the proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
    let days = (secs / 86_400) as i128;
    let of_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3_600,
        of_day / 60 % 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Keypair, Certificate) {
        let authority = Keypair::from_seed([9; 32]);
        let peer = Keypair::from_seed([1; 32]).peer_id();
        let certificate = Certificate::issue(&authority, peer, "run-a", 1_700_000_000, 1_700_086_400).unwrap();
        (authority, certificate)
    }

    #[test]
    fn binary_and_text_forms_round_trip() {
        let (authority, certificate) = sample();
        let bytes = certificate.encode();
        assert_eq!(bytes.len(), FIXED_BYTES + "run-a".len());
        assert_eq!(&bytes[..8], b"CLNYCERT");
        assert_eq!(Certificate::decode(&bytes).unwrap(), certificate);
        let text = certificate.to_text();
        assert!(
            text.contains(&certificate.peer().to_string()) && text.contains("2023-11-14T22:13:20Z"),
            "{text}"
        );
        let read = Certificate::from_text(&text).unwrap();
        assert_eq!(read, certificate);
        read.verify_signature().unwrap();
        assert_eq!(read.authority(), authority.peer_id());
        assert!(read.valid_at(1_700_000_000) && !read.valid_at(1_700_086_400) && !read.valid_at(1_699_999_999));
    }

    #[test]
    fn every_field_is_covered_by_the_signature() {
        let (_, certificate) = sample();
        let bytes = certificate.encode();
        // Flipping any bit of the signed fields (after the magic and version) breaks the signature, or the
        // form; never both accepted.
        for index in 9..bytes.len() - SIGNATURE_LEN {
            let mut changed = bytes.clone();
            changed[index] ^= 1;
            if let Ok(decoded) = Certificate::decode(&changed) {
                assert!(decoded.verify_signature().is_err(), "byte {index} is not signed");
            }
        }
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let error = Certificate::decode(&bad).unwrap().verify_signature().unwrap_err();
        assert!(error.to_string().contains("not one of its authority"), "{error}");
    }

    #[test]
    fn malformed_certificates_are_refused_with_a_reason() {
        let (authority, certificate) = sample();
        let bytes = certificate.encode();
        for cut in 0..bytes.len() {
            assert!(Certificate::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(
            Certificate::decode(&long)
                .unwrap_err()
                .to_string()
                .contains("follow the signature")
        );
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(
            Certificate::decode(&magic)
                .unwrap_err()
                .to_string()
                .contains("CLNYCERT")
        );
        let mut version = bytes.clone();
        version[8] = 2;
        assert!(
            Certificate::decode(&version)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        let peer = certificate.peer();
        assert!(Certificate::issue(&authority, peer, "", 1, 2).is_err());
        assert!(Certificate::issue(&authority, peer, &"r".repeat(129), 1, 2).is_err());
        assert!(matches!(
            Certificate::issue(&authority, peer, "run", 5, 5),
            Err(CertificateError::EmptyValidity { .. })
        ));
        assert!(
            Certificate::from_text("hello")
                .unwrap_err()
                .to_string()
                .contains("BEGIN")
        );
        let other_tag = pem::encode(&pem::Pem::new("CERTIFICATE", bytes.clone()));
        assert!(Certificate::from_text(&other_tag).is_err());
    }

    #[test]
    fn files_round_trip_and_bad_files_name_themselves() {
        let (_, certificate) = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.cert");
        certificate.save(&path).unwrap();
        assert_eq!(Certificate::load(&path).unwrap(), certificate);
        std::fs::write(&path, "# nothing here\n").unwrap();
        let error = Certificate::load(&path).unwrap_err().to_string();
        assert!(error.contains("peer.cert") && error.contains("BEGIN"), "{error}");
        let error = Certificate::load(&dir.path().join("missing.cert"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing.cert"), "{error}");
    }

    #[test]
    fn unix_times_print_as_utc_dates() {
        assert_eq!(format_unix_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix_time(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(format_unix_time(4_102_444_800), "2100-01-01T00:00:00Z");
        // The largest value still prints (a far-future year), without overflow.
        assert!(format_unix_time(u64::MAX).ends_with('Z'));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = Certificate::decode(&bytes);
            let _ = Certificate::from_text(&String::from_utf8_lossy(&bytes));
        }
    }
}
