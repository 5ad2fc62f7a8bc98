//! The write ledger: what a finished cycle records, in set-based statements (members, dead
//! letters, retries, states, the call log).

use crate::error::Result;
use crate::guc;
use crate::outbox;
use listsync_core::http::{self};
use pgrx::JsonB;
use pgrx::prelude::*;
use serde_json::{Map, Value};
use std::time::Duration;

/// (binding, address) columns for set-based statements.
#[derive(Default)]
pub(super) struct Pairs {
    pub(super) bindings: Vec<i64>,
    pub(super) addresses: Vec<String>,
}

impl Pairs {
    pub(super) fn push(&mut self, binding: i64, address: impl Into<String>) {
        self.bindings.push(binding);
        self.addresses.push(address.into());
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }
}

#[derive(Default)]
pub(super) struct MemberWrites {
    pub(super) pairs: Pairs,
    pub(super) statuses: Vec<String>,
    pub(super) remote_ids: Vec<Option<String>>,
    pub(super) fields: Vec<JsonB>,
}

#[derive(Default)]
pub(super) struct DeadLetters {
    pub(super) pairs: Pairs,
    pub(super) operations: Vec<String>,
    pub(super) attempts: Vec<i32>,
    pub(super) errors: Vec<String>,
}

/// The cumulative counters of `listsync.counters`, in its column order.
#[derive(Clone, Copy)]
pub(super) enum Counter {
    Added,
    Updated,
    Removed,
    Erased,
    Refused,
    Failed,
    Retried,
    Throttled,
}

const COUNTERS: usize = Counter::Throttled as usize + 1;

/// The writes of `record`, gathered per kind and applied with one statement each.
#[derive(Default)]
pub(super) struct Book {
    pub(super) members: MemberWrites,
    pub(super) gone: Pairs,
    pub(super) dead: DeadLetters,
    pub(super) complete: (Pairs, Vec<i64>),
    pub(super) retry: (Pairs, Vec<i64>, Vec<String>),
    pub(super) release: Pairs,
    counts: std::collections::BTreeMap<i64, [i64; COUNTERS]>,
}

impl Book {
    pub(super) fn count(&mut self, binding: i64, counter: Counter) {
        self.counts.entry(binding).or_default()[counter as usize] += 1;
    }

    pub(super) fn member(
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

    pub(super) fn gone(&mut self, binding: i64, address: &str) {
        self.gone.push(binding, address);
    }

    pub(super) fn dead(
        &mut self,
        binding: i64,
        address: &str,
        operation: &str,
        attempts: i32,
        error: String,
    ) {
        self.dead.pairs.push(binding, address);
        self.dead.operations.push(operation.to_string());
        self.dead.attempts.push(attempts);
        self.dead.errors.push(error);
    }

    pub(super) fn complete(&mut self, binding: i64, address: String, generation: i64) {
        self.complete.0.push(binding, address);
        self.complete.1.push(generation);
    }

    pub(super) fn retry(&mut self, binding: i64, address: String, delay: Duration, error: String) {
        self.retry.0.push(binding, address);
        self.retry.1.push(delay.as_millis() as i64);
        self.retry.2.push(error);
    }

    pub(super) fn release(&mut self, binding: i64, address: String) {
        self.release.push(binding, address);
    }

    pub(super) fn write(self) -> Result<()> {
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
        write_counts(self.counts)
    }
}

/// Adds a cycle's counts to `listsync.counters`: one row per binding, one statement per cycle.
fn write_counts(counts: std::collections::BTreeMap<i64, [i64; COUNTERS]>) -> Result<()> {
    if counts.is_empty() {
        return Ok(());
    }
    let bindings: Vec<i64> = counts.keys().copied().collect();
    let column =
        |counter: Counter| -> Vec<i64> { counts.values().map(|c| c[counter as usize]).collect() };
    use Counter::*;
    Spi::run_with_args(
        "INSERT INTO listsync.counters AS k (binding_id, added, updated, removed, erased, refused, failed, retried, throttled)
         SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[], $9::int8[])
                       AS u(binding_id, added, updated, removed, erased, refused, failed, retried, throttled)
          -- A binding unbound while its cycle was out has nobody left to count for.
          WHERE EXISTS (SELECT FROM listsync.bindings b WHERE b.id = u.binding_id)
         ON CONFLICT (binding_id) DO UPDATE
            SET added = k.added + EXCLUDED.added, updated = k.updated + EXCLUDED.updated,
                removed = k.removed + EXCLUDED.removed, erased = k.erased + EXCLUDED.erased,
                refused = k.refused + EXCLUDED.refused, failed = k.failed + EXCLUDED.failed,
                retried = k.retried + EXCLUDED.retried, throttled = k.throttled + EXCLUDED.throttled",
        &[
            bindings.into(),
            column(Added).into(),
            column(Updated).into(),
            column(Removed).into(),
            column(Erased).into(),
            column(Refused).into(),
            column(Failed).into(),
            column(Retried).into(),
            column(Throttled).into(),
        ],
    )?;
    Ok(())
}

pub(super) fn clear_dead_letters(bindings: Vec<i64>, addresses: Vec<String>) -> Result<()> {
    Spi::run_with_args(
        "DELETE FROM listsync.dead_letter_items d USING unnest($1::int8[], $2::text[]) AS u(b, a)
          WHERE d.binding_id = u.b AND d.address = u.a",
        &[bindings.into(), addresses.into()],
    )?;
    Ok(())
}

pub(super) fn write_log(connection: i64, binding: i64, log: Vec<http::CallRecord>) -> Result<()> {
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
