//! Configuration (postgresql.conf). Every setting the worker reads is SIGHUP-reloadable.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

pub static DATABASES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static ALLOWED_INSECURE_HOSTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static HTTP_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(20);
pub static RETRY_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
pub static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
pub static LEASE_S: GucSetting<i32> = GucSetting::<i32>::new(120);
pub static RECONCILE_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(3_600);
pub static DELIVERIES_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);

pub fn define() {
    GucRegistry::define_string_guc(
        c"listsync.database",
        c"Databases the pg_listsync worker serves (comma-separated).",
        c"One worker runs per database named here; a database without the extension costs an idle connection.",
        &DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"listsync.allowed_insecure_hosts",
        c"Hosts that may be called over plain http (comma-separated), for tests and local emulators.",
        c"Every other endpoint must be https.",
        &ALLOWED_INSECURE_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        c"listsync.batch_size",
        c"Dirty pairs a worker claims per cycle.",
        &BATCH_SIZE,
        1,
        100_000,
        GucFlags::default(),
    );
    int(
        c"listsync.http_timeout",
        c"Timeout of one provider call.",
        &HTTP_TIMEOUT_MS,
        100,
        120_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"listsync.poll_interval",
        c"How often the worker looks for work without being woken (PREPARE TRANSACTION, retries).",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"listsync.max_attempts",
        c"Attempts of a retryable failure before it becomes a dead letter.",
        &MAX_ATTEMPTS,
        1,
        1_000,
        GucFlags::default(),
    );
    int(
        c"listsync.retry_base_delay",
        c"First retry delay; doubles per attempt, with jitter.",
        &RETRY_BASE_MS,
        10,
        3_600_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"listsync.retry_max_delay",
        c"Longest retry delay.",
        &RETRY_MAX_MS,
        100,
        86_400_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"listsync.lease",
        c"How long a claimed pair is reserved for the worker that claimed it.",
        &LEASE_S,
        5,
        86_400,
        GucFlags::UNIT_S,
    );
    int(
        c"listsync.reconcile_interval",
        c"How often bindings of time-dependent filters are reconciled.",
        &RECONCILE_INTERVAL_S,
        1,
        7 * 86_400,
        GucFlags::UNIT_S,
    );
    int(
        c"listsync.deliveries_retention",
        c"How long listsync.deliveries keeps provider calls.",
        &DELIVERIES_RETENTION_S,
        0,
        365 * 86_400,
        GucFlags::UNIT_S,
    );
    // A misspelt setting (`listsync.batchsize`) is refused with a WARNING at startup and an
    // error in SET, instead of being kept silently as a placeholder.
    // SAFETY: called once while the library loads, after our settings are defined.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"listsync".as_ptr()) };
}

fn int(
    name: &'static std::ffi::CStr,
    description: &'static std::ffi::CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(
        name,
        description,
        c"",
        setting,
        min,
        max,
        GucContext::Sighup,
        flags,
    );
}

pub fn databases() -> Vec<String> {
    list(&DATABASES)
}

pub fn allowed_insecure_hosts() -> Vec<String> {
    list(&ALLOWED_INSECURE_HOSTS)
}

fn list(setting: &GucSetting<Option<CString>>) -> Vec<String> {
    setting
        .get()
        .map(|s| {
            s.to_string_lossy()
                .split(',')
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

pub fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

pub fn seconds(setting: &GucSetting<i32>) -> Duration {
    Duration::from_secs(setting.get().max(0) as u64)
}
