//! Figures 3 and 4: the worker delivering to the emulator.

use crate::Options;
use crate::crm::{self, MAILCHIMP, WEBHOOK, run, scalar};
use crate::writes::{TABLE_ROWS, median};
use listsync_emulator::Emulator;
use postgres::Client;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

const LATENCY_INTERVAL: Duration = Duration::from_millis(50);
const LATENCY_WARMUP: usize = 20;

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds from `from` to `to` (negative if `to` is earlier).
fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// Figure 3: one client commits one qualifying change every 50 ms with ten active bindings
/// (webhook); each change is timed from the moment COMMIT returned to the client to the
/// moment the emulator received the webhook carrying it. With `recommended_index`, the table
/// has the index on `listsync.normalize_email(email)` that the worker looks rows up by.
pub fn latency(
    options: &Options,
    db: &mut Client,
    emulator: &Emulator,
    recommended_index: bool,
) -> Value {
    crm::reset(db);
    crm::load_contacts(db, TABLE_ROWS);
    if recommended_index {
        create_recommended_index(db);
    }
    let bindings = crm::bind_filters(db, 10, WEBHOOK, false);
    crm::wait_synced(db, &bindings, Duration::from_secs(60));

    // The application's own connection, with the default synchronous_commit (the cluster's
    // `off` is for the write-path figures only).
    let mut app = crm::connect(options);
    run(&mut app, "SET synchronous_commit = on");
    // Moscow and ltv 5000: enters filter 0's list.
    let insert = app
        .prepare(
            "INSERT INTO contacts (email, first_name, last_name, city, ltv, last_seen_at)
             VALUES ($1, 'Lara', 'Tency', 'Moscow', 5000, now())",
        )
        .unwrap();
    let total = LATENCY_WARMUP + options.latency_samples;
    let mut committed: Vec<(String, SystemTime)> = Vec::with_capacity(total);
    let started = Instant::now();
    for k in 0..total {
        // Unique to this run: deliveries of an earlier run must not match.
        let email = format!(
            "latency.{k}.{}@example.com",
            if recommended_index { "i" } else { "s" }
        );
        app.execute(&insert, &[&email]).expect("insert");
        committed.push((email, SystemTime::now()));
        let next = LATENCY_INTERVAL * (k as u32 + 1);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }

    let mut received: HashMap<String, SystemTime> = HashMap::new();
    crm::wait_for(
        "the emulator to receive every latency sample",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            for delivery in emulator.webhook().received() {
                for change in delivery.body["changes"].as_array().into_iter().flatten() {
                    if let Some(email) = change["email"].as_str() {
                        received
                            .entry(email.to_string())
                            .or_insert(delivery.received_at);
                    }
                }
            }
            committed.iter().all(|(e, _)| received.contains_key(e))
        },
    );
    let samples: Vec<f64> = committed[LATENCY_WARMUP..]
        .iter()
        .map(|(email, at)| ms_between(*at, received[email]))
        .collect();
    let mut sorted = samples.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (percentile(&sorted, 50.0), percentile(&sorted, 99.0));
    crate::say!(
        "  {} samples: p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        samples.len(),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    json!({
        "provider": "webhook",
        "recommended_index": recommended_index,
        "active_bindings": bindings.len(),
        "interval_ms": LATENCY_INTERVAL.as_millis() as u64,
        "warmup_samples": LATENCY_WARMUP,
        "samples": samples.len(),
        "p50_ms": p50,
        "p90_ms": percentile(&sorted, 90.0),
        "p99_ms": p99,
        "max_ms": sorted.last(),
        "min_ms": sorted.first(),
        "mean_ms": samples.iter().sum::<f64>() / samples.len() as f64,
        "median_ms": median(&samples),
        "samples_ms": samples,
        "target": {"p50_max_ms": 20.0, "p99_max_ms": 100.0},
        "met": {"p50": p50 <= 20.0, "p99": p99 <= 100.0},
    })
}

/// The index the worker looks desired state up by (rows by normalized address), which the
/// documentation recommends on every bound table.
fn create_recommended_index(db: &mut Client) {
    run(
        db,
        "CREATE INDEX ON contacts (listsync.normalize_email(email))",
    );
    run(db, "VACUUM (ANALYZE) contacts");
}

/// Memory figures of a process from /proc/<pid>/status, in kB.
#[derive(Clone, Copy, Default, Debug)]
struct Memory {
    rss: u64,
    anon: u64,
    shmem: u64,
    hwm: u64,
}

fn memory(pid: i32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Some(Memory {
        rss: kb("VmRSS:"),
        anon: kb("RssAnon:"),
        shmem: kb("RssShmem:"),
        hwm: kb("VmHWM:"),
    })
}

/// Samples a process's memory every 200 ms until stopped; returns (seconds, memory) samples.
fn sample_memory(pid: i32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(f64, Memory)>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(m) = memory(pid) {
                samples.push((started.elapsed().as_secs_f64(), m));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        samples
    })
}

fn pending(db: &mut Client, binding: i64) -> i64 {
    db.query_one(
        "SELECT pending FROM listsync.status WHERE binding = $1",
        &[&binding],
    )
    .unwrap()
    .get(0)
}

/// Figure 4: a backlog of `drain_rows` changes (a paused binding captures that many new
/// matching contacts) drained to the Mailchimp emulator, which takes 500 members per call.
pub fn drain(options: &Options, db: &mut Client, emulator: &Emulator) -> Value {
    let rows = options.drain_rows;
    crm::reset(db);
    crm::create_contacts(db);
    let binding = crm::bind_filters(db, 1, MAILCHIMP, false)[0];
    // Let the worker set the list up (the tag at Mailchimp) before the backlog builds up.
    crm::wait_synced(db, &[binding], Duration::from_secs(60));
    db.execute("SELECT listsync.pause_binding($1)", &[&binding])
        .unwrap();

    let started = Instant::now();
    const CHUNK: i64 = 100_000;
    let mut first = 1;
    while first <= rows {
        let count = CHUNK.min(rows - first + 1);
        run(
            db,
            &format!(
                "INSERT INTO contacts ({}) {}",
                crm::COLUMNS,
                crm::contacts_select(first, count, Some("Moscow"))
            ),
        );
        first += count;
    }
    let insert_s = started.elapsed().as_secs_f64();
    create_recommended_index(db);
    run(db, "CHECKPOINT");
    let backlog = pending(db, binding);
    assert_eq!(
        backlog, rows,
        "the paused binding should have captured every row"
    );
    crate::say!("  backlog of {backlog} changes captured in {insert_s:.1} s; draining");

    let pid: i32 = scalar(
        db,
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_listsync worker' AND datname = 'crm'",
    );
    // Peak RSS from now on: writing 5 to clear_refs resets VmHWM to the current RSS.
    let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let before = memory(pid).unwrap_or_default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_memory(pid, Arc::clone(&stop));

    let exists = db
        .prepare(
            "SELECT EXISTS (SELECT FROM listsync.outbox WHERE binding_id = $1 AND address <> '')",
        )
        .unwrap();
    let started = Instant::now();
    db.execute("SELECT listsync.resume_binding($1)", &[&binding])
        .unwrap();
    let deadline = started + Duration::from_secs(options.drain_timeout_s);
    let mut next_progress = started + Duration::from_secs(15);
    let mut completed = true;
    loop {
        let busy: bool = db.query_one(&exists, &[&binding]).unwrap().get(0);
        if !busy {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            completed = false;
            break;
        }
        if now >= next_progress {
            let left = pending(db, binding);
            crate::say!(
                "  {:>4.0} s: {left} pending ({:.0} changes/s so far)",
                started.elapsed().as_secs_f64(),
                (rows - left) as f64 / started.elapsed().as_secs_f64()
            );
            next_progress = now + Duration::from_secs(15);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = memory(pid).unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();

    let status: Value = db
        .query_one(
            "SELECT to_jsonb(s) FROM listsync.status s WHERE binding = $1",
            &[&binding],
        )
        .unwrap()
        .get(0);
    let left = status["pending"].as_i64().unwrap_or(-1);
    let drained = rows - left;
    let rate = drained as f64 / elapsed;
    let list_id = status["list_id"].as_str().unwrap_or_default().to_string();
    let at_provider = emulator.list_members("mailchimp", &list_id).len();
    let peak = |f: fn(&Memory) -> u64| samples.iter().map(|(_, m)| f(m)).max().unwrap_or(0);
    let hwm_mb = after.hwm as f64 / 1024.0;
    crate::say!(
        "  drained {drained} in {elapsed:.1} s: {rate:.0} changes/s; worker VmHWM {hwm_mb:.1} MB, \
         peak RssAnon {:.1} MB; {at_provider} members at the emulator",
        peak(|m| m.anon) as f64 / 1024.0
    );
    json!({
        "provider": "mailchimp",
        "changes": rows,
        "drained": drained,
        "completed": completed && left == 0,
        "timeout_s": options.drain_timeout_s,
        "capture_insert_s": insert_s,
        "seconds": elapsed,
        "changes_per_s": rate,
        "members_at_provider": at_provider,
        "status_after": status,
        "worker": {
            "pid": pid,
            "hwm_reset_before_drain": hwm_reset,
            "before_kb": {"rss": before.rss, "anon": before.anon, "shmem": before.shmem},
            "after_kb": {"rss": after.rss, "anon": after.anon, "shmem": after.shmem},
            "vm_hwm_kb": after.hwm,
            "peak_sampled_kb": {"rss": peak(|m| m.rss), "anon": peak(|m| m.anon), "shmem": peak(|m| m.shmem)},
            "samples": samples.iter().step_by(5).map(|(t, m)| json!([t, m.rss, m.anon, m.shmem])).collect::<Vec<_>>(),
            "samples_columns": ["seconds", "rss_kb", "anon_kb", "shmem_kb"],
        },
        "target": {"min_changes_per_s": 20000.0, "max_rss_mb": 100.0},
        "met": {"throughput": completed && rate >= 20000.0, "rss": hwm_mb < 100.0},
    })
}
