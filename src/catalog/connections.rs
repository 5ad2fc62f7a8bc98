//! Connections: provider accounts, their secrets and who may bind to them (USAGE).

use super::rows::*;
use super::*;

#[pg_extern]
fn create_connection(
    name: Option<&str>,
    provider: Option<&str>,
    settings: default!(Option<Jsonb>, "'{}'"),
    secrets: default!(Option<Jsonb>, "'{}'"),
    if_not_exists: default!(Option<bool>, false),
) -> i64 {
    let (name, provider) = (required(name, "name"), required(provider, "provider"));
    let settings = json_argument(settings, "settings").or_raise();
    let secrets = json_argument(secrets, "secrets").or_raise();
    create_connection_impl(
        name,
        provider,
        settings.unwrap_or(Value::Null),
        secrets.unwrap_or(Value::Null),
        required(if_not_exists, "if_not_exists"),
    )
    .or_raise()
}

fn create_connection_impl(
    name: &str,
    provider: &str,
    settings: Value,
    secrets: Value,
    if_not_exists: bool,
) -> Result<i64> {
    privilege::require_admin("create a connection")?;
    check_name("connection", name, 63)?;
    providers::validate_config(provider, &settings, &secrets)
        .map_err(|e| Error::invalid(format!("connection \"{name}\": {e}")))?;
    AsExtension::run(|| {
        if let Some(id) = connection_id(name)? {
            let existing: String = Spi::get_one_with_args(
                "SELECT provider FROM listsync.connections WHERE id = $1",
                &[id.into()],
            )?
            .unwrap_or_default();
            if if_not_exists && existing == provider {
                notice!(
                    "connection \"{name}\" already exists, skipping; its settings and secrets are unchanged (listsync.alter_connection changes them)"
                );
                return Ok(id);
            }
            return Err(Error::new(
                Kind::DuplicateObject,
                format!("connection \"{name}\" already exists"),
            )
            .with_detail(format!("It is a {existing} connection."))
            .with_hint("Use if_not_exists => true to skip creating a connection that exists, or listsync.alter_connection to change it."));
        }
        let owner = privilege::caller();
        let id: i64 = Spi::get_one_with_args(
            "INSERT INTO listsync.connections (name, provider, settings, owner)
             VALUES ($1, $2, $3, $4::oid::regrole) RETURNING id",
            &[
                name.into(),
                provider.into(),
                JsonB(settings).into(),
                owner.into(),
            ],
        )?
        .ok_or_else(|| Error::internal("INSERT returned no id"))?;
        Spi::run_with_args(
            "INSERT INTO listsync.connection_secrets (connection_id, secrets) VALUES ($1, $2)",
            &[id.into(), JsonB(secrets).into()],
        )?;
        Ok(id)
    })
}

/// Changes a connection's settings or secrets (a rotated API key, say) and clears its error
/// state, so that the bindings stopped by an authentication failure can resume.
#[pg_extern]
fn alter_connection(
    name: Option<&str>,
    settings: default!(Option<Jsonb>, "NULL"),
    secrets: default!(Option<Jsonb>, "NULL"),
) {
    let name = required(name, "name");
    let settings = json_argument(settings, "settings").or_raise();
    let secrets = json_argument(secrets, "secrets").or_raise();
    alter_connection_impl(name, settings, secrets).or_raise()
}

fn alter_connection_impl(
    name: &str,
    settings: Option<Value>,
    secrets: Option<Value>,
) -> Result<()> {
    privilege::require_admin("alter a connection")?;
    AsExtension::run(|| {
        let id = connection_id(name)?.ok_or_else(|| Error::not_found("connection", name))?;
        let (provider, old_settings, old_secrets) = Spi::connect(
            |c| -> Result<(String, Value, Value)> {
                let row = c
                .select(
                    "SELECT c.provider, c.settings, s.secrets FROM listsync.connections c
                       JOIN listsync.connection_secrets s ON s.connection_id = c.id WHERE c.id = $1",
                    None,
                    &[id.into()],
                )?
                .first();
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<JsonB>(2)?.map(|j| j.0).unwrap_or_default(),
                    row.get::<JsonB>(3)?.map(|j| j.0).unwrap_or_default(),
                ))
            },
        )?;
        let settings = settings.unwrap_or(old_settings);
        let secrets = secrets.unwrap_or(old_secrets);
        providers::validate_config(&provider, &settings, &secrets)
            .map_err(|e| Error::invalid(format!("connection \"{name}\": {e}")))?;
        Spi::run_with_args(
            "UPDATE listsync.connections SET settings = $2, state = 'ok', state_reason = NULL,
                    throttled_until = NULL WHERE id = $1",
            &[id.into(), JsonB(settings).into()],
        )?;
        Spi::run_with_args(
            "UPDATE listsync.connection_secrets SET secrets = $2 WHERE connection_id = $1",
            &[id.into(), JsonB(secrets).into()],
        )?;
        // Bindings stopped by this connection's failure may go on.
        Spi::run_with_args(
            "UPDATE listsync.bindings SET state = 'active', state_reason = NULL WHERE connection_id = $1 AND state = 'error'",
            &[id.into()],
        )?;
        crate::wake::request_wake();
        Ok(())
    })
}

/// Renames a connection; bindings refer to it by id and go on.
#[pg_extern]
fn rename_connection(name: Option<&str>, new_name: Option<&str>) {
    rename_connection_impl(required(name, "name"), required(new_name, "new_name")).or_raise()
}

fn rename_connection_impl(name: &str, new_name: &str) -> Result<()> {
    privilege::require_admin("rename a connection")?;
    check_name("connection", new_name, 63)?;
    AsExtension::run(|| {
        let id = connection_id(name)?.ok_or_else(|| Error::not_found("connection", name))?;
        if connection_id(new_name)?.is_some() {
            return Err(Error::new(
                Kind::DuplicateObject,
                format!(
                    "cannot rename connection \"{name}\": connection \"{new_name}\" already exists"
                ),
            ));
        }
        Spi::run_with_args(
            "UPDATE listsync.connections SET name = $2 WHERE id = $1",
            &[id.into(), new_name.into()],
        )?;
        Ok(())
    })
}

#[pg_extern]
fn drop_connection(name: Option<&str>) {
    drop_connection_impl(required(name, "name")).or_raise()
}

fn drop_connection_impl(name: &str) -> Result<()> {
    privilege::require_admin("drop a connection")?;
    AsExtension::run(|| {
        let id = connection_id(name)?.ok_or_else(|| Error::not_found("connection", name))?;
        let bindings: Option<Vec<i64>> = Spi::get_one_with_args(
            "SELECT array_agg(id ORDER BY id) FROM listsync.bindings WHERE connection_id = $1",
            &[id.into()],
        )?;
        if let Some(bindings) = bindings.filter(|b| !b.is_empty()) {
            let list = bindings
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::new(
                Kind::DependentObjectsStillExist,
                format!("cannot drop connection \"{name}\" because bindings use it"),
            )
            .with_detail(format!("Bindings: {list}."))
            .with_hint("Unbind them first with listsync.unbind(id)."));
        }
        Spi::run_with_args(
            "DELETE FROM listsync.connections WHERE id = $1",
            &[id.into()],
        )?;
        Ok(())
    })
}

#[pg_extern]
fn test_connection(name: Option<&str>) -> JsonB {
    JsonB(test_connection_impl(required(name, "name")).or_raise())
}

fn test_connection_impl(name: &str) -> Result<Value> {
    privilege::require_admin("test a connection")?;
    let connection = AsExtension::run(|| crate::delivery::load_connection_by_name(name))?;
    crate::delivery::check_connection(&connection)
}

pub fn connection_id(name: &str) -> Result<Option<i64>> {
    crate::query::optional(
        "SELECT id FROM listsync.connections WHERE name = $1",
        &[name.into()],
    )
}

/// Lets `role` (a role name, or `public`) bind filters to the connection, as USAGE on a
/// foreign server lets a role create user mappings. The connection's owner and
/// `listsync_admin` may grant it.
#[pg_extern]
fn grant_usage(connection: Option<&str>, role: Option<&str>) {
    let (connection, role) = (required(connection, "connection"), required(role, "role"));
    set_usage(connection, role, true).or_raise()
}

/// Takes USAGE back. Bindings made with it stay as they are (as user mappings outlive a revoked
/// USAGE on their server); new ones are refused.
#[pg_extern]
fn revoke_usage(connection: Option<&str>, role: Option<&str>) {
    let (connection, role) = (required(connection, "connection"), required(role, "role"));
    set_usage(connection, role, false).or_raise()
}

fn set_usage(connection: &str, role: &str, grant: bool) -> Result<()> {
    let grantee = grantee_oid(role)?;
    let ConnectionRow { id, owner, .. } = AsExtension::run(|| load_connection(connection))?;
    require_owner(&format!("connection \"{connection}\""), owner)?;
    AsExtension::run(|| {
        if grant {
            Spi::run_with_args(
                "INSERT INTO listsync.connection_usage (connection_id, grantee, granted_by)
                 VALUES ($1, $2::oid::regrole, $3::oid::regrole) ON CONFLICT DO NOTHING",
                &[id.into(), oid_argument(grantee), privilege::caller().into()],
            )?;
        } else {
            Spi::run_with_args(
                "DELETE FROM listsync.connection_usage WHERE connection_id = $1 AND grantee = $2::oid::regrole",
                &[id.into(), oid_argument(grantee)],
            )?;
        }
        Ok(())
    })
}

/// `public` is every role (stored as the invalid role, shown as `-`), as in GRANT.
fn grantee_oid(role: &str) -> Result<pg_sys::Oid> {
    if role.eq_ignore_ascii_case("public") {
        return Ok(pg_sys::InvalidOid);
    }
    let name = std::ffi::CString::new(role)
        .map_err(|_| Error::invalid("a role name cannot contain NUL"))?;
    // SAFETY: get_role_oid with missing_ok = true returns InvalidOid instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return Err(Error::not_found("role", role));
    }
    Ok(oid)
}
