//! The one HTTP client every provider uses: ureq with rustls, short timeouts, connection reuse,
//! the https-only rule (semantics 10), a per-connection rate limit, response classification,
//! retry timing, and a record of every call for `listsync.deliveries`.
//!
//! Plain Rust, no PostgreSQL: the worker calls it outside any transaction.

use serde_json::Value;
use std::fmt;
use std::time::{Duration, Instant};

/// How a provider call failed, as the delivery engine needs to know it.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderError {
    /// Try again later (429, 5xx, timeouts, resets): the items stay dirty with a backoff.
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The credentials were refused: the connection's bindings stop until an operator acts.
    Auth(String),
    /// The binding cannot be served as configured (list gone, field types wrong, insecure
    /// URL): the binding goes to state `error` with this reason.
    Binding(String),
    /// The provider rejected the request for good: its items become dead letters.
    Rejected(String),
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderError::Transient { message, .. } => write!(f, "{message}"),
            ProviderError::Auth(m) => write!(f, "authentication failed: {m}"),
            ProviderError::Binding(m) | ProviderError::Rejected(m) => write!(f, "{m}"),
        }
    }
}

pub type Result<T> = std::result::Result<T, ProviderError>;

pub fn transient(message: impl Into<String>) -> ProviderError {
    ProviderError::Transient {
        message: message.into(),
        retry_after: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: Method, url: impl Into<String>) -> Request {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Request {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn json(self, body: &Value) -> Request {
        let mut request = self.header("content-type", "application/json");
        request.body = Some(serde_json::to_vec(body).unwrap_or_default());
        request
    }

    pub fn form(self, pairs: &[(String, String)]) -> Request {
        let mut request = self.header("content-type", "application/x-www-form-urlencoded");
        request.body = Some(form_encode(pairs).into_bytes());
        request
    }
}

pub fn form_encode(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON; an empty body is `null`. Malformed JSON from a provider is a transient
    /// failure (a proxy's HTML error page, a truncated answer), not a reason to drop data.
    pub fn json(&self) -> Result<Value> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            transient(format!(
                "HTTP {}: malformed JSON in the response ({e}): {}",
                self.status,
                self.text_excerpt()
            ))
        })
    }

    pub fn text_excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        if text.chars().count() > 300 {
            format!("{}…", text.chars().take(300).collect::<String>())
        } else {
            text.to_string()
        }
    }

    /// `Retry-After` in seconds or as an HTTP date.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self.header("retry-after")?.trim();
        if let Ok(seconds) = value.parse::<f64>() {
            return (seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)));
        }
        let at = parse_http_date(value)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs() as i64;
        Some(Duration::from_secs((at - now).clamp(0, 86_400) as u64))
    }

    /// The common meaning of an unsuccessful status: 401/403 authentication, 408/425/429/5xx
    /// transient. Other 4xx answers are the provider's to interpret (`Ok` here).
    pub fn check_common(&self, message: impl FnOnce(&Response) -> String) -> Result<()> {
        match self.status {
            200..=299 => Ok(()),
            401 | 403 => Err(ProviderError::Auth(format!(
                "HTTP {}: {}",
                self.status,
                message(self)
            ))),
            408 | 425 | 429 | 500..=599 => Err(ProviderError::Transient {
                message: format!("HTTP {}: {}", self.status, message(self)),
                retry_after: self.retry_after(),
            }),
            _ => Ok(()),
        }
    }

    /// [`check_common`](Self::check_common), and any other unsuccessful status is the
    /// provider's refusal for good.
    pub fn check(&self, message: impl Fn(&Response) -> String) -> Result<()> {
        self.check_common(&message)?;
        if self.is_success() {
            return Ok(());
        }
        Err(ProviderError::Rejected(format!(
            "HTTP {}: {}",
            self.status,
            message(self)
        )))
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → seconds since the epoch.
fn parse_http_date(value: &str) -> Option<i64> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    if parts.len() != 6 {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as i64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let time: Vec<i64> = parts[4]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    if time.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + time[0] * 3600 + time[1] * 60 + time[2])
}

/// One provider call, for `listsync.deliveries`. Never holds credentials: the URL is kept
/// without its query string.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub operation: String,
    pub request: String,
    pub status: Option<u16>,
    pub duration: Duration,
    pub error: Option<String>,
}

/// Requests per second a connection may make; `None` for no limit.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// A token bucket shared by all bindings of one connection.
#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// How long to wait before the next request may go.
    fn wait(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            let wait = (1.0 - self.tokens) / self.limit.per_second;
            self.tokens -= 1.0;
            Duration::from_secs_f64(wait)
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub timeout: Duration,
    pub allowed_insecure_hosts: Vec<String>,
}

/// Longest the client sleeps to respect a rate limit; beyond it the call is deferred instead
/// (other connections' work goes on meanwhile).
const MAX_RATE_WAIT: Duration = Duration::from_secs(2);

/// How many distinct credential headers a client remembers: OAuth access tokens are renewed
/// hourly, and only recent ones can be echoed back.
const REMEMBERED_CREDENTIALS: usize = 8;

pub struct Http {
    agent: ureq::Agent,
    config: HttpConfig,
    bucket: Option<Bucket>,
    records: Vec<CallRecord>,
    credentials: Vec<String>,
}

/// Headers whose value is a credential, whatever the provider calls it.
fn carries_credentials(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.ends_with("authorization")
        || ["api-key", "apikey", "token", "secret"]
            .iter()
            .any(|word| name.contains(word))
}

impl Http {
    pub fn new(config: HttpConfig, rate: Option<RateLimit>) -> Http {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("pg_listsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let bucket = rate.map(|limit| Bucket {
            limit,
            tokens: limit.burst,
            refilled: Instant::now(),
        });
        Http {
            agent,
            config,
            bucket,
            records: Vec::new(),
            credentials: Vec::new(),
        }
    }

    pub fn set_config(&mut self, config: HttpConfig) {
        if config.timeout != self.config.timeout {
            let credentials = std::mem::take(&mut self.credentials);
            *self = Http::new(config, self.bucket.as_ref().map(|b| b.limit));
            self.credentials = credentials;
        } else {
            self.config = config;
        }
    }

    /// The calls made since the last drain.
    pub fn drain_records(&mut self) -> Vec<CallRecord> {
        std::mem::take(&mut self.records)
    }

    /// The credential header values sent recently (an `Authorization: Basic` built from the
    /// key, an OAuth access token obtained at runtime): what a response may echo besides the
    /// connection's secrets.
    pub fn credentials_sent(&self) -> impl Iterator<Item = &str> {
        self.credentials.iter().map(String::as_str)
    }

    fn remember_credentials(&mut self, request: &Request) {
        for (name, value) in &request.headers {
            if !carries_credentials(name) {
                continue;
            }
            // Most recently sent last: a static key in use is never the one forgotten.
            self.credentials.retain(|known| known != value);
            if self.credentials.len() == REMEMBERED_CREDENTIALS {
                self.credentials.remove(0);
            }
            self.credentials.push(value.clone());
        }
    }

    /// Refuses anything but https, except for hosts named in `listsync.allowed_insecure_hosts`.
    pub fn check_url(&self, url: &str) -> Result<()> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(ProviderError::Binding(format!(
                "invalid endpoint URL \"{url}\""
            )));
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if host.starts_with('[') {
            host.split(']')
                .next()
                .unwrap_or(host)
                .trim_start_matches('[')
        } else {
            host.split(':').next().unwrap_or(host)
        };
        match scheme.to_ascii_lowercase().as_str() {
            "https" => Ok(()),
            "http"
                if self
                    .config
                    .allowed_insecure_hosts
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(host)) =>
            {
                Ok(())
            }
            "http" => Err(ProviderError::Binding(format!(
                "refusing to call http://{host}: only https endpoints are called (hosts listed in listsync.allowed_insecure_hosts excepted)"
            ))),
            other => Err(ProviderError::Binding(format!(
                "unsupported URL scheme \"{other}\""
            ))),
        }
    }

    /// Sends a request. Transport failures (timeouts, resets, DNS) are transient errors; any
    /// HTTP answer, whatever its status, is returned for the provider to interpret.
    pub fn send(&mut self, operation: &str, request: Request) -> Result<Response> {
        self.check_url(&request.url)?;
        if let Some(bucket) = &mut self.bucket {
            let wait = bucket.wait(Instant::now());
            if wait > MAX_RATE_WAIT {
                bucket.tokens += 1.0;
                return Err(ProviderError::Transient {
                    message: "provider rate limit reached (client side)".into(),
                    retry_after: Some(wait),
                });
            }
            std::thread::sleep(wait);
        }
        self.remember_credentials(&request);
        let started = Instant::now();
        let described = format!(
            "{} {}",
            request.method.as_str(),
            request.url.split('?').next().unwrap_or("")
        );
        let result = self.transmit(&request);
        let duration = started.elapsed();
        let record = |status: Option<u16>, error: Option<String>| CallRecord {
            operation: operation.to_string(),
            request: described.clone(),
            status,
            duration,
            error,
        };
        match result {
            Ok(response) => {
                let error = (!response.is_success()).then(|| response.text_excerpt());
                self.records.push(record(Some(response.status), error));
                Ok(response)
            }
            Err(message) => {
                self.records.push(record(None, Some(message.clone())));
                Err(transient(message))
            }
        }
    }

    fn transmit(&self, request: &Request) -> std::result::Result<Response, String> {
        let mut builder = ureq::http::Request::builder()
            .method(request.method.as_str())
            .uri(&request.url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let built = builder
            .body(request.body.clone().unwrap_or_default())
            .map_err(|e| format!("invalid request: {e}"))?;
        let mut response = self.agent.run(built).map_err(describe_transport_error)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .map_err(describe_transport_error)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

fn describe_transport_error(error: ureq::Error) -> String {
    match error {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Io(e) => format!("I/O error: {e}"),
        other => other.to_string(),
    }
}

/// When to try again after `attempts` failures: exponential from `base` to `max` with full
/// jitter, but never sooner than the provider's `Retry-After`. `random` is in [0, 1).
pub fn backoff(
    attempts: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    random: f64,
) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1u32 << exponent).min(max);
    // Half fixed, half jitter: spreads retries without ever retrying immediately.
    let delay = ceiling.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0));
    match retry_after {
        Some(after) if after > delay => after,
        _ => delay,
    }
}

/// Tests call the emulator and Prism on the loopback interface over plain http.
#[cfg(test)]
impl Http {
    pub fn local(timeout: Duration) -> Http {
        Http::new(
            HttpConfig {
                timeout,
                allowed_insecure_hosts: vec!["127.0.0.1".into()],
            },
            None,
        )
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn http(allowed: &[&str]) -> Http {
        Http::new(
            HttpConfig {
                timeout: Duration::from_secs(1),
                allowed_insecure_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            },
            None,
        )
    }

    #[test]
    fn only_https_unless_allowed() {
        let h = http(&["127.0.0.1"]);
        assert!(h.check_url("https://us21.api.mailchimp.com/3.0/").is_ok());
        assert!(h.check_url("http://127.0.0.1:4010/3.0/").is_ok());
        assert!(matches!(
            h.check_url("http://example.com/"),
            Err(ProviderError::Binding(_))
        ));
        assert!(matches!(
            h.check_url("http://user@127.0.0.2:80/"),
            Err(ProviderError::Binding(_))
        ));
        assert!(matches!(
            h.check_url("ftp://127.0.0.1/"),
            Err(ProviderError::Binding(_))
        ));
        assert!(matches!(
            h.check_url("127.0.0.1/"),
            Err(ProviderError::Binding(_))
        ));
        assert!(http(&["::1"]).check_url("http://[::1]:8080/x").is_ok());
    }

    #[test]
    fn retry_after_in_seconds_and_dates() {
        let mut r = Response {
            status: 429,
            headers: vec![("Retry-After".into(), "7".into())],
            body: vec![],
        };
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
        r.headers = vec![("retry-after".into(), "Thu, 01 Jan 1970 00:00:00 GMT".into())];
        assert_eq!(r.retry_after(), Some(Duration::ZERO));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        r.headers = vec![("retry-after".into(), "soon".into())];
        assert_eq!(r.retry_after(), None);
    }

    #[test]
    fn common_statuses_are_classified() {
        let response = |status| Response {
            status,
            headers: vec![],
            body: b"{\"detail\":\"x\"}".to_vec(),
        };
        assert!(matches!(
            response(401).check_common(|r| r.text_excerpt()),
            Err(ProviderError::Auth(_))
        ));
        assert!(matches!(
            response(503).check_common(|r| r.text_excerpt()),
            Err(ProviderError::Transient { .. })
        ));
        assert!(matches!(
            response(429).check_common(|r| r.text_excerpt()),
            Err(ProviderError::Transient { .. })
        ));
        assert!(response(400).check_common(|r| r.text_excerpt()).is_ok());
        assert!(response(204).check_common(|r| r.text_excerpt()).is_ok());
    }

    #[test]
    fn malformed_json_is_transient() {
        let r = Response {
            status: 200,
            headers: vec![],
            body: b"<html>bad gateway".to_vec(),
        };
        assert!(matches!(r.json(), Err(ProviderError::Transient { .. })));
        let empty = Response {
            status: 204,
            headers: vec![],
            body: vec![],
        };
        assert_eq!(empty.json().unwrap(), Value::Null);
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, base, max, None, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, base, max, None, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(3, base, max, None, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(40, base, max, None, 1.0), max);
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(30)), 0.5),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn token_bucket_spaces_requests() {
        let start = Instant::now();
        let mut bucket = Bucket {
            limit: RateLimit {
                per_second: 2.0,
                burst: 2.0,
            },
            tokens: 2.0,
            refilled: start,
        };
        assert_eq!(bucket.wait(start), Duration::ZERO);
        assert_eq!(bucket.wait(start), Duration::ZERO);
        let third = bucket.wait(start);
        assert!(
            third > Duration::from_millis(400) && third <= Duration::from_millis(500),
            "{third:?}"
        );
    }

    #[test]
    fn credential_headers_are_remembered_others_not() {
        let mut http = http(&[]);
        for token in 0..10 {
            http.remember_credentials(
                &Request::new(Method::Get, "https://x")
                    .header("Authorization", format!("Bearer t{token}"))
                    .header("X-Api-Key", "k")
                    .header("webhook-signature", "v1,sig"),
            );
        }
        let sent: Vec<&str> = http.credentials_sent().collect();
        assert_eq!(sent.len(), REMEMBERED_CREDENTIALS);
        assert!(sent.contains(&"Bearer t9") && sent.contains(&"k"));
        assert!(!sent.contains(&"Bearer t0") && !sent.contains(&"v1,sig"));
    }

    #[test]
    fn form_encoding_escapes_everything_reserved() {
        assert_eq!(
            form_encode(&[
                ("fields[email]".into(), "a+b@x.io".into()),
                ("n".into(), "Ann Lee & co".into())
            ]),
            "fields%5Bemail%5D=a%2Bb%40x.io&n=Ann%20Lee%20%26%20co"
        );
    }
}
