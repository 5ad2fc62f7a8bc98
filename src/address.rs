//! The SQL face of address identity (semantics 4); the rules themselves live in
//! `listsync_core::address`.

use listsync_core::address::{normalize, phone_identity};
use pgrx::prelude::*;

/// `listsync.phone_identity(text)`: the identity of a contact known by its phone
/// (`tel:+4930123456`), or NULL when it is not a phone number.
#[pg_extern(name = "phone_identity", immutable, strict, parallel_safe)]
fn phone_identity_sql(phone: &str) -> Option<String> {
    phone_identity(phone)
}

/// `listsync.normalize_email(text)`: the address a binding would keep for this email, or NULL
/// when it is not a deliverable address. Usable in an expression index, which makes the worker's
/// look-ups by address index scans on large tables.
#[pg_extern(immutable, strict, parallel_safe)]
fn normalize_email(email: &str) -> Option<String> {
    normalize(email)
}
