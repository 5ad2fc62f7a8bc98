//! An in-place upgrade from release 0.1.0, the way a DBA does it: the 0.1.0 library and catalog
//! deliver a list; the new library replaces the old one (nothing updated yet: it says so and
//! waits); `ALTER EXTENSION pg_listsync UPDATE`; delivery goes on with nothing sent again and
//! nothing lost; and the updated catalog is the one a fresh install creates (pg_dump).
//!
//! Release 0.1.0 is built from its commit (tag v0.1.0) into `target/release-0.1.0` the first
//! time; it was released for PostgreSQL 15 only, so this test runs on 15.
#![cfg(feature = "pg15")]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RELEASE_0_1_0: &str = "ffede9ba8358768d395d1a4485933228c8dd1027";
const T: Duration = Duration::from_secs(60);

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The 0.1.0 library and install script, built from the release commit with its own lock file.
struct Release {
    library: PathBuf,
    install_script: PathBuf,
}

fn build_release_0_1_0() -> Release {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = checkout.join("target/release-0.1.0");
    let source = work.join("source");
    if !source.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&source).unwrap();
        let archive = work.join("source.tar");
        run(
            Command::new("git")
                .arg("-C")
                .arg(checkout)
                .args(["archive", "--output"])
                .arg(&archive)
                .arg(RELEASE_0_1_0),
            "git archive of release 0.1.0 (the checkout needs its history)",
        );
        run(
            Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&source),
            "unpack release 0.1.0",
        );
    }
    let package = work.join("package");
    run(
        Command::new("cargo")
            .args([
                "pgrx",
                "package",
                "--debug",
                "--no-default-features",
                "--features",
                "pg15",
            ])
            .arg("--pg-config")
            .arg(Cluster::pg_config())
            .arg("--out-dir")
            .arg(&package)
            .current_dir(&source)
            .env("CARGO_TARGET_DIR", work.join("target")),
        "build release 0.1.0",
    );
    let inside = |dir: &Path| package.join(dir.strip_prefix("/").unwrap());
    Release {
        library: inside(Cluster::pkglibdir()).join("pg_listsync.so"),
        install_script: inside(&Cluster::sharedir().join("extension"))
            .join("pg_listsync--0.1.0.sql"),
    }
}

/// Puts a library in place of the installed one the way a package manager does (a new file
/// renamed over the old: running processes keep what they mapped), and puts the current build
/// back when dropped.
struct InstalledLibrary {
    current: PathBuf,
}

impl InstalledLibrary {
    fn replace_with(library: &Path) -> InstalledLibrary {
        let current = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release-0.1.0/current.so");
        std::fs::copy(Self::installed(), &current).expect("keep the current library");
        Self::install(library);
        InstalledLibrary { current }
    }

    fn installed() -> PathBuf {
        Cluster::pkglibdir().join("pg_listsync.so")
    }

    fn install(library: &Path) {
        let incoming = Cluster::pkglibdir().join("pg_listsync.so.incoming");
        std::fs::copy(library, &incoming).expect("copy the library (run as root, as CI does)");
        std::fs::rename(&incoming, Self::installed()).expect("install the library");
    }
}

impl Drop for InstalledLibrary {
    fn drop(&mut self) {
        Self::install(&self.current);
    }
}

/// The schema of a database as pg_dump sees it in binary-upgrade mode (the only mode that dumps
/// an extension's member objects), without what legitimately differs between two databases:
/// object ids and transaction horizons (the `binary_upgrade_*` calls and the `UPDATE pg_class
/// SET relfrozenxid ... WHERE oid = ...` statements), the dump's session key and comments. The configuration tables pg_dump keeps are
/// compared separately: `extconfig` lists them by oid in the order they were registered.
fn dumped_schema(cluster: &Cluster, database: &str) -> Vec<String> {
    let output = Cluster::bin("pg_dump")
        .args([
            "--schema-only",
            "--binary-upgrade",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &cluster.port.to_string(), database])
        .output()
        .expect("pg_dump");
    assert!(
        output.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| {
            !(line.is_empty()
                || line.starts_with("--")
                || line.starts_with("\\restrict")
                || line.starts_with("\\unrestrict")
                || line.contains("binary_upgrade_set_next_")
                || line.starts_with("SET relfrozenxid")
                || line.starts_with("WHERE oid = '")
                || line.contains("binary_upgrade_create_empty_extension"))
        })
        .map(str::to_string)
        .collect()
}

fn kept_tables(db: &mut postgres::Client) -> Vec<String> {
    db.query(
        "SELECT format('%s %s', c::regclass, w) FROM pg_catalog.pg_extension e,
                unnest(e.extconfig, e.extcondition) AS t(c, w)
          WHERE e.extname = 'pg_listsync' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

fn sql_state(error: &postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_string())
        .unwrap_or_default()
}

/// Writes that name one of `addresses`, by email or by Mailchimp's subscriber hash.
fn requests_naming(emulator: &Emulator, addresses: &[&str]) -> Vec<String> {
    let hashes: Vec<String> = addresses
        .iter()
        .map(|a| listsync_emulator::mailchimp::subscriber_hash(a))
        .collect();
    emulator
        .requests("mailchimp")
        .iter()
        .filter(|r| r.method != "GET")
        .filter(|r| {
            addresses.iter().any(|a| r.body.contains(a))
                || hashes.iter().any(|h| r.path.contains(h.as_str()))
        })
        .map(|r| format!("{} {} {}", r.method, r.path, r.body))
        .collect()
}

#[test]
fn updating_from_0_1_0_in_place_keeps_delivering_and_gives_the_fresh_schema() {
    let release = build_release_0_1_0();
    std::fs::copy(
        &release.install_script,
        Cluster::sharedir().join("extension/pg_listsync--0.1.0.sql"),
    )
    .expect("install the 0.1.0 script next to the current ones");
    let old_library = InstalledLibrary::replace_with(&release.library);

    let emulator = Emulator::start();
    // The worker's complaint is a WARNING, which the harness's `log_min_messages = log` hides.
    let cluster = Cluster::start_without_extension("upgrade", &["log_min_messages = 'warning'"]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION pg_listsync VERSION '0.1.0'")
        .unwrap();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    // The binding belongs to a CRM role, as in production.
    db.batch_execute(
        "CREATE ROLE listsync_upgrade_crm;
         GRANT SELECT, TRIGGER ON contacts TO listsync_upgrade_crm;
         INSERT INTO contacts (email, first_name, city) VALUES
             ('ann@example.com', 'Ann', 'Moscow'), ('bob@example.com', 'Bob', 'Moscow');
         SET ROLE listsync_upgrade_crm;
         SELECT listsync.create_filter('moscow', 'contacts', $$ city = 'Moscow' $$);",
    )
    .unwrap();
    let binding: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('moscow', 'mc', fields => '{"FNAME": "first_name"}')"#,
    );
    db.batch_execute("RESET ROLE").unwrap();
    let list = wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator
            .list_members("mailchimp", &list)
            .keys()
            .collect::<Vec<_>>(),
        ["ann@example.com", "bob@example.com"],
        "0.1.0 delivered the list"
    );

    // Changes the 0.1.0 worker cannot deliver (the provider is down) wait in the outbox.
    emulator.faults("mailchimp").set_down(true);
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, city) VALUES ('cat@example.com', 'Cat', 'Moscow');
         UPDATE contacts SET city = 'Paris' WHERE email = 'bob@example.com';",
    )
    .unwrap();
    assert_eq!(status(&mut db, binding)["pending"], 2);
    cluster.stop();

    // The package of the new version is installed: the library changes, the catalog does not.
    drop(old_library);
    cluster.start_again();
    let mut db = cluster.connect();
    let refused = db
        .batch_execute("SELECT listsync.create_filter('later', 'contacts', $$ true $$)")
        .expect_err("the new library refuses to work on the 0.1.0 catalog");
    assert_eq!(sql_state(&refused), "55000", "{refused}");
    let message = refused.as_db_error().unwrap();
    assert!(
        message
            .message()
            .contains("holds the catalog of version 0.1.0")
            && message
                .hint()
                .unwrap_or_default()
                .contains("ALTER EXTENSION pg_listsync UPDATE"),
        "{message:?}"
    );
    let write = db
        .batch_execute("INSERT INTO contacts (email, city) VALUES ('eve@example.com', 'Moscow')")
        .expect_err("a write to a bound table is refused rather than left uncaptured");
    assert_eq!(sql_state(&write), "55000", "{write}");
    wait_for("the worker to say why it waits", T, || {
        cluster
            .log()
            .contains("pg_listsync worker: the pg_listsync library is version")
    });

    emulator.faults("mailchimp").set_down(false);
    emulator.clear_requests("mailchimp");
    db.batch_execute("ALTER EXTENSION pg_listsync UPDATE")
        .unwrap();
    assert_eq!(
        scalar::<String>(
            &mut db,
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_listsync'"
        ),
        env!("CARGO_PKG_VERSION")
    );
    // A write after the update is captured by the new library.
    db.batch_execute("INSERT INTO contacts (email, first_name, city) VALUES ('dan@example.com', 'Dan', 'Moscow')")
        .unwrap();
    db.batch_execute("SELECT listsync.wake()").unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator
            .list_members("mailchimp", &list)
            .keys()
            .collect::<Vec<_>>(),
        ["ann@example.com", "cat@example.com", "dan@example.com"],
        "what waited in the outbox was delivered, and what came after"
    );
    assert_eq!(
        requests_naming(&emulator, &["ann@example.com"]),
        Vec::<String>::new(),
        "a member delivered by 0.1.0 is not sent again"
    );
    assert_eq!(
        scalar::<i64>(
            &mut db,
            &format!(
                "SELECT count(*) FROM listsync.members WHERE binding_id = {binding} AND status = 'subscribed'"
            )
        ),
        3
    );
    // The binding's owner keeps the use of its connection and binds again under the new rules.
    db.batch_execute(
        "SET ROLE listsync_upgrade_crm;
         SELECT listsync.create_filter('paris', 'contacts', $$ city = 'Paris' $$);
         SELECT listsync.bind_filter_to_list('paris', 'mc', list => 'a1');
         RESET ROLE;",
    )
    .unwrap();

    // The updated catalog is a fresh install's, object for object.
    let mut postgres = cluster.connect_to("postgres");
    for database in ["updated", "fresh"] {
        postgres
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .unwrap();
    }
    let mut updated = cluster.connect_to("updated");
    updated
        .batch_execute(
            "CREATE EXTENSION pg_listsync VERSION '0.1.0'; ALTER EXTENSION pg_listsync UPDATE",
        )
        .unwrap();
    let mut fresh = cluster.connect_to("fresh");
    fresh.batch_execute("CREATE EXTENSION pg_listsync").unwrap();
    // A `cargo pgrx test` build installs its in-database tests into schema `tests`, as members
    // of the extension: not part of the product, so not compared.
    fresh
        .batch_execute(
            "DO $$
             DECLARE f regprocedure;
             BEGIN
                 IF to_regnamespace('tests') IS NULL THEN RETURN; END IF;
                 FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'tests'::regnamespace LOOP
                     EXECUTE format('ALTER EXTENSION pg_listsync DROP FUNCTION %s', f);
                     EXECUTE format('DROP FUNCTION %s', f);
                 END LOOP;
                 ALTER EXTENSION pg_listsync DROP SCHEMA tests;
                 DROP SCHEMA tests;
             END $$",
        )
        .unwrap();
    let (was, wanted) = (
        dumped_schema(&cluster, "updated"),
        dumped_schema(&cluster, "fresh"),
    );
    let missing: Vec<&String> = wanted.iter().filter(|l| !was.contains(l)).collect();
    let extra: Vec<&String> = was.iter().filter(|l| !wanted.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the updated schema differs from a fresh install:\nmissing: {missing:#?}\nextra: {extra:#?}"
    );
    assert_eq!(kept_tables(&mut updated), kept_tables(&mut fresh));
}
