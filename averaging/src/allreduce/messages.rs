//! The messages of `/colony/allreduce/1`.
//!
//! A sender opens one stream per reducer. Sender → reducer: [`ToReducer::Begin`] (which group), then one
//! [`ToReducer::Part`] per part the reducer owns, in order, each with the encoded values as the frame's raw
//! payload. Reducer → sender: one [`ToSender::Averaged`] per part, in order, whose payload is the average
//! itself for an uncompressed part, else `average − the sender's decoded part` in the codec the sender used;
//! or one [`ToSender::Refused`] that ends the stream.

/// Frames from a sender to a reducer.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ToReducer {
    /// First frame: the group this stream belongs to.
    Begin {
        /// The group id from matchmaking.
        group_id: [u8; 32],
    },
    /// One part; the payload holds its values encoded with `codec`.
    Part {
        /// Global part index (see [`crate::partition::PartitionPlan::parts`]).
        index: u64,
        /// [`crate::codec::Codec::id`] of the payload.
        codec: u8,
    },
}

/// Frames from a reducer to a sender.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ToSender {
    /// The averaged part: the average for codec `none`, else a delta to the sender's own values in its codec.
    Averaged {
        /// Global part index.
        index: u64,
        /// [`crate::codec::Codec::id`] of the payload.
        codec: u8,
    },
    /// The reducer will not (or no longer) reduce this sender's parts.
    Refused {
        /// Why, as a [`Refusal`] code.
        code: u8,
        /// Details for the log.
        detail: String,
    },
}

/// Why a reducer refuses a sender's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No run of this group started here in time.
    UnknownGroup,
    /// The run was cancelled.
    Cancelled,
    /// The run already finished.
    Finished,
    /// The sender is not a sender of this group, or broke the protocol (order, lengths, codecs, values).
    ProtocolViolation,
    /// The sender was dropped from this round (it stalled longer than the sender timeout).
    Banned,
}

impl Refusal {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Refusal::UnknownGroup => 1,
            Refusal::Cancelled => 2,
            Refusal::Finished => 3,
            Refusal::ProtocolViolation => 4,
            Refusal::Banned => 5,
        }
    }

    /// The refusal of a wire code, if known.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Refusal::UnknownGroup,
            2 => Refusal::Cancelled,
            3 => Refusal::Finished,
            4 => Refusal::ProtocolViolation,
            5 => Refusal::Banned,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::UnknownGroup => "unknown group",
            Refusal::Cancelled => "cancelled",
            Refusal::Finished => "already finished",
            Refusal::ProtocolViolation => "protocol violation",
            Refusal::Banned => "sender dropped",
        })
    }
}
