//! Native per-row evaluation of stored predicates, the way pgoutput evaluates publication row
//! filters: each predicate is prepared once into an `ExprState` bound to a long-lived executor
//! state, and evaluated against the trigger's tuple slot with WHERE semantics (NULL = no match).

use pgrx::pg_sys;

/// An executor state with its own memory context under `CacheMemoryContext`, holding the
/// prepared predicates of one table. Dropping it frees all of them.
pub struct Evaluator {
    context: pg_sys::MemoryContext,
    estate: *mut pg_sys::EState,
    econtext: *mut pg_sys::ExprContext,
}

/// A predicate prepared by an [`Evaluator`]; valid while the evaluator lives.
#[derive(Clone, Copy)]
pub struct Prepared(*mut pg_sys::ExprState);

impl Evaluator {
    pub fn new() -> Evaluator {
        // SAFETY: creates a memory context under CacheMemoryContext (which lives as long as the
        // backend) and an executor state inside it; all are released in Drop.
        unsafe {
            let context = pg_sys::AllocSetContextCreateInternal(
                pg_sys::CacheMemoryContext,
                c"pg_listsync capture".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let previous = pg_sys::MemoryContextSwitchTo(context);
            let estate = pg_sys::CreateExecutorState();
            let econtext = pg_sys::MakePerTupleExprContext(estate);
            pg_sys::MemoryContextSwitchTo(previous);
            Evaluator {
                context,
                estate,
                econtext,
            }
        }
    }

    /// The memory context things living as long as this evaluator should be allocated in.
    pub fn memory_context(&self) -> pg_sys::MemoryContext {
        self.context
    }

    /// Plans and prepares `expr` (copied; the caller's tree may be short-lived).
    pub fn prepare(&self, expr: *mut pg_sys::Node) -> Prepared {
        // SAFETY: `expr` is an analyzed expression tree; the copy and everything ExecPrepareExpr
        // builds live in the executor state's query context, owned by this evaluator.
        unsafe {
            let previous = pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
            let copy = pg_sys::copyObjectImpl(expr as *const std::ffi::c_void) as *mut pg_sys::Expr;
            let state = pg_sys::ExecPrepareExpr(copy, self.estate);
            pg_sys::MemoryContextSwitchTo(previous);
            Prepared(state)
        }
    }

    /// Whether the row in `slot` satisfies `predicate`. A NULL result is no match.
    ///
    /// # Safety
    /// `slot` must be a valid slot holding a row of the table the predicate was prepared for.
    pub unsafe fn matches(&self, predicate: Prepared, slot: *mut pg_sys::TupleTableSlot) -> bool {
        // SAFETY: per the contract above; the per-tuple memory is reset by `reset_row`.
        unsafe {
            (*self.econtext).ecxt_scantuple = slot;
            let mut is_null = false;
            let result =
                pg_sys::ExecEvalExprSwitchContext(predicate.0, self.econtext, &mut is_null);
            !is_null && result.value() != 0
        }
    }

    /// Frees what evaluating one row allocated.
    pub fn reset_row(&self) {
        // SAFETY: the per-tuple context belongs to our executor state.
        unsafe { pg_sys::MemoryContextReset((*self.econtext).ecxt_per_tuple_memory) };
    }
}

impl Default for Evaluator {
    fn default() -> Self {
        Evaluator::new()
    }
}

impl Drop for Evaluator {
    fn drop(&mut self) {
        // SAFETY: frees the executor state and then the context that contains it; nothing
        // prepared by this evaluator is used afterwards (Prepared values die with their entry).
        unsafe {
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::MemoryContextDelete(self.context);
        }
    }
}
