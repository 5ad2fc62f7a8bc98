//! The CRM side of the benchmark: the contacts table and its data, the filters, and the two
//! ways of capturing changes being compared (pg_listsync bindings, the PL/pgSQL peer).

use crate::Options;
use listsync_emulator::Emulator;
use postgres::{Client, NoTls};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Cities of the generated contacts; filter `i` selects `CITIES[i % 20]`.
pub const CITIES: [&str; 20] = [
    "Moscow",
    "Saint Petersburg",
    "Novosibirsk",
    "Kazan",
    "Yekaterinburg",
    "Berlin",
    "Hamburg",
    "Paris",
    "Lyon",
    "London",
    "Manchester",
    "Madrid",
    "Barcelona",
    "Rome",
    "Milan",
    "Amsterdam",
    "Vienna",
    "Prague",
    "Warsaw",
    "Lisbon",
];

const FIRST_NAMES: [&str; 16] = [
    "Anna", "Boris", "Clara", "Dmitry", "Elena", "Felix", "Galina", "Hugo", "Irina", "Jan",
    "Katya", "Leon", "Maria", "Nikolai", "Olga", "Pavel",
];

const LAST_NAMES: [&str; 16] = [
    "Ivanova", "Smirnov", "Muller", "Schmidt", "Dubois", "Martin", "Smith", "Jones", "Garcia",
    "Rossi", "Bianchi", "de Vries", "Novak", "Kowalski", "Silva", "Petrov",
];

/// The webhook connection the write benchmarks bind to (paused, so never called) and the
/// latency benchmark delivers to.
pub const WEBHOOK: &str = "wh";
/// The Mailchimp connection the drain delivers to (batches of 500 members).
pub const MAILCHIMP: &str = "mc";
pub const AUDIENCE: &str = "bench";

/// The filter of binding `i` (0-based) of a configuration: `city = '<city>' AND ltv > <n>`,
/// twenty cities, thresholds stepping up by 1000 every twenty filters.
pub fn predicate(i: usize) -> String {
    predicate_of(i, "")
}

/// [`predicate`] over a record's columns (`OLD.`, `NEW.`).
fn predicate_of(i: usize, record: &str) -> String {
    format!(
        "{record}city = '{}' AND {record}ltv > {}",
        CITIES[i % CITIES.len()],
        1000 * (1 + i / CITIES.len())
    )
}

pub fn connect(options: &Options) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(&options.conninfo, NoTls) {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                crate::say!("waiting for the cluster: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("connect {}: {e}", options.conninfo),
        }
    }
}

/// Runs SQL (several statements run as one implicit transaction: keep VACUUM apart).
pub fn run(db: &mut Client, sql: &str) {
    db.batch_execute(sql).unwrap_or_else(|e| {
        let message = e.as_db_error().map(|d| d.to_string());
        panic!(
            "{}\n(while running)\n{sql}",
            message.unwrap_or(e.to_string())
        )
    });
}

pub fn scalar<T: for<'a> postgres::types::FromSql<'a>>(db: &mut Client, sql: &str) -> T {
    db.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// What the figures were measured on, for the JSON.
pub fn environment(db: &mut Client) -> Value {
    let setting = |db: &mut Client, name: &str| -> String {
        scalar(db, &format!("SELECT current_setting('{name}')"))
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "postgres": scalar::<String>(db, "SELECT version()"),
        "pg_listsync": scalar::<String>(db, "SELECT extversion FROM pg_extension WHERE extname = 'pg_listsync'"),
        "cpus": cpus,
        "cpu_model": cpu_model,
        "shared_buffers": setting(db, "shared_buffers"),
        "synchronous_commit": setting(db, "synchronous_commit"),
        "fsync": setting(db, "fsync"),
        "max_wal_size": setting(db, "max_wal_size"),
    })
}

pub fn create_connections(db: &mut Client, emulator: &Emulator) {
    reset(db);
    run(
        db,
        "SELECT listsync.drop_connection(name) FROM listsync.connections",
    );
    db.execute(
        "SELECT listsync.create_connection($1, 'webhook', jsonb_build_object('url', $2::text),
                                           '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')",
        &[&WEBHOOK, &format!("{}/bench", emulator.base_url("webhook"))],
    )
    .expect("create the webhook connection");
    db.execute(
        "SELECT listsync.create_connection($1, 'mailchimp',
                    jsonb_build_object('audience_id', $2::text, 'base_url', $3::text),
                    '{\"api_key\": \"0123456789abcdef-us21\"}')",
        &[&MAILCHIMP, &AUDIENCE, &emulator.base_url("mailchimp")],
    )
    .expect("create the mailchimp connection");
    emulator.mailchimp().create_audience(AUDIENCE);
}

/// Back to an empty CRM: no bindings, filters, contacts, peer trigger or outbox rows (the
/// connections stay). Every configuration starts from here.
pub fn reset(db: &mut Client) {
    run(
        db,
        "SELECT listsync.unbind(id) FROM listsync.bindings;
         SELECT listsync.drop_filter(name) FROM listsync.filters;
         DROP TABLE IF EXISTS contacts, peer_outbox CASCADE;
         DROP FUNCTION IF EXISTS peer_capture();
         TRUNCATE listsync.outbox, listsync.members, listsync.delivery_log, listsync.dead_letter_items;",
    );
}

/// The contacts table: only its primary key, like the bare table it is compared with.
pub fn create_contacts(db: &mut Client) {
    run(
        db,
        "CREATE TABLE contacts (
             id           serial PRIMARY KEY,
             email        text,
             first_name   text,
             last_name    text,
             city         text,
             ltv          numeric NOT NULL DEFAULT 0,
             last_seen_at timestamptz,
             is_deleted   boolean NOT NULL DEFAULT false
         );",
    );
}

fn sql_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("'{}'", s.replace('\'', "''")))
        .collect();
    format!("(ARRAY[{}])", quoted.join(", "))
}

/// `ARRAY[...cities]`, for pgbench scripts and generated rows.
pub fn cities_array() -> String {
    sql_array(&CITIES)
}

/// A SELECT of `count` realistic contacts numbered from `first` (the columns of [`COLUMNS`]):
/// unique addresses (one in ten with capitals, as people type them), twenty cities, lifetime
/// values from 0 to 10,000, a last visit within the year, 2% deleted. With `city` set, every
/// row is in that city with ltv above 1000 (rows that match filter 0).
pub fn contacts_select(first: i64, count: i64, city: Option<&str>) -> String {
    let (city_expr, ltv_expr) = match city {
        Some(c) => (
            format!("'{}'", c.replace('\'', "''")),
            "round((1000.01 + random() * 9000)::numeric, 2)".to_string(),
        ),
        None => (
            format!("{}[1 + floor(random() * 20)::int]", cities_array()),
            "round((random() * 10000)::numeric, 2)".to_string(),
        ),
    };
    format!(
        "SELECT CASE WHEN g % 10 = 0 THEN f || '.' || l || '.' || g ELSE lower(f || '.' || l || '.' || g) END
                || '@' || (ARRAY['example.com', 'mail.example.org', 'corp.example.net', 'example.ru', 'example.de'])[1 + g % 5],
                f, l, {city_expr}, {ltv_expr},
                now() - random() * interval '365 days', random() < 0.02
           FROM generate_series({first}::bigint, {last}::bigint) g,
                LATERAL (SELECT {first_names}[1 + (g * 7) % 16] AS f, replace({last_names}[1 + (g * 11) % 16], ' ', '') AS l) n",
        last = first + count - 1,
        first_names = sql_array(&FIRST_NAMES),
        last_names = sql_array(&LAST_NAMES),
    )
}

pub const COLUMNS: &str = "email, first_name, last_name, city, ltv, last_seen_at, is_deleted";

/// A fresh contacts table with `rows` generated contacts, vacuumed and analyzed.
pub fn load_contacts(db: &mut Client, rows: i64) {
    create_contacts(db);
    run(
        db,
        &format!(
            "SELECT setseed(0.42);
             INSERT INTO contacts ({COLUMNS}) {};",
            contacts_select(1, rows, None)
        ),
    );
    run(db, "VACUUM (ANALYZE) contacts");
}

/// Creates filters `f0..f{n-1}` and binds each to `connection` (mapping first and last name,
/// as a CRM would), without backfill. Returns the binding ids. Paused bindings still capture
/// (the outbox fills) but the worker does not deliver: the write benchmarks measure the
/// writing backends alone, without delivery competing for the two cores.
pub fn bind_filters(db: &mut Client, n: usize, connection: &str, paused: bool) -> Vec<i64> {
    let mut tx = db.transaction().unwrap();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        tx.execute(
            "SELECT listsync.create_filter($1, 'contacts', $2)",
            &[&format!("f{i}"), &predicate(i)],
        )
        .expect("create_filter");
        let id: i64 = tx
            .query_one(
                "SELECT listsync.bind_filter_to_list($1, $2,
                        fields => '{\"FNAME\": \"first_name\", \"LNAME\": \"last_name\"}', backfill => false)",
                &[&format!("f{i}"), &connection],
            )
            .expect("bind_filter_to_list")
            .get(0);
        if paused {
            tx.execute("SELECT listsync.pause_binding($1)", &[&id])
                .expect("pause_binding");
        }
        ids.push(id);
    }
    tx.commit().unwrap();
    ids
}

/// The peer a DBA would write: one AFTER ROW trigger with the filters inlined, marking
/// (filter, normalized address) in an outbox table for every row that matched before or
/// after the change.
pub fn create_peer(db: &mut Client, n: usize) {
    let mut body = String::new();
    for i in 0..n {
        let (old, new) = (predicate_of(i, "OLD."), predicate_of(i, "NEW."));
        body.push_str(&format!(
            "    IF {old} THEN
        INSERT INTO peer_outbox (binding_id, address) VALUES ({i}, lower(btrim(OLD.email))) ON CONFLICT DO NOTHING;
    END IF;
    IF {new} THEN
        INSERT INTO peer_outbox (binding_id, address) VALUES ({i}, lower(btrim(NEW.email))) ON CONFLICT DO NOTHING;
    END IF;
"
        ));
    }
    run(
        db,
        &format!(
            "CREATE TABLE peer_outbox (
                 binding_id integer NOT NULL,
                 address    text NOT NULL,
                 dirtied_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (binding_id, address)
             );
             CREATE FUNCTION peer_capture() RETURNS trigger LANGUAGE plpgsql AS $fn$
             BEGIN
             -- OLD is NULL on INSERT and NEW on DELETE: their conditions are then NULL, not true.
             {body}    RETURN NULL;
             END
             $fn$;
             CREATE TRIGGER peer_capture AFTER INSERT OR UPDATE OR DELETE ON contacts
                 FOR EACH ROW EXECUTE FUNCTION peer_capture();"
        ),
    );
}

/// How a configuration captures changes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Capture {
    Bare,
    Listsync(usize),
    Peer(usize),
}

impl Capture {
    pub fn key(self) -> String {
        match self {
            Capture::Bare => "bare".into(),
            Capture::Listsync(n) => format!("listsync_{n}"),
            Capture::Peer(n) => format!("plpgsql_{n}"),
        }
    }

    pub fn install(self, db: &mut Client) {
        match self {
            Capture::Bare => {}
            Capture::Listsync(n) => {
                bind_filters(db, n, WEBHOOK, true);
            }
            Capture::Peer(n) => create_peer(db, n),
        }
    }

    /// Dirty pairs recorded so far (for the JSON: both captured work).
    pub fn captured(self, db: &mut Client) -> i64 {
        match self {
            Capture::Bare => 0,
            Capture::Listsync(_) => scalar(db, "SELECT count(*) FROM listsync.outbox"),
            Capture::Peer(_) => scalar(db, "SELECT count(*) FROM peer_outbox"),
        }
    }
}

/// Polls `condition` every `every` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// Waits until the bindings have delivered everything and know their list.
pub fn wait_synced(db: &mut Client, bindings: &[i64], timeout: Duration) {
    wait_for(
        "the bindings to be in sync",
        timeout,
        Duration::from_millis(50),
        || {
            let ready: i64 = db
                .query_one(
                    "SELECT count(*) FROM listsync.status
                      WHERE binding = ANY($1) AND pending = 0 AND list_id IS NOT NULL AND state = 'active'",
                    &[&bindings],
                )
                .unwrap()
                .get(0);
            ready == bindings.len() as i64
        },
    );
}
