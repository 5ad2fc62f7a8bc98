//! Operations: dead letters back to the outbox, and waking the worker.

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
    crate::wake::wake_now();
}
