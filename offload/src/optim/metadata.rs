//! The byte encoding of an optimizer's non-tensor state, sent beside its state tensors during state transfer.
//!
//! Version 1 is 12 bytes:
//!
//! | bytes | field      | meaning                                                        |
//! |-------|------------|----------------------------------------------------------------|
//! | 0     | `version`  | 1                                                              |
//! | 1     | `kind`     | 1 SGD, 2 Adam, 3 AdamW, 4 LAMB                                 |
//! | 2     | `flags`    | bit 0: SGD's momentum buffer is initialised; other bits are 0   |
//! | 3     | `reserved` | 0                                                              |
//! | 4..12 | `steps`    | steps taken, little-endian `u64`                               |
//!
//! Decoding checks every field and returns an error naming it; it never panics, whatever the bytes.

use super::{OptimizerError, OptimizerKind};

/// The version this crate writes and reads.
pub const METADATA_VERSION: u8 = 1;
/// Length of a version-1 encoding.
pub const METADATA_LEN: usize = 12;
const MOMENTUM_INITIALISED: u8 = 1;

/// The non-tensor state of an optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Metadata {
    /// Steps taken.
    pub steps: u64,
    /// Whether SGD's momentum buffer holds a velocity (false before the first step).
    pub momentum_initialised: bool,
}

fn kind_tag(kind: &OptimizerKind) -> u8 {
    match kind {
        OptimizerKind::Sgd { .. } => 1,
        OptimizerKind::Adam { .. } => 2,
        OptimizerKind::AdamW { .. } => 3,
        OptimizerKind::Lamb { .. } => 4,
    }
}

impl Metadata {
    /// The encoding of this state for an optimizer of `kind`.
    pub fn encode(&self, kind: &OptimizerKind) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(METADATA_LEN);
        bytes.push(METADATA_VERSION);
        bytes.push(kind_tag(kind));
        bytes.push(if self.momentum_initialised {
            MOMENTUM_INITIALISED
        } else {
            0
        });
        bytes.push(0);
        bytes.extend_from_slice(&self.steps.to_le_bytes());
        bytes
    }

    /// Decodes `bytes` for an optimizer of `kind`.
    pub fn decode(bytes: &[u8], kind: &OptimizerKind) -> Result<Self, OptimizerError> {
        let invalid = |field, value: String, rule: String| OptimizerError::InvalidMetadata { field, value, rule };
        let Some(&version) = bytes.first() else {
            return Err(invalid("length", "0 bytes".into(), format!("{METADATA_LEN} bytes")));
        };
        if version != METADATA_VERSION {
            return Err(invalid("version", version.to_string(), format!("{METADATA_VERSION}")));
        }
        let Ok(bytes) = <&[u8; METADATA_LEN]>::try_from(bytes) else {
            return Err(invalid(
                "length",
                format!("{} bytes", bytes.len()),
                format!("{METADATA_LEN} bytes for version {METADATA_VERSION}"),
            ));
        };
        let expected = kind_tag(kind);
        if bytes[1] != expected {
            return Err(invalid(
                "kind",
                bytes[1].to_string(),
                format!("{expected} ({}), the kind of this optimizer", kind.name()),
            ));
        }
        let allowed = if matches!(kind, OptimizerKind::Sgd { .. }) {
            MOMENTUM_INITIALISED
        } else {
            0
        };
        if bytes[2] & !allowed != 0 {
            return Err(invalid(
                "flags",
                format!("{:#04x}", bytes[2]),
                format!("within {allowed:#04x} for {}", kind.name()),
            ));
        }
        if bytes[3] != 0 {
            return Err(invalid("reserved", bytes[3].to_string(), "0".into()));
        }
        let mut steps = [0u8; 8];
        steps.copy_from_slice(&bytes[4..]);
        Ok(Self {
            steps: u64::from_le_bytes(steps),
            momentum_initialised: bytes[2] & MOMENTUM_INITIALISED != 0,
        })
    }
}
