//! pg_listsync's pure logic, kept out of the pgrx library so that it builds and is tested with
//! plain `cargo test -p listsync-core`, without PostgreSQL: the HTTP client and its retry policy,
//! the `Provider` trait with every provider, the planner that turns desired and recorded state
//! into an action, the JSON condition tree compiled to SQL, address identity and the redaction of
//! credentials from what is logged. The numbered invariants ("semantics 3") are in
//! `docs/design.md`.
#![forbid(unsafe_code)]

pub mod address;
pub mod conditions;
pub mod http;
pub mod plan;
pub mod providers;
pub mod redact;
