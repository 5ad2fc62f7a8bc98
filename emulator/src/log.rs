//! The per-provider request log that tests and the admin API inspect.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::provider::lock;

/// By default the log keeps this many most recent requests per provider, so a long
/// benchmark run does not grow the emulator's memory without bound.
pub const DEFAULT_LOG_LIMIT: usize = 1000;

/// One request a provider received, with what the client saw.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    pub method: String,
    /// Relative to the provider prefix, e.g. `/3.0/lists/a1`.
    pub path: String,
    /// Raw query string without `?`.
    pub query: String,
    /// The request body (lossy UTF-8).
    pub body: String,
    /// The status sent to the client; 0 when the connection was reset without a response.
    pub status: u16,
    /// The injected fault, if any (see [`crate::Fault::label`]).
    pub fault: Option<String>,
}

impl LoggedRequest {
    /// The body parsed as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "method": self.method, "path": self.path, "query": self.query,
            "body": self.json_or_text(), "status": self.status, "fault": self.fault,
        })
    }

    fn json_or_text(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }
}

#[derive(Default)]
pub(crate) struct RequestLog {
    entries: Mutex<VecDeque<LoggedRequest>>,
}

impl RequestLog {
    pub(crate) fn push(&self, entry: LoggedRequest, limit: usize) {
        let mut entries = lock(&self.entries);
        entries.push_back(entry);
        while entries.len() > limit {
            entries.pop_front();
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<LoggedRequest> {
        lock(&self.entries).iter().cloned().collect()
    }

    pub(crate) fn clear(&self) {
        lock(&self.entries).clear();
    }
}
