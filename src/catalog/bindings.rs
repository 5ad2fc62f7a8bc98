//! Bindings: a filter delivered to a list at a connection, its backfill, state and resync.

use super::rows::*;
use super::views::*;
use super::*;
use listsync_core::providers::{MemberStatus, OnLeave};

/// Every member carries every tag of its binding, in every call: bounded, so that one binding
/// cannot make requests of unbounded size.
const MAX_TAGS: usize = 50;
const MAX_TAG_CHARS: usize = 100;

// The SQL signature is the public contract: named arguments with defaults, one per option.
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
    let id = bind_impl(request).or_raise();
    crate::serving::warn_if_unserved("bind_filter_to_list");
    id
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
    check_delivery_options(&provider, r.on_leave, r.new_member_status, &r.tags)?;
    let capabilities = providers::capabilities(&provider)
        .ok_or_else(|| Error::internal(format!("unknown provider {provider}")))?;
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
        // From the first binding on, the catalog knows where it delivers from.
        crate::instance::record_here(false)?;
        create_binding_view(id, &table, &identity, &predicate, &fields, false)?;
        crate::filter::revalidate::check_binding(id, owner)?;
        grant_view_to(&binding_view(id), owner)?;
        triggers::sync_triggers(filter.source)?;
        if r.backfill {
            let marked = mark_binding_dirty(id, owner)?;
            notice!(
                "binding {id}: filter \"{}\" bound to connection \"{}\"; {marked} matching addresses marked for the backfill",
                r.filter,
                r.connection
            );
        } else {
            mark_skipped_recount(id)?;
            notice!(
                "binding {id}: filter \"{}\" bound to connection \"{}\" without a backfill; rows matching now are sent when they next change",
                r.filter,
                r.connection
            );
        }
        crate::wake::request_wake();
        Ok(id)
    })
}

/// Changes a binding in place: its members and pending changes stay. New `fields` are compared
/// member by member, so only members whose mapped values differ are sent again; new `tags` send
/// every member again (tags go with each member); `on_leave` and `new_member_status` apply to
/// the next leave and the next add. NULL keeps a setting as it is.
#[pg_extern]
fn alter_binding(
    id: Option<i64>,
    fields: default!(Option<Jsonb>, "NULL"),
    tags: default!(Option<Vec<Option<String>>>, "NULL"),
    on_leave: default!(Option<&str>, "NULL"),
    new_member_status: default!(Option<&str>, "NULL"),
) {
    let id = required(id, "id");
    let fields = json_argument(fields, "fields").or_raise();
    let tags: Option<Vec<String>> =
        tags.map(|tags| tags.into_iter().map(|t| required(t, "a tag")).collect());
    alter_binding_impl(id, fields, tags, on_leave, new_member_status).or_raise()
}

fn alter_binding_impl(
    id: i64,
    fields: Option<Value>,
    tags: Option<Vec<String>>,
    on_leave: Option<&str>,
    new_member_status: Option<&str>,
) -> Result<()> {
    let binding = owned_binding(id)?;
    let source = match (binding.state.as_str(), binding.source) {
        ("inactive", _) | (_, None) => {
            return Err(Error::new(
                Kind::ObjectNotInPrerequisiteState,
                format!("binding {id} is inactive and cannot be altered"),
            )
            .with_hint("Its filter or table is gone; unbind it and bind a new filter."));
        }
        (_, Some(source)) => source,
    };
    type Current = (String, String, String, Vec<String>, String, String);
    let (filter, provider, connection, current_tags, current_on_leave, current_status): Current =
        AsExtension::run(|| {
            Spi::connect(|c| -> Result<Current> {
                let row = c
                    .select(
                        "SELECT b.filter_name, c.provider, c.name, b.tags, b.on_leave, b.new_member_status
                           FROM listsync.bindings b JOIN listsync.connections c ON c.id = b.connection_id
                          WHERE b.id = $1",
                        None,
                        &[id.into()],
                    )?
                    .first();
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?.unwrap_or_default(),
                    row.get::<Vec<String>>(4)?.unwrap_or_default(),
                    row.get::<String>(5)?.unwrap_or_default(),
                    row.get::<String>(6)?.unwrap_or_default(),
                ))
            })
        })?;
    let new_tags = tags.clone().unwrap_or_else(|| current_tags.clone());
    let on_leave = on_leave.unwrap_or(&current_on_leave);
    let new_member_status = new_member_status.unwrap_or(&current_status);
    check_delivery_options(&provider, on_leave, new_member_status, &new_tags)?;
    let table = Table::load(source)?;
    let compiled = fields
        .as_ref()
        .map(|f| compile_fields(&filter, &table, &provider, f, binding.owner))
        .transpose()?;
    let predicate = filter_predicate(&filter)?;
    AsExtension::run(|| {
        Spi::run_with_args(
            "UPDATE listsync.bindings SET fields = coalesce($2, fields), tags = $3, on_leave = $4, new_member_status = $5
              WHERE id = $1",
            &[
                id.into(),
                fields.clone().map(JsonB).into(),
                new_tags.clone().into(),
                on_leave.into(),
                new_member_status.into(),
            ],
        )?;
        let mut said = Vec::new();
        if let Some(compiled) = &compiled {
            let phone = binding_has_phone_identity(id)?;
            let identity = current_identity(&filter)?.for_binding(phone);
            create_binding_view(id, &table, &identity, &predicate, compiled, true)?;
            crate::filter::revalidate::check_binding(id, binding.owner)?;
            triggers::sync_triggers(source)?;
        }
        let tags_changed = tags.is_some_and(|t| t != current_tags);
        if tags_changed {
            // Tags go with each member: every member is sent again.
            Spi::run_with_args(
                "UPDATE listsync.members SET verified = false WHERE binding_id = $1",
                &[id.into()],
            )?;
        }
        if compiled.is_some() || tags_changed {
            let marked = mark_binding_dirty(id, binding.owner)?;
            said.push(if tags_changed {
                format!("{marked} addresses marked and every member sent again with the new tags")
            } else {
                format!("{marked} addresses marked; only members whose mapped fields differ are sent again")
            });
            crate::wake::request_wake();
        }
        if on_leave != current_on_leave || new_member_status != current_status {
            said.push(format!(
                "on_leave '{on_leave}' and new_member_status '{new_member_status}' apply from the next change; nothing already at {connection} is changed for them"
            ));
        }
        if said.is_empty() {
            said.push("nothing changed".into());
        }
        notice!("binding {id}: {}", said.join("; "));
        Ok(())
    })
}

/// What bind_filter_to_list and alter_binding check of a binding's delivery options against
/// its provider, without a network call.
fn check_delivery_options(
    provider: &str,
    on_leave: &str,
    new_member_status: &str,
    tags: &[String],
) -> Result<()> {
    if OnLeave::parse(on_leave).is_none() {
        return Err(
            Error::invalid(format!("invalid on_leave \"{}\"", on_leave)).with_hint(format!(
                "on_leave is one of {}.",
                OnLeave::ALL.map(OnLeave::as_str).join(", ")
            )),
        );
    }
    let Some(status) = MemberStatus::parse(new_member_status) else {
        return Err(Error::invalid(format!(
            "invalid new_member_status \"{}\"",
            new_member_status
        ))
        .with_hint(format!(
            "new_member_status is one of {} (pending: double opt-in).",
            MemberStatus::ALL.map(MemberStatus::as_str).join(", ")
        )));
    };
    let capabilities = providers::capabilities(provider)
        .ok_or_else(|| Error::internal(format!("unknown provider {provider}")))?;
    if !capabilities.on_leave.contains(&on_leave) {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            format!("provider {provider} cannot do on_leave => '{}'", on_leave),
        )
        .with_hint(format!(
            "{provider} supports on_leave {}.",
            capabilities.on_leave.join(", ")
        )));
    }
    if status == MemberStatus::Pending && !capabilities.double_opt_in {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            format!("provider {provider} has no double opt-in (new_member_status => 'pending')"),
        ));
    }
    if !tags.is_empty() && !capabilities.tags {
        return Err(Error::new(
            Kind::FeatureNotSupported,
            format!("provider {provider} has no tags"),
        )
        .with_hint("Leave tags empty; the list itself is the grouping at this provider."));
    }
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(format!(
            "a binding has at most {MAX_TAGS} tags, not {}",
            tags.len()
        ))
        .with_hint(
            "Every member delivered carries every tag of its binding; group with the list instead.",
        ));
    }
    if let Some(tag) = tags
        .iter()
        .find(|t| t.trim().is_empty() || t.chars().count() > MAX_TAG_CHARS)
    {
        return Err(Error::invalid(format!("invalid tag \"{tag}\""))
            .with_hint(format!("Tags are 1 to {MAX_TAG_CHARS} characters.")));
    }
    Ok(())
}

/// The predicate as the filter's view holds it now (it follows column renames).
fn filter_predicate(name: &str) -> Result<String> {
    AsExtension::run(|| {
        let view = view_oid(&filter_view(name))?
            .ok_or_else(|| Error::internal(format!("the view of filter \"{name}\" is missing")))?;
        crate::filter::view::predicate_sql(view)
    })
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
            crate::filter::revalidate::check_binding(id, binding.owner).map_err(|e| {
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
        if state == "active" {
            notice!(
                "binding {id} is active: what was recorded while it was paused is delivered now"
            );
        } else {
            notice!(
                "binding {id} is paused: changes are still recorded, and delivered on resume_binding"
            );
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
        let members = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM listsync.members WHERE binding_id = $1",
            &[id.into()],
        )?
        .unwrap_or(0);
        let pending = Spi::get_one_with_args::<i64>(
            "WITH dropped AS (DELETE FROM listsync.outbox WHERE binding_id = $1 RETURNING 1)
             SELECT count(*) FROM dropped",
            &[id.into()],
        )?
        .unwrap_or(0);
        notice!(
            "binding {id} unbound: {members} recorded members forgotten and {pending} pending changes dropped; nothing is removed at the provider"
        );
        Spi::run_with_args("DELETE FROM listsync.bindings WHERE id = $1", &[id.into()])?;
        if let Some(source) = binding.source {
            triggers::sync_triggers(source)?;
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
        notice!("binding {id}: {marked} addresses marked to be compared with the provider");
        crate::wake::request_wake();
        Ok(marked)
    })
}

/// Why `address` is or is not in the binding's list, and what the worker would do with it now.
#[pg_extern]
fn explain(binding: Option<i64>, address: Option<&str>) -> JsonB {
    let binding = required(binding, "binding");
    owned_binding(binding).or_raise();
    JsonB(crate::delivery::explain(binding, required(address, "address")).or_raise())
}

/// What the worker would send for the binding now, without sending anything: for every pair
/// (or for `only_address`; `address` names the result column), at most `max_rows` rows.
#[pg_extern]
fn dry_run(
    id: Option<i64>,
    only_address: default!(Option<&str>, "NULL"),
    max_rows: default!(Option<i32>, "NULL"),
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
    if max_rows.is_some_and(|n| n < 0) {
        Error::invalid("max_rows must not be negative").raise();
    }
    let plan = crate::delivery::dry_run(id, only_address).or_raise();
    let limit = max_rows.map_or(usize::MAX, |n| n as usize);
    TableIterator::new(
        plan.into_iter()
            .take(limit)
            .map(|op| (op.address, op.operation, op.fields.map(JsonB), op.reason)),
    )
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
