//! Connections as the worker serves them: loading one with its secrets, the HTTP settings,
//! `test_connection`, and provider errors with credentials scrubbed.

use crate::error::{Error, Kind, Result};
use crate::guc;
use listsync_core::http::{Http, HttpConfig, ProviderError};
use listsync_core::providers;
use listsync_core::redact::Redactor;
use pgrx::JsonB;
use pgrx::prelude::*;
use serde_json::Value;

/// A provider account as the worker needs it.
#[derive(Debug, Clone)]
pub struct Connection {
    pub id: i64,
    pub name: String,
    pub provider: String,
    pub settings: Value,
    pub secrets: Value,
}

impl Connection {
    /// Changes when the configuration changes; a provider built from an older one is rebuilt.
    pub(super) fn fingerprint(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}",
            self.provider, self.settings, self.secrets
        )
    }
}

pub(super) fn http_config() -> HttpConfig {
    HttpConfig {
        timeout: guc::ms(&guc::HTTP_TIMEOUT_MS),
        allowed_insecure_hosts: guc::allowed_insecure_hosts(),
    }
}

pub fn load_connection_by_name(name: &str) -> Result<Connection> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT c.id, c.name, c.provider, c.settings, s.secrets FROM listsync.connections c
               JOIN listsync.connection_secrets s ON s.connection_id = c.id WHERE c.name = $1",
            None,
            &[name.into()],
        )?;
        if rows.is_empty() {
            return Err(Error::not_found("connection", name));
        }
        let row = rows.first();
        Ok(Connection {
            id: row.get(1)?.unwrap_or_default(),
            name: row.get(2)?.unwrap_or_default(),
            provider: row.get(3)?.unwrap_or_default(),
            settings: row.get::<JsonB>(4)?.map(|j| j.0).unwrap_or_default(),
            secrets: row.get::<JsonB>(5)?.map(|j| j.0).unwrap_or_default(),
        })
    })
}

/// `listsync.test_connection`: one cheap authenticated call, in the caller's backend.
pub fn check_connection(connection: &Connection) -> Result<Value> {
    let mut provider = providers::connect(
        &connection.provider,
        &connection.settings,
        &connection.secrets,
    )
    .map_err(|e| Error::invalid(format!("connection \"{}\": {e}", connection.name)))?;
    let mut http = Http::new(http_config(), None);
    let result = provider.check(&mut http);
    let redactor = Redactor::new(&connection.secrets, http.credentials_sent());
    match result {
        Ok(mut answer) => {
            redactor.redact_json(&mut answer);
            Ok(answer)
        }
        Err(e) => Err(provider_error(&connection.name, e, &redactor)),
    }
}

pub(super) fn provider_error(connection: &str, error: ProviderError, redactor: &Redactor) -> Error {
    let kind = match error {
        ProviderError::Transient { .. } => Kind::ProviderUnavailable,
        _ => Kind::ProviderRejected,
    };
    Error::new(
        kind,
        format!(
            "connection \"{connection}\": {}",
            redactor.redact(&error.to_string())
        ),
    )
}
