//! Operations: dead letters back to the outbox, waking the worker, and whether a worker serves
//! this database at all.

use super::rows::*;
use super::*;

/// Puts dead letters back in the outbox (all of them, or one binding's).
#[pg_extern]
fn retry_dead_letters(binding: default!(Option<i64>, "NULL")) -> i64 {
    retry_dead_letters_impl(binding).or_raise()
}

fn retry_dead_letters_impl(binding: Option<i64>) -> Result<i64> {
    match binding {
        Some(id) => {
            owned_binding(id)?;
        }
        None => privilege::require_admin("retry every dead letter")?,
    }
    AsExtension::run(|| {
        let n = Spi::get_one_with_args::<i64>(
            "WITH retried AS (
                 DELETE FROM listsync.dead_letter_items WHERE $1::bigint IS NULL OR binding_id = $1 RETURNING binding_id, address),
             queued AS (
                 INSERT INTO listsync.outbox AS o (binding_id, address) SELECT binding_id, address FROM retried
                 ON CONFLICT (binding_id, address) DO UPDATE SET generation = o.generation + 1, lease_until = NULL,
                                                             not_before = '-infinity', attempts = 0
                 RETURNING 1)
             SELECT count(*) FROM queued",
            &[binding.into()],
        )?
        .unwrap_or(0);
        crate::wake::request_wake();
        Ok(n)
    })
}

/// Wakes the worker now (after PREPARE TRANSACTION / COMMIT PREPARED, which do not).
#[pg_extern]
fn wake() {
    crate::serving::warn_if_unserved("wake");
    crate::wake::wake_now();
}

/// Whether what this database records is delivered: false, with a WARNING saying why and what
/// to change, when the library is not preloaded or the database is not in listsync.database.
/// CREATE EXTENSION runs it.
#[pg_extern]
fn check_setup() -> bool {
    crate::serving::warn_if_unserved("pg_listsync setup");
    crate::serving::unserved().is_none()
}

/// Confirms that this database, a restore or a clone of another, is to deliver to the lists its
/// bindings name (with the credentials it holds): the worker starts delivering.
#[pg_extern]
fn confirm_restore() {
    confirm_restore_impl().or_raise()
}

fn confirm_restore_impl() -> Result<()> {
    privilege::require_admin("confirm a restore")?;
    AsExtension::run(|| {
        match crate::instance::unconfirmed_copy_of()? {
            Some(original) => notice!(
                "this database now delivers as its own what was bound in {}: the worker resumes",
                original.describe()
            ),
            None => notice!("this database is not a copy: nothing to confirm"),
        }
        crate::instance::record_here(true)?;
        crate::wake::request_wake();
        Ok(())
    })
}

/// Whether this database is a restore or a clone whose deliveries wait for `confirm_restore`;
/// `listsync.status` shows its bindings as `restored`.
#[pg_extern(stable)]
fn restore_unconfirmed() -> bool {
    AsExtension::run(|| crate::instance::unconfirmed_copy_of().map(|copy| copy.is_some()))
        .or_raise()
}

/// The launcher's shared registry of running database workers; `listsync.workers` reads it.
// pgrx reads the column names from this signature: a type alias would lose them.
#[allow(clippy::type_complexity)]
#[pg_extern]
fn worker_registry() -> TableIterator<
    'static,
    (
        name!(database, pg_sys::Oid),
        name!(pid, i32),
        name!(started_at_ms, i64),
        name!(last_cycle_at_ms, i64),
        name!(cycles, i64),
        name!(last_error_at_ms, i64),
        name!(last_error, Option<String>),
    ),
> {
    TableIterator::new(
        crate::wake::workers()
            .into_iter()
            .map(|(database, pid, a)| {
                (
                    pg_sys::Oid::from(database),
                    pid,
                    a.started_at_ms,
                    a.last_cycle_at_ms,
                    a.cycles,
                    a.last_error_at_ms,
                    a.last_error(),
                )
            }),
    )
}
