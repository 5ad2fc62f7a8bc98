//! Stateful fakes of the email providers pg_listsync talks to, with fault injection.
//!
//! One HTTP server on `127.0.0.1` hosts every provider under its own path prefix
//! (`/mailchimp/3.0/...`, `/webhook/...`); point a connection's `base_url` at
//! [`Emulator::base_url`]. Each provider keeps real state (audiences, members,
//! tags, received webhooks) that tests inspect through typed accessors, and each
//! has [`Faults`] to script 429s, outages, timeouts, resets and broken bodies.
//!
//! ```no_run
//! use listsync_emulator::{Emulator, Fault};
//!
//! let emulator = Emulator::start();
//! let base_url = emulator.base_url("mailchimp"); // http://127.0.0.1:PORT/mailchimp
//! emulator.faults("mailchimp").push(Fault::too_many_requests(Some(1)));
//! emulator.mailchimp().reject_address("bad@example.com", "bad@example.com is blocked");
//! // ... run the code under test against base_url ...
//! let vips = emulator.mailchimp().members_with_tag("a1b2c3", "vip (crm)");
//! # let _ = (base_url, vips);
//! ```
//!
//! The same server runs standalone as the `listsync-emulator` binary, controlled
//! through the admin API under `/_admin/` (see `README.md`).

mod admin;
mod faults;
mod http;
mod log;
mod provider;
mod server;

pub mod esputnik;
pub mod google_contacts;
pub mod mailchimp;
pub mod mailerlite;
pub mod sendgrid;
pub mod sendpulse;
pub mod sendsay;
pub mod unisender;
pub mod webhook;

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

pub use faults::{DEFAULT_TIMEOUT, Fault, Faults, ScriptedFault};
pub use log::{DEFAULT_LOG_LIMIT, LoggedRequest};
pub use mailchimp::{Mailchimp, Member, MergeField, Segment};
pub use webhook::{AppliedChange, Webhook, WebhookDelivery};

use provider::Provider;
use server::{Shared, Slot};

/// The one place where providers are registered. Each serves `/<provider.name()>/...`.
fn builtin_providers() -> Vec<Arc<dyn Provider>> {
    vec![
        Arc::new(Mailchimp::new()),
        Arc::new(Webhook::new()),
        Arc::new(google_contacts::GoogleContacts::new()),
        Arc::new(mailerlite::MailerLite::new()),
        Arc::new(unisender::Unisender::new()),
        Arc::new(sendgrid::SendGrid::new()),
        Arc::new(sendsay::Sendsay::new()),
        Arc::new(sendpulse::SendPulse::new()),
        Arc::new(esputnik::Esputnik::new("esputnik")),
        Arc::new(esputnik::Esputnik::new("yespo")),
    ]
}

/// A running emulator. Dropping it stops the server (connections close within ~200 ms).
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Starts on a free port of 127.0.0.1.
    ///
    /// # Panics
    /// If no loopback port can be bound (use [`Emulator::start_on`] to handle that).
    pub fn start() -> Emulator {
        Emulator::start_on(0).expect("listsync-emulator: cannot listen on 127.0.0.1")
    }

    /// Starts on the given port of 127.0.0.1 (0 picks a free one).
    pub fn start_on(port: u16) -> io::Result<Emulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let addr = listener.local_addr()?;
        let slots = builtin_providers()
            .into_iter()
            .map(|provider| Slot {
                provider,
                faults: Faults::default(),
                log: Default::default(),
            })
            .collect();
        let shared = Arc::new(Shared {
            slots,
            stop: AtomicBool::new(false),
            log_limit: AtomicUsize::new(DEFAULT_LOG_LIMIT),
        });
        let acceptor = server::spawn_acceptor(listener, Arc::clone(&shared))?;
        Ok(Emulator {
            shared,
            addr,
            acceptor: Some(acceptor),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/<provider>`: the `base_url` setting for a connection.
    pub fn base_url(&self, provider: &str) -> String {
        format!("{}/{provider}", self.url())
    }

    /// Names of the emulated providers (path prefixes).
    pub fn providers(&self) -> Vec<&'static str> {
        self.shared.provider_names()
    }

    /// Fault controls of a provider.
    ///
    /// # Panics
    /// If `provider` is not one of [`Emulator::providers`].
    pub fn faults(&self, provider: &str) -> Faults {
        self.slot(provider).faults.clone()
    }

    /// The requests a provider received, oldest first (at most the log limit).
    ///
    /// # Panics
    /// If `provider` is not one of [`Emulator::providers`].
    pub fn requests(&self, provider: &str) -> Vec<LoggedRequest> {
        self.slot(provider).log.snapshot()
    }

    pub fn clear_requests(&self, provider: &str) {
        self.slot(provider).log.clear();
    }

    /// How many requests each provider's log keeps (default [`DEFAULT_LOG_LIMIT`]).
    pub fn set_request_log_limit(&self, limit: usize) {
        self.shared.log_limit.store(limit, Ordering::Relaxed);
    }

    /// The Mailchimp fake: settings, per-item errors and state inspection.
    pub fn mailchimp(&self) -> &Mailchimp {
        self.provider::<Mailchimp>()
    }

    /// The webhook receiver: signature secret, received deliveries, resulting lists.
    pub fn webhook(&self) -> &Webhook {
        self.provider::<Webhook>()
    }

    /// The SendGrid fake: lists, contacts, custom fields, suppressions, import jobs.
    pub fn sendgrid(&self) -> &sendgrid::SendGrid {
        self.provider::<sendgrid::SendGrid>()
    }

    /// The Sendsay fake: groups, members, stop list, redirects.
    pub fn sendsay(&self) -> &sendsay::Sendsay {
        self.provider::<sendsay::Sendsay>()
    }

    /// The MailerLite fake: groups, subscribers, fields, batches, rate limits.
    pub fn mailerlite(&self) -> &mailerlite::MailerLite {
        self.provider::<mailerlite::MailerLite>()
    }

    /// The Google Contacts fake: OAuth2 tokens, contact groups, contacts with etags, the cap.
    pub fn google_contacts(&self) -> &google_contacts::GoogleContacts {
        self.provider::<google_contacts::GoogleContacts>()
    }

    /// The Unisender fake: lists, contacts and their statuses, fields, call limits.
    pub fn unisender(&self) -> &unisender::Unisender {
        self.provider::<unisender::Unisender>()
    }

    /// The SendPulse fake: OAuth tokens, mailing lists, address statuses, tags, rate limit.
    pub fn sendpulse(&self) -> &sendpulse::SendPulse {
        self.provider::<sendpulse::SendPulse>()
    }

    /// The eSputnik fake (`/esputnik/`): contacts, segments, imports, the unsubscribed list.
    pub fn esputnik(&self) -> &esputnik::Esputnik {
        // Registered twice (two brands), so found by prefix rather than by type.
        (self.slot("esputnik").provider.as_ref() as &dyn std::any::Any)
            .downcast_ref()
            .expect("registered in builtin_providers()")
    }

    /// The Yespo fake (`/yespo/`): the eSputnik API under its other brand, with its own state.
    pub fn yespo(&self) -> &esputnik::Esputnik {
        (self.slot("yespo").provider.as_ref() as &dyn std::any::Any)
            .downcast_ref()
            .expect("registered in builtin_providers()")
    }

    /// The members of the list a binding stored as `list_id` at `provider`: lower-cased address
    /// -> fields, counting only members that would receive mail.
    pub fn list_members(
        &self,
        provider: &str,
        list_id: &str,
    ) -> BTreeMap<String, Map<String, Value>> {
        self.slot(provider).provider.list_members(list_id)
    }

    /// Resets every provider's state, faults and request log.
    pub fn reset(&self) {
        for slot in &self.shared.slots {
            slot.provider.reset();
            slot.faults.clear();
            slot.log.clear();
        }
    }

    fn slot(&self, name: &str) -> &Slot {
        self.shared.slot(name).unwrap_or_else(|| {
            panic!(
                "listsync-emulator has no provider {name:?}; known: {:?}",
                self.shared.provider_names()
            )
        })
    }

    fn provider<T: Provider>(&self) -> &T {
        self.shared
            .slots
            .iter()
            .find_map(|slot| (slot.provider.as_ref() as &dyn std::any::Any).downcast_ref::<T>())
            .expect("provider registered in builtin_providers()")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        server::wake_acceptor(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("providers", &self.providers())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    /// Tests share one emulator across threads (`&Emulator` in scoped threads, `Arc<Emulator>`).
    #[test]
    fn emulator_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Emulator>();
        assert_send_sync::<super::Faults>();
    }
}
