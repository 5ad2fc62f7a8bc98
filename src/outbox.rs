//! The outbox of dirty (binding, address) pairs: marking, claiming, completing, rescheduling.
//!
//! Marking bumps a pair's `generation` (and clears any lease): a worker that delivered the state
//! it read deletes the pair only if the generation is still the one it claimed, so a change
//! committed while the pair was in flight is delivered afterwards, never lost. Claims and
//! completions use SKIP LOCKED and never wait for a writer's open transaction.
//!
//! Priorities ride on `not_before`: captured changes are due at `-infinity`, bulk marking
//! (backfill, resync) at the epoch, retries at their backoff time; the claim takes them in that
//! order, so a large backfill does not delay real-time changes.

use crate::error::Result;
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use std::cell::RefCell;

/// The conflict clause of every marking statement (the outbox aliased `o`). Schema-qualified:
/// it also runs with the writer's search_path. A pair marked again is due at the earlier of
/// its two times: a contact edited while queued by a backfill or waiting in retry backoff is
/// delivered as a real-time change, not at the later slot.
pub const ON_CONFLICT_DIRTY: &str = "ON CONFLICT (binding_id, address) DO UPDATE \
     SET generation = o.generation OPERATOR(pg_catalog.+) 1, lease_until = NULL, \
         not_before = LEAST(o.not_before, EXCLUDED.not_before)";

/// `not_before` of pairs marked in bulk (backfill, resync, reconcile).
pub const BULK_PRIORITY: &str = "'epoch'::timestamptz";

thread_local! {
    /// The marking statement, planned once per backend: it runs at the end of every statement
    /// that dirtied something.
    static MARK: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

/// Marks pairs dirty, as captured by the trigger.
pub fn mark(bindings: Vec<i64>, addresses: Vec<String>) -> Result<()> {
    Spi::connect_mut(|client| {
        MARK.with(|mark| {
            let mut mark = mark.borrow_mut();
            if mark.is_none() {
                let sql = format!(
                    "INSERT INTO listsync.outbox AS o (binding_id, address)
                     SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2))
                     {ON_CONFLICT_DIRTY}"
                );
                let types = [
                    PgOid::from(pg_sys::INT8ARRAYOID),
                    PgOid::from(pg_sys::TEXTARRAYOID),
                ];
                *mark = Some(client.prepare_mut(sql.as_str(), &types)?.keep());
            }
            let statement = mark.as_ref().expect("prepared above");
            client.update(statement, None, &[bindings.into(), addresses.into()])?;
            Ok(())
        })
    })
}

/// The advisory lock (per database) that orders the worker's transactions against
/// `resync(id, full => true)`, the one user call that locks rows of both the outbox and the
/// members table. Each worker transaction that claims or records takes it shared before any row
/// lock; that resync takes it exclusively before any row lock. Neither can then hold a row the
/// other waits for while waiting itself: no deadlock.
const DELIVERY_LOCK: i64 = 0x6c69_7374_7379_6e63;

/// Taken at the start of the worker's plan and record transactions.
pub fn share_delivery_lock() -> Result<()> {
    Spi::run_with_args(
        "SELECT pg_catalog.pg_advisory_xact_lock_shared($1)",
        &[DELIVERY_LOCK.into()],
    )?;
    Ok(())
}

/// Waits for the worker's current transaction and keeps the next one out until this
/// transaction ends.
pub fn exclude_delivery() -> Result<()> {
    Spi::run_with_args(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[DELIVERY_LOCK.into()],
    )?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Claimed {
    pub binding: i64,
    pub address: String,
    pub generation: i64,
    pub attempts: i32,
}

/// Claims up to `limit` due pairs of bindings that may be served now (active binding, working
/// and unthrottled connection, none of `busy`), leasing them for `lease_s` seconds.
///
/// `busy` are the connections with a delivery in flight: their pairs wait for it to finish
/// even when a lease lapsed or a new change cleared one, so that a pair is never in two
/// deliveries at once and a connection's calls stay in order.
///
/// Each servable binding's pairs are read in due order from `outbox_due` and only the first
/// `limit` overall are locked: the cost follows the batch, not the backlog, even when a paused
/// binding holds a million pairs ahead of a live one.
pub fn claim(limit: i64, lease_s: i32, busy: &[i64]) -> Result<Vec<Claimed>> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            "WITH servable AS (
                 SELECT b.id FROM listsync.bindings b
                   JOIN listsync.connections c ON c.id = b.connection_id AND c.state = 'ok'
                        AND (c.throttled_until IS NULL OR c.throttled_until <= now())
                        AND c.id <> ALL ($3::int8[])
                  WHERE b.state = 'active'),
             candidates AS (
                 SELECT first.binding_id, first.address FROM servable,
                        LATERAL (SELECT o.binding_id, o.address, o.not_before FROM listsync.outbox o
                                  WHERE o.binding_id = servable.id AND o.not_before <= now()
                                    AND (o.lease_until IS NULL OR o.lease_until < now())
                                  ORDER BY o.not_before LIMIT $1) first
                  ORDER BY first.not_before LIMIT $1),
             due AS (
                 SELECT o.binding_id, o.address FROM listsync.outbox o
                   JOIN candidates USING (binding_id, address)
                  WHERE o.not_before <= now() AND (o.lease_until IS NULL OR o.lease_until < now())
                    FOR UPDATE OF o SKIP LOCKED)
             UPDATE listsync.outbox o
                SET lease_until = now() + $2 * interval '1 second', claimed_generation = o.generation
               FROM due WHERE o.binding_id = due.binding_id AND o.address = due.address
             RETURNING o.binding_id, o.address, o.generation, o.attempts",
            None,
            &[limit.into(), lease_s.into(), busy.to_vec().into()],
        )?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            claimed.push(Claimed {
                binding: row.get(1)?.unwrap_or_default(),
                address: row.get(2)?.unwrap_or_default(),
                generation: row.get(3)?.unwrap_or_default(),
                attempts: row.get(4)?.unwrap_or_default(),
            });
        }
        Ok(claimed)
    })
}

/// Gives back every lease: called when a database's (only) worker starts, any lease left is
/// one a crashed worker held.
pub fn release_all_leases() -> Result<()> {
    Spi::run("UPDATE listsync.outbox SET lease_until = NULL WHERE lease_until IS NOT NULL")?;
    Ok(())
}

/// Removes delivered pairs whose generation did not move meanwhile; a pair re-marked since its
/// claim (or locked by a writer right now) stays dirty and is claimed again.
pub fn complete(bindings: Vec<i64>, addresses: Vec<String>, generations: Vec<i64>) -> Result<()> {
    if bindings.is_empty() {
        return Ok(());
    }
    Spi::run_with_args(
        "DELETE FROM listsync.outbox o USING (
             SELECT o2.binding_id, o2.address FROM listsync.outbox o2
               JOIN unnest($1::int8[], $2::text[], $3::int8[]) AS d(binding_id, address, generation)
                 ON o2.binding_id = d.binding_id AND o2.address = d.address AND o2.generation = d.generation
              FOR UPDATE OF o2 SKIP LOCKED) done
         WHERE o.binding_id = done.binding_id AND o.address = done.address",
        &[bindings.into(), addresses.into(), generations.into()],
    )?;
    Ok(())
}

/// Puts failed pairs back with a later due time and their error.
pub fn reschedule(
    bindings: Vec<i64>,
    addresses: Vec<String>,
    delays_ms: Vec<i64>,
    errors: Vec<String>,
) -> Result<()> {
    if bindings.is_empty() {
        return Ok(());
    }
    Spi::run_with_args(
        "UPDATE listsync.outbox o
            SET attempts = o.attempts + 1, not_before = now() + r.delay_ms * interval '1 millisecond',
                last_error = r.error, lease_until = NULL
           FROM (SELECT o2.binding_id, o2.address, d.delay_ms, d.error FROM listsync.outbox o2
                   JOIN unnest($1::int8[], $2::text[], $3::int8[], $4::text[]) AS d(binding_id, address, delay_ms, error)
                     ON o2.binding_id = d.binding_id AND o2.address = d.address
                  FOR UPDATE OF o2 SKIP LOCKED) r
          WHERE o.binding_id = r.binding_id AND o.address = r.address",
        &[bindings.into(), addresses.into(), delays_ms.into(), errors.into()],
    )?;
    Ok(())
}

/// Gives claimed pairs back untouched (their binding or connection stopped).
pub fn release(bindings: Vec<i64>, addresses: Vec<String>) -> Result<()> {
    if bindings.is_empty() {
        return Ok(());
    }
    Spi::run_with_args(
        "UPDATE listsync.outbox o SET lease_until = NULL
           FROM (SELECT o2.binding_id, o2.address FROM listsync.outbox o2
                   JOIN unnest($1::int8[], $2::text[]) AS d(binding_id, address)
                     ON o2.binding_id = d.binding_id AND o2.address = d.address
                  FOR UPDATE OF o2 SKIP LOCKED) r
          WHERE o.binding_id = r.binding_id AND o.address = r.address",
        &[bindings.into(), addresses.into()],
    )?;
    Ok(())
}
