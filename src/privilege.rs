//! Who may do what, and running our own catalog work with our own rights.
//!
//! The public functions are not SECURITY DEFINER: they see their real caller (`GetUserId()`),
//! check the caller's rights on the objects named (SELECT to filter a table, TRIGGER to bind
//! it, membership in `listsync_admin` to manage connections), and only then switch to the
//! bootstrap superuser, with a fixed `search_path`, for the catalog writes themselves — the way
//! a SECURITY DEFINER function with `SET search_path` would, but only around our own SQL.
//! Evaluating what a user wrote (a filter, a mapped field) outside the writer's own trigger
//! happens as the binding's owner in a security-restricted operation (`as_owner`).

use crate::error::{Error, Kind, Result};
use pgrx::pg_sys;
use std::ffi::CString;

/// The role calling the current function.
pub fn caller() -> pg_sys::Oid {
    // SAFETY: GetUserId reads a backend global; it is valid in any transaction.
    unsafe { pg_sys::GetUserId() }
}

pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId returns a palloc'd C string or raises an ERROR (noerr = false).
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, false);
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    }
}

fn is_superuser(role: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookup of a role; no pointers involved.
    unsafe { pg_sys::superuser_arg(role) }
}

/// Connections hold credentials: only superusers and members of `listsync_admin` manage them.
pub fn require_admin(action: &str) -> Result<()> {
    let role = caller();
    if is_superuser(role) || has_role(role, "listsync_admin") {
        return Ok(());
    }
    Err(Error::new(
        Kind::InsufficientPrivilege,
        format!("permission denied to {action}"),
    )
    .with_detail(format!(
        "Role \"{}\" is not a member of listsync_admin.",
        role_name(role)
    ))
    .with_hint("GRANT listsync_admin TO the role that manages provider connections."))
}

fn has_role(role: pg_sys::Oid, name: &str) -> bool {
    let name = CString::new(name).expect("constant role name");
    // SAFETY: get_role_oid with missing_ok = true returns InvalidOid instead of raising.
    unsafe {
        let admin = pg_sys::get_role_oid(name.as_ptr(), true);
        admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(role, admin)
    }
}

/// Whether the caller holds `privilege` (a `pg_sys::ACL_*` bit) on table `relid`.
pub fn caller_has_table_privilege(relid: pg_sys::Oid, privilege: pg_sys::AclMode) -> bool {
    // SAFETY: an ACL check by OIDs; raises only for a missing relation, which callers exclude.
    unsafe {
        pg_sys::pg_class_aclcheck(relid, caller(), privilege) == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// A switch of the current user (and optionally of `search_path`) that restores both when
/// dropped, as fmgr does around a SECURITY DEFINER call.
struct Switched {
    user: pg_sys::Oid,
    security_context: i32,
    _search_path: Option<FixedSearchPath>,
}

impl Switched {
    fn to(role: pg_sys::Oid, extra_context: u32, fixed_search_path: bool) -> Switched {
        let mut user = pg_sys::InvalidOid;
        let mut security_context = 0;
        // SAFETY: these functions save and set backend globals, exactly as fmgr does around a
        // SECURITY DEFINER call; Drop restores them (or transaction abort does).
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut security_context);
            pg_sys::SetUserIdAndSecContext(
                role,
                security_context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | extra_context) as i32,
            );
        }
        Switched {
            user,
            security_context,
            _search_path: fixed_search_path.then(FixedSearchPath::push),
        }
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        // While an ERROR unwinds, transaction (or subtransaction) abort restores the user
        // itself; calling into PostgreSQL then could raise again.
        if !std::thread::panicking() {
            // SAFETY: restores exactly what `to` saved, in the same transaction.
            unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.security_context) };
        }
    }
}

/// While alive, `search_path` is `pg_catalog, pg_temp`: the only path our SQL, and the SQL we
/// evaluate for others, runs under. Nothing a role can create (a schema named like a user, an
/// operator in `public`) is found before `pg_catalog`, and temporary objects come last.
struct FixedSearchPath(i32);

impl FixedSearchPath {
    fn push() -> FixedSearchPath {
        // SAFETY: a new GUC nest level, popped in Drop (or by transaction abort).
        unsafe {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                c"pg_catalog, pg_temp".as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            FixedSearchPath(level)
        }
    }
}

impl Drop for FixedSearchPath {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: pops the level pushed in `push`, in the same transaction.
            unsafe { pg_sys::AtEOXact_GUC(true, self.0) };
        }
    }
}

/// Runs `body` under the fixed search_path, as the same user: catalog reads in the caller's
/// backend, and deparsing, so that every name outside `pg_catalog` comes out schema-qualified.
pub fn with_fixed_search_path<T>(body: impl FnOnce() -> T) -> T {
    let _search_path = FixedSearchPath::push();
    body()
}

/// The extension's own rights: the bootstrap superuser under the fixed search_path. Only for
/// catalog work; SQL run with them never evaluates anything a user wrote.
pub struct AsExtension;

impl AsExtension {
    /// Runs `body` with the extension's rights, on a catalog of this library's version.
    pub fn run<T>(body: impl FnOnce() -> T) -> T {
        let _switched = Switched::to(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), 0, true);
        if let Err(e) = crate::catalog_version::require_current() {
            e.raise();
        }
        body()
    }
}

/// Runs `body` as the bootstrap superuser without touching `search_path`: only for the
/// capture's marking statement, which is schema-qualified throughout (operators included) and
/// runs after every writing statement, where a GUC nest level would cost.
pub fn as_extension_keeping_search_path<T>(body: impl FnOnce() -> T) -> T {
    let _switched = Switched::to(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), 0, false);
    body()
}

/// Runs `body` as `owner` in a security-restricted operation with the fixed search_path, the
/// way PostgreSQL runs REFRESH MATERIALIZED VIEW and index expressions as the table's owner:
/// privileges and row-level security are the owner's, and nothing evaluated may change the
/// session (SET ROLE, temporary objects, ...). Every evaluation of a filter or binding view
/// outside the writer's own trigger goes through here.
pub fn as_owner<T>(owner: pg_sys::Oid, body: impl FnOnce() -> T) -> T {
    let _switched = Switched::to(owner, pg_sys::SECURITY_RESTRICTED_OPERATION, true);
    body()
}
