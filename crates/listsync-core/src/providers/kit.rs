//! Plumbing every provider shares, so that a provider's file holds only its API's facts.

use super::Binding;
use crate::http::{Http, ProviderError, Request, Response, Result, transient};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The strings of a JSON array; a missing or non-array value has none, and non-string items
/// are skipped.
pub fn strings(array: &Value) -> impl Iterator<Item = &str> {
    array
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// The id `prepare` stored for the binding's list; `list` names the provider's kind of list
/// in the error (a delivery can reach a binding whose `prepare` has not run yet).
pub fn list_id<'a>(binding: &'a Binding, list: &str) -> Result<&'a str> {
    binding
        .list_id
        .as_deref()
        .ok_or_else(|| not_prepared(binding, list))
}

/// [`list_id`] for providers whose list ids are numbers; an id that is not one is treated as
/// missing, since only `prepare` writes it.
pub fn numeric_list_id<T: FromStr>(binding: &Binding, list: &str) -> Result<T> {
    binding
        .list_id
        .as_deref()
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| not_prepared(binding, list))
}

fn not_prepared(binding: &Binding, list: &str) -> ProviderError {
    ProviderError::Binding(format!("binding {} has no {list} yet", binding.id))
}

/// A provider's lists as `prepare` sees them: looked up by id or by name, or created.
pub trait ListDirectory {
    /// What the provider calls a list ("group", "mailing list", ...), for error messages.
    const KIND: &'static str;
    /// The provider's name as its users know it, for error messages.
    const PROVIDER: &'static str;

    /// The list's id as the provider spells it, or `None` when there is no such list.
    fn list_by_id(&mut self, http: &mut Http, id: &str) -> Result<Option<String>>;

    /// The id of the list named exactly `name`, if there is one.
    fn list_by_name(&mut self, http: &mut Http, name: &str) -> Result<Option<String>>;

    /// Creates a list named `name` and returns its id.
    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String>;

    /// The id of the list named `name`, created when there is none.
    fn find_or_create(&mut self, http: &mut Http, name: &str) -> Result<String> {
        match self.list_by_name(http, name)? {
            Some(id) => Ok(id),
            None => self.create_list(http, name),
        }
    }
}

/// The error for a list id the provider does not know.
pub fn list_missing<D: ListDirectory>(id: &str) -> ProviderError {
    ProviderError::Binding(format!(
        "{} {id} does not exist at {}",
        D::KIND,
        D::PROVIDER
    ))
}

/// The id of the binding's list: `binding.list_id` once checked, else the list named
/// `binding.list_name`, found or created (a given id that is not found is an error, never a
/// new list).
pub fn resolve_list<D: ListDirectory>(
    http: &mut Http,
    lists: &mut D,
    binding: &Binding,
) -> Result<String> {
    match &binding.list_id {
        Some(id) => lists
            .list_by_id(http, id)?
            .ok_or_else(|| list_missing::<D>(id)),
        None => lists.find_or_create(http, &binding.list_name),
    }
}

/// Fails unless every mapped field in `wanted` is `known` to the provider, naming the first
/// missing one and the known ones, so the user can fix the mapping from the message alone.
pub fn require_fields<'a>(
    provider: &str,
    wanted: &[String],
    known: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let known: BTreeSet<&str> = known.into_iter().collect();
    match wanted.iter().find(|f| !known.contains(f.as_str())) {
        Some(missing) => Err(unknown_field(provider, missing, known)),
        None => Ok(()),
    }
}

/// The error for a mapped field the provider does not have, listing the ones it has (sorted).
pub fn unknown_field<'a>(
    provider: &str,
    field: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> ProviderError {
    let known: BTreeSet<&str> = known.into_iter().collect();
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.into_iter().collect::<Vec<_>>().join(", ")
    };
    ProviderError::Binding(format!(
        "field {field} does not exist at {provider} (fields: {known})"
    ))
}

/// A mapped field's value as the text providers store: a string as it is, a number or boolean
/// as written in JSON; `None` for NULL.
pub fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A number that APIs write as a JSON number or as a numeric string, depending on the endpoint.
pub fn numeric<T: FromStr>(value: &Value) -> Option<T> {
    match value {
        Value::Number(n) => n.to_string().parse().ok(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A member's mapped fields, each converted as the provider's type for it asks; `types` maps
/// field names to those types, as `prepare` kept them.
pub fn typed_fields(
    fields: &Map<String, Value>,
    types: Option<&Map<String, Value>>,
    convert: fn(&Value, Option<&str>) -> Value,
) -> Map<String, Value> {
    fields
        .iter()
        .map(|(name, value)| {
            let kind = types.and_then(|t| t.get(name)).and_then(Value::as_str);
            (name.clone(), convert(value, kind))
        })
        .collect()
}

/// Renew an OAuth access token this long before it expires. Google renewed a minute early,
/// SendPulse five minutes (its PHP SDK's margin); the larger one wins because a call may wait
/// behind the rate limiter and the engine's backoff for minutes after it took the token, and
/// renewing early costs one extra token exchange an hour at most.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// A token endpoint's answer: the access token and how long it lives.
pub struct IssuedToken {
    pub value: String,
    pub lifetime: Duration,
}

impl IssuedToken {
    /// The token of a successful OAuth token answer (`access_token`, `expires_in`), living
    /// `default_lifetime` when the answer does not say; an answer without one is transient.
    pub fn from_answer(
        response: &Response,
        default_lifetime: Duration,
        missing: &str,
    ) -> Result<IssuedToken> {
        let body = response.json()?;
        let value = body["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| transient(missing))?;
        Ok(IssuedToken {
            value: value.to_string(),
            lifetime: body["expires_in"]
                .as_u64()
                .map_or(default_lifetime, Duration::from_secs),
        })
    }
}

/// An OAuth access token, reused until shortly before it expires.
#[derive(Default)]
pub struct BearerToken {
    cached: Option<(String, Instant)>,
}

impl BearerToken {
    fn value(
        &mut self,
        http: &mut Http,
        issue: &mut impl FnMut(&mut Http) -> Result<IssuedToken>,
    ) -> Result<String> {
        if let Some((value, renew_at)) = &self.cached
            && Instant::now() < *renew_at
        {
            return Ok(value.clone());
        }
        self.cached = None;
        let issued = issue(http)?;
        let renew_at = Instant::now() + issued.lifetime.saturating_sub(RENEW_BEFORE);
        self.cached = Some((issued.value.clone(), renew_at));
        Ok(issued.value)
    }

    /// Sends with the token; a 401 (a token revoked, or expired early) gets one new token and
    /// one retry.
    pub fn send(
        &mut self,
        http: &mut Http,
        operation: &str,
        request: Request,
        mut issue: impl FnMut(&mut Http) -> Result<IssuedToken>,
    ) -> Result<Response> {
        let token = self.value(http, &mut issue)?;
        let response = http.send(
            operation,
            request
                .clone()
                .header("authorization", format!("Bearer {token}")),
        )?;
        if response.status != 401 {
            return Ok(response);
        }
        self.cached = None;
        let token = self.value(http, &mut issue)?;
        http.send(
            operation,
            request.header("authorization", format!("Bearer {token}")),
        )
    }
}
