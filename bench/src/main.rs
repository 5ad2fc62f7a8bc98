//! `listsync-bench`: the figures of `make bench` (docs/design.md, "Targets"), all from one run.
//!
//! `scripts/bench.sh` starts a scratch cluster with pg_listsync preloaded and runs this program
//! against it. It starts the provider emulator in-process (so that receipt times and the
//! client's commit times come from the same clock), measures
//!
//! 1. mixed single-row writes (pgbench, 2 clients): bare table, pg_listsync with 1/10/100 paused
//!    bindings, and a hand-written PL/pgSQL trigger + outbox with the same filters;
//! 2. bulk COPY of 100k contacts: bare, pg_listsync with 10 bindings, the PL/pgSQL peer;
//! 3. commit → emulator-received latency at light load, bindings active;
//! 4. drain of a 1M-change backlog to the batching (Mailchimp) emulator, and the worker's RSS,
//!
//! then prints one table and writes `results.json` and `results.md` to the output directory.

mod cpu;
mod crm;
mod delivery;
mod report;
mod writes;

use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;

/// Where the cluster is and how long to measure. Durations come from the environment so that a
/// developer can make a quick run (`BENCH_SECONDS=5 BENCH_ROUNDS=1 ...`); the defaults are the
/// ones `make bench` reports.
pub struct Options {
    /// libpq-style connection string of the `crm` database (unix socket of the scratch cluster).
    pub conninfo: String,
    pub host: String,
    pub port: u16,
    pub pg_bin: PathBuf,
    pub out: PathBuf,
    /// Seconds of each pgbench run.
    pub seconds: u32,
    /// pgbench runs per configuration (the median is reported), interleaved across configurations.
    pub rounds: usize,
    pub copy_rounds: usize,
    pub latency_samples: usize,
    pub drain_rows: i64,
    pub drain_timeout_s: u64,
    /// Figures to measure (`BENCH_ONLY=latency,drain`); all by default.
    pub only: Vec<String>,
    /// Configurations of the mixed-writes figure besides the bare table
    /// (`BENCH_MIXED=listsync_100,plpgsql_100`); all by default.
    pub mixed: Vec<String>,
}

impl Options {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// A comma-separated list from the environment (empty if unset).
fn list(name: &str) -> Vec<String> {
    env_or(name, String::new())
        .split(',')
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect()
}

fn parse_args() -> Options {
    let mut host = None;
    let mut port = None;
    let mut out = PathBuf::from("target/bench");
    let mut pg_bin = PathBuf::from("/usr/lib/postgresql/15/bin");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--host" => host = Some(value()),
            "--port" => port = Some(value().parse().expect("--port: a port number")),
            "--out" => out = PathBuf::from(value()),
            "--pg-bin" => pg_bin = PathBuf::from(value()),
            other => panic!(
                "unknown argument {other:?}\nusage: listsync-bench --host SOCKET_DIR --port N [--out DIR] [--pg-bin DIR]"
            ),
        }
    }
    let host = host.expect("--host (the cluster's unix socket directory) is required");
    let port: u16 = port.expect("--port is required");
    Options {
        conninfo: format!("host={host} port={port} user=postgres dbname=crm"),
        host,
        port,
        pg_bin,
        out,
        seconds: env_or("BENCH_SECONDS", 20),
        rounds: env_or("BENCH_ROUNDS", 3),
        copy_rounds: env_or("BENCH_COPY_ROUNDS", 3),
        latency_samples: env_or("BENCH_LATENCY_SAMPLES", 300),
        drain_rows: env_or("BENCH_DRAIN_ROWS", 1_000_000),
        drain_timeout_s: env_or("BENCH_DRAIN_TIMEOUT", 600),
        only: list("BENCH_ONLY"),
        mixed: list("BENCH_MIXED"),
    }
}

/// Progress for the person watching: the run takes a quarter of an hour.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        eprintln!("bench: {}", format!($($arg)*));
    }};
}

fn main() {
    let options = parse_args();
    std::fs::create_dir_all(&options.out).expect("create the output directory");
    let started = Instant::now();

    // In-process: its receipt timestamps and our commit timestamps share one clock. Request
    // bodies are not kept (the drain sends a million members).
    let emulator = listsync_emulator::Emulator::start();
    emulator.set_request_log_limit(0);

    let mut db = crm::connect(&options);
    let environment = crm::environment(&mut db);
    crm::create_connections(&mut db, &emulator);

    let figure = |name: &str, title: &str, measure: &mut dyn FnMut() -> Value| {
        if options.wants(name) {
            say!("{title}");
            measure()
        } else {
            Value::Null
        }
    };
    let mixed = figure("mixed", "1/4 mixed single-row writes", &mut || {
        writes::mixed(&options, &mut db)
    });
    let copy = figure("copy", "2/4 bulk COPY", &mut || {
        writes::copy(&options, &mut db)
    });
    let latency = figure("latency", "3/4 commit → provider latency", &mut || {
        delivery::latency(&options, &mut db, &emulator, true)
    });
    // The same without the recommended index: what a user who skipped it sees.
    let latency_without_index = figure(
        "latency",
        "3/4 commit → provider latency, without the recommended index",
        &mut || delivery::latency(&options, &mut db, &emulator, false),
    );
    let drain = figure("drain", "4/4 backlog drain", &mut || {
        delivery::drain(&options, &mut db, &emulator)
    });
    crm::reset(&mut db);

    let results: Value = json!({
        "environment": environment,
        "settings": {
            "pgbench_seconds": options.seconds, "rounds": options.rounds,
            "copy_rounds": options.copy_rounds, "latency_samples": options.latency_samples,
            "drain_rows": options.drain_rows, "only": options.only,
        },
        "mixed_writes": mixed,
        "copy": copy,
        "latency": latency,
        "latency_without_index": latency_without_index,
        "drain": drain,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let table = report::table(&results);
    let json_path = options.out.join("results.json");
    let md_path = options.out.join("results.md");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .expect("write results.json");
    std::fs::write(&md_path, &table).expect("write results.md");
    println!("\n{table}");
    println!(
        "raw numbers: {}  table: {}  ({:.0} s)",
        json_path.display(),
        md_path.display(),
        started.elapsed().as_secs_f64()
    );
}
