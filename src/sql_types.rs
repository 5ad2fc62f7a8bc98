//! Argument types of the SQL surface whose pgrx counterparts turn bad input into an internal
//! error (XX000) before our code runs: a `regclass` naming no relation (`0::oid::regclass`),
//! a `regprocedure` likewise, a `jsonb` nested deeper than the JSON parser's recursion limit.
//! These hold the raw value; the function reads it and reports bad input with its SQLSTATE.

use crate::error::{Error, Kind};
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::Value;

/// Deeper nesting than this is refused: serde_json's own recursion limit, which keeps parsing
/// (and dropping) a value from exhausting the stack.
pub const MAX_JSON_DEPTH: usize = 128;

macro_rules! sql_argument {
    ($type:ident, $sql:literal) => {
        pgrx::impl_sql_translatable!($type, arg_only = $sql);

        // SAFETY: the value is unboxed with its own FromDatum, as pgrx does for its own types.
        unsafe impl<'fcx> ArgAbi<'fcx> for $type {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                // SAFETY: the caller guarantees the argument is of this SQL type and not NULL.
                unsafe { arg.unbox_arg_using_from_datum() }
                    .unwrap_or_else(|| panic!("argument {index} must not be null"))
            }
        }
    };
}

/// A `regclass` argument: the OID as given, checked by whoever uses it.
pub struct Regclass(pub pg_sys::Oid);

impl FromDatum for Regclass {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Regclass> {
        // SAFETY: a regclass datum is an OID by value.
        unsafe { pg_sys::Oid::from_datum(datum, is_null) }.map(Regclass)
    }
}
sql_argument!(Regclass, "regclass");

/// A `regprocedure` argument: the OID as given.
pub struct Regprocedure(pub pg_sys::Oid);

impl FromDatum for Regprocedure {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Regprocedure> {
        // SAFETY: a regprocedure datum is an OID by value.
        unsafe { pg_sys::Oid::from_datum(datum, is_null) }.map(Regprocedure)
    }
}
sql_argument!(Regprocedure, "regprocedure");

/// A `jsonb` argument as PostgreSQL's text form, parsed by [`Jsonb::parse`].
pub struct Jsonb(String);

impl FromDatum for Jsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Jsonb> {
        if is_null {
            return None;
        }
        // SAFETY: a non-NULL jsonb datum is a (possibly toasted) jsonb varlena; jsonb_out
        // returns a palloc'd C string of valid UTF-8 (the database encoding is checked by
        // PostgreSQL for jsonb input).
        unsafe {
            let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            let text = pgrx::direct_function_call::<&std::ffi::CStr>(
                pg_sys::jsonb_out,
                &[Some(pg_sys::Datum::from(detoasted))],
            )?;
            Some(Jsonb(text.to_string_lossy().into_owned()))
        }
    }
}
sql_argument!(Jsonb, "jsonb");

impl Jsonb {
    /// The value, or an error naming `argument` when it nests deeper than [`MAX_JSON_DEPTH`].
    pub fn parse(&self, argument: &str) -> crate::error::Result<Value> {
        serde_json::from_str(&self.0).map_err(|e| {
            if e.to_string().starts_with("recursion limit exceeded") {
                Error::new(
                    Kind::InvalidParameter,
                    format!("{argument} nests too deeply"),
                )
                .with_hint(format!(
                    "JSON arguments may nest at most {MAX_JSON_DEPTH} levels of arrays and objects."
                ))
            } else {
                Error::invalid(format!("{argument}: {e}"))
            }
        })
    }
}
