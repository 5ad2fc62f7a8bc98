//! Shared memory between the writing backends, the database workers and the launcher:
//! which worker serves which database, so that a commit that dirtied something can set that
//! worker's latch (commit → provider call in milliseconds, not a polling interval), and so that
//! `DROP DATABASE` can ask the worker connected to it to leave first.

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgList, PgLwLock, is_a, pg_shmem_init, pg_sys};
use std::cell::Cell;
use std::ffi::{CStr, c_char};
use std::sync::atomic::{AtomicBool, Ordering};

pub const MAX_DATABASES: usize = 32;

#[derive(Copy, Clone, Default)]
pub struct WorkerSlot {
    pub database: u32,
    pub pid: i32,
    pub procno: i32,
    pub exit_requested: bool,
    /// The launcher does not start a worker for this database before this time (ms since the
    /// epoch): set while a DROP/RENAME DATABASE waits for the database to be free.
    pub suspended_until_ms: i64,
    pub activity: Activity,
}

/// What the worker in a slot has done, for `listsync.workers` (times in ms since the epoch).
#[derive(Copy, Clone)]
pub struct Activity {
    pub started_at_ms: i64,
    pub last_cycle_at_ms: i64,
    pub cycles: i64,
    pub last_error_at_ms: i64,
    last_error: [u8; LAST_ERROR_BYTES],
    last_error_len: usize,
}

const LAST_ERROR_BYTES: usize = 256;

impl Default for Activity {
    fn default() -> Self {
        Activity {
            started_at_ms: 0,
            last_cycle_at_ms: 0,
            cycles: 0,
            last_error_at_ms: 0,
            last_error: [0; LAST_ERROR_BYTES],
            last_error_len: 0,
        }
    }
}

impl Activity {
    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len]).into_owned())
    }

    fn set_last_error(&mut self, message: &str) {
        // Cut at a character boundary: the slot is fixed-size shared memory.
        let mut len = message.len().min(LAST_ERROR_BYTES);
        while !message.is_char_boundary(len) {
            len -= 1;
        }
        self.last_error[..len].copy_from_slice(&message.as_bytes()[..len]);
        self.last_error_len = len;
    }
}

#[derive(Copy, Clone, Default)]
pub struct Registry {
    pub slots: [WorkerSlot; MAX_DATABASES],
}

// SAFETY: plain Copy data with no pointers, as shared memory requires.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: `PgLwLock::new` is unsafe because the lock is usable only once `pg_shmem_init!` has
// attached it to shared memory. `init_shared_memory` does so during preload; every use is
// behind `preloaded()` or in the workers and the utility hook, which exist only when preloaded.
static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_listsync_registry") };

/// Set in the postmaster during preload and inherited by every backend it forks: shared memory
/// (and so waking) exists only then.
static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

pub fn init_shared_memory() {
    pg_shmem_init!(REGISTRY);
    PRELOADED.store(true, Ordering::Relaxed);
    // SAFETY: a process-lifetime callback registered at preload; #[pg_guard] and never raising.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Asks for the current database's worker to be woken when this transaction commits.
pub fn request_wake() {
    WAKE_AT_COMMIT.with(|w| w.set(true));
}

/// Whether this transaction asked for a wake-up so far; clears the request (tests only).
#[cfg(any(test, feature = "pg_test"))]
pub fn take_wake_request() -> bool {
    WAKE_AT_COMMIT.with(|w| w.replace(false))
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        // After ProcArrayEndTransaction: the worker's next snapshot sees the commit.
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT
            if WAKE_AT_COMMIT.with(|w| w.replace(false)) =>
        {
            wake_now()
        }
        // PREPARE and COMMIT PREPARED do not wake: the worker's polling tick covers them.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.with(|w| w.set(false))
        }
        _ => {}
    }
}

/// Sets the latch of the worker serving the current database, if there is one. Never raises:
/// it runs in the COMMIT callback, where an ERROR would become a PANIC.
pub fn wake_now() {
    if !preloaded() {
        return;
    }
    // SAFETY: MyDatabaseId is a backend global.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let procno = REGISTRY
        .share()
        .slots
        .iter()
        .find(|s| s.database == database && s.pid != 0)
        .map(|s| s.procno);
    if let Some(procno) = procno {
        set_latch(procno);
    }
}

fn set_latch(procno: i32) {
    // SAFETY: procno was published by a live worker from its own MyProc; allProcs has an entry
    // for every proc number, and SetLatch on another process's latch is how PostgreSQL wakes it.
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

/// This process's index in `ProcGlobal->allProcs`.
#[cfg(any(feature = "pg15", feature = "pg16"))]
fn my_proc_number() -> i32 {
    // SAFETY: MyProc is this backend's own PGPROC, set before any extension code runs.
    unsafe { (*pg_sys::MyProc).pgprocno }
}

/// This process's index in `ProcGlobal->allProcs` (PostgreSQL 17 moved it out of PGPROC).
#[cfg(any(feature = "pg17", feature = "pg18"))]
fn my_proc_number() -> i32 {
    // SAFETY: MyProcNumber is set when the backend gets its PGPROC, before extension code runs.
    unsafe { pg_sys::MyProcNumber }
}

/// Registers the calling database worker. Returns `Registration::Duplicate` when another live
/// worker already serves the database (a restarted launcher does not know its predecessor's
/// workers), `Unregistered` when shared memory has no room (the worker then works by polling).
pub fn register_worker() -> Registration {
    if !preloaded() {
        return Registration::Unregistered;
    }
    // SAFETY: reading the worker's own backend globals.
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::MyProcPid) };
    let procno = my_proc_number();
    let mut registry = REGISTRY.exclusive();
    if registry
        .slots
        .iter()
        .any(|s| s.database == database && s.pid != 0 && s.pid != pid)
    {
        return Registration::Duplicate;
    }
    let index = registry
        .slots
        .iter()
        .position(|s| s.database == database && s.pid == 0)
        .or_else(|| registry.slots.iter().position(|s| s.database == 0));
    let Some(index) = index else {
        return Registration::Unregistered;
    };
    registry.slots[index] = WorkerSlot {
        database,
        pid,
        procno,
        exit_requested: false,
        suspended_until_ms: 0,
        activity: Activity {
            started_at_ms: now_ms(),
            ..Activity::default()
        },
    };
    drop(registry);
    // SAFETY: registers a callback run when this process exits (FATAL or normal exit).
    unsafe { pg_sys::on_proc_exit(Some(unregister_worker), pg_sys::Datum::from(0)) };
    Registration::Registered
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Registered,
    Unregistered,
    Duplicate,
}

/// Counts a cycle of the calling worker, and the error it ended with, if any.
pub fn record_cycle(error: Option<&str>) {
    if !preloaded() {
        return;
    }
    // SAFETY: MyProcPid is a backend global.
    let pid = unsafe { pg_sys::MyProcPid };
    let now = now_ms();
    let mut registry = REGISTRY.exclusive();
    if let Some(slot) = registry.slots.iter_mut().find(|s| s.pid == pid) {
        slot.activity.cycles += 1;
        slot.activity.last_cycle_at_ms = now;
        if let Some(message) = error {
            slot.activity.last_error_at_ms = now;
            slot.activity.set_last_error(message);
        }
    }
}

/// The live workers: (database oid, pid, activity).
pub fn workers() -> Vec<(u32, i32, Activity)> {
    if !preloaded() {
        return Vec::new();
    }
    REGISTRY
        .share()
        .slots
        .iter()
        .filter(|s| s.pid != 0)
        .map(|s| (s.database, s.pid, s.activity))
        .collect()
}

/// Whether a live worker already serves `database`.
pub fn served(database: u32) -> bool {
    preloaded()
        && REGISTRY
            .share()
            .slots
            .iter()
            .any(|s| s.database == database && s.pid != 0)
}

#[pg_guard]
unsafe extern "C-unwind" fn unregister_worker(_code: i32, _arg: pg_sys::Datum) {
    // SAFETY: MyProcPid is a backend global.
    let pid = unsafe { pg_sys::MyProcPid };
    let mut registry = REGISTRY.exclusive();
    for slot in registry.slots.iter_mut().filter(|s| s.pid == pid) {
        slot.pid = 0;
        slot.procno = 0;
        slot.exit_requested = false;
        slot.activity = Activity::default();
        if slot.suspended_until_ms == 0 {
            slot.database = 0;
        }
    }
}

/// Whether someone (DROP DATABASE) asked the calling worker to leave.
pub fn exit_requested() -> bool {
    // SAFETY: MyProcPid is a backend global.
    let pid = unsafe { pg_sys::MyProcPid };
    preloaded()
        && REGISTRY
            .share()
            .slots
            .iter()
            .any(|s| s.pid == pid && s.exit_requested)
}

/// Whether the launcher should wait before starting a worker for `database`.
pub fn suspended(database: u32, now_ms: i64) -> bool {
    REGISTRY
        .share()
        .slots
        .iter()
        .any(|s| s.database == database && s.suspended_until_ms > now_ms)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// DROP / RENAME DATABASE and CREATE DATABASE ... TEMPLATE need the database to themselves.

static mut PREVIOUS_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;

pub fn install_utility_hook() {
    // SAFETY: hooks are installed once in the postmaster during preload, chaining the previous.
    unsafe {
        PREVIOUS_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
// The signature is PostgreSQL's ProcessUtility_hook_type.
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: `statement` is the PlannedStmt being executed; we only read its utility node.
    unsafe {
        if let Some(database) = database_needing_exclusive_access((*statement).utilityStmt) {
            evict_worker(&database);
        }
        match PREVIOUS_UTILITY_HOOK {
            Some(previous) => previous(
                statement,
                query,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                completion,
            ),
            None => pg_sys::standard_ProcessUtility(
                statement,
                query,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                completion,
            ),
        }
    }
}

/// # Safety
/// `node` is a utility statement node.
unsafe fn database_needing_exclusive_access(node: *mut pg_sys::Node) -> Option<String> {
    // SAFETY: fields are read only after checking the node's tag; names are C strings.
    unsafe {
        let text = |p: *const c_char| {
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        if is_a(node, pg_sys::NodeTag::T_DropdbStmt) {
            return text((*(node as *mut pg_sys::DropdbStmt)).dbname);
        }
        if is_a(node, pg_sys::NodeTag::T_RenameStmt) {
            let rename = node as *mut pg_sys::RenameStmt;
            if (*rename).renameType == pg_sys::ObjectType::OBJECT_DATABASE
                && is_a((*rename).object, pg_sys::NodeTag::T_String)
            {
                return text((*((*rename).object as *mut pg_sys::String)).sval);
            }
        }
        if is_a(node, pg_sys::NodeTag::T_CreatedbStmt) {
            let options =
                PgList::<pg_sys::DefElem>::from_pg((*(node as *mut pg_sys::CreatedbStmt)).options);
            for option in options.iter_ptr() {
                if CStr::from_ptr((*option).defname).to_bytes() == b"template"
                    && is_a((*option).arg, pg_sys::NodeTag::T_String)
                {
                    return text((*((*option).arg as *mut pg_sys::String)).sval);
                }
            }
        }
        None
    }
}

/// Asks the worker serving `database` to exit and waits (up to 10 s) until it has; keeps the
/// launcher from restarting it for ten seconds, by which time the statement is done.
fn evict_worker(database: &str) {
    if !preloaded() {
        return;
    }
    let Ok(name) = std::ffi::CString::new(database) else {
        return;
    };
    // SAFETY: get_database_oid with missing_ok returns InvalidOid for an unknown name.
    let oid = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) }.to_u32();
    if oid == 0 {
        return;
    }
    let procno = {
        let mut registry = REGISTRY.exclusive();
        let mut procno = None;
        for slot in registry.slots.iter_mut().filter(|s| s.database == oid) {
            slot.suspended_until_ms = now_ms() + 10_000;
            if slot.pid != 0 {
                slot.exit_requested = true;
                procno = Some(slot.procno);
            }
        }
        procno
    };
    let Some(procno) = procno else { return };
    set_latch(procno);
    for _ in 0..1000 {
        if !REGISTRY
            .share()
            .slots
            .iter()
            .any(|s| s.database == oid && s.pid != 0)
        {
            return;
        }
        // SAFETY: sleeping 10 ms; interrupts are checked after.
        unsafe { pg_sys::pg_usleep(10_000) };
        pgrx::check_for_interrupts!();
    }
}
