//! Whether what this database records will ever be delivered. Without the library in
//! `shared_preload_libraries`, or with the database missing from `listsync.database`, every
//! function and trigger still works and the outbox fills, but no worker ever reads it: the calls
//! a user makes while setting up say so at once instead of leaving `pending` to grow.

use crate::guc;
use crate::wake;
use pgrx::prelude::*;

#[derive(Debug, PartialEq, Eq)]
pub enum Unserved {
    NotPreloaded,
    NotListed {
        database: String,
        listed: Vec<String>,
    },
}

/// What keeps the current database from being served, if anything.
pub fn unserved() -> Option<Unserved> {
    if !wake::preloaded() {
        return Some(Unserved::NotPreloaded);
    }
    let database = crate::names::current_database();
    let listed = guc::databases();
    (!listed.contains(&database)).then_some(Unserved::NotListed { database, listed })
}

impl Unserved {
    pub fn message(&self) -> String {
        match self {
            Unserved::NotPreloaded => "pg_listsync is not in shared_preload_libraries: no worker runs, and nothing recorded will be delivered".into(),
            Unserved::NotListed { database, listed } => format!(
                "database \"{database}\" is not in listsync.database ({}): no worker serves it, and nothing recorded here will be delivered",
                if listed.is_empty() { "empty".to_string() } else { format!("'{}'", listed.join(", ")) }
            ),
        }
    }

    pub fn hint(&self) -> String {
        match self {
            Unserved::NotPreloaded => "Add pg_listsync to shared_preload_libraries in postgresql.conf and restart PostgreSQL; what was recorded meanwhile is delivered then.".into(),
            Unserved::NotListed { database, listed } => {
                let mut wanted = listed.clone();
                wanted.push(database.clone());
                format!(
                    "ALTER SYSTEM SET listsync.database = '{}'; SELECT pg_reload_conf();",
                    wanted.join(", ").replace('\'', "''")
                )
            }
        }
    }
}

/// Raises a WARNING (`what` names the call) when the current database is not served.
pub fn warn_if_unserved(what: &str) {
    if let Some(unserved) = unserved() {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("{what}: {}", unserved.message()),
            "pg_listsync",
        )
        .set_hint(unserved.hint())
        .report(PgLogLevel::WARNING);
    }
}
