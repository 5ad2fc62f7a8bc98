//! The SQL surface over the catalog: connections, filters and bindings (DESIGN.md, "Public SQL
//! API"). Each function checks its caller's rights and its arguments, then does its catalog
//! work with the extension's rights (`privilege::AsExtension`).
//!
//! A filter is stored as a view, `listsync."filter:<name>"`, selecting the email and key columns
//! of the rows the predicate matches; a binding as a view `listsync."binding:<id>"` adding the
//! normalized address and the mapped fields. PostgreSQL then does for us what semantics 9 asks:
//! the views follow column renames, refuse to let a column they read be dropped or retyped,
//! and pg_dump recreates them from their definition. The capture trigger reads its predicates
//! from these views' rules, and the worker reads desired state through them.

use crate::error::{Error, Kind, OrRaise, Result, required};
use crate::filter::compile::compile_predicate;
use crate::outbox::{BULK_PRIORITY, ON_CONFLICT_DIRTY};
use crate::privilege::{self, AsExtension};
use crate::sql_types::{Jsonb, Regclass, Regprocedure};
use listsync_core::conditions::{self, ColumnKind, escape_literal, quote_identifier};
use listsync_core::providers;
use pgrx::prelude::*;
use pgrx::{JsonB, pg_sys};
use serde_json::Value;
use std::collections::BTreeMap;

pub const MAX_FILTER_NAME_BYTES: usize = 56;

/// A NULL jsonb argument stays `None`; a value too deeply nested is refused (22023).
fn json_argument(argument: Option<Jsonb>, name: &str) -> Result<Option<Value>> {
    argument.map(|json| json.parse(name)).transpose()
}

pub fn filter_view(name: &str) -> String {
    format!("listsync.{}", quote_identifier(&format!("filter:{name}")))
}

pub fn binding_view(id: i64) -> String {
    format!("listsync.{}", quote_identifier(&format!("binding:{id}")))
}

/// `schema.table`, always qualified and quoted as needed (our SQL runs with a fixed
/// search_path).
pub fn relation_name(relid: pg_sys::Oid) -> String {
    privilege::with_fixed_search_path(|| relation_name_now(relid))
}

fn relation_name_now(relid: pg_sys::Oid) -> String {
    crate::query::optional::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[relid.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| format!("{}", relid.to_u32()))
}

// ---------------------------------------------------------------------------------------------
// Tables

pub struct Column {
    pub name: String,
    pub category: char,
    pub type_name: String,
}

pub struct Table {
    pub relid: pg_sys::Oid,
    pub name: String,
    pub columns: Vec<Column>,
    pub key: Vec<String>,
}

impl Table {
    /// Reads the table's shape from the catalogs (under the fixed search_path: it runs in the
    /// caller's backend).
    pub fn load(relid: pg_sys::Oid) -> Result<Table> {
        privilege::with_fixed_search_path(|| Table::load_now(relid))
    }

    fn load_now(relid: pg_sys::Oid) -> Result<Table> {
        let name = relation_name_now(relid);
        let kind: Option<String> = crate::query::optional(
            "SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = $1",
            &[relid.into()],
        )?;
        match kind.as_deref() {
            Some("r") | Some("p") => {}
            Some(_) => {
                return Err(Error::new(Kind::FeatureNotSupported, format!("\"{name}\" is not a table"))
                    .with_hint("Filters are defined over tables (or partitioned tables); writes through views reach the table's triggers."));
            }
            None => {
                return Err(Error::new(
                    Kind::UndefinedTable,
                    format!("relation with OID {} does not exist", relid.to_u32()),
                ));
            }
        }
        let columns = Spi::connect(|c| -> Result<Vec<Column>> {
            let mut columns = Vec::new();
            let rows = c.select(
                "SELECT a.attname::text, t.typcategory::text, pg_catalog.format_type(a.atttypid, a.atttypmod)
                   FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                None,
                &[relid.into()],
            )?;
            for row in rows {
                columns.push(Column {
                    name: row.get::<String>(1)?.unwrap_or_default(),
                    category: row
                        .get::<String>(2)?
                        .and_then(|s| s.chars().next())
                        .unwrap_or('X'),
                    type_name: row.get::<String>(3)?.unwrap_or_default(),
                });
            }
            Ok(columns)
        })?;
        let key: Vec<String> = Spi::get_one_with_args::<Vec<String>>(
            "SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_catalog.pg_index i,
                    unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord),
                    pg_catalog.pg_attribute a
              WHERE i.indrelid = $1 AND i.indisprimary
                AND a.attrelid = i.indrelid AND a.attnum = k.attnum",
            &[relid.into()],
        )?
        .unwrap_or_default();
        Ok(Table {
            relid,
            name,
            columns,
            key,
        })
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    fn column_kind(&self, name: &str) -> Option<ColumnKind> {
        self.column(name).map(|c| match c.category {
            'S' => ColumnKind::Text,
            'A' => ColumnKind::Array,
            'D' if c.type_name == "date" => ColumnKind::Date,
            'D' if c.type_name.starts_with("timestamp") => ColumnKind::Timestamp,
            _ => ColumnKind::Other,
        })
    }

    fn require_key(&self, filter: &str) -> Result<()> {
        if self.key.is_empty() {
            return Err(Error::new(
                Kind::ObjectNotInPrerequisiteState,
                format!("filter \"{filter}\": table {} has no primary key", self.name),
            )
            .with_hint("pg_listsync needs a primary key to pick one row per address deterministically; add one."));
        }
        Ok(())
    }

    fn require_text_column(&self, filter: &str, role: &str, column: &str) -> Result<()> {
        let email_column = column;
        match self.column(email_column) {
            None => Err(Error::new(
                Kind::UndefinedColumn,
                format!(
                    "filter \"{filter}\": column \"{email_column}\" of table {} does not exist",
                    self.name
                ),
            )
            .with_hint(format!(
                "Name the column holding the {role} with {role}_column => '...'."
            ))),
            Some(c) if c.category != 'S' => Err(Error::new(
                Kind::DatatypeMismatch,
                format!(
                    "filter \"{filter}\": {role} column \"{email_column}\" is of type {}, not a text type",
                    c.type_name
                ),
            )),
            Some(_) => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

#[pg_extern]
fn create_connection(
    name: Option<&str>,
    provider: Option<&str>,
    settings: default!(Option<Jsonb>, "'{}'"),
    secrets: default!(Option<Jsonb>, "'{}'"),
) -> i64 {
    let (name, provider) = (required(name, "name"), required(provider, "provider"));
    let settings = json_argument(settings, "settings").or_raise();
    let secrets = json_argument(secrets, "secrets").or_raise();
    create_connection_impl(
        name,
        provider,
        settings.unwrap_or(Value::Null),
        secrets.unwrap_or(Value::Null),
    )
    .or_raise()
}

fn create_connection_impl(
    name: &str,
    provider: &str,
    settings: Value,
    secrets: Value,
) -> Result<i64> {
    privilege::require_admin("create a connection")?;
    check_name("connection", name, 63)?;
    providers::validate_config(provider, &settings, &secrets)
        .map_err(|e| Error::invalid(format!("connection \"{name}\": {e}")))?;
    AsExtension::run(|| {
        if connection_id(name)?.is_some() {
            return Err(Error::new(
                Kind::DuplicateObject,
                format!("connection \"{name}\" already exists"),
            ));
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

/// An OID as an SPI argument, the invalid OID included (pgrx passes that as NULL).
fn oid_argument(oid: pg_sys::Oid) -> pgrx::datum::DatumWithOid<'static> {
    i64::from(oid.to_u32()).into()
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

/// A connection as the SQL surface needs it: who owns it and which provider it calls.
struct ConnectionRow {
    id: i64,
    provider: String,
    owner: pg_sys::Oid,
}

fn load_connection(name: &str) -> Result<ConnectionRow> {
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
fn require_usage(connection: &str, id: i64, owner: pg_sys::Oid) -> Result<()> {
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

// ---------------------------------------------------------------------------------------------
// Functions allowed in filters

/// Allows a function that is not built in to be used in filters and mapped fields. It then
/// runs in every writer's transaction, as the writer, and in the worker as the binding's owner:
/// allow only functions that read nothing but their arguments. Admin only.
#[pg_extern]
fn allow_function(function: Option<Regprocedure>) {
    let function = required(function, "function");
    set_function_allowed(function.0, true).or_raise()
}

/// Takes an allowance back. Bindings whose filters use the function go to state error at the
/// worker's next look (`revalidate_bindings`); filters can no longer be created with it.
#[pg_extern]
fn disallow_function(function: Option<Regprocedure>) {
    let function = required(function, "function");
    set_function_allowed(function.0, false).or_raise()
}

fn set_function_allowed(function: pg_sys::Oid, allow: bool) -> Result<()> {
    privilege::require_admin(if allow {
        "allow a function in filters"
    } else {
        "disallow a function in filters"
    })?;
    AsExtension::run(|| {
        if allow {
            let volatile: Option<bool> = crate::query::optional(
                "SELECT provolatile = 'v' FROM pg_catalog.pg_proc WHERE oid = $1",
                &[function.into()],
            )?;
            match volatile {
                None => {
                    return Err(Error::new(
                        Kind::UndefinedObject,
                        format!("function with OID {} does not exist", function.to_u32()),
                    ));
                }
                Some(true) => {
                    return Err(Error::new(
                        Kind::InvalidObjectDefinition,
                        format!(
                            "function {} is volatile and cannot be used in a filter",
                            procedure_name(function)?
                        ),
                    )
                    .with_hint("A filter must give the same answer for the same row: mark the function IMMUTABLE or STABLE if it is."));
                }
                Some(false) => {}
            }
            Spi::run_with_args(
                "INSERT INTO listsync.allowed_functions (function, allowed_by)
                 VALUES ($1::oid::regprocedure, $2::oid::regrole) ON CONFLICT DO NOTHING",
                &[function.into(), privilege::caller().into()],
            )?;
        } else {
            Spi::run_with_args(
                "DELETE FROM listsync.allowed_functions WHERE function = $1::oid::regprocedure",
                &[function.into()],
            )?;
            // Every backend rebuilds its capture state, checking the filters again.
            invalidate_bound_tables()?;
            crate::wake::request_wake();
        }
        Ok(())
    })
}

fn procedure_name(function: pg_sys::Oid) -> Result<String> {
    Ok(
        crate::query::optional::<String>("SELECT $1::oid::regprocedure::text", &[function.into()])?
            .unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------------
// Filters

struct FilterRow {
    id: i64,
    source: pg_sys::Oid,
    email_column: String,
    owner: pg_sys::Oid,
}

fn load_filter(name: &str) -> Result<FilterRow> {
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

/// The caller has the privileges of `owner`, or is an admin.
fn caller_owns(owner: pg_sys::Oid) -> bool {
    // SAFETY: role membership check by OIDs.
    let has_privileges = unsafe { pg_sys::has_privs_of_role(privilege::caller(), owner) };
    has_privileges || privilege::require_admin("").is_ok()
}

fn require_owner(what: &str, owner: pg_sys::Oid) -> Result<()> {
    if caller_owns(owner) {
        return Ok(());
    }
    Err(Error::new(
        Kind::InsufficientPrivilege,
        format!("must be owner of {what}"),
    )
    .with_detail(format!(
        "{what} is owned by role \"{}\".",
        privilege::role_name(owner)
    )))
}

fn check_name(what: &str, name: &str, max_bytes: usize) -> Result<()> {
    if name.trim().is_empty() || name.len() > max_bytes || name.chars().any(char::is_control) {
        return Err(
            Error::new(Kind::InvalidName, format!("invalid {what} name \"{name}\"")).with_hint(
                format!("A {what} name is 1 to {max_bytes} bytes of printable characters."),
            ),
        );
    }
    Ok(())
}

/// The predicate written as SQL, or the JSON condition tree compiled to SQL.
pub enum Definition {
    Sql(String),
    Conditions(Value),
}

impl Definition {
    fn to_sql(&self, filter: &str, table: &Table) -> Result<String> {
        match self {
            Definition::Sql(sql) => Ok(sql.clone()),
            Definition::Conditions(tree) => conditions::to_sql(tree, &|c| table.column_kind(c))
                .map_err(|e| Error::invalid(format!("filter \"{filter}\": conditions {e}"))),
        }
    }

    fn conditions(&self) -> Option<Value> {
        match self {
            Definition::Sql(_) => None,
            Definition::Conditions(tree) => Some(tree.clone()),
        }
    }
}

#[pg_extern]
fn create_filter(
    name: Option<&str>,
    source: Option<Regclass>,
    predicate: Option<&str>,
    email_column: default!(Option<&str>, "'email'"),
    phone_column: default!(Option<&str>, "NULL"),
) -> i64 {
    let (name, source) = (required(name, "name"), required(source, "source"));
    let identity = Identity::new(required(email_column, "email_column"), phone_column);
    let predicate = required(predicate, "predicate");
    create_filter_impl(
        name,
        source.0,
        Definition::Sql(predicate.to_string()),
        &identity,
    )
    .or_raise()
}

#[pg_extern(name = "create_filter")]
fn create_filter_from_conditions(
    name: Option<&str>,
    source: Option<Regclass>,
    conditions: Option<Jsonb>,
    email_column: default!(Option<&str>, "'email'"),
    phone_column: default!(Option<&str>, "NULL"),
) -> i64 {
    let (name, source) = (required(name, "name"), required(source, "source"));
    let identity = Identity::new(required(email_column, "email_column"), phone_column);
    let conditions = required(conditions, "conditions")
        .parse("conditions")
        .or_raise();
    create_filter_impl(
        name,
        source.0,
        Definition::Conditions(conditions),
        &identity,
    )
    .or_raise()
}

fn create_filter_impl(
    name: &str,
    source: pg_sys::Oid,
    definition: Definition,
    identity: &Identity,
) -> Result<i64> {
    check_name("filter", name, MAX_FILTER_NAME_BYTES)?;
    let table = Table::load(source)?;
    if !privilege::caller_has_table_privilege(source, pg_sys::ACL_SELECT as pg_sys::AclMode) {
        return Err(Error::new(
            Kind::InsufficientPrivilege,
            format!(
                "permission denied to create filter \"{name}\": no SELECT privilege on table {}",
                table.name
            ),
        ));
    }
    table.require_key(name)?;
    table.require_text_column(name, "email", &identity.email)?;
    if let Some(phone) = &identity.phone {
        table.require_text_column(name, "phone", phone)?;
    }
    let predicate = definition.to_sql(name, &table)?;
    let owner = privilege::caller();
    let compiled =
        compile_predicate(name, source, &predicate, owner).map_err(|e| json_hint(e, &predicate))?;
    AsExtension::run(|| {
        if crate::query::optional::<i64>(
            "SELECT id FROM listsync.filters WHERE name = $1",
            &[name.into()],
        )?
        .is_some()
        {
            return Err(Error::new(
                Kind::DuplicateObject,
                format!("filter \"{name}\" already exists"),
            ));
        }
        let id: i64 = Spi::get_one_with_args(
            "INSERT INTO listsync.filters (name, source, email_column, phone_column, predicate, conditions, time_dependent, owner)
             VALUES ($1, $2::oid::regclass, $3, $8, $4, $5, $6, $7::oid::regrole) RETURNING id",
            &[
                name.into(),
                source.into(),
                identity.email.clone().into(),
                compiled.sql.clone().into(),
                definition.conditions().map(JsonB).into(),
                compiled.time_dependent.into(),
                owner.into(),
                identity.phone.clone().into(),
            ],
        )?
        .ok_or_else(|| Error::internal("INSERT returned no id"))?;
        create_filter_view(name, &table, identity, &compiled.sql, owner, false)?;
        Ok(id)
    })
}

/// A JSON condition tree passed as text lands on the SQL overload; say how to pick the other.
fn json_hint(error: Error, predicate: &str) -> Error {
    if predicate.trim_start().starts_with('{')
        && error.kind.sqlstate() == pg_sys::errcodes::PgSqlErrorCode::ERRCODE_SYNTAX_ERROR
    {
        error.with_hint("To pass a JSON condition tree, cast it: '{\"all\": [...]}'::jsonb.")
    } else {
        error
    }
}

fn create_filter_view(
    name: &str,
    table: &Table,
    identity: &Identity,
    predicate: &str,
    owner: pg_sys::Oid,
    replace: bool,
) -> Result<()> {
    let mut select = vec![format!("{} AS email", quote_identifier(&identity.email))];
    if let Some(phone) = &identity.phone {
        select.push(format!("{} AS phone", quote_identifier(phone)));
    }
    select.extend(
        table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} AS key_{}", quote_identifier(k), i + 1)),
    );
    let view = filter_view(name);
    Spi::run(&format!(
        "CREATE {} VIEW {view} WITH (security_invoker = true) AS SELECT {} FROM {} WHERE ({predicate})",
        if replace { "OR REPLACE" } else { "" },
        select.join(", "),
        table.name
    ))?;
    Spi::run(&format!(
        "COMMENT ON VIEW {view} IS {}",
        escape_literal(&format!("pg_listsync filter {name}"))
    ))?;
    grant_view_to(&view, owner)
}

fn grant_view_to(view: &str, role: pg_sys::Oid) -> Result<()> {
    if role != pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID) {
        Spi::run(&format!(
            "GRANT SELECT ON {view} TO {}",
            quote_identifier(&privilege::role_name(role))
        ))?;
    }
    Ok(())
}

#[pg_extern]
fn alter_filter(name: Option<&str>, predicate: Option<&str>) {
    let (name, predicate) = (required(name, "name"), required(predicate, "predicate"));
    alter_filter_impl(name, Definition::Sql(predicate.to_string())).or_raise()
}

#[pg_extern(name = "alter_filter")]
fn alter_filter_from_conditions(name: Option<&str>, conditions: Option<Jsonb>) {
    let (name, conditions) = (required(name, "name"), required(conditions, "conditions"));
    let conditions = conditions.parse("conditions").or_raise();
    alter_filter_impl(name, Definition::Conditions(conditions)).or_raise()
}

fn alter_filter_impl(name: &str, definition: Definition) -> Result<()> {
    let mut filter = AsExtension::run(|| load_filter(name))?;
    require_owner(&format!("filter \"{name}\""), filter.owner)?;
    let table = Table::load(filter.source)?;
    let identity = AsExtension::run(|| current_identity(name))?;
    filter.email_column = identity.email.clone();
    let predicate = definition.to_sql(name, &table)?;
    let compiled = compile_predicate(name, filter.source, &predicate, filter.owner)
        .map_err(|e| json_hint(e, &predicate))?;
    AsExtension::run(|| {
        Spi::run_with_args(
            "UPDATE listsync.filters SET predicate = $2, conditions = $3, time_dependent = $4, email_column = $5, updated_at = now()
              WHERE id = $1",
            &[
                filter.id.into(),
                compiled.sql.clone().into(),
                definition.conditions().map(JsonB).into(),
                compiled.time_dependent.into(),
                filter.email_column.clone().into(),
            ],
        )?;
        create_filter_view(name, &table, &identity, &compiled.sql, filter.owner, true)?;
        for binding in bindings_of_filter(filter.id)? {
            let fields = binding_fields(binding)?;
            let phone = binding_has_phone_identity(binding)?;
            create_binding_view(
                binding,
                &table,
                &identity.for_binding(phone),
                &compiled.sql,
                &fields,
                true,
            )?;
            let owner = load_binding(binding)?.owner;
            check_binding_view(binding, owner)?;
            // Members recorded under the old predicate and rows matching the new one are all dirty.
            mark_binding_dirty(binding, owner)?;
        }
        crate::capture::sync_triggers(filter.source)?;
        Ok(())
    })
}

#[pg_extern]
fn drop_filter(name: Option<&str>) {
    drop_filter_impl(required(name, "name")).or_raise()
}

fn drop_filter_impl(name: &str) -> Result<()> {
    let filter = AsExtension::run(|| load_filter(name))?;
    require_owner(&format!("filter \"{name}\""), filter.owner)?;
    AsExtension::run(|| {
        for binding in bindings_of_filter(filter.id)? {
            deactivate_binding(binding, &format!("filter \"{name}\" was dropped"))?;
        }
        Spi::run(&format!("DROP VIEW IF EXISTS {}", filter_view(name)))?;
        Spi::run_with_args(
            "DELETE FROM listsync.filters WHERE id = $1",
            &[filter.id.into()],
        )?;
        crate::capture::sync_triggers(filter.source)?;
        Ok(())
    })
}

/// Takes a binding out of service for good (its filter or table is gone): the binding stays
/// listed, visibly inactive with the reason; its pending work is dropped.
fn deactivate_binding(binding: i64, reason: &str) -> Result<()> {
    Spi::run(&format!("DROP VIEW IF EXISTS {}", binding_view(binding)))?;
    Spi::run_with_args(
        "UPDATE listsync.bindings SET state = 'inactive', state_reason = $2 WHERE id = $1",
        &[binding.into(), reason.into()],
    )?;
    Spi::run_with_args(
        "DELETE FROM listsync.outbox WHERE binding_id = $1",
        &[binding.into()],
    )?;
    Ok(())
}

#[pg_extern]
fn preview_filter(name: Option<&str>, sample: default!(Option<i32>, 20)) -> JsonB {
    JsonB(preview_filter_impl(required(name, "name"), required(sample, "sample")).or_raise())
}

fn preview_filter_impl(name: &str, sample: i32) -> Result<Value> {
    if !(0..=10_000).contains(&sample) {
        return Err(Error::invalid(format!(
            "sample must be between 0 and 10000, not {sample}"
        )));
    }
    let filter = AsExtension::run(|| load_filter(name))?;
    require_owner(&format!("filter \"{name}\""), filter.owner)?;
    let view = filter_view(name);
    let table_name = relation_name(filter.source);
    // Read as the filter's owner: what they may see is what would be synced.
    privilege::as_owner(filter.owner, || {
        let counts = Spi::connect(|c| -> Result<(i64, i64, i64)> {
            let row = c
                .select(
                    &format!(
                        "SELECT count(*), count(DISTINCT listsync.normalize_email(email::text)),
                                count(*) FILTER (WHERE listsync.normalize_email(email::text) IS NULL)
                           FROM {view}"
                    ),
                    None,
                    &[],
                )?
                .first();
            Ok((
                row.get(1)?.unwrap_or(0),
                row.get(2)?.unwrap_or(0),
                row.get(3)?.unwrap_or(0),
            ))
        })?;
        let rows: Option<JsonB> = Spi::get_one_with_args(
            &format!(
                "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') FROM (
                   SELECT t.* FROM {table_name} t
                    WHERE ({}) IN (SELECT {} FROM {view}) LIMIT $1) t",
                key_tuple(&Table::load(filter.source)?.key, "t."),
                key_columns(Table::load(filter.source)?.key.len()),
            ),
            &[sample.into()],
        )?;
        Ok(serde_json::json!({
            "filter": name,
            "matching_rows": counts.0,
            "addresses": counts.1,
            "invalid_addresses": counts.2,
            "sample": rows.map(|j| j.0).unwrap_or(Value::Array(vec![])),
        }))
    })
}

fn key_tuple(key: &[String], prefix: &str) -> String {
    key.iter()
        .map(|k| format!("{prefix}{}", quote_identifier(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_columns(n: usize) -> String {
    (1..=n)
        .map(|i| format!("key_{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn bindings_of_filter(filter_id: i64) -> Result<Vec<i64>> {
    Ok(Spi::get_one_with_args::<Vec<i64>>(
        "SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM listsync.bindings WHERE filter_id = $1 AND state <> 'inactive'",
        &[filter_id.into()],
    )?
    .unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Bindings

/// Every member carries every tag of its binding, in every call: bounded, so that one binding
/// cannot make requests of unbounded size.
const MAX_TAGS: usize = 50;
const MAX_TAG_CHARS: usize = 100;
const ON_LEAVE: [&str; 5] = ["remove", "archive", "unsubscribe", "delete", "keep"];
const NEW_MEMBER_STATUS: [&str; 2] = ["subscribed", "pending"];

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn bind_filter_to_list(
    filter: Option<&str>,
    connection: Option<&str>,
    list: default!(Option<&str>, "NULL"),
    fields: default!(Option<Jsonb>, "'{}'"),
    tags: default!(Option<Vec<Option<String>>>, "'{}'"),
    on_leave: default!(Option<&str>, "'remove'"),
    new_member_status: default!(Option<&str>, "'subscribed'"),
    backfill: default!(Option<bool>, true),
) -> i64 {
    let (filter, connection) = (
        required(filter, "filter"),
        required(connection, "connection"),
    );
    let fields = required(fields, "fields").parse("fields").or_raise();
    let tags: Vec<String> = required(tags, "tags")
        .into_iter()
        .map(|t| required(t, "a tag"))
        .collect();
    let on_leave = required(on_leave, "on_leave");
    let new_member_status = required(new_member_status, "new_member_status");
    let backfill = required(backfill, "backfill");
    let request = BindRequest {
        filter,
        connection,
        list,
        fields,
        tags,
        on_leave,
        new_member_status,
        backfill,
    };
    bind_impl(request).or_raise()
}

struct BindRequest<'a> {
    filter: &'a str,
    connection: &'a str,
    list: Option<&'a str>,
    fields: Value,
    tags: Vec<String>,
    on_leave: &'a str,
    new_member_status: &'a str,
    backfill: bool,
}

fn bind_impl(r: BindRequest) -> Result<i64> {
    let name = r.filter;
    let filter = AsExtension::run(|| load_filter(name))?;
    let ConnectionRow {
        id: connection_id,
        provider,
        owner: connection_owner,
    } = AsExtension::run(|| load_connection(r.connection))?;
    require_usage(r.connection, connection_id, connection_owner)?;
    let table = Table::load(filter.source)?;
    for (privilege, word) in [
        (pg_sys::ACL_TRIGGER, "TRIGGER"),
        (pg_sys::ACL_SELECT, "SELECT"),
    ] {
        if !privilege::caller_has_table_privilege(filter.source, privilege as pg_sys::AclMode) {
            return Err(Error::new(
                Kind::InsufficientPrivilege,
                format!("permission denied to bind filter \"{name}\": no {word} privilege on table {}", table.name),
            )
            .with_hint(format!("Binding installs a trigger on the table, which needs the same rights as CREATE TRIGGER: GRANT {word} ON {} TO {}.", table.name, quote_identifier(&privilege::role_name(privilege::caller())))));
        }
    }
    if !ON_LEAVE.contains(&r.on_leave) {
        return Err(
            Error::invalid(format!("invalid on_leave \"{}\"", r.on_leave))
                .with_hint("on_leave is one of remove, archive, unsubscribe, delete, keep."),
        );
    }
    if !NEW_MEMBER_STATUS.contains(&r.new_member_status) {
        return Err(Error::invalid(format!(
            "invalid new_member_status \"{}\"",
            r.new_member_status
        ))
        .with_hint("new_member_status is subscribed or pending (double opt-in)."));
    }
    let capabilities = providers::capabilities(&provider)
        .ok_or_else(|| Error::internal(format!("unknown provider {provider}")))?;
    if !capabilities.on_leave.contains(&r.on_leave) {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            format!("provider {provider} cannot do on_leave => '{}'", r.on_leave),
        )
        .with_hint(format!(
            "{provider} supports on_leave {}.",
            capabilities.on_leave.join(", ")
        )));
    }
    if r.new_member_status == "pending" && !capabilities.double_opt_in {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            format!("provider {provider} has no double opt-in (new_member_status => 'pending')"),
        ));
    }
    if !r.tags.is_empty() && !capabilities.tags {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            format!("provider {provider} has no tags"),
        )
        .with_hint("Leave tags empty; the list itself is the grouping at this provider."));
    }
    if r.tags.len() > MAX_TAGS {
        return Err(Error::invalid(format!(
            "a binding has at most {MAX_TAGS} tags, not {}",
            r.tags.len()
        ))
        .with_hint(
            "Every member delivered carries every tag of its binding; group with the list instead.",
        ));
    }
    if let Some(tag) = r
        .tags
        .iter()
        .find(|t| t.trim().is_empty() || t.chars().count() > MAX_TAG_CHARS)
    {
        return Err(Error::invalid(format!("invalid tag \"{tag}\""))
            .with_hint(format!("Tags are 1 to {MAX_TAG_CHARS} characters.")));
    }
    if r.list.is_some_and(|l| l.trim().is_empty()) {
        return Err(Error::invalid(
            "list must be a provider's list id, or NULL to create one",
        ));
    }
    let fields = compile_fields(name, &table, &provider, &r.fields, privilege::caller())?;
    let predicate = filter_predicate(name)?;
    let identity =
        AsExtension::run(|| current_identity(name))?.for_binding(capabilities.phone_identity);
    let owner = privilege::caller();
    let list_name = match r.list {
        Some(_) => None,
        None => Some(format!("{name} ({})", privilege::role_name(owner))),
    };
    AsExtension::run(|| {
        let id: i64 = Spi::get_one_with_args(
            "INSERT INTO listsync.bindings (filter_id, filter_name, connection_id, source, list_id, list_name,
                                            fields, tags, on_leave, new_member_status, owner)
             VALUES ($1, $2, $3, $4::oid::regclass, $5, $6, $7, $8, $9, $10, $11::oid::regrole) RETURNING id",
            &[
                filter.id.into(),
                name.into(),
                connection_id.into(),
                filter.source.into(),
                r.list.into(),
                list_name.into(),
                JsonB(r.fields.clone()).into(),
                r.tags.clone().into(),
                r.on_leave.into(),
                r.new_member_status.into(),
                owner.into(),
            ],
        )?
        .ok_or_else(|| Error::internal("INSERT returned no id"))?;
        create_binding_view(id, &table, &identity, &predicate, &fields, false)?;
        check_binding_view(id, owner)?;
        grant_view_to(&binding_view(id), owner)?;
        crate::capture::sync_triggers(filter.source)?;
        if r.backfill {
            mark_binding_dirty(id, owner)?;
        } else {
            mark_skipped_recount(id)?;
        }
        crate::wake::request_wake();
        Ok(id)
    })
}

/// The columns identifying a contact: its email and, optionally, its phone (for providers
/// where a contact may have no email, such as Google Contacts).
pub struct Identity {
    pub email: String,
    pub phone: Option<String>,
}

impl Identity {
    fn new(email: &str, phone: Option<&str>) -> Identity {
        Identity {
            email: email.to_string(),
            phone: phone.map(str::to_string),
        }
    }

    /// The identity a binding uses: the phone only where its provider can hold phone-only contacts.
    fn for_binding(&self, phone_identity: bool) -> Identity {
        Identity {
            email: self.email.clone(),
            phone: self.phone.clone().filter(|_| phone_identity),
        }
    }
}

/// The identity columns as the filter's view reads them now (it follows column renames).
fn current_identity(filter: &str) -> Result<Identity> {
    let view = view_oid(&filter_view(filter))?
        .ok_or_else(|| Error::internal(format!("the view of filter \"{filter}\" is missing")))?;
    let rule = crate::filter::view::ViewRule::load(view)?;
    let name_of = |attnum: i16| -> Result<String> {
        crate::query::optional::<String>(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum = $2",
            &[rule.table.into(), attnum.into()],
        )?
        .ok_or_else(|| Error::internal(format!("filter \"{filter}\": column {attnum} is gone")))
    };
    let email = name_of(rule.column_of("email")?)?;
    let phone = match rule.has_column("phone") {
        true => Some(name_of(rule.column_of("phone")?)?),
        false => None,
    };
    Ok(Identity { email, phone })
}

/// Whether the binding's view identifies contacts by phone as well as by email.
fn binding_has_phone_identity(binding: i64) -> Result<bool> {
    Ok(binding_rule(binding)?.has_column("phone"))
}

/// The predicate as the filter's view holds it now (it follows column renames).
fn filter_predicate(name: &str) -> Result<String> {
    AsExtension::run(|| {
        let view = view_oid(&filter_view(name))?
            .ok_or_else(|| Error::internal(format!("the view of filter \"{name}\" is missing")))?;
        crate::filter::view::predicate_sql(view)
    })
}

/// Each mapped field's SQL: a column of the table, or an expression compiled like a predicate
/// (same rules: no subqueries, no volatile or untrusted functions).
fn compile_fields(
    filter: &str,
    table: &Table,
    provider: &str,
    fields: &Value,
    owner: pg_sys::Oid,
) -> Result<BTreeMap<String, String>> {
    let Some(object) = fields.as_object() else {
        return Err(Error::invalid(
            "fields must be a JSON object mapping provider field names to columns",
        ));
    };
    let mut compiled = BTreeMap::new();
    for (field, source) in object {
        providers::validate_field_name(provider, field)
            .map_err(|e| Error::invalid(format!("field \"{field}\": {e}")))?;
        let Some(source) = source.as_str().filter(|s| !s.trim().is_empty()) else {
            return Err(Error::invalid(format!(
                "field \"{field}\": expected a column name or an SQL expression (a string)"
            )));
        };
        let sql = if table.column(source).is_some() {
            quote_identifier(source)
        } else {
            crate::filter::compile::compile_expression(filter, table.relid, source, owner).map_err(
                |mut e| {
                    e.message = format!("field \"{field}\": {}", e.message);
                    e
                },
            )?
        };
        compiled.insert(field.clone(), sql);
    }
    Ok(compiled)
}

/// The mapped fields of an existing binding, as its view computes them.
fn binding_fields(binding: i64) -> Result<BTreeMap<String, String>> {
    binding_rule(binding)?.fields()
}

/// The stored rule of the binding's view.
pub fn binding_rule(binding: i64) -> Result<crate::filter::view::ViewRule> {
    let view = view_oid(&binding_view(binding))?
        .ok_or_else(|| Error::internal(format!("the view of binding {binding} is missing")))?;
    crate::filter::view::ViewRule::load(view)
}

pub fn view_oid(qualified: &str) -> Result<Option<pg_sys::Oid>> {
    Ok(Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass($1)::oid",
        &[qualified.into()],
    )?)
}

fn create_binding_view(
    id: i64,
    table: &Table,
    identity: &Identity,
    predicate: &str,
    fields: &BTreeMap<String, String>,
    replace: bool,
) -> Result<()> {
    let email = quote_identifier(&identity.email);
    let fields_sql = if fields.is_empty() {
        "'{}'::jsonb".to_string()
    } else {
        // Keys as text: an untyped literal passed to jsonb_build_object's "any" stays `unknown`.
        let pairs: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}::text, ({v})", escape_literal(k)))
            .collect();
        format!("jsonb_build_object({})", pairs.join(", "))
    };
    let mut select = match &identity.phone {
        None => vec![format!(
            "listsync.normalize_email({email}::text) AS address"
        )],
        Some(phone) => {
            let phone = quote_identifier(phone);
            vec![
                format!(
                    "coalesce(listsync.normalize_email({email}::text), listsync.phone_identity({phone}::text)) AS address"
                ),
                format!("{phone}::text AS phone"),
            ]
        }
    };
    select.push(format!("{email}::text AS email"));
    select.push(format!("{fields_sql} AS fields"));
    select.extend(
        table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} AS key_{}", quote_identifier(k), i + 1)),
    );
    let view = binding_view(id);
    Spi::run(&format!(
        "CREATE {} VIEW {view} WITH (security_invoker = true) AS SELECT {} FROM {} WHERE ({predicate})",
        if replace { "OR REPLACE" } else { "" },
        select.join(", "),
        table.name
    ))?;
    Ok(())
}

/// The binding's view as stored follows the rules for `owner`, who it is evaluated as (the
/// filter's predicate was checked for the filter's owner, who may be someone else).
fn check_binding_view(binding: i64, owner: pg_sys::Oid) -> Result<()> {
    binding_rule(binding)?
        .check_allowed(owner)
        .map_err(|e| e.in_object(&format!("binding {binding}")))
}

/// Bindings whose predicate or mapped fields break today's rules for what a filter may contain
/// (made by an older version, or a privilege since revoked from the owner) go to state error
/// with the reason: capture skips them and the worker does not serve them. Returns how many.
pub fn revalidate_bindings() -> Result<usize> {
    let bindings: Vec<(i64, pg_sys::Oid)> = Spi::connect(|c| -> Result<Vec<(i64, pg_sys::Oid)>> {
        let mut bindings = Vec::new();
        for row in c.select(
            "SELECT id, owner::oid FROM listsync.bindings WHERE state IN ('active', 'paused') ORDER BY id",
            None,
            &[],
        )? {
            bindings.push((
                row.get(1)?.unwrap_or_default(),
                row.get(2)?.unwrap_or(pg_sys::InvalidOid),
            ));
        }
        Ok(bindings)
    })?;
    let mut refused = 0;
    for (binding, owner) in bindings {
        if let Err(reason) = check_binding_view(binding, owner) {
            refused += 1;
            Spi::run_with_args(
                "UPDATE listsync.bindings SET state = 'error', state_reason = $2, last_error = $2, last_error_at = now()
                  WHERE id = $1",
                &[binding.into(), reason.message.into()],
            )?;
        }
    }
    if refused > 0 {
        invalidate_bound_tables()?;
    }
    Ok(refused)
}

/// Makes every backend rebuild the capture state of every bound table at its next write.
fn invalidate_bound_tables() -> Result<()> {
    let tables: Vec<pg_sys::Oid> = Spi::get_one::<Vec<pg_sys::Oid>>(
        "SELECT coalesce(array_agg(DISTINCT c.oid), '{}') FROM listsync.bindings b
           JOIN pg_catalog.pg_class c ON c.oid = b.source::oid",
    )?
    .unwrap_or_default();
    for table in tables {
        // SAFETY: queues a relcache invalidation of the table, delivered at commit.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
    }
    Ok(())
}

/// Marks every address of the binding dirty: the ones its filter matches now and the ones the
/// worker recorded at the provider. Backfill, resync and alter_filter all come down to this.
/// Returns how many distinct addresses were marked.
///
/// The filter is evaluated as the binding's owner (`privilege::as_owner`), never with the
/// extension's rights: a cursor over the binding's view is opened and read as the owner, and
/// each chunk it yields is written to the outbox as the extension.
pub fn mark_binding_dirty(binding: i64, owner: pg_sys::Oid) -> Result<i64> {
    const CHUNK: i64 = 10_000;
    let recorded = AsExtension::run(|| {
        Spi::get_one_with_args::<i64>(
            &format!(
                "WITH dirty AS (
                     INSERT INTO listsync.outbox AS o (binding_id, address, not_before)
                     SELECT $1, address, {BULK_PRIORITY} FROM (
                         SELECT address FROM listsync.members WHERE binding_id = $1
                         UNION ALL
                         SELECT '') a
                     {ON_CONFLICT_DIRTY}
                     RETURNING 1)
                 SELECT count(*) - 1 FROM dirty"
            ),
            &[binding.into()],
        )
    })?
    .unwrap_or(0);
    let view = binding_view(binding);
    let cursor = privilege::as_owner(owner, || {
        Spi::connect(|c| -> Result<String> {
            let query = format!("SELECT DISTINCT address FROM {view} WHERE address IS NOT NULL");
            Ok(c.try_open_cursor(query.as_str(), &[])?.detach_into_name())
        })
    })?;
    let mut matching = 0;
    loop {
        // Each chunk in its own SPI session, so that fetched rows are freed as we go.
        let chunk: Vec<String> = privilege::as_owner(owner, || {
            Spi::connect(|c| -> Result<Vec<String>> {
                let mut cursor = c.find_cursor(&cursor)?;
                let mut addresses = Vec::new();
                for row in cursor.fetch(CHUNK)? {
                    addresses.extend(row.get::<String>(1)?);
                }
                cursor.detach_into_name();
                Ok(addresses)
            })
        })?;
        if chunk.is_empty() {
            break;
        }
        // Addresses also recorded as members were counted above.
        matching += AsExtension::run(|| {
            Spi::get_one_with_args::<i64>(
                &format!(
                    "WITH dirty AS (
                         INSERT INTO listsync.outbox AS o (binding_id, address, not_before)
                         SELECT $1, a, {BULK_PRIORITY} FROM pg_catalog.unnest($2::text[]) AS a
                         {ON_CONFLICT_DIRTY}
                         RETURNING o.address)
                     SELECT count(*) FROM dirty d
                      WHERE NOT EXISTS (SELECT FROM listsync.members m
                                         WHERE m.binding_id = $1 AND m.address = d.address)"
                ),
                &[binding.into(), chunk.into()],
            )
        })?
        .unwrap_or(0);
    }
    Spi::connect(|c| -> Result<()> {
        drop(c.find_cursor(&cursor)?);
        Ok(())
    })?;
    Ok(recorded + matching)
}

/// The empty address is the outbox's way of saying "recount this binding's skipped rows".
fn mark_skipped_recount(binding: i64) -> Result<()> {
    Spi::run_with_args(
        &format!(
            "INSERT INTO listsync.outbox AS o (binding_id, address) VALUES ($1, '') {ON_CONFLICT_DIRTY}"
        ),
        &[binding.into()],
    )?;
    Ok(())
}

struct BindingRow {
    source: Option<pg_sys::Oid>,
    owner: pg_sys::Oid,
    state: String,
}

fn load_binding(id: i64) -> Result<BindingRow> {
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

fn owned_binding(id: i64) -> Result<BindingRow> {
    let binding = AsExtension::run(|| load_binding(id))?;
    require_owner(&format!("binding {id}"), binding.owner)?;
    Ok(binding)
}

#[pg_extern]
fn pause_binding(id: Option<i64>) {
    let id = required(id, "id");
    set_binding_state(id, "paused").or_raise()
}

#[pg_extern]
fn resume_binding(id: Option<i64>) {
    let id = required(id, "id");
    set_binding_state(id, "active").or_raise()
}

fn set_binding_state(id: i64, state: &str) -> Result<()> {
    let binding = owned_binding(id)?;
    if binding.state == "inactive" {
        return Err(Error::new(
            Kind::ObjectNotInPrerequisiteState,
            format!("binding {id} is inactive and cannot be resumed"),
        )
        .with_hint("Its filter or table is gone; unbind it and bind a new filter."));
    }
    AsExtension::run(|| {
        if state == "active" {
            check_binding_view(id, binding.owner).map_err(|e| {
                e.with_hint("Change the filter (listsync.alter_filter) or ask an administrator to allow the function (listsync.allow_function).")
            })?;
        }
        Spi::run_with_args(
            "UPDATE listsync.bindings SET state = $2, state_reason = NULL WHERE id = $1",
            &[id.into(), state.into()],
        )?;
        if state == "active" {
            // The operator says the cause is fixed: let the connection be called again, and
            // retry what was waiting.
            Spi::run_with_args(
                "UPDATE listsync.connections c SET state = 'ok', state_reason = NULL, throttled_until = NULL
                   FROM listsync.bindings b WHERE b.id = $1 AND c.id = b.connection_id AND c.state = 'error'",
                &[id.into()],
            )?;
            Spi::run_with_args(
                "UPDATE listsync.outbox SET not_before = '-infinity' WHERE binding_id = $1",
                &[id.into()],
            )?;
            crate::wake::request_wake();
        }
        if let Some(source) = binding.source {
            // Capture wakes the worker only for bindings that are not paused.
            // SAFETY: queues a relcache invalidation of the table, delivered at commit.
            unsafe { pg_sys::CacheInvalidateRelcacheByRelid(source) };
        }
        Ok(())
    })
}

#[pg_extern]
fn unbind(id: Option<i64>) {
    let id = required(id, "id");
    unbind_impl(id).or_raise()
}

fn unbind_impl(id: i64) -> Result<()> {
    let binding = owned_binding(id)?;
    AsExtension::run(|| {
        Spi::run(&format!("DROP VIEW IF EXISTS {}", binding_view(id)))?;
        Spi::run_with_args(
            "DELETE FROM listsync.outbox WHERE binding_id = $1",
            &[id.into()],
        )?;
        Spi::run_with_args("DELETE FROM listsync.bindings WHERE id = $1", &[id.into()])?;
        if let Some(source) = binding.source {
            crate::capture::sync_triggers(source)?;
        }
        Ok(())
    })
}

/// Reconciles a binding: every address the filter matches or the provider was given is
/// re-examined against what was recorded. With `full`, members are sent again even when the
/// recorded state says they are right (repairs changes made by hand at the provider), and the
/// list is set up again.
#[pg_extern]
fn resync(id: Option<i64>, full: default!(Option<bool>, false)) -> i64 {
    resync_impl(required(id, "id"), required(full, "full")).or_raise()
}

fn resync_impl(id: i64, full: bool) -> Result<i64> {
    let binding = owned_binding(id)?;
    if binding.state == "inactive" {
        return Err(Error::new(
            Kind::ObjectNotInPrerequisiteState,
            format!("binding {id} is inactive"),
        ));
    }
    AsExtension::run(|| {
        if full {
            crate::outbox::exclude_delivery()?;
            Spi::run_with_args(
                "UPDATE listsync.members SET verified = false WHERE binding_id = $1",
                &[id.into()],
            )?;
            Spi::run_with_args(
                "UPDATE listsync.bindings SET remote = remote - 'prepared_at' WHERE id = $1",
                &[id.into()],
            )?;
        }
        let marked = mark_binding_dirty(id, binding.owner)?;
        crate::wake::request_wake();
        Ok(marked)
    })
}

#[pg_extern]
fn dry_run(
    id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(address, String),
        name!(operation, String),
        name!(fields, Option<JsonB>),
        name!(reason, Option<String>),
    ),
> {
    let id = required(id, "id");
    let binding = owned_binding(id).or_raise();
    if binding.state == "inactive" {
        Error::new(
            Kind::ObjectNotInPrerequisiteState,
            format!("binding {id} is inactive"),
        )
        .raise();
    }
    let plan = crate::delivery::dry_run(id).or_raise();
    TableIterator::new(
        plan.into_iter()
            .map(|op| (op.address, op.operation, op.fields.map(JsonB), op.reason)),
    )
}

/// Addresses never to be sent anywhere (semantics 6). Every binding holding the address is
/// marked dirty, so the provider side follows (by the binding's `on_leave`).
#[pg_extern]
fn suppress(address: Option<&str>, reason: default!(Option<&str>, "NULL")) {
    suppression(required(address, "address"), reason, true).or_raise()
}

#[pg_extern]
fn unsuppress(address: Option<&str>) {
    suppression(required(address, "address"), None, false).or_raise()
}

fn suppression(address: &str, reason: Option<&str>, add: bool) -> Result<()> {
    privilege::require_admin(if add {
        "suppress an address"
    } else {
        "unsuppress an address"
    })?;
    let normalized = listsync_core::address::normalize_identity(address).ok_or_else(|| {
        Error::invalid(format!(
            "\"{address}\" is neither an email address nor tel: and a phone number"
        ))
    })?;
    AsExtension::run(|| {
        if add {
            Spi::run_with_args(
                "INSERT INTO listsync.suppressions (address, reason) VALUES ($1, $2)
                 ON CONFLICT (address) DO UPDATE SET reason = EXCLUDED.reason",
                &[normalized.clone().into(), reason.into()],
            )?;
        } else {
            Spi::run_with_args(
                "DELETE FROM listsync.suppressions WHERE address = $1",
                &[normalized.clone().into()],
            )?;
        }
        Spi::run_with_args(
            &format!(
                "INSERT INTO listsync.outbox AS o (binding_id, address)
                 SELECT id, $1 FROM listsync.bindings WHERE state <> 'inactive' {ON_CONFLICT_DIRTY}"
            ),
            &[normalized.into()],
        )?;
        crate::wake::request_wake();
        Ok(())
    })
}

/// GDPR erasure: suppresses the address everywhere and erases it at the provider of every
/// binding that ever delivered it. Returns the number of bindings asked to erase it.
#[pg_extern]
fn forget(address: Option<&str>) -> i64 {
    forget_impl(required(address, "address")).or_raise()
}

fn forget_impl(address: &str) -> Result<i64> {
    privilege::require_admin("erase an address")?;
    let normalized = listsync_core::address::normalize_identity(address).ok_or_else(|| {
        Error::invalid(format!(
            "\"{address}\" is neither an email address nor tel: and a phone number"
        ))
    })?;
    AsExtension::run(|| {
        Spi::run_with_args(
            "INSERT INTO listsync.suppressions (address, reason) VALUES ($1, 'erased (listsync.forget)')
             ON CONFLICT (address) DO UPDATE SET reason = EXCLUDED.reason",
            &[normalized.clone().into()],
        )?;
        let n = Spi::get_one_with_args::<i64>(
            &format!(
                "WITH asked AS (
                     INSERT INTO listsync.erasures (binding_id, address)
                     SELECT binding_id, address FROM listsync.members WHERE address = $1
                     ON CONFLICT DO NOTHING RETURNING binding_id, address),
                 marked AS (
                     INSERT INTO listsync.outbox AS o (binding_id, address) SELECT binding_id, address FROM asked
                     {ON_CONFLICT_DIRTY} RETURNING 1)
                 SELECT count(*) FROM marked"
            ),
            &[normalized.into()],
        )?
        .unwrap_or(0);
        crate::wake::request_wake();
        Ok(n)
    })
}

/// Puts dead letters back in the outbox (all of them, or one binding's).
#[pg_extern]
fn retry_dead_letters(binding: default!(Option<i64>, "NULL")) -> i64 {
    retry_dead_letters_impl(binding).or_raise()
}

fn retry_dead_letters_impl(binding: Option<i64>) -> Result<i64> {
    match binding {
        Some(id) => {
            owned_binding(id)?;
        }
        None => privilege::require_admin("retry every dead letter")?,
    }
    AsExtension::run(|| {
        let n = Spi::get_one_with_args::<i64>(
            "WITH retried AS (
                 DELETE FROM listsync.dead_letter_items WHERE $1::bigint IS NULL OR binding_id = $1 RETURNING binding_id, address),
             queued AS (
                 INSERT INTO listsync.outbox AS o (binding_id, address) SELECT binding_id, address FROM retried
                 ON CONFLICT (binding_id, address) DO UPDATE SET generation = o.generation + 1, lease_until = NULL,
                                                             not_before = '-infinity', attempts = 0
                 RETURNING 1)
             SELECT count(*) FROM queued",
            &[binding.into()],
        )?
        .unwrap_or(0);
        crate::wake::request_wake();
        Ok(n)
    })
}

/// The rows a binding's filter matches whose email is NULL or not an address.
#[pg_extern]
fn skipped_rows(
    binding: Option<i64>,
) -> TableIterator<'static, (name!(row_key, JsonB), name!(email, Option<String>))> {
    let binding = required(binding, "binding");
    let row = owned_binding(binding).or_raise();
    let view = binding_view(binding);
    let rows = privilege::as_owner(row.owner, || {
        Spi::connect(|c| -> Result<Vec<(JsonB, Option<String>)>> {
            let key_count: i64 = c
                .select(
                    "SELECT count(*) FROM pg_catalog.pg_attribute WHERE attrelid = $1::regclass AND attname::text LIKE 'key\\_%'",
                    None,
                    &[view.clone().into()],
                )?
                .first()
                .get::<i64>(1)?
                .unwrap_or(0);
            let keys = key_columns(key_count as usize);
            let mut out = Vec::new();
            for r in c.select(
                &format!("SELECT to_jsonb(ARRAY[{}]::text[]), email FROM {view} WHERE address IS NULL ORDER BY {keys}", keys),
                None,
                &[],
            )? {
                out.push((r.get::<JsonB>(1)?.unwrap_or(JsonB(Value::Null)), r.get::<String>(2)?));
            }
            Ok(out)
        })
    })
    .or_raise();
    TableIterator::new(rows)
}

/// Wakes the worker now (after PREPARE TRANSACTION / COMMIT PREPARED, which do not).
#[pg_extern]
fn wake() {
    crate::wake::wake_now();
}
