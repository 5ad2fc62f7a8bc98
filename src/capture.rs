//! The capture trigger: inside the writing transaction, decide which (binding, address) pairs a
//! row change made dirty, and record them in the outbox (semantics 2, 3, 7).
//!
//! Three triggers per bound table, installed and kept current by [`sync_triggers`]:
//! - `listsync_capture`, AFTER INSERT OR DELETE OR UPDATE OF <every column a binding reads>, FOR
//!   EACH ROW: evaluates each filter natively on OLD and NEW and buffers dirty pairs. An UPDATE
//!   of other columns never reaches it (PostgreSQL's own column-list firing).
//! - `listsync_capture_flush`, the same events FOR EACH STATEMENT: writes the buffered pairs to
//!   the outbox with one INSERT per statement. Pairs of a statement that fails, or of a
//!   subtransaction that rolls back, are dropped from the buffer; leftovers (writes routed to
//!   a partition directly) are flushed before commit or prepare.
//! - `listsync_capture_truncate`, AFTER TRUNCATE: every recorded member becomes dirty.
//!
//! The per-table state (prepared predicates, which columns matter) is built once per backend
//! from the filter and binding views and dropped on a relcache invalidation of the table.

use crate::error::{Error, Kind, OrRaise};
use crate::filter::dispatch::Dispatch;
use crate::filter::eval::{Evaluator, Prepared};
use crate::filter::view::ViewRule;
use crate::names::{filter_view, view_oid};
use crate::privilege::AsExtension;
use pgrx::prelude::*;
use pgrx::{PgRelation, PgTupleDesc, pg_sys};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;

// SAFETY (of the declaration): the signature matches utils/datum.h; it only compares memory
// and never raises an ERROR, so it needs no guard.
unsafe extern "C-unwind" {
    /// `utils/datum.h`; compares two datums' stored images (toasted values by pointer).
    fn datumIsEqual(
        value1: pg_sys::Datum,
        value2: pg_sys::Datum,
        typ_by_val: bool,
        typ_len: i32,
    ) -> bool;
}

struct FilterState {
    predicate: Prepared,
    email: i16,
}

struct BindingState {
    id: i64,
    /// Paused when the capture state was built (pause and resume invalidate it).
    paused: bool,
    filter: usize,
    mapped: Vec<i16>,
    /// The phone column identifying contacts without an email, where the provider allows it.
    phone: Option<i16>,
}

#[derive(Clone, Copy)]
struct ColumnState {
    attnum: i16,
    len: i16,
    by_value: bool,
}

/// A partition's rows converted to the shape of the bound (partitioned) table.
struct Conversion {
    map: *mut pg_sys::TupleConversionMap,
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
}

struct TableCapture {
    filters: Vec<FilterState>,
    bindings: Vec<BindingState>,
    /// Every column some binding reads: an UPDATE changing none of them is nothing to us.
    read: Vec<ColumnState>,
    /// Which filters a row could match, so that only those are evaluated.
    dispatch: Dispatch,
    conversion: Option<Conversion>,
    // Last: the evaluator owns the memory everything above points into.
    evaluator: Evaluator,
}

thread_local! {
    static TABLES: RefCell<HashMap<pg_sys::Oid, TableCapture>> = RefCell::new(HashMap::new());
    static STALE: RefCell<HashSet<pg_sys::Oid>> = RefCell::new(HashSet::new());
    static ALL_STALE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

/// Dirty pairs waiting for the statement's end, each with the subtransaction that marked it.
#[derive(Default)]
struct Pending {
    pairs: HashMap<(i64, String), pg_sys::SubTransactionId>,
    /// Whether a pair belongs to a binding the worker serves now (not paused): only those wake
    /// it at commit. A paused binding's pairs wait for `resume_binding`, which wakes it.
    wakes_worker: bool,
}

impl Pending {
    fn mark(&mut self, binding: &BindingState, address: String) {
        // SAFETY: reads the current subtransaction id, a backend global.
        let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
        self.pairs.entry((binding.id, address)).or_insert(subxact);
        self.wakes_worker |= !binding.paused;
    }

    fn into_parts(self) -> (HashMap<(i64, String), pg_sys::SubTransactionId>, bool) {
        (self.pairs, self.wakes_worker)
    }

    /// A rolled-back subtransaction takes its marks (and its children's, which have larger
    /// ids) with it; marks of earlier, enclosing or committed siblings stay.
    fn forget_since(&mut self, subxact: pg_sys::SubTransactionId) {
        self.pairs.retain(|_, marked_in| *marked_in < subxact);
    }
}

pub fn register_callbacks() {
    // SAFETY: registering process-lifetime callbacks during library load; both are #[pg_guard]
    // and never raise an ERROR from a COMMIT/ABORT event.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_invalidated), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Only marks: the entry may be in use further up the stack (invalidations arrive whenever
    // a lock is taken); it is rebuilt at the next trigger call.
    if relid == pg_sys::InvalidOid {
        ALL_STALE.with(|all| all.set(true));
    } else {
        STALE.with(|stale| stale.borrow_mut().insert(relid));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // Still inside the transaction: an ERROR here aborts it cleanly.
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE | XACT_EVENT_PARALLEL_PRE_COMMIT => {
            flush_pending().or_raise()
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            PENDING.with(|p| *p.borrow_mut() = Pending::default())
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    subxact: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        PENDING.with(|p| p.borrow_mut().forget_since(subxact));
    }
}

// ---------------------------------------------------------------------------------------------
// The triggers

// The trigger functions take the call's fcinfo themselves (rather than `#[pg_trigger]`, which
// fails with an internal error when called directly), so that a direct call gets 39P01.

/// The TriggerData of a trigger call, or 39P01 when `function` was called some other way.
fn trigger_data<'a>(
    fcinfo: pg_sys::FunctionCallInfo,
    function: &str,
) -> crate::error::Result<&'a pg_sys::TriggerData> {
    // SAFETY: PostgreSQL passes a valid fcinfo; its context is NULL or a node, and a
    // TriggerData node lives for the whole trigger call.
    unsafe {
        let context = (*fcinfo).context;
        if !context.is_null() && (*context).type_ == pg_sys::NodeTag::T_TriggerData {
            return Ok(&*(context as *const pg_sys::TriggerData));
        }
    }
    Err(Error::new(
        Kind::TriggerProtocolViolated,
        format!("{function}() can only be called as a trigger"),
    )
    .with_hint("pg_listsync installs it on bound tables itself (listsync.bind_filter_to_list)."))
}

#[pg_extern(
    sql = r#"CREATE FUNCTION listsync."capture"() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"#
)]
fn capture(fcinfo: pg_sys::FunctionCallInfo) {
    let data = trigger_data(fcinfo, "listsync.capture").or_raise();
    // SAFETY: for an AFTER ROW trigger the slots hold the old/new row as the event requires.
    unsafe { capture_row(data) }.or_raise();
}

#[pg_extern(
    sql = r#"CREATE FUNCTION listsync."capture_flush"() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"#
)]
fn capture_flush(fcinfo: pg_sys::FunctionCallInfo) {
    trigger_data(fcinfo, "listsync.capture_flush").or_raise();
    flush_pending().or_raise();
}

#[pg_extern(
    sql = r#"CREATE FUNCTION listsync."capture_truncate"() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"#
)]
fn capture_truncate(fcinfo: pg_sys::FunctionCallInfo) {
    let data = trigger_data(fcinfo, "listsync.capture_truncate").or_raise();
    // SAFETY: tg_relation is the table the trigger fired on.
    let relid = unsafe { (*data.tg_relation).rd_id };
    AsExtension::run(|| -> crate::error::Result<()> {
        Spi::run_with_args(
            &format!("INSERT INTO listsync.outbox AS o (binding_id, address)
             SELECT m.binding_id, m.address FROM listsync.members m
               JOIN listsync.bindings b ON b.id = m.binding_id
              WHERE b.source = $1::oid::regclass AND b.state <> 'inactive'
             UNION
             SELECT b.id, '' FROM listsync.bindings b WHERE b.source = $1::oid::regclass AND b.state <> 'inactive'
             {}", crate::outbox::ON_CONFLICT_DIRTY),
            &[relid.into()],
        )?;
        Ok(())
    })
    .or_raise();
    crate::wake::request_wake();
}

/// # Safety
/// `data` must be the TriggerData of an AFTER ROW trigger call.
unsafe fn capture_row(data: &pg_sys::TriggerData) -> crate::error::Result<()> {
    // SAFETY: tg_relation is the table the trigger fired on.
    let relid = unsafe { (*data.tg_relation).rd_id };
    let event = data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let (old, new) = match event {
        pg_sys::TRIGGER_EVENT_INSERT => (std::ptr::null_mut(), data.tg_trigslot),
        pg_sys::TRIGGER_EVENT_UPDATE => (data.tg_trigslot, data.tg_newslot),
        pg_sys::TRIGGER_EVENT_DELETE => (data.tg_trigslot, std::ptr::null_mut()),
        _ => return Ok(()),
    };
    with_table(relid, data.tg_relation, |table| {
        // SAFETY: slots come from the trigger data; conversion slots belong to the table entry.
        unsafe { table.capture(old, new) };
        Ok(())
    })
}

impl TableCapture {
    /// Which filters the row in `slot` (NULL: no row) satisfies.
    ///
    /// # Safety
    /// `slot` is NULL or holds a row of the bound table.
    unsafe fn matching(&self, slot: *mut pg_sys::TupleTableSlot) -> Vec<bool> {
        let mut matches = vec![false; self.filters.len()];
        if slot.is_null() {
            return matches;
        }
        // SAFETY: per the contract.
        unsafe {
            self.dispatch.candidates(slot, &mut matches);
            for (filter, candidate) in self.filters.iter().zip(matches.iter_mut()) {
                if *candidate {
                    *candidate = self.evaluator.matches(filter.predicate, slot);
                }
            }
        }
        matches
    }

    /// # Safety
    /// `old`/`new` are NULL or slots holding rows of the table this entry was built for.
    unsafe fn capture(&self, old: *mut pg_sys::TupleTableSlot, new: *mut pg_sys::TupleTableSlot) {
        // SAFETY: see the function contract; every slot access is by attribute number of the
        // bound table, which the (converted) slots have.
        unsafe {
            let (old, new) = match &self.conversion {
                None => (old, new),
                Some(c) => (convert(c, old, c.old), convert(c, new, c.new)),
            };
            if !old.is_null() && !new.is_null() && !self.read.iter().any(|c| changed(c, old, new)) {
                return;
            }
            let old_match = self.matching(old);
            let new_match = self.matching(new);
            self.evaluator.reset_row();

            PENDING.with(|pending| {
                let mut pending = pending.borrow_mut();
                for binding in &self.bindings {
                    let (was, is) = (old_match[binding.filter], new_match[binding.filter]);
                    if !was && !is {
                        continue;
                    }
                    let email = self.filters[binding.filter].email;
                    let old_address = if was {
                        Some(address_of(old, email, binding.phone))
                    } else {
                        None
                    };
                    let new_address = if is {
                        Some(address_of(new, email, binding.phone))
                    } else {
                        None
                    };
                    let mut mark = |address: Option<String>| {
                        pending.mark(binding, address.unwrap_or_default())
                    };
                    match (old_address, new_address) {
                        (Some(a), None) | (None, Some(a)) => mark(a),
                        (Some(a), Some(b)) if a != b => {
                            mark(a);
                            mark(b);
                        }
                        (Some(a), Some(_)) => {
                            let columns = self
                                .read
                                .iter()
                                .filter(|c| binding.mapped.contains(&c.attnum));
                            if columns.into_iter().any(|c| changed(c, old, new)) {
                                mark(a);
                            }
                        }
                        (None, None) => {}
                    }
                }
            });
        }
    }
}

/// The identity a row holds: `Some(normalized address)` — or, for bindings identifying contacts
/// by phone too, `Some("tel:…")` when the email is not an address — or `None` when the row has
/// none, which the outbox records as the empty address, "recount this binding's skipped rows".
/// Computed exactly as the binding's view computes `address`.
///
/// # Safety
/// `slot` holds a row with text-like columns `email` (and `phone`).
unsafe fn address_of(
    slot: *mut pg_sys::TupleTableSlot,
    email: i16,
    phone: Option<i16>,
) -> Option<String> {
    // SAFETY: per the contract.
    let by_email =
        unsafe { text_of(slot, email) }.and_then(|raw| listsync_core::address::normalize(&raw));
    match (by_email, phone) {
        (Some(address), _) => Some(address),
        // SAFETY: per the contract.
        (None, Some(phone)) => unsafe { text_of(slot, phone) }
            .and_then(|raw| listsync_core::address::phone_identity(&raw)),
        (None, None) => None,
    }
}

/// # Safety
/// `slot` holds a row with a text-like column `attnum`.
unsafe fn text_of(slot: *mut pg_sys::TupleTableSlot, attnum: i16) -> Option<String> {
    let mut is_null = false;
    // SAFETY: per the contract; text-like types (text, varchar, bpchar, citext) are varlena
    // text, which String::from_datum detoasts and reads.
    unsafe {
        let datum = pg_sys::slot_getattr(slot, attnum as i32, &mut is_null);
        String::from_datum(datum, is_null)
    }
}

/// # Safety
/// Both slots hold rows of the same table.
unsafe fn changed(
    column: &ColumnState,
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
) -> bool {
    let (mut old_null, mut new_null) = (false, false);
    // SAFETY: per the contract; datumIsEqual only reads the datums' images.
    unsafe {
        let a = pg_sys::slot_getattr(old, column.attnum as i32, &mut old_null);
        let b = pg_sys::slot_getattr(new, column.attnum as i32, &mut new_null);
        match (old_null, new_null) {
            (true, true) => false,
            (false, false) => !datumIsEqual(a, b, column.by_value, column.len as i32),
            _ => true,
        }
    }
}

/// # Safety
/// `from` is NULL or a slot of the partition; `to` a slot of the bound table's shape.
unsafe fn convert(
    conversion: &Conversion,
    from: *mut pg_sys::TupleTableSlot,
    to: *mut pg_sys::TupleTableSlot,
) -> *mut pg_sys::TupleTableSlot {
    if from.is_null() {
        return from;
    }
    // SAFETY: per the contract; the map was built from these two tuple descriptors.
    unsafe { pg_sys::execute_attr_map_slot((*conversion.map).attrMap, from, to) }
}

/// Runs `body` with the capture state of `relid`, building it if missing or stale.
fn with_table(
    relid: pg_sys::Oid,
    relation: pg_sys::Relation,
    body: impl FnOnce(&TableCapture) -> crate::error::Result<()>,
) -> crate::error::Result<()> {
    if ALL_STALE.with(|all| all.replace(false)) {
        TABLES.with(|t| t.borrow_mut().clear());
        STALE.with(|s| s.borrow_mut().clear());
    }
    if STALE.with(|s| s.borrow_mut().remove(&relid)) {
        TABLES.with(|t| t.borrow_mut().remove(&relid));
    }
    let present = TABLES.with(|t| t.borrow().contains_key(&relid));
    if !present {
        let built = build(relid, relation)?;
        TABLES.with(|t| t.borrow_mut().insert(relid, built));
    }
    TABLES.with(|t| match t.borrow().get(&relid) {
        Some(table) => body(table),
        None => Ok(()),
    })
}

fn build(relid: pg_sys::Oid, relation: pg_sys::Relation) -> crate::error::Result<TableCapture> {
    AsExtension::run(|| {
        // A partition's row trigger is a clone of its ancestor's: find the bound ancestor.
        let bound: Option<pg_sys::Oid> = crate::query::optional(
            "SELECT b.source::oid FROM listsync.bindings b
              WHERE (b.source::oid = $1 OR b.source::oid IN (SELECT relid FROM pg_catalog.pg_partition_ancestors($1)))
                AND b.state <> 'inactive'
              ORDER BY b.source::oid = $1 DESC LIMIT 1",
            &[relid.into()],
        )?;
        let evaluator = Evaluator::new();
        let Some(bound) = bound else {
            return Ok(TableCapture {
                filters: vec![],
                bindings: vec![],
                read: vec![],
                dispatch: Dispatch::default(),
                conversion: None,
                evaluator,
            });
        };
        type Row = (i64, i64, String, bool, pg_sys::Oid);
        let rows = Spi::connect(|c| -> crate::error::Result<Vec<Row>> {
            let mut rows = Vec::new();
            for row in c.select(
                "SELECT b.id, f.id, f.name, b.state = 'paused', b.owner::oid FROM listsync.bindings b JOIN listsync.filters f ON f.id = b.filter_id
                  WHERE b.source = $1::oid::regclass AND b.state <> 'inactive' ORDER BY f.id, b.id",
                None,
                &[bound.into()],
            )? {
                rows.push((
                    row.get(1)?.unwrap_or_default(),
                    row.get(2)?.unwrap_or_default(),
                    row.get(3)?.unwrap_or_default(),
                    row.get(4)?.unwrap_or_default(),
                    row.get(5)?.unwrap_or(pg_sys::InvalidOid),
                ));
            }
            Ok(rows)
        })?;

        let mut filters: Vec<FilterState> = Vec::new();
        let mut dispatch = Dispatch::default();
        let mut filter_index: HashMap<i64, usize> = HashMap::new();
        let mut bindings = Vec::new();
        let mut read: Vec<i16> = Vec::new();
        for (binding_id, filter_id, filter_name, paused, owner) in rows {
            let rule = ViewRule::of_binding(binding_id)?;
            if let Err(refused) = rule.check_allowed(owner) {
                // A binding made under older rules that breaks today's is never evaluated; the
                // worker puts it in state error with this reason (`revalidate_bindings`).
                warning!("pg_listsync: binding {binding_id} is not captured: {refused}");
                continue;
            }
            let index = match filter_index.get(&filter_id) {
                Some(i) => *i,
                None => {
                    let view = view_oid(&filter_view(&filter_name))?.ok_or_else(|| {
                        Error::internal(format!("the view of filter \"{filter_name}\" is missing"))
                    })?;
                    let rule = ViewRule::load(view)?;
                    let email = rule.column_of("email")?;
                    read.push(email);
                    read.extend(rule.predicate_columns());
                    // SAFETY: the rule was just loaded; quals is its analyzed WHERE clause.
                    unsafe { dispatch.add(filters.len(), rule.quals()) };
                    filters.push(FilterState {
                        predicate: evaluator.prepare(rule.quals()),
                        email,
                    });
                    filter_index.insert(filter_id, filters.len() - 1);
                    filters.len() - 1
                }
            };
            let mapped = rule.field_columns()?;
            let phone = if rule.has_column("phone") {
                Some(rule.column_of("phone")?)
            } else {
                None
            };
            read.extend(&mapped);
            read.extend(phone);
            bindings.push(BindingState {
                id: binding_id,
                paused,
                filter: index,
                mapped,
                phone,
            });
        }
        read.sort_unstable();
        read.dedup();

        // SAFETY: the relation is open for the trigger call; its descriptor lives as long.
        let (read, conversion) = unsafe {
            let bound_relation = PgRelation::open(bound);
            let descriptor = bound_relation.rd_att;
            // Not reference-counted by us: the relation holds it.
            let columns = PgTupleDesc::from_pg_unchecked(descriptor);
            let read = read
                .into_iter()
                .map(|attnum| {
                    // Column numbers come from the views' rules: user columns, numbered from 1.
                    let attribute = usize::try_from(attnum)
                        .ok()
                        .and_then(|n| n.checked_sub(1))
                        .and_then(|index| columns.get(index))
                        .ok_or_else(|| {
                            Error::internal(format!("column {attnum} is not a column of the table"))
                        })?;
                    Ok(ColumnState {
                        attnum,
                        len: attribute.attlen,
                        by_value: attribute.attbyval,
                    })
                })
                .collect::<crate::error::Result<Vec<_>>>()?;
            let conversion = if bound == relid {
                None
            } else {
                conversion_for(&evaluator, relation, descriptor)
            };
            (read, conversion)
        };
        Ok(TableCapture {
            filters,
            bindings,
            read,
            dispatch,
            conversion,
            evaluator,
        })
    })
}

/// How to read a partition's rows as rows of the bound table; `None` when they have the same
/// shape (attribute numbers agree).
///
/// # Safety
/// `partition` is open; `bound_descriptor` is the bound table's descriptor.
unsafe fn conversion_for(
    evaluator: &Evaluator,
    partition: pg_sys::Relation,
    bound_descriptor: pg_sys::TupleDesc,
) -> Option<Conversion> {
    // SAFETY: everything is allocated in the evaluator's context and lives as long as it.
    unsafe {
        let previous = pg_sys::MemoryContextSwitchTo(evaluator.memory_context());
        let target = pg_sys::CreateTupleDescCopy(bound_descriptor);
        let source = pg_sys::CreateTupleDescCopy((*partition).rd_att);
        let map = pg_sys::convert_tuples_by_name(source, target);
        let conversion = (!map.is_null()).then(|| Conversion {
            map,
            old: pg_sys::MakeSingleTupleTableSlot(target, &pg_sys::TTSOpsVirtual),
            new: pg_sys::MakeSingleTupleTableSlot(target, &pg_sys::TTSOpsVirtual),
        });
        pg_sys::MemoryContextSwitchTo(previous);
        conversion
    }
}

/// Writes the buffered dirty pairs to the outbox, with one statement.
pub fn flush_pending() -> crate::error::Result<()> {
    let (pairs, wakes_worker) = PENDING
        .with(|p| std::mem::take(&mut *p.borrow_mut()))
        .into_parts();
    if pairs.is_empty() {
        return Ok(());
    }
    let (bindings, addresses): (Vec<i64>, Vec<String>) = pairs.into_keys().unzip();
    // Only the user switches (the statement is schema-qualified and planned once): this runs
    // after every statement that dirtied something.
    crate::privilege::as_extension_keeping_search_path(|| {
        crate::outbox::mark(bindings, addresses)
    })?;
    if wakes_worker {
        crate::wake::request_wake();
    }
    Ok(())
}
