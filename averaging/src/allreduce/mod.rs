//! Being written; see issue 4.
