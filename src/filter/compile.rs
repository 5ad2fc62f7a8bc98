//! Compiling a predicate the way PostgreSQL cooks a CHECK constraint (`heap.c:cookConstraint`):
//! parse it alone, analyze it against the one table, coerce to boolean, assign collations; then
//! apply the rules of a publication row filter (no volatile functions, no system columns, and
//! what `allowed` says) and deparse it back to canonical, schema-qualified SQL.
//!
//! The canonical text is what the filter's view is created from; from then on the view's stored
//! rule is the predicate's truth (see `catalog`).

use crate::error::{Error, Kind, Result};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::{PgList, is_a};
use std::ffi::{CStr, CString};

pub struct CompiledPredicate {
    /// The predicate deparsed by PostgreSQL: no comments, every name resolved.
    pub sql: String,
    /// Uses `now()`, `current_date` or another STABLE function (semantics 8).
    pub time_dependent: bool,
}

/// Compiles `predicate` over table `relid` for the filter named `filter`. PostgreSQL's own
/// errors (syntax, unknown column, wrong type, subquery, aggregate ...) are re-raised with the
/// filter's name in front and their SQLSTATE kept.
pub fn compile_predicate(
    filter: &str,
    relid: pg_sys::Oid,
    predicate: &str,
    owner: pg_sys::Oid,
) -> Result<CompiledPredicate> {
    if predicate.contains('\0') {
        return Err(
            Error::new(Kind::SyntaxError, "the predicate contains a NUL character")
                .in_filter(filter),
        );
    }
    let source = CString::new(format!("SELECT WHERE {predicate}")).expect("NUL checked above");
    let analyzed = analyze_guarded(relid, &source, true, owner).map_err(|e| e.in_filter(filter))?;
    Ok(CompiledPredicate {
        sql: analyzed.sql,
        time_dependent: analyzed.mutable,
    })
}

/// Compiles a mapped field's SQL expression over table `relid`, under the same rules as a
/// predicate (it runs in the worker as the binding's owner). Returns the deparsed SQL.
pub fn compile_expression(
    filter: &str,
    relid: pg_sys::Oid,
    expression: &str,
    owner: pg_sys::Oid,
) -> Result<String> {
    if expression.contains('\0') {
        return Err(
            Error::new(Kind::SyntaxError, "the expression contains a NUL character")
                .in_filter(filter),
        );
    }
    let source = CString::new(format!("SELECT WHERE {expression}")).expect("NUL checked above");
    Ok(analyze_guarded(relid, &source, false, owner)
        .map_err(|e| e.in_filter(filter))?
        .sql)
}

fn analyze_guarded(
    relid: pg_sys::Oid,
    source: &CStr,
    boolean: bool,
    owner: pg_sys::Oid,
) -> Result<Analyzed> {
    PgTryBuilder::new(|| {
        // SAFETY: `source` outlives the call; everything analyze allocates lives in the current
        // memory context, and a PostgreSQL ERROR inside unwinds into the catch below.
        unsafe { analyze(relid, source, boolean, owner) }
    })
    .catch_others(|caught| Err(from_postgres(caught)))
    .execute()
}

struct Analyzed {
    sql: String,
    mutable: bool,
}

fn from_postgres(caught: CaughtError) -> Error {
    let report = match &caught {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    // The analyzer speaks of "check constraints" because that is the expression kind we use.
    let message = report
        .message()
        .replace("check constraints", "filter predicates")
        .replace("check constraint", "filter predicate");
    let mut error = Error::new(Kind::Postgres(report.sql_error_code()), message);
    error.detail = report.detail().map(str::to_string);
    error.hint = Some(report.hint().map(str::to_string).unwrap_or_else(|| {
        "A filter predicate is a boolean expression over the table's columns, as in a CHECK constraint.".into()
    }));
    error
}

/// # Safety
/// Must run inside a transaction; PostgreSQL ERRORs unwind out of it.
unsafe fn analyze(
    relid: pg_sys::Oid,
    source: &CStr,
    boolean: bool,
    owner: pg_sys::Oid,
) -> Result<Analyzed> {
    // SAFETY: raw_parser and the analyzer take and return palloc'd node trees valid for the
    // current memory context; every pointer dereferenced was just returned non-NULL by
    // PostgreSQL or checked for NULL.
    unsafe {
        let where_clause = single_where_clause(source)?;

        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        // Every refusal below returns through here, so the relation is always closed (an ERROR
        // unwinds into the transaction's abort, which releases it).
        let analyzed = (|| -> Result<Analyzed> {
            (*pstate).p_sourcetext = source.as_ptr();
            let nsitem = pg_sys::addRangeTableEntryForRelation(
                pstate,
                rel,
                pg_sys::AccessShareLock as i32,
                std::ptr::null_mut(),
                false,
                true,
            );
            pg_sys::addNSItemToQuery(pstate, nsitem, true, true, true);
            let expr = pg_sys::transformExpr(
                pstate,
                where_clause,
                pg_sys::ParseExprKind::EXPR_KIND_CHECK_CONSTRAINT,
            );
            let expr = if boolean {
                pg_sys::coerce_to_boolean(pstate, expr, c"filter".as_ptr())
            } else {
                expr
            };
            pg_sys::assign_expr_collations(pstate, expr);

            let mut columns: *mut pg_sys::Bitmapset = std::ptr::null_mut();
            pg_sys::pull_varattnos(expr, 1, &mut columns);
            let mut member = -1;
            loop {
                member = pg_sys::bms_next_member(columns, member);
                if member < 0 {
                    break;
                }
                let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
                if attnum < 0 {
                    return Err(Error::new(
                        Kind::FeatureNotSupported,
                        "system columns cannot be used in a filter",
                    ));
                }
                if attnum == 0 {
                    return Err(Error::new(
                        Kind::FeatureNotSupported,
                        "whole-row references cannot be used in a filter; name the columns",
                    ));
                }
            }
            if pg_sys::contain_volatile_functions(expr) {
                return Err(Error::new(
                    Kind::InvalidObjectDefinition,
                    "a filter predicate cannot use volatile functions (random(), nextval(), clock_timestamp() ...)",
                )
                .with_hint("Stable functions such as now() and current_date are allowed and make the filter time-dependent."));
            }
            let mutable = pg_sys::contain_mutable_functions(expr);
            crate::filter::allowed::check(expr, owner)?;

            let relname = CString::new(crate::names::relation_name(relid)?)
                .map_err(|_| Error::internal("relation name with NUL"))?;
            // Names were resolved by the caller's search_path; they are printed for ours, so that
            // whatever is not in pg_catalog comes out schema-qualified.
            let sql = crate::privilege::with_fixed_search_path(|| {
                let context = pg_sys::deparse_context_for(relname.as_ptr(), relid);
                let deparsed = pg_sys::deparse_expression(expr, context, false, false);
                CStr::from_ptr(deparsed).to_string_lossy().into_owned()
            });

            Ok(Analyzed { sql, mutable })
        })();
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        analyzed
    }
}

/// Parses `SELECT WHERE <predicate>` and insists that nothing but the WHERE clause came out:
/// `true; DROP TABLE t`, `true UNION SELECT ...`, `true ORDER BY 1` and the like are refused.
///
/// # Safety
/// Must run inside a transaction.
unsafe fn single_where_clause(source: &CStr) -> Result<*mut pg_sys::Node> {
    let not_single = || {
        Error::new(Kind::SyntaxError, "a filter predicate must be a single boolean expression")
            .with_hint("Write it as you would write a CHECK constraint, without SELECT, FROM or a trailing semicolon.")
    };
    // SAFETY: raw_parser returns a List of RawStmt (or raises an ERROR); we only read fields of
    // nodes whose tag we checked.
    unsafe {
        let statements =
            pg_sys::raw_parser(source.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        let statements = PgList::<pg_sys::RawStmt>::from_pg(statements);
        if statements.len() != 1 {
            return Err(not_single());
        }
        let raw = statements.get_ptr(0).ok_or_else(not_single)?;
        let stmt = (*raw).stmt;
        if !is_a(stmt, pg_sys::NodeTag::T_SelectStmt) {
            return Err(not_single());
        }
        let select = stmt as *mut pg_sys::SelectStmt;
        let s = &*select;
        let only_where = s.op == pg_sys::SetOperation::SETOP_NONE
            && s.targetList.is_null()
            && s.fromClause.is_null()
            && s.groupClause.is_null()
            && s.havingClause.is_null()
            && s.windowClause.is_null()
            && s.sortClause.is_null()
            && s.limitOffset.is_null()
            && s.limitCount.is_null()
            && s.lockingClause.is_null()
            && s.withClause.is_null()
            && s.distinctClause.is_null()
            && s.intoClause.is_null()
            && s.valuesLists.is_null()
            && !s.whereClause.is_null();
        if only_where {
            Ok(s.whereClause)
        } else {
            Err(not_single())
        }
    }
}
