//! Integration-test harness: a scratch PostgreSQL cluster per test with pg_listsync preloaded
//! and its worker running, the provider emulator in-process, and small helpers.
//!
//! The extension must be installed (`cargo pgrx test` installs it before these tests run;
//! `make install` otherwise). As root, PostgreSQL runs as the `postgres` user through sudo.
//! The PostgreSQL is the one `PG_CONFIG` names (scripts/test.sh sets it for `make test PG=N`),
//! else Debian's 15; it must be the major the crate was built for.
#![allow(dead_code)] // each test binary uses a different part of the harness

use postgres::{Client, NoTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // not every test binary injects faults
pub use listsync_emulator::{Emulator, Fault};

/// The major this build of the extension targets (`cargo pgrx test pgNN` selects the feature).
const MAJOR: &str = if cfg!(feature = "pg16") {
    "16"
} else if cfg!(feature = "pg17") {
    "17"
} else if cfg!(feature = "pg18") {
    "18"
} else {
    "15"
};

/// Directories of the PostgreSQL installation under test, from its pg_config.
struct Installation {
    pg_config: PathBuf,
    bindir: PathBuf,
    sharedir: PathBuf,
    pkglibdir: PathBuf,
}

fn installation() -> &'static Installation {
    static INSTALLATION: std::sync::OnceLock<Installation> = std::sync::OnceLock::new();
    INSTALLATION.get_or_init(|| {
        let pg_config = std::env::var("PG_CONFIG")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".to_string());
        let ask = |option: &str| {
            let output = check(
                Command::new(&pg_config).arg(option).output(),
                &format!("{pg_config} {option}"),
            );
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        };
        let version = ask("--version");
        assert!(
            version.starts_with(&format!("PostgreSQL {MAJOR}.")),
            "{pg_config} is {version}, but these tests were built for PostgreSQL {MAJOR}: set PG_CONFIG"
        );
        Installation {
            bindir: ask("--bindir").into(),
            sharedir: ask("--sharedir").into(),
            pkglibdir: ask("--pkglibdir").into(),
            pg_config: pg_config.into(),
        }
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL program as the user that owns the cluster.
fn pg_command(program: &str) -> Command {
    let path = installation().bindir.join(program);
    if is_root() {
        let mut command = Command::new("sudo");
        command.args(["-u", "postgres", "--"]).arg(&path);
        command
    } else {
        Command::new(path)
    }
}

fn check(output: std::io::Result<Output>, what: &str) -> Output {
    let output = output.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub struct Cluster {
    pub port: u16,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
}

impl Cluster {
    /// A new cluster with `listsync.database = 'crm'`, the given extra settings, database
    /// `crm` created and the extension installed in it.
    pub fn start(name: &str, settings: &[&str]) -> Cluster {
        let cluster = Cluster::start_without_extension(name, settings);
        cluster
            .connect()
            .batch_execute("CREATE EXTENSION pg_listsync")
            .expect("create extension");
        cluster
    }

    /// As [`Cluster::start`], leaving `CREATE EXTENSION` to the test.
    pub fn start_without_extension(name: &str, settings: &[&str]) -> Cluster {
        assert!(
            installation()
                .sharedir
                .join("extension/pg_listsync.control")
                .exists(),
            "pg_listsync is not installed: run `make install` (or `cargo pgrx test`, which installs it first)"
        );
        // Under the system temp directory, not the checkout: the postgres user must be able to
        // reach it even when the checkout lives in a private home directory.
        let base = std::env::temp_dir().join("listsync-it");
        let root = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create cluster directory");
        let _ =
            std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o1777));
        if is_root() {
            check(
                Command::new("chown")
                    .args(["-R", "postgres", root.to_str().unwrap()])
                    .output(),
                "chown",
            );
        }
        let data = root.join("data");
        let log = root.join("log");
        check(
            pg_command("initdb")
                .args([
                    "-D",
                    data.to_str().unwrap(),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-locale",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ])
                .output(),
            "initdb",
        );
        let port = free_port();
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", root.display()),
            "shared_preload_libraries = 'pg_listsync'".into(),
            "listsync.database = 'crm'".into(),
            "listsync.allowed_insecure_hosts = '127.0.0.1'".into(),
            "listsync.retry_base_delay = '50ms'".into(),
            "listsync.retry_max_delay = '2s'".into(),
            "listsync.http_timeout = '2s'".into(),
            "max_prepared_transactions = 10".into(),
            "fsync = off".into(),
            "log_min_messages = 'log'".into(),
        ];
        conf.extend(settings.iter().map(|s| s.to_string()));
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&conf.join("\n"));
        text.push('\n');
        write_as_owner(&auto, &text);
        let cluster = Cluster {
            port,
            root,
            data,
            log,
        };
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        let mut postgres = cluster.connect_to("postgres");
        postgres
            .batch_execute("CREATE DATABASE crm")
            .expect("create database crm");
        cluster
    }

    /// Stops the cluster cleanly; `start_again` brings it back.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut command = pg_command("pg_ctl");
        command
            .args([
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log.to_str().unwrap(),
            ])
            .args(args);
        check(command.output(), &format!("pg_ctl {args:?}"));
    }

    pub fn connect_to(&self, database: &str) -> Client {
        self.connect_with(database, |_| {})
    }

    /// A connection whose WARNINGs and NOTICEs land in the returned list, as
    /// "SEVERITY: message (HINT: hint)".
    pub fn connect_hearing_notices(&self, database: &str) -> (Client, Notices) {
        let notices = Notices::default();
        let heard = notices.clone();
        let client = self.connect_with(database, move |notice| {
            let hint = notice
                .hint()
                .map(|h| format!(" (HINT: {h})"))
                .unwrap_or_default();
            heard.0.lock().unwrap().push(format!(
                "{}: {}{hint}",
                notice.severity(),
                notice.message()
            ));
        });
        (client, notices)
    }

    fn connect_with(
        &self,
        database: &str,
        on_notice: impl Fn(postgres::error::DbError) + Send + Sync + Clone + 'static,
    ) -> Client {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname={database} connect_timeout=10",
            self.port
        );
        let mut last = None;
        for _ in 0..100 {
            let mut config: postgres::Config = url.parse().expect("connection string");
            config.notice_callback(on_notice.clone());
            match config.connect(NoTls) {
                Ok(client) => return client,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("connect to {database}: {last:?}");
    }

    /// A connection to the `crm` database.
    pub fn connect(&self) -> Client {
        self.connect_to("crm")
    }

    /// Changes settings and reloads the configuration (SIGHUP).
    pub fn reconfigure(&self, settings: &[(&str, &str)]) {
        let mut client = self.connect();
        for (name, value) in settings {
            client
                .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
                .unwrap();
        }
        client.batch_execute("SELECT pg_reload_conf()").unwrap();
        // The worker applies it at its next wake-up; nudge it.
        std::thread::sleep(Duration::from_millis(200));
        client.batch_execute("SELECT listsync.wake()").unwrap();
    }

    /// Stops the postmaster the hard way (as a power cut would) and starts it again.
    pub fn crash_and_restart(&self) {
        self.pg_ctl(&["stop", "-m", "immediate"]);
        self.start_again();
    }

    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    }

    /// The pid of the worker serving `crm`, once it runs.
    pub fn worker_pid(&self) -> Option<i32> {
        let mut client = self.connect_to("postgres");
        client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_listsync worker'",
                &[],
            )
            .ok()
            .flatten()
            .map(|row| row.get(0))
    }

    pub fn wait_for_worker(&self) -> i32 {
        let mut pid = None;
        wait_for(
            "the pg_listsync worker to run",
            Duration::from_secs(60),
            || {
                pid = self.worker_pid();
                pid.is_some()
            },
        );
        pid.unwrap()
    }

    /// SIGKILLs the database worker (the postmaster then restarts every backend).
    pub fn kill_worker(&self) -> bool {
        match self.worker_pid() {
            // SAFETY: signalling a process of our own test cluster.
            Some(pid) => unsafe { libc::kill(pid, libc::SIGKILL) == 0 },
            None => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn bin(program: &str) -> Command {
        pg_command(program)
    }

    /// The installation's share directory (extension scripts live in its `extension/`).
    pub fn sharedir() -> &'static Path {
        &installation().sharedir
    }

    /// Where the installation loads extension libraries from.
    pub fn pkglibdir() -> &'static Path {
        &installation().pkglibdir
    }

    pub fn pg_config() -> &'static Path {
        &installation().pg_config
    }
}

/// What a connection heard (see [`Cluster::connect_hearing_notices`]).
#[derive(Clone, Default)]
pub struct Notices(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Notices {
    /// Everything heard since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut command = pg_command("pg_ctl");
        command.args(["-D", self.data.to_str().unwrap(), "stop", "-m", "immediate"]);
        let _ = command.output();
        if std::thread::panicking() {
            eprintln!(
                "--- server log ({}) ---\n{}",
                self.log.display(),
                tail(&self.log(), 80)
            );
        } else if std::env::var_os("KEEP_CLUSTERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn write_as_owner(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config");
    if is_root() {
        check(
            Command::new("chown")
                .args(["postgres", path.to_str().unwrap()])
                .output(),
            "chown config",
        );
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The CRM schema most tests use.
pub const CONTACTS: &str = "
    CREATE TABLE contacts (
        id serial PRIMARY KEY,
        email text,
        first_name text,
        last_name text,
        city text,
        ltv numeric NOT NULL DEFAULT 0,
        last_seen_at timestamptz,
        is_deleted boolean NOT NULL DEFAULT false,
        birthday date
    );
    CREATE INDEX contacts_address ON contacts (listsync.normalize_email(email));";

/// Creates a Mailchimp connection `mc` to the emulator, audience `a1`.
pub fn mailchimp_connection(client: &mut Client, emulator: &Emulator) {
    client
        .execute(
            "SELECT listsync.create_connection('mc', 'mailchimp', jsonb_build_object('audience_id', 'a1', 'base_url', $1::text),
                                               '{\"api_key\": \"0123456789abcdef-us21\"}')",
            &[&emulator.base_url("mailchimp")],
        )
        .expect("create connection");
}

pub fn scalar<T: for<'a> postgres::types::FromSql<'a>>(client: &mut Client, sql: &str) -> T {
    client
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The binding's status row as JSON, for assertions and failure messages.
pub fn status(client: &mut Client, binding: i64) -> serde_json::Value {
    client
        .query_one(
            "SELECT to_jsonb(s) FROM listsync.status s WHERE binding = $1",
            &[&binding],
        )
        .map(|row| row.get::<_, serde_json::Value>(0))
        .unwrap_or(serde_json::Value::Null)
}

pub fn list_id(client: &mut Client, binding: i64) -> Option<String> {
    client
        .query_one(
            "SELECT list_id FROM listsync.bindings WHERE id = $1",
            &[&binding],
        )
        .ok()
        .and_then(|r| r.get(0))
}

/// Waits until the binding has nothing pending and its list id is known; returns the list id.
pub fn wait_synced(client: &mut Client, binding: i64, timeout: Duration) -> String {
    wait_for(&format!("binding {binding} to drain"), timeout, || {
        let s = status(client, binding);
        s["pending"] == 0 && s["list_id"].is_string()
    });
    list_id(client, binding).unwrap()
}

/// The convergence invariant (docs/design.md semantics 1) for a binding over `contacts` whose
/// filter is `predicate` and which maps `field` to `first_name`: the provider's list holds
/// exactly the valid, unsuppressed addresses of matching rows (minus those the provider holds
/// as unsubscribed), each with the first name of the row with the greatest id. Returns a
/// description of every difference (empty when converged).
pub fn convergence_differences(
    db: &mut Client,
    emulator: &Emulator,
    provider: &str,
    binding: i64,
    predicate: &str,
    field: &str,
) -> Vec<String> {
    let list = list_id(db, binding).unwrap_or_default();
    let expected: std::collections::BTreeMap<String, Option<String>> = db
        .query(
            &format!(
                "SELECT DISTINCT ON (a) a, first_name FROM (
                     SELECT listsync.normalize_email(email) AS a, first_name, id FROM contacts WHERE {predicate}) r
                  WHERE a IS NOT NULL
                    AND a NOT IN (SELECT address FROM listsync.suppressions)
                    AND a NOT IN (SELECT address FROM listsync.members WHERE binding_id = $1
                                   AND status NOT IN ('subscribed', 'pending'))
                  ORDER BY a, id DESC"
            ),
            &[&binding],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let actual = emulator.list_members(provider, &list);
    let text = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let mut differences = Vec::new();
    for (address, first_name) in &expected {
        match actual.get(address) {
            None => differences.push(format!("{provider}: {address} missing")),
            Some(fields) if text(fields.get(field)) != first_name.clone().unwrap_or_default() => {
                differences.push(format!(
                    "{provider}: {address} has {field} = {:?}, expected {first_name:?}",
                    fields.get(field)
                ))
            }
            Some(_) => {}
        }
    }
    for address in actual.keys().filter(|a| !expected.contains_key(*a)) {
        differences.push(format!("{provider}: {address} should not be in the list"));
    }
    differences
}

/// Waits until every binding has drained, then asserts the invariant for each.
pub fn assert_converged(
    db: &mut Client,
    emulator: &Emulator,
    cases: &[(&str, i64, &str, &str)],
    timeout: Duration,
) {
    for (_, binding, _, _) in cases {
        wait_synced(db, *binding, timeout);
    }
    let differences: Vec<String> = cases
        .iter()
        .flat_map(|(provider, binding, predicate, field)| {
            convergence_differences(db, emulator, provider, *binding, predicate, field)
        })
        .collect();
    assert!(
        differences.is_empty(),
        "not converged ({} differences):\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// A small deterministic generator (xorshift64*) so a failing workload can be replayed.
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed from `LISTSYNC_SEED`, or a fresh one; printed so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("LISTSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("randomized workload seed: {seed} (replay with LISTSYNC_SEED={seed})");
    seed
}

/// A client that reconnects when the server restarted under it (crash tests).
pub fn execute_retrying(cluster: &Cluster, db: &mut Client, sql: &str) {
    for _ in 0..50 {
        match db.batch_execute(sql) {
            Ok(()) => return,
            Err(e)
                if db.is_closed()
                    || e.as_db_error().is_none()
                    || e.code().is_some_and(|c| c.code().starts_with("57P")) =>
            {
                std::thread::sleep(Duration::from_millis(200));
                *db = cluster.connect();
            }
            Err(e) => match e.as_db_error() {
                Some(db) => panic!(
                    "{sql}: {} {}: {} ({:?})",
                    db.severity(),
                    db.code().code(),
                    db.message(),
                    db.detail()
                ),
                None => panic!("{sql}: {e}"),
            },
        }
    }
    panic!("{sql}: the server did not come back");
}
