//! The trait every emulated provider implements, plus small helpers they share.
//!
//! Adding a provider: write `src/<name>.rs` with a type implementing [`Provider`],
//! and list it in `builtin_providers()` in `lib.rs` (plus a typed accessor on
//! `Emulator` if tests need its state). Routing under `/<name>/`, fault injection,
//! the request log and the generic admin endpoints then work without further code.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::http::{Request, Response, reason_phrase};

pub(crate) trait Provider: Any + Send + Sync {
    /// The path prefix: the provider serves `/<name>/...`.
    fn name(&self) -> &'static str;

    /// Serves one request. `req.path` is relative to the prefix (`/3.0/ping`).
    /// Must not panic on any client input (a panic becomes a 500, but is a bug).
    fn handle(&self, req: &Request) -> Response;

    /// The whole state as JSON, for `GET /_admin/state/<name>`.
    fn state_json(&self) -> Value;

    /// A provider-specific admin action: `POST /_admin/<name>/<action>` with a JSON body.
    fn admin(&self, action: &str, _body: &Value) -> Response {
        admin_error(
            404,
            &format!("{} has no admin action {action:?}", self.name()),
        )
    }

    /// Forget all state (accounts, lists, members, settings) as if freshly started.
    fn reset(&self);

    /// Who is in the list the extension knows by `list_id` (the id it stored for a binding),
    /// as lower-cased address -> fields: the uniform view convergence tests compare with the
    /// filter's rows. Only members that would receive mail (subscribed or pending) count.
    fn list_members(&self, list_id: &str) -> BTreeMap<String, Map<String, Value>>;

    /// The error document this provider sends with `status`, used for injected
    /// status faults and outages. The default is a plain JSON object.
    fn error_response(&self, status: u16, detail: &str) -> Response {
        Response::json(
            status,
            &json!({ "error": reason_phrase(status), "message": detail, "status": status }),
        )
    }
}

/// Locks a mutex, ignoring poisoning: a panicking handler must not take the
/// whole emulator down with it, and every state mutation here is small enough
/// to leave the data consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A JSON error for the admin API.
pub(crate) fn admin_error(status: u16, message: &str) -> Response {
    Response::json(status, &json!({ "error": message }))
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An optional string field: absent and `null` are `None`, other types are an error.
pub(crate) fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key} must be a string, not {}", type_name(other))),
    }
}

/// A required string field.
pub(crate) fn req_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    opt_str(obj, key)?.ok_or_else(|| format!("{key} is required"))
}

/// An optional boolean field.
pub(crate) fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!("{key} must be a boolean, not {}", type_name(other))),
    }
}

/// The JSON type name, for error messages ("Schema describes string, array found instead").
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `count`/`offset` query parameters with the provider's default and maximum page size.
pub(crate) fn page(
    req: &Request,
    default_count: usize,
    max_count: usize,
) -> Result<(usize, usize), String> {
    let parse = |name: &str, default: usize| match req.query_param(name) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| format!("{name} must be a non-negative integer")),
    };
    let count = parse("count", default_count)?;
    if count > max_count {
        return Err(format!("count must be at most {max_count}"));
    }
    Ok((count, parse("offset", 0)?))
}
