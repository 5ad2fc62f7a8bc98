//! Filters: saved predicates over a table, stored as views, and the functions they may call.

use super::rows::*;
use super::views::*;
use super::*;

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
            crate::filter::revalidate::invalidate_bound_tables()?;
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
            crate::filter::revalidate::check_binding(binding, owner)?;
            // Members recorded under the old predicate and rows matching the new one are all dirty.
            let marked = mark_binding_dirty(binding, owner)?;
            notice!(
                "binding {binding}: {marked} addresses marked to follow the new definition of filter \"{name}\""
            );
        }
        triggers::sync_triggers(filter.source)?;
        Ok(())
    })
}

/// Renames a filter; its bindings, their members and pending changes stay as they are.
#[pg_extern]
fn rename_filter(name: Option<&str>, new_name: Option<&str>) {
    rename_filter_impl(required(name, "name"), required(new_name, "new_name")).or_raise()
}

fn rename_filter_impl(name: &str, new_name: &str) -> Result<()> {
    let filter = AsExtension::run(|| load_filter(name))?;
    require_owner(&format!("filter \"{name}\""), filter.owner)?;
    check_name("filter", new_name, MAX_FILTER_NAME_BYTES)?;
    AsExtension::run(|| {
        if load_filter(new_name).is_ok() {
            return Err(Error::new(
                Kind::DuplicateObject,
                format!("cannot rename filter \"{name}\": filter \"{new_name}\" already exists"),
            ));
        }
        Spi::run(&format!(
            "ALTER VIEW {} RENAME TO {}",
            filter_view(name),
            quote_identifier(&format!("filter:{new_name}"))
        ))?;
        Spi::run_with_args(
            "UPDATE listsync.filters SET name = $2, updated_at = now() WHERE id = $1",
            &[filter.id.into(), new_name.into()],
        )?;
        Spi::run_with_args(
            "UPDATE listsync.bindings SET filter_name = $2 WHERE filter_id = $1",
            &[filter.id.into(), new_name.into()],
        )?;
        // Capture states name the filter's view: every backend builds them again.
        // SAFETY: queues a relcache invalidation of the table, delivered at commit.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(filter.source) };
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
            notice!(
                "binding {binding} is now inactive: its pending changes are dropped and nothing is removed at the provider"
            );
        }
        Spi::run(&format!("DROP VIEW IF EXISTS {}", filter_view(name)))?;
        Spi::run_with_args(
            "DELETE FROM listsync.filters WHERE id = $1",
            &[filter.id.into()],
        )?;
        triggers::sync_triggers(filter.source)?;
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
    let table_name = relation_name(filter.source)?;
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

fn bindings_of_filter(filter_id: i64) -> Result<Vec<i64>> {
    Ok(Spi::get_one_with_args::<Vec<i64>>(
        "SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM listsync.bindings WHERE filter_id = $1 AND state <> 'inactive'",
        &[filter_id.into()],
    )?
    .unwrap_or_default())
}
