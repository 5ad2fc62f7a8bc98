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

use crate::error::{Error, Kind, Result};
use crate::guc;
use crate::names::binding_view;
use crate::outbox;
use crate::privilege::{self, AsExtension};
use listsync_core::http::{self, Http, HttpConfig, ProviderError};
use listsync_core::plan::{self, Action, Recorded};
use listsync_core::providers::{self, Member, MemberStatus, OnLeave, Outcome, Provider};
use listsync_core::redact::Redactor;
use pgrx::prelude::*;
use pgrx::{JsonB, pg_sys};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::Duration;

/// A provider account as the worker needs it.
#[derive(Debug, Clone)]
pub struct Connection {
    pub id: i64,
    pub name: String,
    pub provider: String,
    pub settings: Value,
    pub secrets: Value,
}

impl Connection {
    /// Changes when the configuration changes; a provider built from an older one is rebuilt.
    fn fingerprint(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}",
            self.provider, self.settings, self.secrets
        )
    }
}

fn http_config() -> HttpConfig {
    HttpConfig {
        timeout: guc::ms(&guc::HTTP_TIMEOUT_MS),
        allowed_insecure_hosts: guc::allowed_insecure_hosts(),
    }
}

pub fn load_connection_by_name(name: &str) -> Result<Connection> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT c.id, c.name, c.provider, c.settings, s.secrets FROM listsync.connections c
               JOIN listsync.connection_secrets s ON s.connection_id = c.id WHERE c.name = $1",
            None,
            &[name.into()],
        )?;
        if rows.is_empty() {
            return Err(Error::not_found("connection", name));
        }
        let row = rows.first();
        Ok(Connection {
            id: row.get(1)?.unwrap_or_default(),
            name: row.get(2)?.unwrap_or_default(),
            provider: row.get(3)?.unwrap_or_default(),
            settings: row.get::<JsonB>(4)?.map(|j| j.0).unwrap_or_default(),
            secrets: row.get::<JsonB>(5)?.map(|j| j.0).unwrap_or_default(),
        })
    })
}

/// `listsync.test_connection`: one cheap authenticated call, in the caller's backend.
pub fn check_connection(connection: &Connection) -> Result<Value> {
    let mut provider = providers::connect(
        &connection.provider,
        &connection.settings,
        &connection.secrets,
    )
    .map_err(|e| Error::invalid(format!("connection \"{}\": {e}", connection.name)))?;
    let mut http = Http::new(http_config(), None);
    let result = provider.check(&mut http);
    let redactor = Redactor::new(&connection.secrets, http.credentials_sent());
    match result {
        Ok(mut answer) => {
            redactor.redact_json(&mut answer);
            Ok(answer)
        }
        Err(e) => Err(provider_error(&connection.name, e, &redactor)),
    }
}

fn provider_error(connection: &str, error: ProviderError, redactor: &Redactor) -> Error {
    let kind = match error {
        ProviderError::Transient { .. } => Kind::ProviderUnavailable,
        _ => Kind::ProviderRejected,
    };
    Error::new(
        kind,
        format!(
            "connection \"{connection}\": {}",
            redactor.redact(&error.to_string())
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Reading state

/// A binding as the engine serves it.
struct Target {
    owner: pg_sys::Oid,
    connection: Connection,
    binding: providers::Binding,
    needs_prepare: bool,
}

fn load_targets(ids: &[i64]) -> Result<HashMap<i64, Target>> {
    Spi::connect(|c| {
        let mut targets = HashMap::new();
        for row in c.select(
            "SELECT b.id, b.filter_name, b.list_id, coalesce(b.list_name, b.list_id) AS list_name,
                    b.tags, ARRAY(SELECT jsonb_object_keys(b.fields)) AS fields, b.on_leave,
                    b.new_member_status, b.remote, b.owner::oid AS owner,
                    (b.list_id IS NULL OR NOT b.remote ? 'prepared_at') AS needs_prepare,
                    c.id AS connection_id, c.name AS connection_name, c.provider, c.settings,
                    s.secrets
               FROM listsync.bindings b
               JOIN listsync.connections c ON c.id = b.connection_id
               JOIN listsync.connection_secrets s ON s.connection_id = c.id
              WHERE b.id = ANY($1)",
            None,
            &[ids.to_vec().into()],
        )? {
            let id: i64 = row.get_by_name("id")?.unwrap_or_default();
            let on_leave: String = row.get_by_name("on_leave")?.unwrap_or_default();
            let on_leave = OnLeave::parse(&on_leave).ok_or_else(|| {
                Error::new(
                    Kind::InvalidParameter,
                    format!("binding {id} has an unknown on_leave \"{on_leave}\""),
                )
            })?;
            let new_member_status = match row
                .get_by_name::<String, _>("new_member_status")?
                .as_deref()
            {
                Some("pending") => MemberStatus::Pending,
                Some("subscribed") => MemberStatus::Subscribed,
                other => {
                    return Err(Error::new(
                        Kind::InvalidParameter,
                        format!("binding {id} has an unknown new_member_status {other:?}"),
                    ));
                }
            };
            let binding = providers::Binding {
                id,
                filter: row.get_by_name("filter_name")?.unwrap_or_default(),
                list_id: row.get_by_name("list_id")?,
                list_name: row.get_by_name("list_name")?.unwrap_or_default(),
                tags: row.get_by_name("tags")?.unwrap_or_default(),
                fields: row.get_by_name("fields")?.unwrap_or_default(),
                on_leave,
                new_member_status,
                remote: row
                    .get_by_name::<JsonB, _>("remote")?
                    .and_then(|j| j.0.as_object().cloned())
                    .unwrap_or_default(),
            };
            let json = |column: &str| -> Result<Value> {
                Ok(row
                    .get_by_name::<JsonB, _>(column)?
                    .map(|j| j.0)
                    .unwrap_or_default())
            };
            targets.insert(
                id,
                Target {
                    owner: row.get_by_name("owner")?.unwrap_or(pg_sys::InvalidOid),
                    needs_prepare: row.get_by_name("needs_prepare")?.unwrap_or(true),
                    connection: Connection {
                        id: row.get_by_name("connection_id")?.unwrap_or_default(),
                        name: row.get_by_name("connection_name")?.unwrap_or_default(),
                        provider: row.get_by_name("provider")?.unwrap_or_default(),
                        settings: json("settings")?,
                        secrets: json("secrets")?,
                    },
                    binding,
                },
            );
        }
        Ok(targets)
    })
}

/// For each address the filter matches now, the mapped fields of its row (the row with the
/// greatest key when several rows share the address: semantics 4). Read as the binding's
/// owner, so row-level security applies.
fn desired(
    binding: i64,
    owner: pg_sys::Oid,
    addresses: &[String],
) -> Result<HashMap<String, Map<String, Value>>> {
    let view = binding_view(binding);
    let keys: i64 = Spi::get_one_with_args(
        "SELECT count(*) FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass($1) AND attname::text LIKE 'key\\_%'",
        &[view.clone().into()],
    )?
    .unwrap_or(0);
    let order: String = (1..=keys).map(|i| format!(", key_{i} DESC")).collect();
    privilege::as_owner(owner, || {
        Spi::connect(|c| {
            let mut found = HashMap::with_capacity(addresses.len());
            for row in c.select(
                &format!(
                    "SELECT DISTINCT ON (address) address, fields FROM {view}
                      WHERE address = ANY($1) ORDER BY address{order}"
                ),
                None,
                &[addresses.to_vec().into()],
            )? {
                let address: String = row.get(1)?.unwrap_or_default();
                let fields = row
                    .get::<JsonB>(2)?
                    .and_then(|j| j.0.as_object().cloned())
                    .unwrap_or_default();
                found.insert(address, fields);
            }
            Ok(found)
        })
    })
}

/// The lookups of one batch's keys below read key by key (a LATERAL subquery the planner
/// cannot turn into a scan of the whole table), whatever the tables' statistics say.
fn recorded(binding: i64, addresses: &[String]) -> Result<HashMap<String, Recorded>> {
    Spi::connect(|c| {
        let mut found = HashMap::new();
        for row in c.select(
            "SELECT m.address, m.status, m.remote_id, m.fields, m.verified
               FROM unnest($2::text[]) AS u(address),
                    LATERAL (SELECT * FROM listsync.members m
                              WHERE m.binding_id = $1 AND m.address = u.address LIMIT 1) m",
            None,
            &[binding.into(), addresses.to_vec().into()],
        )? {
            found.insert(
                row.get::<String>(1)?.unwrap_or_default(),
                Recorded {
                    status: row.get(2)?.unwrap_or_default(),
                    remote_id: row.get(3)?,
                    fields: row
                        .get::<JsonB>(4)?
                        .and_then(|j| j.0.as_object().cloned())
                        .unwrap_or_default(),
                    verified: row.get(5)?.unwrap_or(true),
                },
            );
        }
        Ok(found)
    })
}

fn address_set(query: &str, binding: Option<i64>, addresses: &[String]) -> Result<HashSet<String>> {
    Spi::connect(|c| {
        let mut found = HashSet::new();
        let args = match binding {
            Some(b) => vec![addresses.to_vec().into(), b.into()],
            None => vec![addresses.to_vec().into()],
        };
        for row in c.select(query, None, &args)? {
            found.insert(row.get::<String>(1)?.unwrap_or_default());
        }
        Ok(found)
    })
}

fn suppressed(addresses: &[String]) -> Result<HashSet<String>> {
    address_set(
        "SELECT s.address FROM unnest($1::text[]) AS u(address),
                LATERAL (SELECT address FROM listsync.suppressions s WHERE s.address = u.address LIMIT 1) s",
        None,
        addresses,
    )
}

fn erasures(binding: i64, addresses: &[String]) -> Result<HashSet<String>> {
    address_set(
        "SELECT e.address FROM unnest($1::text[]) AS u(address),
                LATERAL (SELECT address FROM listsync.erasures e
                          WHERE e.binding_id = $2 AND e.address = u.address LIMIT 1) e",
        Some(binding),
        addresses,
    )
}

/// The planned action for each address of one binding.
struct Planned {
    address: String,
    action: Action,
    fields: Map<String, Value>,
    recorded: Option<Recorded>,
}

fn plan_binding(
    binding: i64,
    owner: pg_sys::Oid,
    on_leave: OnLeave,
    addresses: &[String],
) -> Result<Vec<Planned>> {
    let desired = desired(binding, owner, addresses)?;
    let mut recorded = recorded(binding, addresses)?;
    let suppressed = suppressed(addresses)?;
    let erasures = erasures(binding, addresses)?;
    Ok(addresses
        .iter()
        .map(|address| {
            let wanted = desired.get(address);
            let known = recorded.remove(address);
            let action = plan::plan(
                wanted,
                known.as_ref(),
                suppressed.contains(address),
                erasures.contains(address),
                on_leave,
            );
            Planned {
                address: address.clone(),
                action,
                fields: wanted.cloned().unwrap_or_default(),
                recorded: known,
            }
        })
        .collect())
}

/// Recounts the rows the binding's filter matches whose email is not an address.
fn recount_skipped(binding: i64, owner: pg_sys::Oid) -> Result<()> {
    let view = binding_view(binding);
    let count: i64 = privilege::as_owner(owner, || {
        Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM {view} WHERE address IS NULL"
        ))
    })?
    .unwrap_or(0);
    Spi::run_with_args(
        "UPDATE listsync.bindings SET skipped_invalid = $2 WHERE id = $1",
        &[binding.into(), count.into()],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dry run

pub struct DryRunStep {
    pub address: String,
    pub operation: String,
    pub fields: Option<Value>,
    pub reason: Option<String>,
}

/// What a resync of the binding would send now, computed exactly as the worker would.
pub fn dry_run(binding: i64) -> Result<Vec<DryRunStep>> {
    AsExtension::run(|| {
        let targets = load_targets(&[binding])?;
        let target = targets
            .get(&binding)
            .ok_or_else(|| Error::not_found("binding", &binding.to_string()))?;
        let view = binding_view(binding);
        let mut addresses: Vec<String> = privilege::as_owner(target.owner, || {
            Spi::get_one::<Vec<String>>(&format!(
                "SELECT coalesce(array_agg(DISTINCT address), '{{}}') FROM {view} WHERE address IS NOT NULL"
            ))
        })?
        .unwrap_or_default();
        addresses.extend(
            Spi::get_one_with_args::<Vec<String>>(
                "SELECT coalesce(array_agg(address), '{}') FROM listsync.members WHERE binding_id = $1",
                &[binding.into()],
            )?
            .unwrap_or_default(),
        );
        addresses.sort_unstable();
        addresses.dedup();
        let on_leave = target.binding.on_leave;
        let mut steps = Vec::new();
        for chunk in addresses.chunks(5_000) {
            for planned in plan_binding(binding, target.owner, on_leave, chunk)? {
                let reason = match &planned.action {
                    Action::Nothing => continue,
                    Action::Refrain(why) => Some(why.clone()),
                    _ => None,
                };
                let fields = matches!(planned.action, Action::Add | Action::Update)
                    .then(|| Value::Object(planned.fields.clone()));
                steps.push(DryRunStep {
                    address: planned.address,
                    operation: planned.action.describe(on_leave).into(),
                    fields,
                    reason,
                });
            }
        }
        Ok(steps)
    })
}

// ---------------------------------------------------------------------------------------------
// The cycle

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
        let on_leave = work.target.binding.on_leave;
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
            let operation = planned.action.describe(on_leave);
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
                    book.gone(id, &item.address);
                }
                Outcome::Refused { status, message } => {
                    last_error = Some(format!("{}: {message}", item.address));
                    let fields = planned.recorded.map(|r| r.fields).unwrap_or_default();
                    book.member(id, &item.address, status.as_str(), None, fields);
                }
                Outcome::Failed { message } => {
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
        plan_binding(id, target.owner, target.binding.on_leave, &addresses)?
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

/// Serves one connection's bindings in turn. An authentication failure stops the connection's
/// remaining bindings too.
fn deliver_connection(runtime: &mut Runtime, works: Vec<&mut Work>) {
    let mut refused: Option<String> = None;
    for work in works {
        if let Some(reason) = &refused {
            work.stop = Some(Stop::Auth(reason.clone()));
            continue;
        }
        deliver_work(runtime, work);
        work.calls = runtime.http.drain_records();
        if let Some(Stop::Auth(reason)) = &work.stop {
            refused = Some(reason.clone());
        }
        if terminating() {
            return;
        }
    }
}

/// Scrubs every provider-originated text of a delivery before it leaves the delivery thread:
/// from here on it is stored (deliveries, outbox, dead letters, binding and connection states)
/// where every role can read it.
fn scrub(work: &mut Work, redactor: &Redactor) {
    for call in &mut work.calls {
        if let Some(error) = &mut call.error {
            *error = redactor.redact(error);
        }
    }
    for item in &mut work.items {
        match &mut item.outcome {
            Some(
                Outcome::Retry { message, .. }
                | Outcome::Failed { message }
                | Outcome::Refused { message, .. },
            ) => *message = redactor.redact(message),
            Some(Outcome::Member { .. } | Outcome::Removed) | None => {}
        }
    }
    if let Some(Stop::Auth(reason) | Stop::Binding(reason)) = &mut work.stop {
        *reason = redactor.redact(reason);
    }
}

/// SIGTERM arrived. Reads only the flag the signal handler sets: delivery threads must not
/// call into PostgreSQL.
fn terminating() -> bool {
    // SAFETY: a read of a sig_atomic_t set by the signal handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Starts a delivery thread with every signal blocked from its first instruction on: signals
/// belong to the worker's main thread, where PostgreSQL's handlers expect to run.
fn spawn_without_signals(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // SAFETY: zeroed sigset_t values are valid storage for sigfillset and pthread_sigmask,
    // which change the calling thread's mask only; a new thread inherits it.
    let previous = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        previous
    };
    let spawned = std::thread::Builder::new().name(name).spawn(body);
    // SAFETY: restores the main thread's own mask, saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    spawned
}

/// A connection's delivery thread: serves its jobs until the engine is gone. It calls no
/// PostgreSQL function (the worker reads every setting it needs for it).
fn serve_lane(
    jobs: mpsc::Receiver<Job>,
    delivered: mpsc::Sender<Delivered>,
    notify: Arc<UnixStream>,
) {
    let mut runtime: Option<Runtime> = None;
    while let Ok(Job {
        connection,
        config,
        mut works,
    }) = jobs.recv()
    {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deliver_job(&mut runtime, &connection, config, &mut works)
        }));
        let redactor = Redactor::new(
            &connection.secrets,
            runtime.iter().flat_map(|r| r.http.credentials_sent()),
        );
        for work in &mut works {
            scrub(work, &redactor);
        }
        let panicked = outcome.is_err();
        if panicked {
            // Its state is unknown: the next job builds a new client.
            runtime = None;
        }
        let sent = delivered.send(Delivered {
            connection: connection.id,
            works,
            panicked,
        });
        if sent.is_err() {
            return;
        }
        // A full socket is already readable: the worker wakes anyway.
        let _ = (&*notify).write(&[1]);
    }
}

/// Delivers one job with the connection's client, built again when its configuration changed.
fn deliver_job(
    runtime: &mut Option<Runtime>,
    connection: &Connection,
    config: HttpConfig,
    works: &mut [Work],
) {
    let fingerprint = connection.fingerprint();
    if runtime
        .as_ref()
        .is_none_or(|r| r.fingerprint != fingerprint)
    {
        *runtime = None;
        match providers::connect(
            &connection.provider,
            &connection.settings,
            &connection.secrets,
        ) {
            Ok(provider) => {
                let http = Http::new(config.clone(), provider.limits().rate);
                *runtime = Some(Runtime {
                    fingerprint,
                    provider,
                    http,
                });
            }
            Err(e) => {
                let reason = format!("connection \"{}\": {e}", connection.name);
                for work in works {
                    work.stop = Some(Stop::Binding(reason.clone()));
                }
                return;
            }
        }
    }
    let runtime = runtime.as_mut().expect("built above");
    runtime.http.set_config(config);
    deliver_connection(runtime, works.iter_mut().collect());
}

/// Sends one binding's planned pairs.
fn deliver_work(runtime: &mut Runtime, work: &mut Work) {
    let Runtime { provider, http, .. } = runtime;
    let binding = &mut work.target.binding;
    if work.target.needs_prepare {
        match provider.prepare(http, binding) {
            Ok(()) => work.prepared = true,
            Err(error) => {
                stop_or_retry(work, error, None);
                return;
            }
        }
    }
    let limits = provider.limits();
    for call in [Call::Upsert, Call::Remove, Call::Erase] {
        let indices: Vec<usize> = (0..work.items.len())
            .filter(|i| {
                work.items[*i]
                    .planned
                    .as_ref()
                    .is_some_and(|p| call.carries(&p.action))
            })
            .collect();
        let size = if call == Call::Upsert {
            limits.upsert_batch
        } else {
            limits.remove_batch
        };
        for batch in indices.chunks(size.max(1)) {
            let members: Vec<Member> = batch
                .iter()
                .map(|i| {
                    let planned = work.items[*i].planned.as_ref().expect("selected above");
                    Member {
                        address: planned.address.clone(),
                        fields: planned.fields.clone(),
                        remote_id: planned.recorded.as_ref().and_then(|r| r.remote_id.clone()),
                    }
                })
                .collect();
            let binding = &work.target.binding;
            let result = match call {
                Call::Upsert => provider.upsert(http, binding, &members),
                Call::Remove => provider.remove(http, binding, &members),
                Call::Erase => provider.erase(http, binding, &members),
            };
            match result {
                Ok(outcomes) if outcomes.len() == members.len() => {
                    for (i, outcome) in batch.iter().zip(outcomes) {
                        work.items[*i].outcome = Some(outcome);
                    }
                }
                Ok(outcomes) => {
                    let message = format!(
                        "provider answered {} outcomes for {} members",
                        outcomes.len(),
                        members.len()
                    );
                    for i in batch {
                        work.items[*i].outcome = Some(Outcome::Retry {
                            message: message.clone(),
                            retry_after: None,
                        });
                    }
                }
                Err(error) => {
                    if stop_or_retry(work, error, Some(batch)) {
                        return;
                    }
                }
            }
            if terminating() {
                return;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Upsert,
    Remove,
    Erase,
}

impl Call {
    fn carries(self, action: &Action) -> bool {
        match self {
            Call::Upsert => matches!(action, Action::Add | Action::Update),
            Call::Remove => matches!(action, Action::Leave),
            Call::Erase => matches!(action, Action::Erase),
        }
    }
}

/// Applies a batch-level failure: authentication and binding errors stop the binding (returns
/// true), transient and permanent ones become every item's outcome.
fn stop_or_retry(work: &mut Work, error: ProviderError, batch: Option<&[usize]>) -> bool {
    let all: Vec<usize> = (0..work.items.len()).collect();
    let batch = batch.unwrap_or(&all);
    let outcome = match error {
        ProviderError::Auth(message) => {
            work.stop = Some(Stop::Auth(format!("authentication failed: {message}")));
            return true;
        }
        ProviderError::Binding(message) => {
            work.stop = Some(Stop::Binding(message));
            return true;
        }
        ProviderError::Transient {
            message,
            retry_after,
        } => {
            if retry_after.is_some() {
                work.throttled = retry_after;
            }
            Outcome::Retry {
                message,
                retry_after,
            }
        }
        ProviderError::Rejected(message) => Outcome::Failed { message },
    };
    for i in batch {
        if work.items[*i]
            .planned
            .as_ref()
            .is_some_and(|p| !matches!(p.action, Action::Nothing | Action::Refrain(_)))
        {
            work.items[*i].outcome = Some(outcome.clone());
        }
    }
    false
}

/// (binding, address) columns for set-based statements.
#[derive(Default)]
struct Pairs {
    bindings: Vec<i64>,
    addresses: Vec<String>,
}

impl Pairs {
    fn push(&mut self, binding: i64, address: impl Into<String>) {
        self.bindings.push(binding);
        self.addresses.push(address.into());
    }

    fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }
}

#[derive(Default)]
struct MemberWrites {
    pairs: Pairs,
    statuses: Vec<String>,
    remote_ids: Vec<Option<String>>,
    fields: Vec<JsonB>,
}

#[derive(Default)]
struct DeadLetters {
    pairs: Pairs,
    operations: Vec<String>,
    attempts: Vec<i32>,
    errors: Vec<String>,
}

/// The writes of `record`, gathered per kind and applied with one statement each.
#[derive(Default)]
struct Book {
    members: MemberWrites,
    gone: Pairs,
    dead: DeadLetters,
    complete: (Pairs, Vec<i64>),
    retry: (Pairs, Vec<i64>, Vec<String>),
    release: Pairs,
}

impl Book {
    fn member(
        &mut self,
        binding: i64,
        address: &str,
        status: &str,
        remote_id: Option<String>,
        fields: Map<String, Value>,
    ) {
        self.members.pairs.push(binding, address);
        self.members.statuses.push(status.to_string());
        self.members.remote_ids.push(remote_id);
        self.members.fields.push(JsonB(Value::Object(fields)));
    }

    fn gone(&mut self, binding: i64, address: &str) {
        self.gone.push(binding, address);
    }

    fn dead(&mut self, binding: i64, address: &str, operation: &str, attempts: i32, error: String) {
        self.dead.pairs.push(binding, address);
        self.dead.operations.push(operation.to_string());
        self.dead.attempts.push(attempts);
        self.dead.errors.push(error);
    }

    fn complete(&mut self, binding: i64, address: String, generation: i64) {
        self.complete.0.push(binding, address);
        self.complete.1.push(generation);
    }

    fn retry(&mut self, binding: i64, address: String, delay: Duration, error: String) {
        self.retry.0.push(binding, address);
        self.retry.1.push(delay.as_millis() as i64);
        self.retry.2.push(error);
    }

    fn release(&mut self, binding: i64, address: String) {
        self.release.push(binding, address);
    }

    fn write(self) -> Result<()> {
        let members = self.members;
        if !members.pairs.is_empty() {
            let Pairs {
                bindings,
                addresses,
            } = members.pairs;
            Spi::run_with_args(
                "INSERT INTO listsync.members AS m (binding_id, address, status, remote_id, fields, synced_at)
                 SELECT b, a, s, r, f, now() FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::jsonb[]) AS u(b, a, s, r, f)
                 ON CONFLICT (binding_id, address) DO UPDATE
                    SET status = EXCLUDED.status, remote_id = coalesce(EXCLUDED.remote_id, m.remote_id),
                        fields = EXCLUDED.fields, synced_at = now(), verified = true",
                &[
                    bindings.clone().into(),
                    addresses.clone().into(),
                    members.statuses.into(),
                    members.remote_ids.into(),
                    members.fields.into(),
                ],
            )?;
            clear_dead_letters(bindings, addresses)?;
        }
        if !self.gone.is_empty() {
            let Pairs {
                bindings,
                addresses,
            } = self.gone;
            Spi::run_with_args(
                "DELETE FROM listsync.members m USING unnest($1::int8[], $2::text[]) AS u(b, a)
                  WHERE m.binding_id = u.b AND m.address = u.a",
                &[bindings.clone().into(), addresses.clone().into()],
            )?;
            Spi::run_with_args(
                "DELETE FROM listsync.erasures e USING unnest($1::int8[], $2::text[]) AS u(b, a)
                  WHERE e.binding_id = u.b AND e.address = u.a",
                &[bindings.clone().into(), addresses.clone().into()],
            )?;
            clear_dead_letters(bindings, addresses)?;
        }
        let dead = self.dead;
        if !dead.pairs.is_empty() {
            Spi::run_with_args(
                "INSERT INTO listsync.dead_letter_items AS d (binding_id, address, operation, attempts, error)
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int4[], $5::text[])
                 ON CONFLICT (binding_id, address) DO UPDATE
                    SET operation = EXCLUDED.operation, attempts = d.attempts + EXCLUDED.attempts,
                        error = EXCLUDED.error, last_failed_at = now()",
                &[
                    dead.pairs.bindings.into(),
                    dead.pairs.addresses.into(),
                    dead.operations.into(),
                    dead.attempts.into(),
                    dead.errors.into(),
                ],
            )?;
        }
        let (pairs, generations) = self.complete;
        outbox::complete(pairs.bindings, pairs.addresses, generations)?;
        let (pairs, delays, errors) = self.retry;
        outbox::reschedule(pairs.bindings, pairs.addresses, delays, errors)?;
        outbox::release(self.release.bindings, self.release.addresses)?;
        Ok(())
    }
}

fn clear_dead_letters(bindings: Vec<i64>, addresses: Vec<String>) -> Result<()> {
    Spi::run_with_args(
        "DELETE FROM listsync.dead_letter_items d USING unnest($1::int8[], $2::text[]) AS u(b, a)
          WHERE d.binding_id = u.b AND d.address = u.a",
        &[bindings.into(), addresses.into()],
    )?;
    Ok(())
}

fn write_log(connection: i64, binding: i64, log: Vec<http::CallRecord>) -> Result<()> {
    if log.is_empty() || guc::DELIVERIES_RETENTION_S.get() == 0 {
        return Ok(());
    }
    let mut operation = Vec::new();
    let mut request = Vec::new();
    let mut status: Vec<Option<i32>> = Vec::new();
    let mut duration = Vec::new();
    let mut error: Vec<Option<String>> = Vec::new();
    for call in log {
        operation.push(call.operation);
        request.push(call.request);
        status.push(call.status.map(i32::from));
        duration.push(call.duration.as_secs_f64() * 1000.0);
        error.push(call.error);
    }
    Spi::run_with_args(
        "INSERT INTO listsync.delivery_log (connection_id, binding_id, operation, request, http_status, duration_ms, outcome, message)
         SELECT $6, $7, o, r, s, d, CASE WHEN s BETWEEN 200 AND 299 THEN 'ok' WHEN s IS NULL THEN 'transport error' ELSE 'error' END, e
           FROM unnest($1::text[], $2::text[], $3::int4[], $4::float8[], $5::text[]) AS u(o, r, s, d, e)",
        &[operation.into(), request.into(), status.into(), duration.into(), error.into(), connection.into(), binding.into()],
    )?;
    Ok(())
}

pub fn extension_installed() -> bool {
    // SAFETY: get_extension_oid with missing_ok = true returns InvalidOid when not installed.
    unsafe { pg_sys::get_extension_oid(c"pg_listsync".as_ptr(), true) != pg_sys::InvalidOid }
}
