//! The admin HTTP API under `/_admin/`, for the standalone process (demo, humans,
//! tests in other languages). Documented in `emulator/README.md`.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::faults::{Fault, ScriptedFault};
use crate::http::{Request, Response};
use crate::provider::{admin_error, opt_bool, opt_str};
use crate::server::{Shared, Slot};

pub(crate) fn handle(shared: &Shared, req: &Request) -> Response {
    let segments = req.segments();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let slot = |name: &str| {
        shared
            .slot(name)
            .ok_or_else(|| admin_error(404, &format!("unknown provider {name:?}")))
    };
    let result = match (req.method.as_str(), segments.as_slice()) {
        ("GET", [] | ["providers"]) => Ok(Response::json(
            200,
            &json!({ "providers": shared.provider_names() }),
        )),
        ("GET", ["state", name]) => {
            slot(name).map(|s| Response::json(200, &s.provider.state_json()))
        }
        ("GET", ["lists", name, list]) => {
            slot(name).map(|s| Response::json(200, &json!(s.provider.list_members(list))))
        }
        ("GET", ["faults", name]) => slot(name).map(|s| Response::json(200, &s.faults.describe())),
        ("POST", ["faults", name]) => slot(name).and_then(|s| configure_faults(s, req)),
        ("GET", ["requests", name]) => slot(name).map(|s| {
            let entries: Vec<Value> = s.log.snapshot().iter().map(|r| r.to_json()).collect();
            Response::json(200, &Value::Array(entries))
        }),
        ("DELETE", ["requests", name]) => slot(name).map(|s| {
            s.log.clear();
            Response::no_content()
        }),
        ("POST", ["reset", name]) => slot(name).map(|s| {
            s.provider.reset();
            s.faults.clear();
            s.log.clear();
            Response::no_content()
        }),
        ("POST", [name, action]) => slot(name).and_then(|s| {
            let body = parse_body(req)?;
            Ok(s.provider.admin(action, &Value::Object(body)))
        }),
        _ => Err(admin_error(
            404,
            &format!("no admin route {} /_admin{}", req.method, req.path),
        )),
    };
    result.unwrap_or_else(|error| error)
}

/// An empty body counts as `{}` so that `curl -X POST` works for argument-less actions.
fn parse_body(req: &Request) -> Result<Map<String, Value>, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match req.json() {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(admin_error(400, "body must be a JSON object")),
        Err(e) => Err(admin_error(400, &e)),
    }
}

/// `POST /_admin/faults/<provider>`: keys are applied in the order clear, down,
/// timeout_default_ms, random, push, so one call can reset and re-arm.
fn configure_faults(slot: &Slot, req: &Request) -> Result<Response, Response> {
    let body = parse_body(req)?;
    let bad = |e: String| admin_error(400, &e);
    let faults = &slot.faults;
    if opt_bool(&body, "clear").map_err(bad)? == Some(true) {
        faults.clear();
    }
    if let Some(down) = opt_bool(&body, "down").map_err(bad)? {
        faults.set_down(down);
    }
    if let Some(ms) = body.get("timeout_default_ms") {
        let ms = ms
            .as_u64()
            .ok_or_else(|| bad("timeout_default_ms must be a non-negative integer".into()))?;
        faults.set_timeout(Duration::from_millis(ms));
    }
    if let Some(random) = body.get("random") {
        let rate = random.get("rate").and_then(Value::as_f64);
        let seed = random.get("seed").map_or(Some(0), Value::as_u64);
        let (Some(rate), Some(seed)) = (rate, seed) else {
            return Err(bad(
                r#"random must look like {"rate": 0.2, "seed": 7}"#.into()
            ));
        };
        faults.set_random(rate, seed);
    }
    if let Some(push) = body.get("push") {
        let items = push
            .as_array()
            .ok_or_else(|| bad("push must be an array".into()))?;
        // Parse all first, so that a bad entry queues nothing.
        let parsed = items
            .iter()
            .map(|item| parse_fault(item, faults.timeout()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        parsed.into_iter().for_each(|f| faults.push(f));
    }
    Ok(Response::json(200, &faults.describe()))
}

/// One `push` entry: `{"status": 429, "retry_after": 1, "body": "..."}`, `{"timeout_ms": 3000}`,
/// `{"timeout": true}`, `{"reset": true}`, `{"malformed": true}`, `{"lost_response": true}`;
/// each may add `"path": "<substring>"` and `"method": "POST"`.
fn parse_fault(item: &Value, default_timeout: Duration) -> Result<ScriptedFault, String> {
    let obj = item
        .as_object()
        .ok_or("each pushed fault must be an object")?;
    let flag = |key: &str| opt_bool(obj, key).map(|b| b == Some(true));
    let fault = if let Some(code) = obj.get("status") {
        let code = code
            .as_u64()
            .filter(|c| (100..=599).contains(c))
            .ok_or("status must be an HTTP status code")?;
        let retry_after = match obj.get("retry_after") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|s| u32::try_from(s).ok())
                    .ok_or("retry_after must be seconds")?,
            ),
        };
        let body = opt_str(obj, "body")?.map(str::to_string);
        Fault::Status {
            code: code as u16,
            retry_after,
            body,
        }
    } else if let Some(ms) = obj.get("timeout_ms") {
        Fault::Timeout(Duration::from_millis(
            ms.as_u64()
                .ok_or("timeout_ms must be a non-negative integer")?,
        ))
    } else if flag("timeout")? {
        Fault::Timeout(default_timeout)
    } else if flag("reset")? {
        Fault::Reset
    } else if flag("malformed")? {
        Fault::MalformedJson
    } else if flag("lost_response")? {
        Fault::LostResponse
    } else {
        return Err(format!("unrecognised fault {item}"));
    };
    let mut scripted = ScriptedFault::from(fault);
    if let Some(path) = opt_str(obj, "path")? {
        scripted = scripted.on_path(path);
    }
    if let Some(method) = opt_str(obj, "method")? {
        scripted = scripted.on_method(method);
    }
    Ok(scripted)
}
