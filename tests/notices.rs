//! Each call that changes what is delivered says in a NOTICE what it did, and what it did not
//! do at the provider.

mod common;

use common::*;

#[test]
fn every_binding_change_says_what_it_did() {
    let cluster = Cluster::start("notices", &[]);
    let (mut db, notices) = cluster.connect_hearing_notices("crm");
    db.batch_execute(
        "CREATE TABLE contacts (id int PRIMARY KEY, email text, city text);
         INSERT INTO contacts SELECT n, 'p' || n || '@example.com', CASE WHEN n <= 3 THEN 'Moscow' ELSE 'Paris' END
           FROM generate_series(1, 5) n;
         SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://hooks.example/x\"}',
                                           '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}');
         SELECT listsync.create_filter('moscow', 'contacts', $$ city = 'Moscow' $$);",
    )
    .unwrap();
    notices.take();
    let mut said = |sql: &str| -> Vec<String> {
        db.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        notices.take()
    };
    assert_eq!(
        said("SELECT listsync.bind_filter_to_list('moscow', 'hook', 'list-1')"),
        [
            "NOTICE: binding 1: filter \"moscow\" bound to connection \"hook\"; 3 matching addresses marked for the backfill"
        ]
    );
    assert_eq!(
        said("SELECT listsync.pause_binding(1)"),
        [
            "NOTICE: binding 1 is paused: changes are still recorded, and delivered on resume_binding"
        ]
    );
    assert_eq!(
        said("SELECT listsync.resume_binding(1)"),
        ["NOTICE: binding 1 is active: what was recorded while it was paused is delivered now"]
    );
    assert_eq!(
        said("SELECT listsync.resync(1)"),
        ["NOTICE: binding 1: 3 addresses marked to be compared with the provider"]
    );
    assert_eq!(
        said("SELECT listsync.alter_filter('moscow', $$ city IN ('Moscow', 'Paris') $$)"),
        ["NOTICE: binding 1: 5 addresses marked to follow the new definition of filter \"moscow\""]
    );
    let unbound = said("SELECT listsync.unbind(1)");
    assert_eq!(unbound.len(), 1, "{unbound:#?}");
    assert!(
        unbound[0].starts_with("NOTICE: binding 1 unbound: ")
            && unbound[0].ends_with("pending changes dropped; nothing is removed at the provider"),
        "{unbound:#?}"
    );
    said("SELECT listsync.bind_filter_to_list('moscow', 'hook', 'list-1', backfill => false)");
    assert_eq!(
        said("SELECT listsync.drop_filter('moscow')"),
        [
            "NOTICE: binding 2 is now inactive: its pending changes are dropped and nothing is removed at the provider"
        ]
    );
}
