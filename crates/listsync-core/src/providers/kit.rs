//! Plumbing every provider shares, so that a provider's file holds only its API's facts.

use super::Binding;
use crate::http::{Http, ProviderError, Request, Response, Result};
use std::str::FromStr;
use std::time::{Duration, Instant};

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
