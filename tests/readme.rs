//! The README cannot go stale: its SQL examples run as written, in order, in a fresh database
//! served by a worker (the emulator's address substituted for the one the README names), and
//! every function signature of its SQL reference exists as written.

mod common;

use common::*;
use std::time::Duration;

const README: &str = include_str!("../README.md");

/// The address the README's examples give the emulator (`make demo` leaves one there).
const README_EMULATOR: &str = "http://127.0.0.1:18080";

/// The bodies of the README's ```sql blocks, in order.
fn sql_blocks() -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in README.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sql") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```sql block in README.md");
    blocks
}

/// One statement at a time: `CREATE INDEX CONCURRENTLY` cannot run inside the implicit
/// transaction of a multi-statement simple query. Splits at semicolons outside quotes,
/// dollar quotes and `--` comments.
fn statements(block: &str) -> Vec<String> {
    let (mut statements, mut current) = (Vec::new(), String::new());
    let (mut quoted, mut dollar_quoted, mut comment) = (false, false, false);
    let mut chars = block.chars().peekable();
    while let Some(c) = chars.next() {
        if comment {
            comment = c != '\n';
        } else if c == '-' && chars.peek() == Some(&'-') && !quoted && !dollar_quoted {
            comment = true;
            continue;
        } else if c == '\'' && !dollar_quoted {
            quoted = !quoted;
        } else if c == '$' && chars.peek() == Some(&'$') && !quoted {
            dollar_quoted = !dollar_quoted;
            current.push(chars.next().unwrap_or('$'));
        } else if c == ';' && !quoted && !dollar_quoted {
            current.push(c);
            statements.push(std::mem::take(&mut current));
            continue;
        }
        if !comment {
            current.push(c);
        }
    }
    assert!(
        current.trim().is_empty(),
        "a README statement without its semicolon: {current}"
    );
    statements
}

#[test]
fn the_readme_sql_examples_run_as_written() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("readme", &["listsync.database = 'crm, readme'"]);
    cluster
        .connect_to("postgres")
        .batch_execute("CREATE DATABASE readme")
        .unwrap();
    let mut db = cluster.connect_to("readme");
    let blocks = sql_blocks();
    assert!(blocks.len() >= 3, "README.md lost its SQL examples");
    for block in &blocks {
        for statement in statements(block) {
            let statement = statement.replace(README_EMULATOR, &emulator.url());
            db.batch_execute(&statement)
                .unwrap_or_else(|e| panic!("README statement failed: {statement}\n{e:?}"));
        }
    }
    // The quickstart's promise: Ann lands in both lists, normalized, birthday as MM/DD.
    let birthday: String = scalar(&mut db, "SELECT to_char(current_date + 3, 'MM/DD')");
    wait_for(
        "Ann in both Mailchimp tags",
        Duration::from_secs(60),
        || {
            ["vip_moscow (postgres)", "birthdays_this_week (postgres)"]
                .iter()
                .all(|tag| {
                    emulator
                        .mailchimp()
                        .members_with_tag("a1b2c3", tag)
                        .contains_key("ann.lee@example.com")
                })
        },
    );
    let ann = &emulator
        .mailchimp()
        .members_with_tag("a1b2c3", "birthdays_this_week (postgres)")["ann.lee@example.com"];
    assert_eq!(ann.merge_fields["FNAME"], "Ann");
    assert_eq!(ann.merge_fields["BIRTHDAY"], birthday.as_str());
}

/// A parameter as the README spells it: `name type [DEFAULT …]`.
struct Parameter {
    name: String,
    kind: String,
    has_default: bool,
}

/// A function row of the README's SQL reference.
struct Documented {
    name: String,
    parameters: Vec<Parameter>,
    result: String,
}

fn parameter(text: &str) -> Parameter {
    let (declared, default) = match text.find(" DEFAULT ") {
        Some(at) => (&text[..at], true),
        None => (text, false),
    };
    let (name, kind) = declared
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("README parameter without a type: {text}"));
    Parameter {
        name: name.to_string(),
        kind: kind.trim().to_string(),
        has_default: default,
    }
}

/// Splits a parameter list at the commas outside quotes and brackets.
fn parameters(list: &str) -> Vec<Parameter> {
    let (mut parts, mut current, mut depth, mut quoted) = (Vec::new(), String::new(), 0, false);
    for c in list.chars() {
        match c {
            '\'' => quoted = !quoted,
            '(' | '[' if !quoted => depth += 1,
            ')' | ']' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        parts.push(current);
    }
    parts.iter().map(|p| parameter(p)).collect()
}

/// The SQL reference's function rows.
fn documented_functions() -> Vec<Documented> {
    let reference = README
        .split("## SQL reference")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a SQL reference section");
    let mut functions = Vec::new();
    for row in reference.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let result = cells.get(1).and_then(|c| c.split('`').nth(1)).unwrap_or("");
        for signature in cells[0].trim_start_matches("| ").split(" / ") {
            let signature = signature.trim_matches('`');
            let Some((name, rest)) = signature.split_once('(') else {
                continue; // a view column, not a function
            };
            let list = rest.strip_suffix(')').unwrap_or(rest);
            functions.push(Documented {
                name: name.to_string(),
                parameters: parameters(list),
                result: result.to_string(),
            });
        }
    }
    functions
}

#[test]
fn every_documented_function_exists_as_written() {
    let cluster = Cluster::start("readme-reference", &[]);
    let mut db = cluster.connect();
    let functions = documented_functions();
    assert!(
        functions.len() >= 25,
        "README's SQL reference lost its functions"
    );
    for Documented {
        name,
        parameters,
        result,
    } in functions
    {
        let types: Vec<&str> = parameters.iter().map(|p| p.kind.as_str()).collect();
        let signature = format!("listsync.{name}({})", types.join(", "));
        let row = db
            .query_one(
                "SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
                        p.pronargdefaults::int,
                        (SELECT string_agg(quote_ident(n) || ' ' || format_type(t::regtype, NULL), ', ' ORDER BY i)
                           FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(n, t, i))
                   FROM pg_proc p WHERE p.oid = $1::text::regprocedure",
                &[
                    &signature,
                    &parameters
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>(),
                    &types,
                ],
            )
            .unwrap_or_else(|e| panic!("README documents {signature}, which does not exist: {e}"));
        let (actual, actual_result): (String, String) = (row.get(0), row.get(1));
        let defaults: i32 = row.get(2);
        let documented: Option<String> = row.get(3);
        assert_eq!(
            actual,
            documented.unwrap_or_default(),
            "README's parameter names of {signature}"
        );
        let documented_defaults = parameters.iter().filter(|p| p.has_default).count();
        assert_eq!(
            defaults as usize, documented_defaults,
            "README's defaults of {signature}"
        );
        let documented_result: String = if result.starts_with("TABLE(") {
            result.clone()
        } else {
            scalar(
                &mut db,
                &format!("SELECT format_type('{result}'::regtype, NULL)"),
            )
        };
        assert_eq!(
            actual_result, documented_result,
            "README's result of {signature}"
        );
    }
}
