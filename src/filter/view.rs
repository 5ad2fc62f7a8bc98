//! Reading a filter's or binding's view back: its rule is the stored, analyzed predicate (with
//! the table's current column numbers and names), which is what the capture trigger evaluates
//! and what `alter_filter`/`bind_filter_to_list` re-deparse.
//!
//! The views are always `SELECT <target list> FROM <one table> WHERE (<predicate>)`.

use crate::error::{Error, Result};
use crate::filter::allowed;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgList, is_a};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};

/// The parsed `_RETURN` rule of a view over one table.
pub struct ViewRule {
    query: *mut pg_sys::Query,
    /// Range-table index of the table (its Vars carry this `varno`).
    table_index: i32,
    pub table: pg_sys::Oid,
}

impl ViewRule {
    /// The stored rule of the binding's view.
    pub fn of_binding(binding: i64) -> Result<ViewRule> {
        let view = crate::names::view_oid(&crate::names::binding_view(binding))?
            .ok_or_else(|| Error::internal(format!("the view of binding {binding} is missing")))?;
        ViewRule::load(view)
    }

    /// Loads and parses the view's rule into the current memory context.
    pub fn load(view: pg_sys::Oid) -> Result<ViewRule> {
        let action: Option<String> = crate::query::optional(
            "SELECT ev_action::text FROM pg_catalog.pg_rewrite WHERE ev_class = $1 AND rulename = '_RETURN'",
            &[view.into()],
        )?;
        let action =
            action.ok_or_else(|| Error::internal(format!("view {} has no rule", view.to_u32())))?;
        let action = CString::new(action).map_err(|_| Error::internal("rule text with NUL"))?;
        // SAFETY: the text is PostgreSQL's own nodeToString output from pg_rewrite (never user
        // input); stringToNode rebuilds the List of Query it was made from. Pointers read below
        // are checked for NULL and node tags before being cast.
        unsafe {
            let list = pg_sys::stringToNode(action.as_ptr()) as *mut pg_sys::List;
            let queries = PgList::<pg_sys::Query>::from_pg(list);
            let query = queries
                .get_ptr(0)
                .ok_or_else(|| Error::internal("empty view rule"))?;
            let jointree = (*query).jointree;
            let from = PgList::<pg_sys::Node>::from_pg((*jointree).fromlist);
            let item = from
                .get_ptr(0)
                .filter(|_| from.len() == 1)
                .ok_or_else(|| Error::internal("view is not over one table"))?;
            if !is_a(item, pg_sys::NodeTag::T_RangeTblRef) {
                return Err(Error::internal("view is not over one table"));
            }
            let table_index = (*(item as *mut pg_sys::RangeTblRef)).rtindex;
            let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
            // Range-table indexes count from 1.
            let rte = usize::try_from(table_index)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| rtable.get_ptr(i))
                .ok_or_else(|| Error::internal("bad range table index"))?;
            Ok(ViewRule {
                query,
                table_index,
                table: (*rte).relid,
            })
        }
    }

    /// The WHERE clause, as stored (Vars numbered `table_index`); evaluable with the table's row
    /// as the scan tuple.
    pub fn quals(&self) -> *mut pg_sys::Node {
        // SAFETY: `query` was checked in `load`; jointree is never NULL for a SELECT.
        unsafe { (*(*self.query).jointree).quals }
    }

    /// The expression of the target-list entry named `name`.
    fn target(&self, name: &str) -> Result<*mut pg_sys::Node> {
        // SAFETY: the target list holds TargetEntry nodes whose resname is NULL or a C string.
        unsafe {
            let entries = PgList::<pg_sys::TargetEntry>::from_pg((*self.query).targetList);
            for entry in entries.iter_ptr() {
                let resname = (*entry).resname;
                if !resname.is_null() && CStr::from_ptr(resname).to_bytes() == name.as_bytes() {
                    return Ok((*entry).expr as *mut pg_sys::Node);
                }
            }
        }
        Err(Error::internal(format!("view has no column {name}")))
    }

    /// The table columns (attribute numbers) an expression of this view reads.
    fn columns_of(&self, node: *mut pg_sys::Node) -> Vec<i16> {
        let mut set: *mut pg_sys::Bitmapset = std::ptr::null_mut();
        let mut columns = Vec::new();
        // SAFETY: pull_varattnos only reads the tree and builds a palloc'd bitmapset.
        unsafe {
            pg_sys::pull_varattnos(node, self.table_index as pg_sys::Index, &mut set);
            let mut member = -1;
            loop {
                member = pg_sys::bms_next_member(set, member);
                if member < 0 {
                    break;
                }
                let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
                if attnum > 0 {
                    columns.push(attnum as i16);
                }
            }
        }
        columns
    }

    /// Whether the view has an output column `name`.
    pub fn has_column(&self, name: &str) -> bool {
        self.target(name).is_ok()
    }

    /// The column the view selects `AS <name>`, when it is a plain column reference.
    pub fn column_of(&self, name: &str) -> Result<i16> {
        let node = self.target(name)?;
        self.columns_of(node)
            .first()
            .copied()
            .ok_or_else(|| Error::internal(format!("view column {name} reads no table column")))
    }

    /// The columns the predicate reads.
    pub fn predicate_columns(&self) -> Vec<i16> {
        self.columns_of(self.quals())
    }

    /// The columns the view's `fields` expression reads (a binding's mapped fields).
    pub fn field_columns(&self) -> Result<Vec<i16>> {
        Ok(self.columns_of(self.target("fields")?))
    }

    /// Deparses an expression of this view as SQL over the table, unqualified.
    fn deparse(&self, node: *mut pg_sys::Node) -> Result<String> {
        let relname = CString::new(crate::names::relation_name(self.table)?)
            .map_err(|_| Error::internal("relation name with NUL"))?;
        // SAFETY: the copy is renumbered to the single-table numbering deparse_context_for
        // builds; deparse_expression returns a palloc'd C string. Printed under the fixed
        // search_path, every name outside pg_catalog comes out schema-qualified.
        crate::privilege::with_fixed_search_path(|| unsafe {
            let copy = pg_sys::copyObjectImpl(node as *const std::ffi::c_void) as *mut pg_sys::Node;
            pg_sys::ChangeVarNodes(copy, self.table_index, 1, 0);
            let context = pg_sys::deparse_context_for(relname.as_ptr(), self.table);
            let text = pg_sys::deparse_expression(copy, context, false, false);
            Ok(CStr::from_ptr(text).to_string_lossy().into_owned())
        })
    }

    /// The mapped fields: provider field name → its expression, as the view computes them.
    fn field_expressions(&self) -> Result<Vec<(String, *mut pg_sys::Node)>> {
        let node = self.target("fields")?;
        let mut fields = Vec::new();
        // SAFETY: `fields` is either a Const ('{}'::jsonb) or a call of jsonb_build_object whose
        // arguments alternate a text Const key and a value expression (we built it so).
        unsafe {
            if !is_a(node, pg_sys::NodeTag::T_FuncExpr) {
                return Ok(fields);
            }
            let args = PgList::<pg_sys::Node>::from_pg((*(node as *mut pg_sys::FuncExpr)).args);
            let args: Vec<*mut pg_sys::Node> = args.iter_ptr().collect();
            for pair in args.chunks(2) {
                let [key, value] = pair else { break };
                if !is_a(*key, pg_sys::NodeTag::T_Const) {
                    return Err(Error::internal("mapped field key is not a constant"));
                }
                let key = *key as *mut pg_sys::Const;
                if (*key).consttype != pg_sys::TEXTOID {
                    return Err(Error::internal("mapped field key is not text"));
                }
                let name =
                    String::from_datum((*key).constvalue, (*key).constisnull).unwrap_or_default();
                fields.push((name, *value));
            }
        }
        Ok(fields)
    }

    /// The mapped fields: provider field name → SQL, as the view computes them now.
    pub fn fields(&self) -> Result<BTreeMap<String, String>> {
        self.field_expressions()?
            .into_iter()
            .map(|(name, node)| Ok((name, self.deparse(node)?)))
            .collect()
    }

    /// Whether the predicate and (in a binding's view) the mapped fields follow today's rules
    /// for what a filter may contain, evaluated as `role` (`allowed`).
    pub fn check_allowed(&self, role: pg_sys::Oid) -> Result<()> {
        // SAFETY: the quals and field expressions are parts of the rule loaded in `load`.
        unsafe {
            allowed::check(self.quals(), role)?;
            if self.has_column("fields") {
                for (name, node) in self.field_expressions()? {
                    allowed::check(node, role)
                        .map_err(|e| e.in_object(&format!("field \"{name}\"")))?;
                }
            }
        }
        Ok(())
    }

    pub fn predicate(&self) -> Result<String> {
        self.deparse(self.quals())
    }
}

/// The predicate of a filter's view, deparsed as SQL over its table.
pub fn predicate_sql(view: pg_sys::Oid) -> Result<String> {
    ViewRule::load(view)?.predicate()
}
