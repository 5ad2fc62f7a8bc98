//! SPI helpers our catalog code needs beyond pgrx's: a single value that may be absent.

use crate::error::Result;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

/// The first column of the first row, or `None` when the query returns no row (pgrx's
/// `get_one` treats no row as an error) or a NULL.
pub fn optional<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Result<Option<T>> {
    Spi::connect_mut(|client| {
        let rows = client.update(sql, Some(1), args)?;
        if rows.is_empty() {
            Ok(None)
        } else {
            Ok(rows.first().get_one::<T>()?)
        }
    })
}

/// Runs `body` in a subtransaction, as PL/pgSQL's EXCEPTION blocks do: an error inside (a
/// PostgreSQL ERROR or our own) rolls back only what `body` did and comes back as its message,
/// so one binding's failure does not abort the work of the others.
pub fn in_subtransaction<T>(body: impl FnOnce() -> Result<T>) -> std::result::Result<T, String> {
    use pgrx::pg_sys;
    use pgrx::pg_sys::panic::CaughtError;
    // SAFETY: the memory context and resource owner are saved before the subtransaction and
    // restored after it is released or rolled back, exactly as PL/pgSQL does.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let outcome = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            body().map_err(|e| e.to_string())
        }))
        .catch_others(|caught| {
            Err(match &caught {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                    r.message().to_string()
                }
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute();
        if outcome.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        outcome
    }
}
