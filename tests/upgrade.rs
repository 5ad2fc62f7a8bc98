//! `ALTER EXTENSION pg_listsync UPDATE` from 0.1.0: the upgraded schema is the one a fresh
//! install creates, object for object, and what was recorded under 0.1.0 survives it.
//!
//! `fixtures/pg_listsync--0.1.0.sql` is the install script of release 0.1.0 (tag v0.1.0, as
//! `cargo pgrx schema` generated it). Every C function it names still exists in the current
//! library, so it installs as is.

mod common;

use common::*;

/// Every object of the extension, described in one line each: columns, constraints, indexes,
/// view and function definitions, policies, row-level security, privileges, and which tables
/// pg_dump keeps. Two installs with the same lines have the same schema.
const DESCRIBE: &str = r#"
WITH members AS (
    SELECT d.classid, d.objid FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND e.extname = 'pg_listsync' AND d.deptype = 'e'
       -- `cargo pgrx test` installs a build whose test functions (schema tests) join the extension
       AND pg_catalog.pg_describe_object(d.classid, d.objid, 0) !~ '^(schema tests$|function tests\.)')
SELECT line FROM (
    SELECT pg_catalog.pg_describe_object(m.classid, m.objid, 0) AS line FROM members m
    UNION ALL
    SELECT format('%s.%s %s %s default %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attnotnull THEN 'not null' ELSE 'null' END,
                  pg_catalog.pg_get_expr(ad.adbin, ad.adrelid))
      FROM members m JOIN pg_catalog.pg_class c ON m.classid = 'pg_catalog.pg_class'::regclass AND c.oid = m.objid
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
    UNION ALL
    SELECT format('%s %s rls=%s acl=%s', c.relname, c.relkind, c.relrowsecurity, c.relacl)
      FROM members m JOIN pg_catalog.pg_class c ON m.classid = 'pg_catalog.pg_class'::regclass AND c.oid = m.objid
    UNION ALL
    SELECT format('%s constraint %s', co.conrelid::regclass, pg_catalog.pg_get_constraintdef(co.oid))
      FROM pg_catalog.pg_constraint co JOIN members m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = co.conrelid
    UNION ALL
    SELECT pg_catalog.pg_get_indexdef(i.indexrelid)
      FROM pg_catalog.pg_index i JOIN members m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = i.indrelid
    UNION ALL
    SELECT format('view %s: %s', c.relname, pg_catalog.pg_get_viewdef(c.oid))
      FROM members m JOIN pg_catalog.pg_class c ON m.classid = 'pg_catalog.pg_class'::regclass AND c.oid = m.objid
     WHERE c.relkind = 'v'
    UNION ALL
    SELECT format('function %s', pg_catalog.pg_get_functiondef(p.oid))
      FROM members m JOIN pg_catalog.pg_proc p ON m.classid = 'pg_catalog.pg_proc'::regclass AND p.oid = m.objid
    UNION ALL
    SELECT format('policy %s on %s: %s', po.polname, po.polrelid::regclass, pg_catalog.pg_get_expr(po.polqual, po.polrelid))
      FROM pg_catalog.pg_policy po JOIN members m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = po.polrelid
    UNION ALL
    SELECT format('dumped %s', x::regclass) FROM pg_catalog.pg_extension e, unnest(e.extconfig) x
     WHERE e.extname = 'pg_listsync'
) described
ORDER BY line
"#;

fn describe(db: &mut postgres::Client) -> Vec<String> {
    db.query(DESCRIBE, &[])
        .expect("describe the extension")
        .iter()
        .map(|row| row.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}

fn install_release_script() {
    let sharedir = Cluster::bin("pg_config")
        .arg("--sharedir")
        .output()
        .expect("pg_config");
    let sharedir = String::from_utf8_lossy(&sharedir.stdout).trim().to_string();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pg_listsync--0.1.0.sql");
    std::fs::copy(
        &fixture,
        format!("{sharedir}/extension/pg_listsync--0.1.0.sql"),
    )
    .expect("install the 0.1.0 script next to the current one (run as root, as CI does)");
}

#[test]
fn updating_from_0_1_0_gives_the_fresh_schema_and_keeps_the_data() {
    install_release_script();
    let cluster = Cluster::start("upgrade", &[]);
    let mut fresh = cluster.connect();
    cluster
        .connect_to("postgres")
        .batch_execute("CREATE DATABASE upgraded")
        .unwrap();
    let mut db = cluster.connect_to("upgraded");
    db.batch_execute(
        "CREATE EXTENSION pg_listsync VERSION '0.1.0';
         CREATE ROLE listsync_upgrade_crm;
         CREATE TABLE contacts (id int PRIMARY KEY, email text, city text);
         GRANT SELECT, TRIGGER ON contacts TO listsync_upgrade_crm;
         -- What 0.1.0 recorded: a connection, a binding owned by a CRM role with a delivered
         -- member and a pending change.
         INSERT INTO listsync.connections (name, provider, settings)
              VALUES ('hook', 'webhook', '{\"url\": \"https://hooks.example/x\"}');
         INSERT INTO listsync.connection_secrets (connection_id, secrets)
              SELECT id, '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}' FROM listsync.connections;
         INSERT INTO listsync.bindings (filter_name, connection_id, source, list_id, owner, state)
              SELECT 'old', id, 'contacts', 'list-1', 'listsync_upgrade_crm', 'paused' FROM listsync.connections;
         INSERT INTO listsync.members (binding_id, address, status)
              SELECT id, 'kept@example.com', 'subscribed' FROM listsync.bindings;
         INSERT INTO listsync.outbox (binding_id, address)
              SELECT id, 'pending@example.com' FROM listsync.bindings;",
    )
    .unwrap();
    let before = describe(&mut db);
    db.batch_execute("ALTER EXTENSION pg_listsync UPDATE TO '0.2.0'")
        .unwrap();
    assert_eq!(
        scalar::<String>(
            &mut db,
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_listsync'"
        ),
        "0.2.0"
    );
    let (upgraded, wanted) = (describe(&mut db), describe(&mut fresh));
    let missing: Vec<&String> = wanted.iter().filter(|l| !upgraded.contains(l)).collect();
    let extra: Vec<&String> = upgraded.iter().filter(|l| !wanted.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the upgraded schema differs from a fresh install:\nmissing: {missing:#?}\nextra: {extra:#?}"
    );
    assert_ne!(before, upgraded, "the update changed something");

    assert_eq!(
        scalar::<i64>(
            &mut db,
            "SELECT count(*) FROM listsync.members WHERE address = 'kept@example.com'"
        ),
        1
    );
    assert_eq!(
        scalar::<i64>(
            &mut db,
            "SELECT count(*) FROM listsync.outbox WHERE address = 'pending@example.com'"
        ),
        1
    );
    // The binding's owner keeps the use of its connection, and binds again under 0.2.0 rules.
    db.batch_execute(
        "SET ROLE listsync_upgrade_crm;
         SELECT listsync.create_filter('moscow', 'contacts', $$ city = 'Moscow' $$);
         SELECT listsync.bind_filter_to_list('moscow', 'hook');
         RESET ROLE;",
    )
    .unwrap();
    assert_eq!(
        scalar::<i64>(
            &mut db,
            "SELECT count(*) FROM listsync.bindings WHERE owner = 'listsync_upgrade_crm'::regrole"
        ),
        2
    );
}
