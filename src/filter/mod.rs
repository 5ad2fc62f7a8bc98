//! Filter compilation and evaluation: a JSON condition tree becomes SQL (`listsync_core::conditions`), SQL is
//! analyzed like a CHECK constraint (`compile`), the analyzed predicate is stored as a view and
//! read back from its rule (`view`), and evaluated natively per row (`eval`).
pub mod allowed;
pub mod compile;
pub mod dispatch;
pub mod eval;
pub mod revalidate;
pub mod view;
