//! Who may do what, and running our own catalog work with our own rights.
//!
//! The public functions are not SECURITY DEFINER: they see their real caller (`GetUserId()`),
//! check the caller's rights on the objects named (SELECT to filter a table, TRIGGER to bind
//! it, membership in `listsync_admin` to manage connections), and only then switch to the
//! bootstrap superuser, with a fixed `search_path`, for the catalog writes themselves — the way
//! a SECURITY DEFINER function with `SET search_path` would, but only around our own SQL.

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

/// While alive, the backend acts as the bootstrap superuser with `search_path` set to
/// `pg_catalog, pg_temp`; dropping it restores both.
pub struct AsExtension {
    user: pg_sys::Oid,
    security_context: i32,
    guc_level: i32,
}

impl AsExtension {
    pub fn enter() -> Self {
        let mut user = pg_sys::InvalidOid;
        let mut security_context = 0;
        // SAFETY: these functions save and set backend globals, exactly as fmgr does around a
        // SECURITY DEFINER call; the GUC nest level is popped in Drop (or by transaction abort).
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut security_context);
            pg_sys::SetUserIdAndSecContext(
                pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
                security_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
            );
            let guc_level = pg_sys::NewGUCNestLevel();
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
            AsExtension {
                user,
                security_context,
                guc_level,
            }
        }
    }

    /// Runs `body` with the extension's rights.
    pub fn run<T>(body: impl FnOnce() -> T) -> T {
        let _guard = AsExtension::enter();
        body()
    }
}

impl Drop for AsExtension {
    fn drop(&mut self) {
        // While an ERROR unwinds, transaction (or subtransaction) abort restores the user and
        // pops the GUC level itself; calling into PostgreSQL then could raise again.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: restores exactly what `enter` saved, in the same transaction.
        unsafe {
            pg_sys::AtEOXact_GUC(true, self.guc_level);
            pg_sys::SetUserIdAndSecContext(self.user, self.security_context);
        }
    }
}

/// Runs `body` as `role` (row-level security and privileges apply to it), used to read a
/// binding's rows as the binding's owner (semantics 3).
pub fn as_role<T>(role: pg_sys::Oid, body: impl FnOnce() -> T) -> T {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                // SAFETY: restores the saved user and context in the same transaction.
                unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
            }
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: as in AsExtension::enter.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let _restore = Restore(user, context);
    body()
}
