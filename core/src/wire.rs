//! Wire format (in progress).
