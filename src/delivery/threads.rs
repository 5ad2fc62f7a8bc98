//! Delivery threads: one per connection, sending batches within the provider's limits with no
//! transaction open, and deciding per call between retry, stop and dead letter.

use listsync_core::http::{Http, HttpConfig, ProviderError};
use listsync_core::plan::Action;
use listsync_core::providers::{self, LeaveAction, Member, OnLeave, Outcome};
use listsync_core::redact::Redactor;
use pgrx::pg_sys;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};

use super::*;

/// Serves one connection's bindings in turn. An authentication failure stops the connection's
/// remaining bindings too.
pub(super) fn deliver_connection(runtime: &mut Runtime, works: Vec<&mut Work>) {
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
pub(super) fn scrub(work: &mut Work, redactor: &Redactor) {
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
pub(super) fn terminating() -> bool {
    // SAFETY: a read of a sig_atomic_t set by the signal handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Starts a delivery thread with every signal blocked from its first instruction on: signals
/// belong to the worker's main thread, where PostgreSQL's handlers expect to run.
pub(super) fn spawn_without_signals(
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
pub(super) fn serve_lane(
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
pub(super) fn deliver_job(
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
pub(super) fn deliver_work(runtime: &mut Runtime, work: &mut Work) {
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
    // A `keep` binding has nothing to send for members who leave: the planner forgets them.
    let leave = match work.target.on_leave {
        OnLeave::Keep => None,
        OnLeave::Act(action) => Some(Call::Remove(action)),
    };
    for call in [Some(Call::Upsert), leave, Some(Call::Erase)]
        .into_iter()
        .flatten()
    {
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
                Call::Remove(action) => provider.remove(http, binding, action, &members),
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
pub(super) enum Call {
    Upsert,
    Remove(LeaveAction),
    Erase,
}

impl Call {
    pub(super) fn carries(self, action: &Action) -> bool {
        match self {
            Call::Upsert => matches!(action, Action::Add | Action::Update),
            Call::Remove(leave) => *action == Action::Leave(leave),
            Call::Erase => matches!(action, Action::Erase),
        }
    }
}

/// Applies a batch-level failure: authentication and binding errors stop the binding (returns
/// true), transient and permanent ones become every item's outcome.
pub(super) fn stop_or_retry(
    work: &mut Work,
    error: ProviderError,
    batch: Option<&[usize]>,
) -> bool {
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
