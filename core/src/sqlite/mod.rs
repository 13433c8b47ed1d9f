//! SQLite side (in progress).
