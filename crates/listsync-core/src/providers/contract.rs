//! Contract tests' harness: a Stoplight Prism mock server on a provider's official OpenAPI
//! description (`tests/contract/specs/`), which rejects any request the spec does not allow.
//! Each provider's tests send every kind of request its adapter makes and require all of them
//! to validate. `make test` installs Prism (`tests/contract`, npm).

use crate::http::{CallRecord, Http};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct Prism {
    child: Child,
    pub base_url: String,
}

fn contract_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/contract")
}

impl Prism {
    /// Starts Prism on `tests/contract/specs/<spec>` and waits until it listens.
    pub fn start(spec: &str) -> Prism {
        let prism = contract_dir().join("node_modules/.bin/prism");
        assert!(
            prism.exists(),
            "Prism is not installed: run scripts/setup.sh (or `npm ci` in tests/contract)"
        );
        // The free port is only free when asked: a test starting in parallel can take it
        // before Prism binds it, and Prism then exits. Another port is tried.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Command::new(&prism)
                .args([
                    "mock",
                    &format!("specs/{spec}"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .current_dir(contract_dir())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start Prism");
            let stdout = child.stdout.take().expect("piped stdout");
            let (ready, wait) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.contains("Prism is listening") {
                        let _ = ready.send(());
                    }
                }
            });
            match wait.recv_timeout(Duration::from_secs(90)) {
                Ok(()) => {
                    return Prism {
                        child,
                        base_url: format!("http://127.0.0.1:{port}"),
                    };
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!("Prism did not start on {spec} within 90 s");
                }
            }
        }
        panic!("Prism exited three times on {spec} before listening")
    }

    pub fn http(&self) -> Http {
        Http::local(Duration::from_secs(30))
    }
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every call was accepted by the spec (Prism answers 4xx, with the violations, otherwise).
pub fn assert_all_valid(calls: &[CallRecord]) {
    assert!(!calls.is_empty(), "no request was made");
    let invalid: Vec<String> = calls
        .iter()
        .filter(|c| !c.status.is_some_and(|s| (200..300).contains(&s)))
        .map(|c| {
            format!(
                "{} → {:?}: {}",
                c.request,
                c.status,
                c.error.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert!(
        invalid.is_empty(),
        "requests the spec rejects:\n{}",
        invalid.join("\n")
    );
}
