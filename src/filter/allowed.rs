//! What a filter predicate or a mapped expression may contain (semantics 10), modelled on
//! PostgreSQL's publication row filters (`check_simple_rowfilter_expr`): a filter runs inside
//! every writer's transaction, as the writer, and in the worker as the binding's owner, so it
//! may only call code that no role could have written and that reads nothing but the row.
//!
//! Allowed: built-in functions and operators that are IMMUTABLE, or STABLE from a fixed list of
//! date/time functions; built-in types, plus enums and domains over them as column types;
//! built-in collations; functions an administrator allowed with `listsync.allow_function`.
//! Always checked: EXECUTE on every function, for the role the expression is evaluated as.
//! Refused: anything user-defined, STABLE built-ins that read the database (`table_to_xml`,
//! `query_to_xml`, `current_setting`, `to_regclass`, ...), casts to a domain (its CHECK
//! constraints may call any function), and values that depend on who evaluates the expression
//! (`current_user`, `session_user`, `current_schema`, ...): the writer and the worker would see
//! different values.

use crate::error::{Error, Kind, Result};
use crate::privilege::AsExtension;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::ffi::c_void;

/// STABLE built-ins that only compute with dates and times (they are STABLE because of the time
/// zone or the transaction's start time, not because they read anything). Besides these, any
/// STABLE `pg_catalog` function whose name starts with a date/time type's name followed by `_`
/// (the comparison, arithmetic and I/O functions behind date/time operators and casts).
const STABLE_DATE_TIME_FUNCTIONS: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "age",
    "date_trunc",
    "date_part",
    "date_bin",
    "extract",
    "to_char",
    "to_date",
    "to_timestamp",
    "timezone",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "isfinite",
    "make_timestamptz",
    "overlaps",
];
const STABLE_DATE_TIME_PREFIXES: &str = "^(date|time|timetz|timestamp|timestamptz|interval)_";

/// Everything an expression tree refers to that the rules look at.
#[derive(Default)]
struct Usage {
    functions: Vec<pg_sys::Oid>,
    operators: Vec<pg_sys::Oid>,
    types: Vec<pg_sys::Oid>,
    collations: Vec<pg_sys::Oid>,
    domain_casts: Vec<pg_sys::Oid>,
    evaluator_dependent: bool,
}

/// Checks an analyzed expression (a predicate, or a mapped field) that will be evaluated as
/// `role`. Callers put the filter's or field's name in front of the error.
///
/// # Safety
/// `expr` is an analyzed expression tree in a live memory context.
pub unsafe fn check(expr: *mut pg_sys::Node, role: pg_sys::Oid) -> Result<()> {
    let usage = PgTryBuilder::new(|| {
        // SAFETY: the caller vouches for `expr`; the walker only reads it (set_opfuncid fills
        // a cache field, as the planner does).
        Ok(unsafe { collect(expr) })
    })
    .catch_others(|caught| Err(postgres_message(caught)))
    .execute()?;
    if usage.evaluator_dependent {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            "current_user, session_user, current_role, current_schema and current_catalog cannot be used in a filter",
        )
        .with_hint("A filter is evaluated by every writer and by the worker: its result must not depend on who evaluates it."));
    }
    // Names in errors are printed under the fixed search_path: schema-qualified.
    AsExtension::run(|| {
        if let Some(domain) = usage.domain_casts.first() {
            return Err(Error::new(
                Kind::FeatureNotSupported,
                format!("casting to domain {} is not allowed in a filter", type_name(*domain)?),
            )
            .with_hint(
                "A domain's CHECK constraints can call any function; compare with the base type instead.",
            ));
        }
        check_types(&usage.types)?;
        check_operators(&usage.operators)?;
        check_collations(&usage.collations)?;
        check_functions(&usage.functions, role)
    })
}

fn postgres_message(caught: CaughtError) -> Error {
    let report = match &caught {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    Error::new(Kind::Postgres(report.sql_error_code()), report.message())
}

fn type_name(oid: pg_sys::Oid) -> Result<String> {
    Ok(
        Spi::get_one_with_args::<String>("SELECT pg_catalog.format_type($1, NULL)", &[oid.into()])?
            .unwrap_or_default(),
    )
}

fn first_refused(sql: &str, oids: &[pg_sys::Oid]) -> Result<Option<String>> {
    if oids.is_empty() {
        return Ok(None);
    }
    crate::query::optional::<String>(sql, &[oids.to_vec().into()])
}

/// User-defined types are refused, except enums and domains (over allowed types) as the types
/// of columns and constants: their comparisons are built-in functions, and reading a domain
/// value runs none of its constraints.
fn check_types(types: &[pg_sys::Oid]) -> Result<()> {
    let refused = first_refused(
        "WITH RECURSIVE reached(root, t) AS (
             SELECT u, u FROM pg_catalog.unnest($1::oid[]) AS u
             UNION
             SELECT r.root, CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.typelem END
               FROM reached r JOIN pg_catalog.pg_type ty ON ty.oid = r.t
              WHERE ty.oid >= 16384 AND (ty.typtype = 'd' OR (ty.typcategory = 'A' AND ty.typelem <> 0)))
         SELECT pg_catalog.format_type(r.root, NULL) FROM reached r JOIN pg_catalog.pg_type ty ON ty.oid = r.t
          WHERE ty.oid >= 16384 AND ty.typtype NOT IN ('e', 'd')
            AND NOT (ty.typcategory = 'A' AND ty.typelem <> 0)
          LIMIT 1",
        types,
    )?;
    match refused {
        None => Ok(()),
        Some(name) => Err(Error::new(
            Kind::FeatureNotSupported,
            format!("user-defined type {name} is not allowed in a filter"),
        )
        .with_hint(
            "Filters may use built-in types, and enums and domains over them as column types.",
        )),
    }
}

fn check_operators(operators: &[pg_sys::Oid]) -> Result<()> {
    match first_refused(
        "SELECT o::pg_catalog.regoperator::text FROM pg_catalog.unnest($1::oid[]) AS o WHERE o >= 16384 LIMIT 1",
        operators,
    )? {
        None => Ok(()),
        Some(name) => Err(Error::new(
            Kind::FeatureNotSupported,
            format!("user-defined operator {name} is not allowed in a filter"),
        )
        .with_hint("Filters may use built-in operators only.")),
    }
}

fn check_collations(collations: &[pg_sys::Oid]) -> Result<()> {
    match first_refused(
        "SELECT c::pg_catalog.regcollation::text FROM pg_catalog.unnest($1::oid[]) AS c WHERE c >= 16384 LIMIT 1",
        collations,
    )? {
        None => Ok(()),
        Some(name) => Err(Error::new(
            Kind::FeatureNotSupported,
            format!("user-defined collation {name} is not allowed in a filter"),
        )
        .with_hint("Filters may use built-in collations only.")),
    }
}

fn check_functions(functions: &[pg_sys::Oid], role: pg_sys::Oid) -> Result<()> {
    if functions.is_empty() {
        return Ok(());
    }
    let verdict = Spi::connect(|c| -> Result<Option<(String, String)>> {
        let rows = c.select(
            "SELECT p.oid::pg_catalog.regprocedure::text,
                    CASE
                      WHEN NOT pg_catalog.has_function_privilege($2, p.oid, 'EXECUTE') THEN 'execute'
                      WHEN EXISTS (SELECT FROM listsync.allowed_functions a WHERE a.function = p.oid) THEN NULL
                      WHEN p.oid >= 16384 THEN 'user-defined'
                      WHEN p.provolatile = 'i' THEN NULL
                      WHEN p.provolatile = 's' AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
                           AND (p.proname::text = ANY($3) OR p.proname::text ~ $4) THEN NULL
                      ELSE 'not-allowed'
                    END AS refusal
               FROM pg_catalog.pg_proc p
              WHERE p.oid = ANY($1)
              ORDER BY p.oid",
            None,
            &[
                functions.to_vec().into(),
                role.into(),
                STABLE_DATE_TIME_FUNCTIONS
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .into(),
                STABLE_DATE_TIME_PREFIXES.into(),
            ],
        )?;
        for row in rows {
            if let Some(refusal) = row.get::<String>(2)? {
                return Ok(Some((row.get::<String>(1)?.unwrap_or_default(), refusal)));
            }
        }
        Ok(None)
    })?;
    let Some((function, refusal)) = verdict else {
        return Ok(());
    };
    let role_name = crate::privilege::role_name(role);
    Err(match refusal.as_str() {
        "execute" => Error::new(
            Kind::InsufficientPrivilege,
            format!("permission denied for function {function}"),
        )
        .with_detail(format!("Role \"{role_name}\" has no EXECUTE privilege on it.")),
        "user-defined" => Error::new(
            Kind::InsufficientPrivilege,
            format!("function {function} is not built in and cannot be used in a filter"),
        )
        .with_hint(format!(
            "A filter runs in every writer's transaction, as the writer. An administrator may allow this function with SELECT listsync.allow_function('{function}')."
        )),
        _ => Error::new(
            Kind::FeatureNotSupported,
            format!("function {function} cannot be used in a filter"),
        )
        .with_hint("Filters may call IMMUTABLE built-in functions and the date/time functions now(), current_date, date_trunc, age, extract, to_char ...; never functions that read the database or settings."),
    })
}

/// # Safety
/// `expr` is an analyzed expression tree.
unsafe fn collect(expr: *mut pg_sys::Node) -> Usage {
    #[pg_guard]
    unsafe extern "C-unwind" fn record_function(func: pg_sys::Oid, context: *mut c_void) -> bool {
        // SAFETY: `context` is the `Usage` passed by `walk` below, alive for the whole walk.
        unsafe { (*(context as *mut Usage)).functions.push(func) };
        false
    }
    #[pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: `node` is a node of the analyzed tree, `context` the `Usage` being filled;
        // each cast follows a check of the node's tag.
        unsafe {
            let usage = &mut *(context as *mut Usage);
            pg_sys::check_functions_in_node(node, Some(record_function), context);
            let tag = (*node).type_;
            use pg_sys::NodeTag::*;
            match tag {
                T_OpExpr | T_DistinctExpr | T_NullIfExpr => {
                    usage.operators.push((*(node as *mut pg_sys::OpExpr)).opno)
                }
                T_ScalarArrayOpExpr => usage
                    .operators
                    .push((*(node as *mut pg_sys::ScalarArrayOpExpr)).opno),
                T_CoerceToDomain => usage
                    .domain_casts
                    .push((*(node as *mut pg_sys::CoerceToDomain)).resulttype),
                T_SQLValueFunction => {
                    use pg_sys::SQLValueFunctionOp::*;
                    let op = (*(node as *mut pg_sys::SQLValueFunction)).op;
                    if matches!(
                        op,
                        SVFOP_CURRENT_ROLE
                            | SVFOP_CURRENT_USER
                            | SVFOP_USER
                            | SVFOP_SESSION_USER
                            | SVFOP_CURRENT_CATALOG
                            | SVFOP_CURRENT_SCHEMA
                    ) {
                        usage.evaluator_dependent = true;
                    }
                }
                _ => {}
            }
            if !matches!(tag, T_List | T_IntList | T_OidList) {
                usage.types.push(pg_sys::exprType(node));
                usage.collations.push(pg_sys::exprCollation(node));
                usage.collations.push(pg_sys::exprInputCollation(node));
            }
            pg_sys::expression_tree_walker(node, Some(walk), context)
        }
    }
    let mut usage = Usage::default();
    // SAFETY: the walker only reads the tree and fills `usage`, which outlives it.
    unsafe { walk(expr, &mut usage as *mut Usage as *mut c_void) };
    for list in [
        &mut usage.functions,
        &mut usage.operators,
        &mut usage.types,
        &mut usage.collations,
    ] {
        list.retain(|oid| *oid != pg_sys::InvalidOid);
        list.sort_unstable_by_key(|oid| oid.to_u32());
        list.dedup();
    }
    usage
}
