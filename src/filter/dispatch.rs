//! Which filters a row could possibly match, without evaluating them.
//!
//! CRM filters mostly pin a column to a value (`city = 'Moscow' AND ...`). A table with a
//! hundred bindings would otherwise evaluate a hundred predicates on every captured row (twice
//! for an UPDATE). Like a publish/subscribe matcher, filters whose predicate has a top-level
//! conjunct `column = constant` are indexed by that constant: a row is only evaluated against
//! the filters keyed by its own value in that column, plus the filters that have no such
//! conjunct. The predicate is still evaluated in full for every candidate, so the index only
//! ever skips filters that would have been false.
//!
//! Only equality whose meaning is byte equality is indexed: `text`/`varchar` under a
//! deterministic collation, `int4`, `int8`, `bool`.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgList, is_a};
use std::collections::HashMap;

const INT8_EQUAL_OPERATOR: u32 = 410;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Text,
    Word,
}

/// A column some filters are keyed on, with the filters per value.
struct Index {
    attnum: i16,
    kind: KeyKind,
    filters: HashMap<Vec<u8>, Vec<usize>>,
}

/// The filters of one table, organised for candidate lookup.
#[derive(Default)]
pub struct Dispatch {
    indexes: Vec<Index>,
    /// Filters with no indexable conjunct: always candidates.
    unkeyed: Vec<usize>,
}

impl Dispatch {
    /// Adds filter number `filter`, whose stored predicate is `quals`.
    ///
    /// # Safety
    /// `quals` is an analyzed predicate tree (a view rule's WHERE clause) or NULL.
    pub unsafe fn add(&mut self, filter: usize, quals: *mut pg_sys::Node) {
        // SAFETY: per the contract.
        let key = unsafe { equality_key(quals) };
        match key {
            Some((attnum, kind, value)) => {
                let position = match self
                    .indexes
                    .iter()
                    .position(|i| i.attnum == attnum && i.kind == kind)
                {
                    Some(p) => p,
                    None => {
                        self.indexes.push(Index {
                            attnum,
                            kind,
                            filters: HashMap::new(),
                        });
                        self.indexes.len() - 1
                    }
                };
                self.indexes[position]
                    .filters
                    .entry(value)
                    .or_default()
                    .push(filter);
            }
            None => self.unkeyed.push(filter),
        }
    }

    /// Marks in `candidates` every filter the row in `slot` could match.
    ///
    /// # Safety
    /// `slot` holds a row of the table the filters are over.
    pub unsafe fn candidates(&self, slot: *mut pg_sys::TupleTableSlot, candidates: &mut [bool]) {
        candidates.iter_mut().for_each(|c| *c = false);
        for filter in &self.unkeyed {
            candidates[*filter] = true;
        }
        for index in &self.indexes {
            let mut is_null = false;
            // SAFETY: per the contract; the attribute exists in the slot's descriptor.
            let datum = unsafe { pg_sys::slot_getattr(slot, index.attnum as i32, &mut is_null) };
            if is_null {
                continue;
            }
            // SAFETY: the datum is of the column's type, which `kind` describes.
            let value = unsafe { key_bytes(datum, index.kind) };
            if let Some(filters) = index.filters.get(&value) {
                for filter in filters {
                    candidates[*filter] = true;
                }
            }
        }
    }
}

/// # Safety
/// `datum` is a non-NULL value of a type of kind `kind`.
unsafe fn key_bytes(datum: pg_sys::Datum, kind: KeyKind) -> Vec<u8> {
    match kind {
        // SAFETY: text and varchar are varlena text; from_datum detoasts.
        KeyKind::Text => unsafe { String::from_datum(datum, false) }
            .unwrap_or_default()
            .into_bytes(),
        KeyKind::Word => (datum.value() as u64).to_le_bytes().to_vec(),
    }
}

/// The first top-level conjunct of `quals` of the form `column = constant` with byte-equality
/// semantics: (attribute number, kind, constant's bytes).
///
/// # Safety
/// `quals` is an analyzed expression tree (or NULL).
unsafe fn equality_key(quals: *mut pg_sys::Node) -> Option<(i16, KeyKind, Vec<u8>)> {
    if quals.is_null() {
        return None;
    }
    // SAFETY: node tags are checked before every cast.
    unsafe {
        if is_a(quals, pg_sys::NodeTag::T_BoolExpr) {
            let boolean = quals as *mut pg_sys::BoolExpr;
            if (*boolean).boolop != pg_sys::BoolExprType::AND_EXPR {
                return None;
            }
            let args = PgList::<pg_sys::Node>::from_pg((*boolean).args);
            return args.iter_ptr().find_map(|arg| equality_key(arg));
        }
        if !is_a(quals, pg_sys::NodeTag::T_OpExpr) {
            return None;
        }
        let op = quals as *mut pg_sys::OpExpr;
        let kind = match (*op).opno.to_u32() {
            pg_sys::TextEqualOperator
                if pg_sys::get_collation_isdeterministic((*op).inputcollid) =>
            {
                KeyKind::Text
            }
            pg_sys::Int4EqualOperator | INT8_EQUAL_OPERATOR | pg_sys::BooleanEqualOperator => {
                KeyKind::Word
            }
            _ => return None,
        };
        let args = PgList::<pg_sys::Node>::from_pg((*op).args);
        let (Some(left), Some(right)) = (args.get_ptr(0), args.get_ptr(1)) else {
            return None;
        };
        let (var, constant) = match (strip_relabel(left), strip_relabel(right)) {
            (l, r) if is_a(l, pg_sys::NodeTag::T_Var) && is_a(r, pg_sys::NodeTag::T_Const) => {
                (l, r)
            }
            (l, r) if is_a(r, pg_sys::NodeTag::T_Var) && is_a(l, pg_sys::NodeTag::T_Const) => {
                (r, l)
            }
            _ => return None,
        };
        let var = var as *mut pg_sys::Var;
        let constant = constant as *mut pg_sys::Const;
        if (*var).varattno <= 0 || (*var).varlevelsup != 0 || (*constant).constisnull {
            return None;
        }
        Some((
            (*var).varattno,
            kind,
            key_bytes((*constant).constvalue, kind),
        ))
    }
}

/// A column of a binary-compatible type (varchar compared as text) is wrapped in RelabelType.
///
/// # Safety
/// `node` is an expression node.
unsafe fn strip_relabel(node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    // SAFETY: the tag is checked before the cast.
    unsafe {
        if is_a(node, pg_sys::NodeTag::T_RelabelType) {
            (*(node as *mut pg_sys::RelabelType)).arg as *mut pg_sys::Node
        } else {
            node
        }
    }
}
