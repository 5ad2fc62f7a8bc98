//! The delivery engine: turns claimed dirty pairs into provider calls and records what happened.
//!
//! A cycle has three phases, so that no transaction is ever open across an HTTP call:
//! 1. [`Engine::plan`] (in a transaction): claim due pairs, read each binding's desired state
//!    for them through its view as the binding's owner (one query per binding), read the
//!    recorded remote state, and plan each pair (`plan::plan`).
//! 2. [`Engine::dispatch`] (no transaction): each connection's delivery thread prepares
//!    lists, sends batches within the provider's limits and collects one outcome per pair,
//!    while the worker goes on serving the other connections.
//! 3. [`Engine::record`] (in a transaction), for whatever [`Engine::collect`] found finished:
//!    record outcomes (members, dead letters, retries with backoff, binding and connection
//!    states, the call log) and complete the pairs whose generation did not move.
//!
//! The engine is here; what it reads is in `state`, the delivery threads in `threads`, what
//! it writes in `ledger`, connection loading in `connection`, and `dry_run` plans without
//! sending.

use crate::error::{Error, Result};
use crate::guc;
use crate::names::binding_view;
use crate::outbox;
use crate::privilege::{self};
use listsync_core::http::{self, Http, HttpConfig};
use listsync_core::plan::Action;
use listsync_core::providers::{MemberStatus, Outcome, Provider};
use pgrx::prelude::*;
use pgrx::{JsonB, pg_sys};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::Duration;

mod connection;
mod dry_run;
mod ledger;
mod state;
mod threads;

use connection::http_config;
pub use connection::{Connection, check_connection, load_connection_by_name};
pub use dry_run::{DryRunStep, dry_run, explain};
use ledger::*;
use state::*;
use threads::*;

struct Item {
    address: String,
    generation: i64,
    attempts: i32,
    planned: Option<Planned>,
    outcome: Option<Outcome>,
}

/// Why a whole binding (or its connection) could not be served this cycle.
enum Stop {
    Auth(String),
    Binding(String),
}

struct Work {
    id: i64,
    target: Target,
    items: Vec<Item>,
    prepared: bool,
    stop: Option<Stop>,
    throttled: Option<Duration>,
    calls: Vec<http::CallRecord>,
}

pub struct Cycle {
    work: Vec<Work>,
    /// The claim took every due pair it could: claiming again before a connection becomes
    /// idle or a change arrives would find nothing.
    exhausted: bool,
}

impl Cycle {
    fn new(work: Vec<Work>, exhausted: bool) -> Cycle {
        Cycle { work, exhausted }
    }

    pub fn is_empty(&self) -> bool {
        self.work.is_empty()
    }

    pub fn pairs(&self) -> usize {
        self.work.iter().map(|w| w.items.len()).sum()
    }

    pub fn exhausted(&self) -> bool {
        self.exhausted
    }
}

struct Runtime {
    fingerprint: String,
    provider: Box<dyn Provider>,
    http: Http,
}

/// One connection's deliveries for one cycle, handed to its delivery thread.
struct Job {
    connection: Connection,
    config: HttpConfig,
    works: Vec<Work>,
}

/// A job's results, handed back to the worker's main thread.
struct Delivered {
    connection: i64,
    works: Vec<Work>,
    panicked: bool,
}

/// A connection's delivery thread: it serves one job at a time, so calls to a provider stay
/// sequential (as its limits expect) while other connections' threads go on.
struct Lane {
    jobs: mpsc::Sender<Job>,
    busy: bool,
}

/// The worker's long-lived state: one delivery thread per connection, each keeping its
/// provider client across cycles.
///
/// Only the worker's main thread calls PostgreSQL: it plans and records, and hands deliveries
/// to the threads, never waiting for one. A connection whose endpoint hangs therefore delays
/// only its own pairs; the claim skips its bindings until its results are back.
pub struct Engine {
    lanes: HashMap<i64, Lane>,
    delivered: mpsc::Sender<Delivered>,
    results: mpsc::Receiver<Delivered>,
    /// Delivery threads write a byte when they hand back results, so that the main thread's
    /// wait (on its latch and this socket) ends without them calling into PostgreSQL.
    notify: Arc<UnixStream>,
    wakeup: UnixStream,
    /// Jobs that could not be handed to a thread: recorded as if delivered with no outcome
    /// (their pairs are released).
    undelivered: Vec<Work>,
    random: u64,
    leases_released: bool,
}

impl Engine {
    pub fn new() -> Result<Engine> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let (notify, wakeup) = UnixStream::pair()
            .and_then(|(notify, wakeup)| {
                notify.set_nonblocking(true)?;
                wakeup.set_nonblocking(true)?;
                Ok((notify, wakeup))
            })
            .map_err(|e| Error::internal(format!("could not create the wake-up socket: {e}")))?;
        let (delivered, results) = mpsc::channel();
        Ok(Engine {
            lanes: HashMap::new(),
            delivered,
            results,
            notify: Arc::new(notify),
            wakeup,
            undelivered: Vec::new(),
            random: seed | 1,
            leases_released: false,
        })
    }

    /// Readable when a delivery thread has handed back results.
    pub fn wakeup_fd(&self) -> RawFd {
        self.wakeup.as_raw_fd()
    }

    /// Whether some connection's delivery is in flight.
    pub fn in_flight(&self) -> bool {
        self.lanes.values().any(|l| l.busy)
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64*: jitter needs spread, not cryptographic quality.
        self.random ^= self.random >> 12;
        self.random ^= self.random << 25;
        self.random ^= self.random >> 27;
        (self.random.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Phase 1, in a transaction.
    pub fn plan(&mut self) -> Result<Cycle> {
        outbox::share_delivery_lock()?;
        if !self.leases_released {
            outbox::release_all_leases()?;
            self.leases_released = true;
        }
        let batch = guc::BATCH_SIZE.get() as usize;
        let busy: Vec<i64> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.busy)
            .map(|(id, _)| *id)
            .collect();
        let claimed = outbox::claim(batch as i64, guc::LEASE_S.get(), &busy)?;
        let exhausted = claimed.len() < batch;
        if claimed.is_empty() {
            return Ok(Cycle::new(Vec::new(), exhausted));
        }
        if claimed.len() >= batch {
            // A backlog: the next cycles should not wait for housekeeping to see its size.
            analyze_grown_queues()?;
        }
        let mut by_binding: HashMap<i64, Vec<outbox::Claimed>> = HashMap::new();
        for pair in claimed {
            by_binding.entry(pair.binding).or_default().push(pair);
        }
        let ids: Vec<i64> = by_binding.keys().copied().collect();
        let mut targets = load_targets(&ids)?;
        let mut work = Vec::new();
        for (id, pairs) in by_binding {
            let Some(target) = targets.remove(&id) else {
                continue;
            };
            let items = crate::query::in_subtransaction(|| plan_pairs(id, &target, pairs.clone()));
            let items = match items {
                Ok(items) => items,
                Err(reason) => {
                    // Reading this binding's rows failed (a mapped expression that errors on
                    // some row, a privilege revoked from its owner...): it stops, visibly; the
                    // other bindings go on.
                    let reason = format!("reading the rows to deliver failed: {reason}");
                    Spi::run_with_args(
                        "UPDATE listsync.bindings SET state = 'error', state_reason = $2, last_error = $2,
                                last_error_at = now() WHERE id = $1",
                        &[id.into(), reason.into()],
                    )?;
                    let (bindings, addresses) =
                        pairs.into_iter().map(|p| (p.binding, p.address)).unzip();
                    outbox::release(bindings, addresses)?;
                    continue;
                }
            };
            work.push(Work {
                id,
                target,
                items,
                prepared: false,
                stop: None,
                throttled: None,
                calls: Vec::new(),
            });
        }
        work.sort_by_key(|w| w.id);
        Ok(Cycle::new(work, exhausted))
    }

    /// Phase 2: hands each connection's work to its delivery thread (idle: the claim skipped
    /// busy connections) and returns at once. Call after the plan's transaction committed:
    /// the intents must be durable before anything is sent.
    pub fn dispatch(&mut self, cycle: Cycle) {
        let config = http_config();
        let mut by_connection: Vec<(Connection, Vec<Work>)> = Vec::new();
        for work in cycle.work {
            let id = work.target.connection.id;
            match by_connection.iter_mut().find(|(c, _)| c.id == id) {
                Some((_, works)) => works.push(work),
                None => by_connection.push((work.target.connection.clone(), vec![work])),
            }
        }
        for (connection, works) in by_connection {
            let id = connection.id;
            let job = Job {
                connection,
                config: config.clone(),
                works,
            };
            let Some(lane) = self.lane(id) else {
                self.undelivered.extend(job.works);
                continue;
            };
            match lane.jobs.send(job) {
                Ok(()) => lane.busy = true,
                // The thread is gone: a new one serves the connection next time.
                Err(mpsc::SendError(job)) => {
                    self.lanes.remove(&id);
                    self.undelivered.extend(job.works);
                }
            }
        }
    }

    fn lane(&mut self, connection: i64) -> Option<&mut Lane> {
        if !self.lanes.contains_key(&connection) {
            let (jobs, queue) = mpsc::channel();
            let delivered = self.delivered.clone();
            let notify = Arc::clone(&self.notify);
            let spawned = spawn_without_signals(format!("listsync conn {connection}"), move || {
                serve_lane(queue, delivered, notify)
            });
            if let Err(e) = spawned {
                warning!(
                    "pg_listsync: could not start a delivery thread for connection {connection}: {e}"
                );
                return None;
            }
            self.lanes.insert(connection, Lane { jobs, busy: false });
        }
        self.lanes.get_mut(&connection)
    }

    /// The results handed back since the last call, to record: never waits.
    pub fn collect(&mut self) -> Cycle {
        let mut drained = [0u8; 64];
        while matches!((&self.wakeup).read(&mut drained), Ok(n) if n > 0) {}
        let mut work = std::mem::take(&mut self.undelivered);
        while let Ok(delivered) = self.results.try_recv() {
            self.take_delivered(delivered, &mut work);
        }
        work.sort_by_key(|w| w.id);
        Cycle::new(work, true)
    }

    /// At shutdown: waits up to `grace` for the deliveries in flight (they stop after their
    /// current call) and returns what came back. A delivery still running is abandoned: its
    /// pairs stay leased, and intents make whatever it sent right on the next look.
    pub fn collect_in_flight(&mut self, grace: Duration) -> Cycle {
        let deadline = std::time::Instant::now() + grace;
        let mut cycle = self.collect();
        while self.in_flight() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.results.recv_timeout(left) {
                Ok(delivered) => self.take_delivered(delivered, &mut cycle.work),
                Err(_) => break,
            }
        }
        cycle
    }

    fn take_delivered(&mut self, delivered: Delivered, into: &mut Vec<Work>) {
        if let Some(lane) = self.lanes.get_mut(&delivered.connection) {
            lane.busy = false;
        }
        if delivered.panicked {
            // Pairs the delivery gave no outcome are released when recorded.
            warning!(
                "pg_listsync: delivery for connection {} panicked",
                delivered.connection
            );
        }
        into.extend(delivered.works);
    }

    /// Phase 3, in a transaction. Returns the number of pairs handled.
    pub fn record(&mut self, cycle: Cycle) -> Result<usize> {
        outbox::share_delivery_lock()?;
        let handled = cycle.pairs();
        let mut book = Book::default();
        for mut work in cycle.work {
            write_log(
                work.target.connection.id,
                work.id,
                std::mem::take(&mut work.calls),
            )?;
            self.record_work(work, &mut book)?;
        }
        book.write()?;
        Ok(handled)
    }

    fn record_work(&mut self, work: Work, book: &mut Book) -> Result<()> {
        let id = work.id;
        if work.prepared {
            Spi::run_with_args(
                "UPDATE listsync.bindings SET list_id = $2, remote = $3 || jsonb_build_object('prepared_at', now()) WHERE id = $1",
                &[
                    id.into(),
                    work.target.binding.list_id.clone().into(),
                    JsonB(Value::Object(work.target.binding.remote.clone())).into(),
                ],
            )?;
        }
        match &work.stop {
            Some(Stop::Auth(reason)) => {
                Spi::run_with_args(
                    "UPDATE listsync.connections SET state = 'error', state_reason = $2 WHERE id = $1",
                    &[work.target.connection.id.into(), reason.clone().into()],
                )?;
                Spi::run_with_args(
                    "UPDATE listsync.bindings SET state = 'error', state_reason = $2, last_error = $2, last_error_at = now()
                      WHERE connection_id = $1 AND state = 'active'",
                    &[work.target.connection.id.into(), format!("connection \"{}\": {reason}", work.target.connection.name).into()],
                )?;
            }
            Some(Stop::Binding(reason)) => {
                Spi::run_with_args(
                    "UPDATE listsync.bindings SET state = 'error', state_reason = $2, last_error = $2, last_error_at = now() WHERE id = $1",
                    &[id.into(), reason.clone().into()],
                )?;
            }
            None => {}
        }
        if let Some(after) = work.throttled {
            book.count(id, Counter::Throttled);
            Spi::run_with_args(
                "UPDATE listsync.connections SET throttled_until = now() + $2 * interval '1 millisecond' WHERE id = $1",
                &[
                    work.target.connection.id.into(),
                    (after.as_millis() as i64).into(),
                ],
            )?;
        }
        let base = guc::ms(&guc::RETRY_BASE_MS);
        let max = guc::ms(&guc::RETRY_MAX_MS);
        let max_attempts = guc::MAX_ATTEMPTS.get();
        let (mut succeeded, mut last_error) = (false, None::<String>);
        for item in work.items {
            let Some(planned) = item.planned else {
                // The recount marker, or a pair whose binding stopped: done, or released.
                if item.address.is_empty() {
                    book.complete(id, item.address, item.generation);
                } else {
                    book.release(id, item.address);
                }
                continue;
            };
            let operation = planned.action.describe();
            let outcome = match (item.outcome, &planned.action) {
                (Some(outcome), _) => outcome,
                (None, Action::Nothing | Action::Refrain(_)) => {
                    book.complete(id, item.address, item.generation);
                    continue;
                }
                (None, Action::Forget) => Outcome::Removed,
                (None, _) => {
                    book.release(id, item.address);
                    continue;
                }
            };
            match outcome {
                Outcome::Member { status, remote_id } => {
                    succeeded = true;
                    book.count(
                        id,
                        if planned.action == Action::Add {
                            Counter::Added
                        } else {
                            Counter::Updated
                        },
                    );
                    book.member(
                        id,
                        &item.address,
                        status.as_str(),
                        remote_id,
                        planned.fields,
                    );
                }
                Outcome::Removed => {
                    succeeded = true;
                    match planned.action {
                        Action::Erase => book.count(id, Counter::Erased),
                        Action::Leave(_) => book.count(id, Counter::Removed),
                        // Forgotten without a call: nothing happened at the provider.
                        _ => {}
                    }
                    book.gone(id, &item.address);
                }
                Outcome::Refused { status, message } => {
                    book.count(id, Counter::Refused);
                    last_error = Some(format!("{}: {message}", item.address));
                    let fields = planned.recorded.map(|r| r.fields).unwrap_or_default();
                    book.member(id, &item.address, status.as_str(), None, fields);
                }
                Outcome::Failed { message } => {
                    book.count(id, Counter::Failed);
                    last_error = Some(format!("{}: {message}", item.address));
                    if planned.action == Action::Add {
                        // Refused for good: the provider did not take it, there is nothing to undo.
                        book.gone(id, &item.address);
                    }
                    book.dead(id, &item.address, operation, item.attempts + 1, message);
                }
                Outcome::Retry {
                    message,
                    retry_after,
                } => {
                    last_error = Some(format!("{}: {message}", item.address));
                    let attempts = item.attempts + 1;
                    if attempts >= max_attempts {
                        book.count(id, Counter::Failed);
                        book.dead(
                            id,
                            &item.address,
                            operation,
                            attempts,
                            format!("gave up after {attempts} attempts: {message}"),
                        );
                    } else {
                        let delay = http::backoff(
                            attempts as u32,
                            base,
                            max,
                            retry_after,
                            self.next_random(),
                        );
                        book.count(id, Counter::Retried);
                        book.retry(id, item.address, delay, message);
                        continue;
                    }
                }
            }
            book.complete(id, item.address, item.generation);
        }
        if succeeded {
            Spi::run_with_args(
                "UPDATE listsync.bindings SET last_success_at = now() WHERE id = $1",
                &[id.into()],
            )?;
        }
        if let Some(error) = last_error {
            Spi::run_with_args(
                "UPDATE listsync.bindings SET last_error = $2, last_error_at = now() WHERE id = $1",
                &[id.into(), error.into()],
            )?;
        }
        Ok(())
    }

    /// Periodic work: stop bindings that break the rules for filters, reconcile time-dependent
    /// bindings that are due, trim the call log.
    pub fn housekeeping(&mut self) -> Result<()> {
        crate::filter::revalidate::revalidate_bindings()?;
        let due: Vec<i64> = Spi::get_one_with_args::<Vec<i64>>(
            "SELECT coalesce(array_agg(b.id), '{}') FROM listsync.bindings b JOIN listsync.filters f ON f.id = b.filter_id
              WHERE f.time_dependent AND b.state IN ('active', 'paused')
                AND (b.last_reconciled_at IS NULL OR b.last_reconciled_at < now() - $1 * interval '1 second')",
            &[guc::RECONCILE_INTERVAL_S.get().into()],
        )?
        .unwrap_or_default();
        for binding in due {
            mark_membership_drift(binding)?;
            Spi::run_with_args(
                "UPDATE listsync.bindings SET last_reconciled_at = now() WHERE id = $1",
                &[binding.into()],
            )?;
        }
        Spi::run_with_args(
            "DELETE FROM listsync.delivery_log WHERE at < now() - $1 * interval '1 second'",
            &[guc::DELIVERIES_RETENTION_S.get().into()],
        )?;
        analyze_grown_queues()
    }
}

/// Autovacuum analyzes a table a minute or more after it grew; a backlog that grew from
/// nothing meanwhile would be planned as if the queue were empty.
fn analyze_grown_queues() -> Result<()> {
    let grown: Vec<String> = Spi::get_one::<Vec<String>>(
        "SELECT coalesce(array_agg(format('%I.%I', schemaname, relname)), '{}') FROM pg_catalog.pg_stat_user_tables
          WHERE schemaname = 'listsync' AND relname IN ('outbox', 'members')
            AND n_mod_since_analyze > 1000 + 0.1 * n_live_tup",
    )?
    .unwrap_or_default();
    for table in grown {
        Spi::run(&format!("ANALYZE {table}"))?;
    }
    Ok(())
}

/// Plans one binding's claimed pairs and records the intents of adds and updates.
fn plan_pairs(id: i64, target: &Target, pairs: Vec<outbox::Claimed>) -> Result<Vec<Item>> {
    let mut items: Vec<Item> = Vec::with_capacity(pairs.len());
    let mut addresses = Vec::with_capacity(pairs.len());
    for pair in pairs {
        if pair.address.is_empty() {
            recount_skipped(id, target.owner)?;
        } else {
            addresses.push(pair.address.clone());
        }
        items.push(Item {
            address: pair.address,
            generation: pair.generation,
            attempts: pair.attempts,
            planned: None,
            outcome: None,
        });
    }
    let mut planned: HashMap<String, Planned> =
        plan_binding(id, target.owner, target.on_leave, &addresses)?
            .into_iter()
            .map(|p| (p.address.clone(), p))
            .collect();
    for item in &mut items {
        item.planned = planned.remove(&item.address);
    }
    record_intent(id, target.binding.new_member_status, &items)?;
    Ok(items)
}

/// Before an add or update is sent, its member is recorded as unverified (committed with the
/// claim): if the call's outcome is never learnt — a lost response, a timeout after the provider
/// applied it, the worker killed mid-call — the next look at the pair sees a member that may
/// be at the provider, and sends what makes it right (the update again, or the removal),
/// instead of assuming nothing was sent.
fn record_intent(binding: i64, new_member_status: MemberStatus, items: &[Item]) -> Result<()> {
    let mut addresses = Vec::new();
    let mut fields = Vec::new();
    for planned in items.iter().filter_map(|i| i.planned.as_ref()) {
        if matches!(planned.action, Action::Add | Action::Update) {
            addresses.push(planned.address.clone());
            fields.push(JsonB(Value::Object(planned.fields.clone())));
        }
    }
    if addresses.is_empty() {
        return Ok(());
    }
    Spi::run_with_args(
        "INSERT INTO listsync.members AS m (binding_id, address, status, fields, verified)
         SELECT $1, a, $2, f, false FROM unnest($3::text[], $4::jsonb[]) AS u(a, f)
         ON CONFLICT (binding_id, address) DO UPDATE SET verified = false",
        &[
            binding.into(),
            new_member_status.as_str().into(),
            addresses.into(),
            fields.into(),
        ],
    )?;
    Ok(())
}

/// Marks the addresses whose membership differs between the filter (now) and the provider
/// (as recorded): what a time-dependent filter changes without any write (semantics 8).
pub fn mark_membership_drift(binding: i64) -> Result<i64> {
    let owner: pg_sys::Oid = crate::query::optional(
        "SELECT owner::oid FROM listsync.bindings WHERE id = $1",
        &[binding.into()],
    )?
    .unwrap_or(pg_sys::InvalidOid);
    let view = binding_view(binding);
    let wanted: Vec<String> = privilege::as_owner(owner, || {
        Spi::get_one::<Vec<String>>(&format!("SELECT coalesce(array_agg(DISTINCT address), '{{}}') FROM {view} WHERE address IS NOT NULL"))
    })?
    .unwrap_or_default();
    Ok(Spi::get_one_with_args::<i64>(
        &format!(
            "WITH wanted AS (SELECT unnest($2::text[]) AS address),
                  held AS (SELECT address FROM listsync.members WHERE binding_id = $1 AND status IN ('subscribed', 'pending')),
                  drift AS (SELECT address FROM wanted WHERE address NOT IN (SELECT address FROM held)
                            UNION ALL
                            SELECT address FROM held WHERE address NOT IN (SELECT address FROM wanted)),
                  marked AS (INSERT INTO listsync.outbox AS o (binding_id, address, not_before)
                             SELECT $1, address, {} FROM drift {} RETURNING 1)
             SELECT count(*) FROM marked",
            outbox::BULK_PRIORITY,
            outbox::ON_CONFLICT_DIRTY
        ),
        &[binding.into(), wanted.into()],
    )?
    .unwrap_or(0))
}
