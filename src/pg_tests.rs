//! In-database tests (`cargo pgrx test`): each runs in a transaction that is rolled back.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn normalize_email_is_exposed() {
        assert_eq!(
            Spi::get_one::<String>("SELECT listsync.normalize_email('  Ann@Example.COM ')").unwrap(),
            Some("ann@example.com".into())
        );
    }
}
