//! The HTTP server: accepts connections (one thread each), routes requests to
//! providers by their first path segment, injects faults and logs requests.

use std::io::{self, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admin;
use crate::faults::{Fault, Faults};
use crate::http::{self, ReadError, Request, Response};
use crate::log::{LoggedRequest, RequestLog};
use crate::provider::Provider;

/// How often blocked reads wake up to check whether the server is stopping.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A registered provider with its fault controls and request log.
pub(crate) struct Slot {
    pub provider: Arc<dyn Provider>,
    pub faults: Faults,
    pub log: RequestLog,
}

/// Everything the connection threads share.
pub(crate) struct Shared {
    pub slots: Vec<Slot>,
    pub stop: AtomicBool,
    pub log_limit: AtomicUsize,
}

impl Shared {
    pub(crate) fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.provider.name() == name)
    }

    pub(crate) fn provider_names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.provider.name()).collect()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// What to do with the connection after handling a request.
enum Outcome {
    Respond(Response),
    /// Close the connection with a TCP reset and no response.
    Reset,
}

/// Accepts connections until `shared.stop` is set (and a connection wakes the loop).
pub(crate) fn spawn_acceptor(
    listener: TcpListener,
    shared: Arc<Shared>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("emulator-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if shared.stopping() {
                    break;
                }
                let Ok(stream) = stream else {
                    // Typically EMFILE under load: back off instead of spinning.
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let shared = Arc::clone(&shared);
                // If the thread cannot be spawned the stream is dropped: the client sees a closed connection.
                let _ = thread::Builder::new()
                    .name("emulator-conn".into())
                    .spawn(move || serve_connection(stream, &shared));
            }
        })
}

/// Wakes the accept loop so that it notices `stop`.
pub(crate) fn wake_acceptor(addr: SocketAddr) {
    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
}

/// A reader that retries read timeouts until the server stops, so idle keep-alive
/// connections neither block shutdown nor get cut off while the server runs.
struct StopAwareStream<'a> {
    stream: TcpStream,
    shared: &'a Shared,
}

impl Read for StopAwareStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.stopping() {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "server stopping",
                        ));
                    }
                }
                other => return other,
            }
        }
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(POLL_INTERVAL)).is_err() {
        return;
    }
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(StopAwareStream {
        stream: read_half,
        shared,
    });
    loop {
        let request = match http::read_request(&mut reader, &mut stream) {
            Ok(request) => request,
            Err(ReadError::Malformed(message)) => {
                let response =
                    Response::json(400, &json!({ "error": "Bad Request", "message": message }));
                let _ = http::write_response(&mut stream, &response, false);
                return;
            }
            Err(ReadError::Closed | ReadError::Io) => return,
        };
        let keep_alive = request.wants_keep_alive();
        match dispatch(shared, request) {
            Outcome::Respond(response) => {
                if http::write_response(&mut stream, &response, keep_alive).is_err() || !keep_alive
                {
                    return;
                }
            }
            Outcome::Reset => {
                // SO_LINGER 0 makes close() send RST instead of FIN. Both fds (the
                // stream and the reader's clone) are closed when this function returns.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                return;
            }
        }
        if shared.stopping() {
            return;
        }
    }
}

/// Splits `/mailchimp/3.0/ping` into `("mailchimp", "/3.0/ping")`.
fn split_prefix(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.find('/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, "/"),
    }
}

fn dispatch(shared: &Shared, mut request: Request) -> Outcome {
    let (prefix, rest) = split_prefix(&request.path);
    let (prefix, rest) = (prefix.to_string(), rest.to_string());
    if prefix == "_admin" {
        request.path = rest;
        return Outcome::Respond(admin::handle(shared, &request));
    }
    let Some(slot) = shared.slot(&prefix) else {
        let message = format!(
            "no emulated provider at /{prefix}/; known: {:?}",
            shared.provider_names()
        );
        return Outcome::Respond(Response::json(
            404,
            &json!({ "error": "Not Found", "message": message }),
        ));
    };
    request.path = rest;

    let fault = slot.faults.next(&request.method, &request.path);
    let (outcome, status) = match &fault {
        None => {
            let response = call_provider(slot, &request);
            let status = response.status;
            (Outcome::Respond(response), status)
        }
        Some(fault) => inject(shared, slot, &request, fault),
    };
    slot.log.push(
        LoggedRequest {
            method: request.method.clone(),
            path: request.path.clone(),
            query: request.query.clone(),
            body: request.body_text(),
            status,
            fault: fault.as_ref().map(Fault::label),
        },
        shared.log_limit.load(Ordering::Relaxed),
    );
    outcome
}

/// Runs the provider, turning a panic (a bug in the emulator) into a 500.
fn call_provider(slot: &Slot, request: &Request) -> Response {
    catch_unwind(AssertUnwindSafe(|| slot.provider.handle(request))).unwrap_or_else(|_| {
        slot.provider.error_response(
            500,
            "the emulator panicked while handling this request (an emulator bug)",
        )
    })
}

/// Applies an injected fault; returns the outcome and the status the client sees (0: none).
fn inject(shared: &Shared, slot: &Slot, request: &Request, fault: &Fault) -> (Outcome, u16) {
    let provider = &slot.provider;
    match fault {
        Fault::Status {
            code,
            retry_after,
            body,
        } => {
            let mut response = match body {
                Some(body) => Response::new(*code, "application/json", body.as_bytes()),
                None => provider.error_response(*code, "injected fault"),
            };
            if let Some(seconds) = retry_after {
                response = response.with_header("Retry-After", seconds.to_string());
            }
            (Outcome::Respond(response), *code)
        }
        Fault::Timeout(duration) => {
            sleep_unless_stopped(shared, *duration);
            (
                Outcome::Respond(provider.error_response(504, "injected timeout")),
                504,
            )
        }
        Fault::Reset => (Outcome::Reset, 0),
        Fault::MalformedJson => {
            let body = r#"{"id": "b1c2", "members": [{"email_address": "trunc"#;
            (
                Outcome::Respond(Response::new(200, "application/json", body)),
                200,
            )
        }
        Fault::LostResponse => {
            call_provider(slot, request);
            (Outcome::Reset, 0)
        }
    }
}

fn sleep_unless_stopped(shared: &Shared, duration: Duration) {
    let deadline = Instant::now() + duration;
    while !shared.stopping() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        thread::sleep(left.min(POLL_INTERVAL));
    }
}

#[cfg(test)]
mod tests {
    use super::split_prefix;

    #[test]
    fn splits_provider_prefix() {
        assert_eq!(
            split_prefix("/mailchimp/3.0/ping"),
            ("mailchimp", "/3.0/ping")
        );
        assert_eq!(split_prefix("/webhook"), ("webhook", "/"));
        assert_eq!(split_prefix("/"), ("", "/"));
    }
}
