//! The views that store filters and bindings (see the catalog module): their identity
//! columns, mapped fields, creation, grants, and marking all of a binding's addresses dirty.

use super::*;

pub(super) fn create_filter_view(
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
    let view = filter_view(name);
    create_view(&view, select, table, predicate, replace)?;
    Spi::run(&format!(
        "COMMENT ON VIEW {view} IS {}",
        escape_literal(&format!("pg_listsync filter {name}"))
    ))?;
    grant_view_to(&view, owner)
}

pub(super) fn grant_view_to(view: &str, role: pg_sys::Oid) -> Result<()> {
    if role != pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID) {
        Spi::run(&format!(
            "GRANT SELECT ON {view} TO {}",
            quote_identifier(&privilege::role_name(role))
        ))?;
    }
    Ok(())
}

/// The columns identifying a contact: its email and, optionally, its phone (for providers
/// where a contact may have no email, such as Google Contacts).
pub struct Identity {
    pub email: String,
    pub phone: Option<String>,
}

impl Identity {
    pub(super) fn new(email: &str, phone: Option<&str>) -> Identity {
        Identity {
            email: email.to_string(),
            phone: phone.map(str::to_string),
        }
    }

    /// The identity a binding uses: the phone only where its provider can hold phone-only contacts.
    pub(super) fn for_binding(&self, phone_identity: bool) -> Identity {
        Identity {
            email: self.email.clone(),
            phone: self.phone.clone().filter(|_| phone_identity),
        }
    }
}

/// The identity columns as the filter's view reads them now (it follows column renames).
pub(super) fn current_identity(filter: &str) -> Result<Identity> {
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
pub(super) fn binding_has_phone_identity(binding: i64) -> Result<bool> {
    Ok(ViewRule::of_binding(binding)?.has_column("phone"))
}

/// Each mapped field's SQL: a column of the table, or an expression compiled like a predicate
/// (same rules: no subqueries, no volatile or untrusted functions).
pub(super) fn compile_fields(
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
pub(super) fn binding_fields(binding: i64) -> Result<BTreeMap<String, String>> {
    ViewRule::of_binding(binding)?.fields()
}

pub(super) fn create_binding_view(
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
    create_view(&binding_view(id), select, table, predicate, replace)
}

/// `select` and the table's key columns (`key_1`, ...) of the rows `predicate` matches, read
/// with the reader's rights (security_invoker), so row-level security applies.
fn create_view(
    view: &str,
    mut select: Vec<String>,
    table: &Table,
    predicate: &str,
    replace: bool,
) -> Result<()> {
    select.extend(
        table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} AS key_{}", quote_identifier(k), i + 1)),
    );
    Spi::run(&format!(
        "CREATE {} VIEW {view} WITH (security_invoker = true) AS SELECT {} FROM {} WHERE ({predicate})",
        if replace { "OR REPLACE" } else { "" },
        select.join(", "),
        table.name
    ))?;
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
pub(super) fn mark_skipped_recount(binding: i64) -> Result<()> {
    Spi::run_with_args(
        &format!(
            "INSERT INTO listsync.outbox AS o (binding_id, address) VALUES ($1, '') {ON_CONFLICT_DIRTY}"
        ),
        &[binding.into()],
    )?;
    Ok(())
}

pub(super) fn key_tuple(key: &[String], prefix: &str) -> String {
    key.iter()
        .map(|k| format!("{prefix}{}", quote_identifier(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn key_columns(n: usize) -> String {
    (1..=n)
        .map(|i| format!("key_{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
