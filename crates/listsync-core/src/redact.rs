//! Scrubbing of provider-originated text (error bodies, per-item messages, transport errors)
//! before the worker stores it or a function raises it: providers echo what they were sent,
//! API keys and `Authorization` headers included, and everything stored here is readable by
//! every role (`listsync.deliveries`, `listsync.status`, `listsync.dead_letters`).
//!
//! Plain Rust, no PostgreSQL: delivery threads scrub before handing results to the worker.

use crate::http::percent_encode;
use serde_json::Value;

pub const REDACTED: &str = "[redacted]";

/// Shorter values occur by chance too often to be scrubbed, and no provider issues keys that
/// short.
const MIN_SECRET: usize = 4;

/// A token after `Bearer ` or `Basic ` that is not a known secret is scrubbed only if it looks
/// like one: long enough and not a plain word, so that "Basic authentication failed" survives.
const MIN_SCHEME_TOKEN: usize = 8;

/// Names after which (with `:` or `=`) a credential follows, in headers, JSON and forms.
const LABELS: &[&str] = &[
    "authorization",
    "api-key",
    "api_key",
    "apikey",
    "access_token",
    "refresh_token",
    "client_secret",
];

/// Authentication schemes that precede a credential without a separator.
const SCHEMES: &[&str] = &["bearer", "basic"];

/// The credentials of one connection, in every form a request may have carried them.
pub struct Redactor {
    /// Longest first, so that a value containing another is replaced whole.
    values: Vec<String>,
}

impl Redactor {
    /// `secrets` is the connection's secrets document; `sent` are credentials the HTTP client
    /// put in headers, which include forms derived at runtime (a Basic `user:key` in base64,
    /// an OAuth access token).
    pub fn new<'a>(secrets: &Value, sent: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut values = Vec::new();
        collect_strings(secrets, &mut values);
        for header in sent {
            values.push(header.to_string());
            // The credential after the scheme name ("Bearer <token>").
            if let Some((_, credential)) = header.split_once(char::is_whitespace) {
                values.push(credential.trim().to_string());
            }
        }
        let mut forms = Vec::new();
        for value in values {
            // As a form body or a query string carries it, and as a JSON echo escapes it.
            forms.push(percent_encode(&value));
            if let Ok(json) = serde_json::to_string(&value) {
                forms.push(json[1..json.len() - 1].to_string());
            }
            forms.push(value);
        }
        forms.retain(|v| v.chars().count() >= MIN_SECRET);
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Redactor { values: forms }
    }

    /// `text` with every credential replaced by `[redacted]`: the connection's secrets and
    /// their encoded forms; the start of one cut off where an excerpt was truncated; and
    /// whatever follows an `Authorization:`-like label or a `Bearer`/`Basic` scheme.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), REDACTED);
            }
        }
        let out = self.cut_prefixes(&out);
        redact_labelled(&out)
    }

    /// Every string inside `value`, scrubbed.
    pub fn redact_json(&self, value: &mut Value) {
        match value {
            Value::String(s) => *s = self.redact(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.redact_json(v)),
            _ => {}
        }
    }

    /// Excerpts of response bodies are cut at a length, possibly inside a secret: the part
    /// before the cut (ending the text or followed by `…`) is scrubbed too.
    fn cut_prefixes(&self, text: &str) -> String {
        let mut cuts: Vec<usize> = text.match_indices('…').map(|(i, _)| i).collect();
        cuts.push(text.len());
        let mut out = String::with_capacity(text.len());
        let mut from = 0;
        for cut in cuts {
            let before = &text[from..cut];
            // Only where a word starts: a text ending in "Bear" was not cut inside a token.
            let starts_word = |k: usize| {
                before[..before.len() - k]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !c.is_alphanumeric())
            };
            let longest = self
                .values
                .iter()
                .filter(|value| !value.contains(char::is_whitespace))
                .filter_map(|value| {
                    (MIN_SECRET..value.len())
                        .rev()
                        .filter(|k| value.is_char_boundary(*k))
                        .find(|k| before.ends_with(&value[..*k]) && starts_word(*k))
                })
                .max();
            match longest {
                Some(k) => {
                    out.push_str(&before[..before.len() - k]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(before),
            }
            from = cut;
        }
        out
    }
}

fn collect_strings(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::String(s) => into.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, into)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, into)),
        _ => {}
    }
}

/// Where a credential value ends in a header, JSON document, form or sentence.
fn ends_value(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | ',' | ';' | '&' | '}' | ']' | ')' | '<' | '\\'
        )
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Scrubs the value after each label (`Authorization: Bearer x`, `"api_key": "x"`,
/// `apikey=x`) and the token after each scheme (`Bearer x`), whatever their value.
fn redact_labelled(text: &str) -> String {
    // ASCII lowercasing keeps byte offsets, so positions found in `lower` index `text`.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let boundary = text[..i].chars().next_back().is_none_or(|c| !is_word(c));
        if boundary && let Some(end) = labelled_value(text, &lower, i) {
            out.push_str(&text[i..end.0]);
            out.push_str(REDACTED);
            i = end.1;
            continue;
        }
        let c = text[i..].chars().next().expect("i < len");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// At `at`, a label or scheme followed by a credential: (where the credential starts, where
/// it ends).
fn labelled_value(text: &str, lower: &str, at: usize) -> Option<(usize, usize)> {
    let rest = &lower[at..];
    if let Some(label) = LABELS.iter().find(|l| rest.starts_with(**l)) {
        let mut i = at + label.len();
        if text[i..].chars().next().is_some_and(is_word) {
            return None;
        }
        i = skip(text, i, |c| c == '"' || c == '\'' || c == ' ');
        if !text[i..].starts_with([':', '=']) {
            return None;
        }
        let start = skip(text, i + 1, |c| c == '"' || c == '\'' || c == ' ');
        if text[start..].starts_with(REDACTED) {
            return None;
        }
        let mut end = skip(text, start, |c| !ends_value(c));
        let first = &text[start..end];
        // A scheme name and its credential ("Bearer x", "sendsay apikey=x") are one value.
        if !first.is_empty() && first.chars().all(|c| c.is_ascii_alphabetic()) {
            let next = skip(text, end, |c| c == ' ');
            let after = if text[next..].starts_with(REDACTED) {
                next + REDACTED.len()
            } else {
                skip(text, next, |c| !ends_value(c))
            };
            if next > end && after > next {
                end = after;
            }
        }
        return (end > start).then_some((start, end));
    }
    let scheme = SCHEMES.iter().find(|s| rest.starts_with(**s))?;
    let gap = at + scheme.len();
    let start = skip(text, gap, |c| c == ' ');
    if start == gap {
        return None;
    }
    let end = skip(text, start, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/' | '=' | ':')
    });
    let token = &text[start..end];
    let looks_like_a_credential =
        token.len() >= MIN_SCHEME_TOKEN && token.chars().any(|c| !c.is_ascii_alphabetic());
    looks_like_a_credential.then_some((start, end))
}

/// The first position from `from` whose character does not satisfy `keep`.
fn skip(text: &str, from: usize, keep: impl Fn(char) -> bool) -> usize {
    text[from..]
        .char_indices()
        .find(|(_, c)| !keep(*c))
        .map_or(text.len(), |(i, _)| from + i)
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn redactor(secrets: Value, sent: &[&str]) -> Redactor {
        Redactor::new(&secrets, sent.iter().copied())
    }

    #[test]
    fn every_secret_value_and_its_encodings_are_replaced() {
        let r = redactor(
            json!({"api_key": "0123456789abcdef-us21", "nested": {"client_secret": "s3cr\"et+/x"}, "n": 7}),
            &[],
        );
        assert_eq!(
            r.redact("bad key 0123456789abcdef-us21 (again: 0123456789abcdef-us21)"),
            "bad key [redacted] (again: [redacted])"
        );
        assert_eq!(r.redact("got s3cr\"et+/x"), "got [redacted]");
        assert_eq!(
            r.redact(r#"{"x": "s3cr\"et+/x"}"#),
            r#"{"x": "[redacted]"}"#
        );
        assert_eq!(r.redact("body=s3cr%22et%2B%2Fx&a=b"), "body=[redacted]&a=b");
    }

    #[test]
    fn short_values_and_unrelated_text_are_left_alone() {
        let r = redactor(json!({"api_key": "abc", "other": "secret-key-1"}), &[]);
        assert_eq!(
            r.redact("HTTP 400: abc is not a valid email"),
            "HTTP 400: abc is not a valid email"
        );
        assert_eq!(
            r.redact("Basic authentication failed; authorization required"),
            "Basic authentication failed; authorization required"
        );
        assert_eq!(r.redact("Bearer token expired"), "Bearer token expired");
        assert_eq!(r.redact(""), "");
        assert_eq!(r.redact("ünïcødé … text…"), "ünïcødé … text…");
    }

    #[test]
    fn credentials_sent_in_headers_are_replaced_in_every_form() {
        // eSputnik's Basic pg_listsync:<key> and an OAuth access token obtained at runtime.
        let r = redactor(
            json!({"api_key": "k"}),
            &[
                "Basic cGdfbGlzdHN5bmM6c2VjcmV0LWtleQ==",
                "Bearer ya29.a0AfH6SMBx",
            ],
        );
        assert_eq!(
            r.redact("denied cGdfbGlzdHN5bmM6c2VjcmV0LWtleQ== and ya29.a0AfH6SMBx"),
            "denied [redacted] and [redacted]"
        );
    }

    #[test]
    fn authorization_echoes_are_replaced_whatever_the_value() {
        let r = redactor(json!({}), &[]);
        assert_eq!(
            r.redact("request had Authorization: Bearer unknown-token-1 and was refused"),
            "request had Authorization: [redacted] and was refused"
        );
        assert_eq!(
            r.redact(r#"{"headers": {"authorization": "Basic dXNlcjpwYXNz", "x": 1}}"#),
            r#"{"headers": {"authorization": "[redacted]", "x": 1}}"#
        );
        assert_eq!(
            r.redact("header sendsay apikey=zzzzzz1 rejected"),
            "header sendsay apikey=[redacted] rejected"
        );
        assert_eq!(
            r.redact("Authorization=sendsay apikey=zzzzzz1"),
            "Authorization=[redacted]"
        );
        assert_eq!(
            r.redact("form api_key=abcdef&list=1; X-Api-Key: qwerty"),
            "form api_key=[redacted]&list=1; X-Api-Key: [redacted]"
        );
        assert_eq!(
            r.redact("token bearer  abc.def-123 is invalid"),
            "token bearer  [redacted] is invalid"
        );
        assert_eq!(
            r.redact(r#"{"access_token":"ya29.x","refresh_token": "1//r"}"#),
            r#"{"access_token":"[redacted]","refresh_token": "[redacted]"}"#
        );
    }

    #[test]
    fn text_scrubbed_once_is_not_mangled_again() {
        let r = redactor(json!({"api_key": "0123456789abcdef-us21"}), &[]);
        let once =
            r.redact("Authorization: Bearer 0123456789abcdef-us21 (api_key=0123456789abcdef-us21)");
        assert_eq!(once, "Authorization: [redacted] (api_key=[redacted])");
        assert_eq!(r.redact(&once), once);
    }

    #[test]
    fn a_secret_cut_off_by_an_excerpt_is_replaced() {
        let r = redactor(json!({"api_key": "0123456789abcdef-us21"}), &[]);
        assert_eq!(
            r.redact("HTTP 500: key 0123456789a…"),
            "HTTP 500: key [redacted]…"
        );
        assert_eq!(
            r.redact("HTTP 500: key 01234567"),
            "HTTP 500: key [redacted]"
        );
        assert_eq!(
            r.redact("HTTP 500: key 0123456789a… then more"),
            "HTTP 500: key [redacted]… then more"
        );
        assert_eq!(r.redact("ends in 012"), "ends in 012");
    }

    #[test]
    fn json_documents_are_scrubbed_throughout() {
        let r = redactor(json!({"api_key": "0123456789abcdef-us21"}), &[]);
        let mut value = json!({"account": "ok", "echo": ["0123456789abcdef-us21", 3]});
        r.redact_json(&mut value);
        assert_eq!(value, json!({"account": "ok", "echo": ["[redacted]", 3]}));
    }
}
