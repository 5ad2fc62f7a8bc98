//! The catalog rows the SQL API works on, loaded by name or id with the checks every caller
//! needs (existence, ownership, USAGE).

use super::*;

/// A connection as the SQL surface needs it: who owns it and which provider it calls.
pub(super) struct ConnectionRow {
    pub(super) id: i64,
    pub(super) provider: String,
    pub(super) owner: pg_sys::Oid,
}

pub(super) fn load_connection(name: &str) -> Result<ConnectionRow> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT id, provider, owner::oid FROM listsync.connections WHERE name = $1",
            None,
            &[name.into()],
        )?;
        if rows.is_empty() {
            return Err(Error::not_found("connection", name));
        }
        let row = rows.first();
        Ok(ConnectionRow {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            provider: row.get::<String>(2)?.unwrap_or_default(),
            owner: row.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
        })
    })
}

/// Binding to a connection needs USAGE on it: granted to the caller (or a role whose
/// privileges it has, or PUBLIC), or being its owner or an admin.
pub(super) fn require_usage(connection: &str, id: i64, owner: pg_sys::Oid) -> Result<()> {
    if caller_owns(owner) {
        return Ok(());
    }
    let caller = privilege::caller();
    let granted: bool = AsExtension::run(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM listsync.connection_usage
                             WHERE connection_id = $1
                               AND (grantee::oid = 0 OR pg_catalog.pg_has_role($2, grantee::oid, 'USAGE')))",
            &[id.into(), caller.into()],
        )
    })?
    .unwrap_or(false);
    if granted {
        return Ok(());
    }
    Err(Error::new(
        Kind::InsufficientPrivilege,
        format!("permission denied for connection \"{connection}\""),
    )
    .with_detail(format!(
        "Role \"{}\" has no USAGE on the connection.",
        privilege::role_name(caller)
    ))
    .with_hint(format!(
        "The connection's owner or listsync_admin can run SELECT listsync.grant_usage({}, {}).",
        escape_literal(connection),
        escape_literal(&privilege::role_name(caller))
    )))
}

pub(super) struct FilterRow {
    pub(super) id: i64,
    pub(super) source: pg_sys::Oid,
    pub(super) email_column: String,
    pub(super) owner: pg_sys::Oid,
}

pub(super) fn load_filter(name: &str) -> Result<FilterRow> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT id, source::oid, email_column::text, owner::oid FROM listsync.filters WHERE name = $1",
            None,
            &[name.into()],
        )?;
        if rows.is_empty() {
            return Err(Error::not_found("filter", name));
        }
        let row = rows.first();
        Ok(FilterRow {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            source: row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
            email_column: row.get::<String>(3)?.unwrap_or_default(),
            owner: row.get::<pg_sys::Oid>(4)?.unwrap_or(pg_sys::InvalidOid),
        })
    })
}

pub(super) struct BindingRow {
    pub(super) source: Option<pg_sys::Oid>,
    pub(super) owner: pg_sys::Oid,
    pub(super) state: String,
}

pub(super) fn load_binding(id: i64) -> Result<BindingRow> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT source::oid, owner::oid, state FROM listsync.bindings WHERE id = $1",
            None,
            &[id.into()],
        )?;
        if rows.is_empty() {
            return Err(Error::not_found("binding", &id.to_string()));
        }
        let row = rows.first();
        Ok(BindingRow {
            source: row.get::<pg_sys::Oid>(1)?,
            owner: row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
            state: row.get::<String>(3)?.unwrap_or_default(),
        })
    })
}

pub(super) fn owned_binding(id: i64) -> Result<BindingRow> {
    let binding = AsExtension::run(|| load_binding(id))?;
    require_owner(&format!("binding {id}"), binding.owner)?;
    Ok(binding)
}
