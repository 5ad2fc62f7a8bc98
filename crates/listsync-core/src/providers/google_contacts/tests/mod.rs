//! The provider's tests, which see the whole module as the one file it once was: `unit` (field
//! names, settings, merging fields onto a contact, Google's errors, the directory), `fake` (the
//! provider against the emulator's stateful fake, the conformance suite included) and
//! `contract` (the provider's requests replayed to Prism on Google's API description).

use super::directory::*;
use super::fields::*;
use super::*;
use std::collections::BTreeMap;

mod contract;
mod fake;
mod unit;
