//! Figures 1 and 2: what capture costs the writing transactions.
//!
//! Each configuration runs on a freshly loaded table, after a CHECKPOINT, with the worker idle
//! (bindings paused), so that the only difference between runs is the capture itself. Rounds
//! are interleaved (every configuration once, then again) so that drift of the machine over
//! the run touches all configurations alike; the median of the rounds is reported.

use crate::Options;
use crate::cpu;
use crate::crm::{self, Capture, run};
use postgres::Client;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const TABLE_ROWS: i64 = 100_000;
const CLIENTS: u32 = 2;

/// The CRM write mix, as pgbench scripts with their weights (percent of transactions).
fn scripts() -> Vec<(&'static str, u32, String)> {
    let cities = crm::cities_array();
    vec![
        (
            "visit",
            70,
            // A page view or login: touches a column no filter or mapping reads.
            format!(
                "\\set id random(1, {TABLE_ROWS})\n\
                 UPDATE contacts SET last_seen_at = now() WHERE id = :id;\n"
            ),
        ),
        (
            "move",
            10,
            // A filtered column: the contact may enter or leave a city's lists.
            format!(
                "\\set id random(1, {TABLE_ROWS})\n\
                 \\set c random(1, 20)\n\
                 UPDATE contacts SET city = {cities}[:c] WHERE id = :id;\n"
            ),
        ),
        (
            "purchase",
            10,
            // The other filtered column: lifetime value crosses a threshold or not.
            format!(
                "\\set id random(1, {TABLE_ROWS})\n\
                 \\set cents random(0, 1000000)\n\
                 UPDATE contacts SET ltv = :cents / 100.0 WHERE id = :id;\n"
            ),
        ),
        (
            "signup",
            10,
            // A new contact with a unique address.
            format!(
                "\\set c random(1, 20)\n\
                 \\set cents random(0, 1000000)\n\
                 INSERT INTO contacts (id, email, first_name, last_name, city, ltv, last_seen_at)\n\
                 SELECT n, 'new.contact.' || n || '@example.com', 'New', 'Contact', {cities}[:c], :cents / 100.0, now()\n\
                   FROM nextval('contacts_id_seq') n;\n"
            ),
        ),
    ]
}

/// Writes the scripts next to the results (so a run can be reproduced by hand) and returns
/// pgbench's `-f file@weight` arguments.
fn write_scripts(out: &Path) -> Vec<String> {
    let dir = out.join("pgbench");
    std::fs::create_dir_all(&dir).expect("create the pgbench script directory");
    scripts()
        .into_iter()
        .flat_map(|(name, weight, text)| {
            let path: PathBuf = dir.join(format!("{name}.sql"));
            std::fs::write(&path, text).expect("write a pgbench script");
            ["-f".to_string(), format!("{}@{weight}", path.display())]
        })
        .collect()
}

/// One pgbench run of the mix; returns (tps, average latency in ms).
fn pgbench(options: &Options, script_args: &[String]) -> (f64, f64) {
    let output = Command::new(options.pg_bin.join("pgbench"))
        .args(["-n", "-M", "prepared"])
        .args(["-c", &CLIENTS.to_string(), "-j", &CLIENTS.to_string()])
        .args(["-T", &options.seconds.to_string()])
        .args(["-h", &options.host, "-p", &options.port.to_string()])
        .args(["-U", "postgres"])
        .args(script_args)
        .arg("crm")
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pgbench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let number = |prefix: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no \"{prefix}\" in pgbench's output:\n{stdout}"))
    };
    if let Some(failed) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
    {
        assert!(
            failed.starts_with("0 "),
            "pgbench transactions failed: {failed}\n{stdout}"
        );
    }
    (number("tps = "), number("latency average = "))
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// docs/design.md's targets for pg_listsync, and its reference figures for the PL/pgSQL peer.
fn mixed_target(capture: Capture) -> Value {
    match capture {
        Capture::Listsync(1) => json!({"min_ratio": 0.95}),
        Capture::Listsync(10) => json!({"min_ratio": 0.90}),
        Capture::Listsync(100) => json!({"min_ratio": 0.80}),
        Capture::Peer(1) => json!({"design_reference_ratio": 0.82}),
        Capture::Peer(10) => json!({"design_reference_ratio": 0.69}),
        Capture::Peer(100) => json!({"design_reference_ratio": 0.27}),
        _ => Value::Null,
    }
}

/// Figure 1: mixed single-row writes, 2 clients.
pub fn mixed(options: &Options, db: &mut Client) -> Value {
    let configurations = [
        Capture::Bare,
        Capture::Listsync(1),
        Capture::Listsync(10),
        Capture::Listsync(100),
        Capture::Peer(1),
        Capture::Peer(10),
        Capture::Peer(100),
    ];
    // BENCH_MIXED=listsync_100 (say) measures only those, besides the bare table.
    let configurations: Vec<Capture> = configurations
        .into_iter()
        .filter(|c| {
            *c == Capture::Bare || options.mixed.is_empty() || options.mixed.contains(&c.key())
        })
        .collect();
    let script_args = write_scripts(&options.out);
    let postmaster = cpu::postmaster_pid(db);
    let mut foreign: Vec<Vec<f64>> = vec![Vec::new(); configurations.len()];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); configurations.len()];
    let mut latency: Vec<Vec<f64>> = vec![Vec::new(); configurations.len()];
    let mut captured: Vec<Vec<i64>> = vec![Vec::new(); configurations.len()];
    for round in 1..=options.rounds {
        for (i, capture) in configurations.iter().enumerate() {
            crm::reset(db);
            crm::load_contacts(db, TABLE_ROWS);
            capture.install(db);
            run(db, "CHECKPOINT");
            let before = cpu::snapshot(postmaster);
            let (t, l) = pgbench(options, &script_args);
            let others = cpu::foreign_percent(before, cpu::snapshot(postmaster));
            let pairs = capture.captured(db);
            crate::say!(
                "  round {round}/{}: {:<12} {t:>8.0} tps  ({l:.3} ms avg, {pairs} dirty pairs, other processes {others:.0}% CPU)",
                options.rounds,
                capture.key()
            );
            foreign[i].push(others);
            tps[i].push(t);
            latency[i].push(l);
            captured[i].push(pairs);
        }
    }
    let bare = median(&tps[0]);
    let results: Vec<Value> = configurations
        .iter()
        .enumerate()
        .map(|(i, capture)| {
            let m = median(&tps[i]);
            let ratio = m / bare;
            let target = mixed_target(*capture);
            let met = target["min_ratio"].as_f64().map(|min| ratio >= min);
            json!({
                "configuration": capture.key(),
                "tps_runs": tps[i],
                "latency_avg_ms_runs": latency[i],
                "dirty_pairs_runs": captured[i],
                "other_processes_cpu_pct_runs": foreign[i],
                "tps": m,
                "ratio_to_bare": ratio,
                "target": target,
                "met": met,
            })
        })
        .collect();
    json!({
        "clients": CLIENTS,
        "table_rows": TABLE_ROWS,
        "seconds_per_run": options.seconds,
        "rounds": options.rounds,
        "mix": scripts().iter().map(|(name, weight, text)| json!({"name": name, "percent": weight, "script": text})).collect::<Vec<_>>(),
        "configurations": results,
    })
}

/// Figure 2: COPY of 100k contacts into an empty table.
pub fn copy(options: &Options, db: &mut Client) -> Value {
    // The same 100k rows for every run, generated once by the server as COPY text.
    crm::reset(db);
    run(db, "SELECT setseed(0.42)");
    let mut data = Vec::new();
    db.copy_out(&format!(
        "COPY ({}) TO STDOUT",
        crm::contacts_select(1, TABLE_ROWS, None)
    ))
    .expect("generate the COPY data")
    .read_to_end(&mut data)
    .expect("read the COPY data");

    let configurations = [Capture::Bare, Capture::Listsync(10), Capture::Peer(10)];
    let postmaster = cpu::postmaster_pid(db);
    let mut foreign: Vec<Vec<f64>> = vec![Vec::new(); configurations.len()];
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); configurations.len()];
    let mut captured: Vec<Vec<i64>> = vec![Vec::new(); configurations.len()];
    for round in 1..=options.copy_rounds {
        for (i, capture) in configurations.iter().enumerate() {
            crm::reset(db);
            crm::create_contacts(db);
            capture.install(db);
            run(db, "CHECKPOINT");
            let before = cpu::snapshot(postmaster);
            let started = Instant::now();
            let mut writer = db
                .copy_in(&format!("COPY contacts ({}) FROM STDIN", crm::COLUMNS))
                .expect("start COPY");
            writer.write_all(&data).expect("send COPY data");
            let rows = writer.finish().expect("COPY");
            let elapsed = started.elapsed().as_secs_f64();
            let others = cpu::foreign_percent(before, cpu::snapshot(postmaster));
            assert_eq!(rows, TABLE_ROWS as u64);
            let pairs = capture.captured(db);
            crate::say!(
                "  round {round}/{}: {:<12} {elapsed:>7.3} s  ({pairs} dirty pairs, other processes {others:.0}% CPU)",
                options.copy_rounds,
                capture.key()
            );
            foreign[i].push(others);
            seconds[i].push(elapsed);
            captured[i].push(pairs);
        }
    }
    let bare = median(&seconds[0]);
    let results: Vec<Value> = configurations
        .iter()
        .enumerate()
        .map(|(i, capture)| {
            let m = median(&seconds[i]);
            let ratio = m / bare;
            let (target, met) = match capture {
                Capture::Listsync(10) => (json!({"max_ratio": 2.0}), Some(ratio <= 2.0)),
                Capture::Peer(10) => (json!({"design_reference_ratio": 6.9}), None),
                _ => (Value::Null, None),
            };
            json!({
                "configuration": capture.key(),
                "seconds_runs": seconds[i],
                "dirty_pairs_runs": captured[i],
                "other_processes_cpu_pct_runs": foreign[i],
                "seconds": m,
                "ratio_to_bare": ratio,
                "target": target,
                "met": met,
            })
        })
        .collect();
    json!({
        "rows": TABLE_ROWS,
        "rounds": options.copy_rounds,
        "configurations": results,
    })
}
