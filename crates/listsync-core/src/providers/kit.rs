//! Plumbing every provider shares, so that a provider's file holds only its API's facts.

use super::Binding;
use crate::http::{ProviderError, Result};
use std::str::FromStr;

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
