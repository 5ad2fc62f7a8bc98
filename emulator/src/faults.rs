//! Fault injection, shared by every provider.
//!
//! Each provider has one [`Faults`] handle. For every request the server asks it
//! which fault, if any, applies; precedence is: outage (`set_down`) > the first
//! matching scripted fault (consumed) > a random draw (`set_random`).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::provider::lock;

/// How long an injected [`Fault::Timeout`] holds a request when drawn by
/// [`Faults::set_random`] or pushed through the admin API without a duration.
/// Longer than the extension's test-time HTTP timeout, so the client gives up first.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// What the emulator does to one request instead of (or after) serving it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer `code` without applying the request. The body is the provider's usual
    /// error document (Mailchimp: problem+json) unless `body` is given; `retry_after`
    /// adds a `Retry-After: <seconds>` header.
    Status {
        code: u16,
        retry_after: Option<u32>,
        body: Option<String>,
    },
    /// Hold the request for this long, then answer 504 without applying it. Use a
    /// duration longer than the client's timeout to make the client time out.
    Timeout(Duration),
    /// Close the connection with a TCP reset and no response; the request is not applied.
    Reset,
    /// Answer `200 OK` with a truncated JSON body; the request is not applied.
    MalformedJson,
    /// Apply the request, then reset the connection instead of answering: the client
    /// cannot tell that it succeeded (tests idempotent re-delivery).
    LostResponse,
}

impl Fault {
    /// A bare status fault, e.g. `Fault::status(500)`.
    pub fn status(code: u16) -> Fault {
        Fault::Status {
            code,
            retry_after: None,
            body: None,
        }
    }

    /// `429 Too Many Requests`, optionally with `Retry-After` seconds.
    pub fn too_many_requests(retry_after: Option<u32>) -> Fault {
        Fault::Status {
            code: 429,
            retry_after,
            body: None,
        }
    }

    /// Restrict this fault to requests whose path (relative to the provider prefix,
    /// e.g. `/3.0/lists/a1/segments/7`) contains `needle`.
    pub fn on_path(self, needle: impl Into<String>) -> ScriptedFault {
        ScriptedFault::from(self).on_path(needle)
    }

    /// Restrict this fault to requests with this HTTP method.
    pub fn on_method(self, method: &str) -> ScriptedFault {
        ScriptedFault::from(self).on_method(method)
    }

    /// A short label for request logs.
    pub fn label(&self) -> String {
        match self {
            Fault::Status {
                code,
                retry_after: Some(s),
                ..
            } => format!("status {code} retry-after {s}"),
            Fault::Status { code, .. } => format!("status {code}"),
            Fault::Timeout(d) => format!("timeout {} ms", d.as_millis()),
            Fault::Reset => "reset".into(),
            Fault::MalformedJson => "malformed json".into(),
            Fault::LostResponse => "lost response".into(),
        }
    }
}

/// A fault queued with [`Faults::push`], with optional filters.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptedFault {
    pub fault: Fault,
    /// Only requests whose path contains this substring.
    pub path_contains: Option<String>,
    /// Only requests with this method (upper case).
    pub method: Option<String>,
}

impl ScriptedFault {
    pub fn on_path(mut self, needle: impl Into<String>) -> ScriptedFault {
        self.path_contains = Some(needle.into());
        self
    }

    pub fn on_method(mut self, method: &str) -> ScriptedFault {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|needle| path.contains(needle))
    }
}

impl From<Fault> for ScriptedFault {
    fn from(fault: Fault) -> Self {
        ScriptedFault {
            fault,
            path_contains: None,
            method: None,
        }
    }
}

/// The fault controls of one provider. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
}

struct FaultState {
    scripted: VecDeque<ScriptedFault>,
    down: bool,
    random: Option<RandomFaults>,
    timeout: Duration,
}

struct RandomFaults {
    rate: f64,
    rng: SplitMix64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            state: Arc::new(Mutex::new(FaultState {
                scripted: VecDeque::new(),
                down: false,
                random: None,
                timeout: DEFAULT_TIMEOUT,
            })),
        }
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("Faults")
            .field("scripted", &st.scripted)
            .field("down", &st.down)
            .field("random_rate", &st.random.as_ref().map(|r| r.rate))
            .field("timeout", &st.timeout)
            .finish()
    }
}

impl Faults {
    /// Queue a fault. Scripted faults are consumed in FIFO order, each by the first
    /// later request it matches (non-matching requests pass it by).
    pub fn push(&self, fault: impl Into<ScriptedFault>) {
        lock(&self.state).scripted.push_back(fault.into());
    }

    /// Outage mode: while `true`, every request is answered 503 (nothing is applied).
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    pub fn is_down(&self) -> bool {
        lock(&self.state).down
    }

    /// Make each request fail independently with probability `rate` (0.0..=1.0), with
    /// a fault drawn uniformly from: 429 with `Retry-After: 1`, 429 without it, 500,
    /// 503, timeout (see [`Faults::set_timeout`]), connection reset, malformed JSON.
    /// The same seed gives the same sequence of decisions. A rate of 0 disables it.
    pub fn set_random(&self, rate: f64, seed: u64) {
        let rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        lock(&self.state).random = (rate > 0.0).then_some(RandomFaults {
            rate,
            rng: SplitMix64(seed),
        });
    }

    /// How long random timeouts hold a request (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&self, duration: Duration) {
        lock(&self.state).timeout = duration;
    }

    pub fn timeout(&self) -> Duration {
        lock(&self.state).timeout
    }

    /// Number of scripted faults not yet consumed.
    pub fn pending(&self) -> usize {
        lock(&self.state).scripted.len()
    }

    /// Remove scripted faults, end the outage and stop random faults.
    pub fn clear(&self) {
        let mut st = lock(&self.state);
        st.scripted.clear();
        st.down = false;
        st.random = None;
    }

    /// A JSON summary for the admin API.
    pub(crate) fn describe(&self) -> serde_json::Value {
        let st = lock(&self.state);
        serde_json::json!({
            "down": st.down,
            "pending": st.scripted.iter().map(|s| s.fault.label()).collect::<Vec<_>>(),
            "random_rate": st.random.as_ref().map(|r| r.rate),
            "timeout_ms": st.timeout.as_millis() as u64,
        })
    }

    /// The fault to inject into this request, if any (consumes scripted faults).
    pub(crate) fn next(&self, method: &str, path: &str) -> Option<Fault> {
        let mut st = lock(&self.state);
        if st.down {
            return Some(Fault::status(503));
        }
        if let Some(pos) = st.scripted.iter().position(|s| s.matches(method, path)) {
            return st.scripted.remove(pos).map(|s| s.fault);
        }
        let timeout = st.timeout;
        let random = st.random.as_mut()?;
        if random.rng.next_f64() >= random.rate {
            return None;
        }
        Some(match random.rng.next_u64() % 7 {
            0 => Fault::too_many_requests(Some(1)),
            1 => Fault::too_many_requests(None),
            2 => Fault::status(500),
            3 => Fault::status(503),
            4 => Fault::Timeout(timeout),
            5 => Fault::Reset,
            _ => Fault::MalformedJson,
        })
    }
}

/// A tiny deterministic PRNG (SplitMix64): reproducible fault sequences without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_faults_are_fifo_and_filtered() {
        let f = Faults::default();
        f.push(Fault::status(500).on_path("/segments"));
        f.push(Fault::Reset);
        assert_eq!(f.next("GET", "/3.0/ping"), Some(Fault::Reset));
        assert_eq!(f.next("GET", "/3.0/ping"), None);
        assert_eq!(
            f.next("POST", "/3.0/lists/a/segments/1"),
            Some(Fault::status(500))
        );
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn down_wins_and_clear_resets() {
        let f = Faults::default();
        f.push(Fault::Reset);
        f.set_down(true);
        assert_eq!(f.next("GET", "/"), Some(Fault::status(503)));
        f.clear();
        assert_eq!(f.next("GET", "/"), None);
    }

    #[test]
    fn random_faults_are_reproducible() {
        let draw = |seed| {
            let f = Faults::default();
            f.set_random(0.5, seed);
            (0..200).map(|_| f.next("GET", "/")).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        let failures = a.iter().filter(|x| x.is_some()).count();
        assert!(
            (60..140).contains(&failures),
            "{failures} failures of 200 at rate 0.5"
        );
    }
}
