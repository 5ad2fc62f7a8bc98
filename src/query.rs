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
