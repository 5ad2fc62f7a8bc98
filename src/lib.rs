//! pg_listsync: keeps mailing lists at email providers in step with saved filters over a CRM's
//! contact tables.
//!
//! The in-database half (catalog, filter compilation, the capture trigger, the outbox) runs in
//! the writing backend; the delivery half (worker, HTTP, providers) runs in background workers.
//! The invariants in `docs/design.md` are referred to by number in comments ("semantics 3").
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

pub mod address;
pub mod capture;
pub mod catalog;
pub mod catalog_version;
pub mod delivery;
pub mod error;
pub mod filter;
pub mod guc;
pub mod instance;
pub mod names;
pub mod outbox;
pub mod privilege;
pub mod query;
pub mod serving;
pub mod sql_types;
pub mod wake;
pub mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/api.sql", name = "api", finalize);

/// Loaded from `shared_preload_libraries` the library also starts the workers and wakes them at
/// commit; loaded on demand (a backend calling a function) it only evaluates and records.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::define();
    capture::register_callbacks();
    // SAFETY: reading a postmaster-set global flag during library load.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        wake::init_shared_memory();
        worker::register_launcher();
        wake::install_utility_hook();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_listsync'",
            "listsync.database = 'pgrx_tests'",
        ]
    }
}
