//! Background workers: a launcher, and one worker per database named in `listsync.database`.
//!
//! The launcher is registered at preload, restarts itself after a crash, and keeps one dynamic
//! worker running per configured database that exists (re-reading the list on SIGHUP, backing
//! off when a worker keeps failing, and leaving alone a database that DROP DATABASE is waiting
//! for). A database worker sleeps on its latch, which committing writers set (`wake`), with
//! `listsync.poll_interval` as a safety net, and runs delivery cycles until nothing is due.

use crate::catalog_version::{self, Catalog};
use crate::delivery::Engine;
use crate::guc;
use crate::instance::Instance;
use crate::wake;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

const LIBRARY: &str = "pg_listsync";

pub fn register_launcher() {
    BackgroundWorkerBuilder::new("pg_listsync launcher")
        .set_type("pg_listsync launcher")
        .set_library(LIBRARY)
        .set_function("listsync_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Whether this process should stop what it is doing: SIGTERM, or DROP DATABASE asking.
pub fn shutdown_requested() -> bool {
    // SAFETY: reads a flag set by the SIGTERM handler.
    let terminating = unsafe { pg_sys::ShutdownRequestPending != 0 };
    terminating || wake::exit_requested()
}

/// What the launcher knows about one configured database.
#[derive(Default)]
struct Served {
    worker: Option<DynamicBackgroundWorker>,
    started: Option<Instant>,
    /// Consecutive quick failures of its worker, for the backoff.
    failures: u32,
    not_before: Option<Instant>,
    warned_missing: bool,
}

impl Served {
    fn running(&self) -> bool {
        self.worker
            .as_ref()
            .is_some_and(|w| matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)))
    }

    /// A worker that ran for a while and stopped, or that left because it was asked to (DROP or
    /// RENAME DATABASE), starts again at once; one that keeps failing backs off, up to a minute.
    fn worker_stopped(&mut self, now: Instant, asked_to_leave: bool) {
        let ran_long = self
            .started
            .is_some_and(|t| now.duration_since(t) > Duration::from_secs(60));
        self.failures = if ran_long || asked_to_leave {
            0
        } else {
            self.failures + 1
        };
        let delay = if self.failures == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1 << self.failures.min(6))
        };
        self.not_before = Some(now + delay.min(Duration::from_secs(60)));
        self.worker = None;
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn listsync_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    log!("pg_listsync launcher started");
    let mut served: HashMap<String, Served> = HashMap::new();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf, as any backend does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let wanted = guc::databases();
        served.retain(|database, state| {
            let keep = wanted.contains(database);
            if !keep {
                log!("pg_listsync: no longer serving database \"{database}\"");
                if let Some(Ok(pid)) = state.worker.as_ref().map(|w| w.pid()) {
                    // SAFETY: signalling our own child worker to stop.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
            keep
        });
        let now = Instant::now();
        for database in wanted {
            let state = served.entry(database.clone()).or_default();
            if state.running() {
                continue;
            }
            if state.worker.is_some() {
                // The database is gone or held for DROP/RENAME: the worker left on request.
                let asked_to_leave =
                    database_oid(&database).is_none_or(|oid| wake::suspended(oid, wake::now_ms()));
                state.worker_stopped(now, asked_to_leave);
            }
            if state.not_before.is_some_and(|t| t > now) {
                continue;
            }
            match database_oid(&database) {
                None => {
                    if !state.warned_missing {
                        warning!(
                            "pg_listsync: database \"{database}\" named in listsync.database does not exist"
                        );
                        state.warned_missing = true;
                    }
                    state.not_before = Some(now + Duration::from_secs(2));
                }
                Some(oid) if wake::suspended(oid, wake::now_ms()) || wake::served(oid) => {}
                Some(_) => {
                    state.warned_missing = false;
                    match start_database_worker(&database) {
                        Ok(worker) => {
                            state.worker = Some(worker);
                            state.started = Some(now);
                        }
                        Err(()) => {
                            warning!(
                                "pg_listsync: could not start a worker for database \"{database}\" (max_worker_processes?)"
                            );
                            state.not_before = Some(now + Duration::from_secs(10));
                        }
                    }
                }
            }
        }
    }
    // Exit code 1: the postmaster restarts a launcher that was terminated (it never restarts
    // workers while shutting down, so this is also right on server stop).
    // SAFETY: proc_exit runs the exit callbacks and ends the process.
    unsafe { pg_sys::proc_exit(1) };
}

/// Looks the database up by a heap scan of pg_database: a worker connected to no database
/// cannot use catalog indexes (as PostgreSQL's autovacuum launcher, it scans the heap).
fn database_oid(name: &str) -> Option<u32> {
    BackgroundWorker::transaction(|| {
        // SAFETY: a catalog heap scan inside a transaction; each tuple's data is a
        // FormData_pg_database, valid until the next heap_getnext.
        unsafe {
            let relation = pg_sys::table_open(
                pg_sys::DatabaseRelationId,
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
            );
            let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
            let mut found = None;
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let form = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database;
                if std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()).to_bytes()
                    == name.as_bytes()
                {
                    found = Some((*form).oid.to_u32());
                    break;
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            found
        }
    })
}

fn start_database_worker(database: &str) -> Result<DynamicBackgroundWorker, ()> {
    BackgroundWorkerBuilder::new(&format!("pg_listsync worker {database}"))
        .set_type("pg_listsync worker")
        .set_library(LIBRARY)
        .set_function("listsync_database_worker_main")
        .enable_spi_access()
        .set_restart_time(None)
        .set_extra(database)
        // SAFETY: reading our own pid to be notified of the child's start and stop.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .map_err(|_| ())
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn listsync_database_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    if wake::register_worker() == wake::Registration::Duplicate {
        log!("pg_listsync: database \"{database}\" already has a worker");
        return;
    }
    log!("pg_listsync worker serving database \"{database}\"");
    BackgroundWorker::transaction(pin_search_path);
    BackgroundWorker::transaction(plan_for_keyed_lookups);

    let mut engine = match Engine::new() {
        Ok(engine) => engine,
        Err(e) => error!("pg_listsync worker: {e}"),
    };
    let mut next_housekeeping = Instant::now();
    let mut preconditions = Preconditions::new();
    // SAFETY: a memory context of our own for everything one iteration allocates outside a
    // transaction, reset after each iteration (between transactions CurrentMemoryContext is
    // TopMemoryContext, where anything left would leak for the life of the worker).
    let iteration = unsafe {
        pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"pg_listsync worker iteration".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    };
    loop {
        if shutdown_requested() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf, as any backend does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // SAFETY: switching to and resetting our own context around the iteration.
        let previous = unsafe { pg_sys::MemoryContextSwitchTo(iteration) };
        let outcome = guarded(
            "delivery",
            AssertUnwindSafe(|| {
                run_iteration(&mut engine, &mut next_housekeeping, &mut preconditions)
            }),
        );
        wake::record_cycle(outcome.as_ref().err().map(String::as_str));
        let busy = outcome.unwrap_or(false);
        // SAFETY: `previous` was current before the iteration and outlives it; nothing the
        // iteration allocated in `iteration` is used after the reset.
        unsafe {
            pg_sys::MemoryContextSwitchTo(previous);
            pg_sys::MemoryContextReset(iteration);
        }
        if busy {
            continue;
        }
        if !wait(&engine, guc::ms(&guc::POLL_INTERVAL_MS)) {
            break;
        }
    }
    log!("pg_listsync worker for database \"{database}\" stopping");
    let finished = engine.collect_in_flight(SHUTDOWN_GRACE);
    if !finished.is_empty() {
        let _ = guarded(
            "delivery",
            AssertUnwindSafe(|| {
                BackgroundWorker::transaction(AssertUnwindSafe(|| {
                    guard_result(engine_record(&mut engine, finished))
                }))
            }),
        );
    }
}

/// How long a stopping worker waits for deliveries in flight to come back (each stops after
/// its current call) before leaving them: an abandoned delivery's pairs stay leased until the
/// next worker starts, and their intents make whatever was sent right.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Sleeps until the latch is set (a commit, a signal), a delivery thread handed back results,
/// or `timeout`. Returns false when the worker must stop.
fn wait(engine: &Engine, timeout: Duration) -> bool {
    let events = pg_sys::WL_LATCH_SET
        | pg_sys::WL_TIMEOUT
        | pg_sys::WL_POSTMASTER_DEATH
        | pg_sys::WL_SOCKET_READABLE;
    // SAFETY: waits on this process's own latch and a socket the engine keeps open, then
    // resets the latch and serves interrupts, as BackgroundWorker::wait_latch does.
    let woken = unsafe {
        let woken = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            engine.wakeup_fd(),
            timeout.as_millis().try_into().unwrap_or(libc::c_long::MAX),
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::check_for_interrupts!();
        woken
    };
    woken & pg_sys::WL_POSTMASTER_DEATH as i32 == 0 && !BackgroundWorker::sigterm_received()
}

/// The worker runs as a superuser, and its SQL names functions and operators unqualified
/// (`now() + $1 * interval '1 second'`): with the default `"$user", public`, or whatever
/// `ALTER DATABASE ... SET search_path` a database owner chose, anyone who can create in a
/// schema on the path (an operator `public.*(integer, interval)`, a schema named after the
/// worker's user) would have their code run by it. A session setting, so that it overrides
/// the database's and role's defaults applied at connection. Failing to set it is fatal: the
/// worker must not run without it.
fn pin_search_path() {
    if let Err(e) = Spi::run("SET search_path = pg_catalog, pg_temp") {
        error!("pg_listsync: could not set the worker's search_path: {e}");
    }
}

/// Every statement the worker runs looks up a bounded batch of keys (at most
/// `listsync.batch_size`) in the outbox and the members table, whose statistics lag far behind
/// their size: a backlog grows from nothing to millions between two autovacuum rounds. With
/// stale statistics the planner hashes the whole queue for each batch, which makes a drain
/// quadratic; nested loops over the batch's keys are right for every batch. Session settings
/// of this worker only; its reads of a binding's view (`address = ANY(batch)`, or a whole
/// filter to reconcile) do not join, and keep their choice of index or scan.
fn plan_for_keyed_lookups() {
    for setting in ["enable_hashjoin", "enable_mergejoin"] {
        if let Err(e) = Spi::run(&format!("SET {setting} = off")) {
            warning!("pg_listsync: could not set {setting}: {e}");
        }
    }
}

/// What decides whether the worker may deliver at all, as the last pass found it: each change
/// is reported once, not at every poll.
struct Preconditions {
    catalog: Catalog,
    copy_of: Option<Instance>,
}

impl Preconditions {
    fn new() -> Self {
        Preconditions {
            catalog: Catalog::Current,
            copy_of: None,
        }
    }

    /// Whether the extension is installed at this library's version in the database it was
    /// bound in (or a restore was confirmed). Otherwise the worker waits, and says why.
    fn hold(&mut self) -> bool {
        let catalog = BackgroundWorker::transaction(catalog_version::installed);
        if let Catalog::Other(version) = &catalog
            && self.catalog != catalog
        {
            let mismatch = BackgroundWorker::transaction(|| catalog_version::mismatch(version));
            mismatch
                .in_object("pg_listsync worker")
                .report()
                .report(PgLogLevel::WARNING);
        }
        self.catalog = catalog;
        if self.catalog != Catalog::Current {
            return false;
        }
        let copy_of = BackgroundWorker::transaction(|| {
            crate::instance::unconfirmed_copy_of().unwrap_or_else(|e| e.raise())
        });
        if let Some(original) = &copy_of
            && self.copy_of != copy_of
        {
            warning!(
                "pg_listsync worker: this database is a copy (a restore or a clone) of {}, whose lists it would write to; nothing is delivered until an administrator runs SELECT listsync.confirm_restore()",
                original.describe()
            );
        }
        self.copy_of = copy_of;
        self.copy_of.is_none()
    }
}

/// One pass: if the worker may deliver (see [`Preconditions`]), record the deliveries that
/// finished and hand out new ones to idle connections while work is due (bounded, so that
/// signals and housekeeping get their turn). Never waits for a delivery in flight. Returns
/// whether more work may be waiting right now.
fn run_iteration(
    engine: &mut Engine,
    next_housekeeping: &mut Instant,
    preconditions: &mut Preconditions,
) -> bool {
    if !preconditions.hold() {
        // Whatever comes back has nowhere to go (and must not keep the worker awake).
        engine.collect();
        return false;
    }
    if Instant::now() >= *next_housekeeping {
        BackgroundWorker::transaction(AssertUnwindSafe(|| engine_housekeeping(engine)));
        *next_housekeeping = Instant::now() + Duration::from_secs(10);
    }
    for _ in 0..20 {
        if shutdown_requested() {
            return false;
        }
        let finished = engine.collect();
        if !finished.is_empty() {
            BackgroundWorker::transaction(AssertUnwindSafe(|| {
                guard_result(engine_record(engine, finished))
            }));
        }
        let planned =
            BackgroundWorker::transaction(AssertUnwindSafe(|| guard_result(engine_plan(engine))));
        let Some(cycle) = planned else {
            return false;
        };
        let exhausted = cycle.exhausted();
        engine.dispatch(cycle);
        if exhausted {
            // Nothing else is due for an idle connection: the next results, a commit or the
            // polling tick wake the worker.
            return false;
        }
    }
    true
}

// The transaction closures must be unwind-safe; the engine is only touched inside them.
fn engine_plan(engine: &mut Engine) -> crate::error::Result<crate::delivery::Cycle> {
    engine.plan()
}

fn engine_record(
    engine: &mut Engine,
    cycle: crate::delivery::Cycle,
) -> crate::error::Result<usize> {
    engine.record(cycle)
}

fn engine_housekeeping(engine: &mut Engine) {
    if let Err(e) = engine.housekeeping() {
        warning!("pg_listsync housekeeping: {e}");
    }
}

/// An error from our own code aborts the transaction like a PostgreSQL error would.
fn guard_result<T>(result: crate::error::Result<T>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => e.raise(),
    }
}

/// Runs `body`; an ERROR inside is logged as a WARNING, its transaction aborted, and the worker
/// goes on (a restart would only repeat it). Returns the error's message.
fn guarded<T>(what: &str, body: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    PgTryBuilder::new(|| Ok(body()))
        .catch_others(|caught| {
            let message = match &caught {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_string(),
                pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                    ereport.message().to_string()
                }
            };
            warning!("pg_listsync {what} failed: {message}");
            // SAFETY: we are at the top of the worker's loop; aborting the failed transaction
            // (if one is open) is what PostgreSQL's own workers do after an error.
            unsafe {
                if pg_sys::IsTransactionState() || pg_sys::IsAbortedTransactionBlockState() {
                    pg_sys::AbortCurrentTransaction();
                }
            }
            // Do not spin on a persistent error.
            std::thread::sleep(Duration::from_secs(1));
            Err(message)
        })
        .execute()
}

#[cfg(test)]
mod unit {
    use super::*;

    fn stopped_after(state: &mut Served, ran: Duration, asked_to_leave: bool) -> Duration {
        let now = Instant::now() + Duration::from_secs(3600);
        state.started = Some(now - ran);
        state.worker_stopped(now, asked_to_leave);
        state.not_before.unwrap().duration_since(now)
    }

    #[test]
    fn quick_failures_back_off_up_to_a_minute() {
        let mut state = Served::default();
        let delays: Vec<u64> = (0..8)
            .map(|_| stopped_after(&mut state, Duration::from_secs(1), false).as_secs())
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(
            stopped_after(&mut state, Duration::from_secs(61), false),
            Duration::ZERO
        );
    }

    #[test]
    fn a_worker_asked_to_leave_is_no_failure() {
        let mut state = Served::default();
        for _ in 0..5 {
            stopped_after(&mut state, Duration::from_secs(1), false);
        }
        // DROP DATABASE then CREATE DATABASE of the same name: the new worker is not held back.
        assert_eq!(
            stopped_after(&mut state, Duration::from_secs(1), true),
            Duration::ZERO
        );
        assert_eq!(state.failures, 0);
    }
}
