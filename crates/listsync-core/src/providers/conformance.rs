//! The conformance suite: what every provider promises the delivery engine, checked against
//! each provider's stateful fake (`listsync-emulator`) by the same scenarios.
//!
//! A provider's test module describes its fake once, by implementing [`Fake`] (and [`Consent`]
//! and [`Erasure`] where the provider has them), then calls [`conformance_suite!`], which
//! writes one `#[test]` per scenario into a `conformance` module of its own, so a failure
//! names the provider and the scenario. What only one provider does stays in its own tests.

use super::{Binding, ConsentStatus, LeaveAction, Member, MemberStatus, Outcome, Provider, Spec};
use crate::http::{Http, ProviderError, Result};
use listsync_emulator::{DEFAULT_TIMEOUT, Emulator, Fault};
use std::collections::BTreeSet;
use std::time::Duration;

/// The secret a [`Fake::connect_with_wrong_secret`] provider presents. Long enough for every
/// provider's format check (the webhook's signing secret wants 16 characters), so it is the
/// provider that refuses it, not our validation.
pub const WRONG_SECRET: &str = "not-the-secret-0123456789";

/// How members leave in the suite: removal from the list, which every provider can do.
const LEAVE: LeaveAction = LeaveAction::Remove;

/// The client's timeout in the scenarios: shorter than the emulator's injected
/// [`DEFAULT_TIMEOUT`], so a held request times out at the client as a stalled provider would.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What the scenarios need to know about one provider and its fake.
pub trait Fake {
    /// The provider's declaration; its name is also its prefix at the emulator.
    const SPEC: &'static Spec;

    /// Opens the provider's account at the emulator (credentials, the fields the binding
    /// maps) and connects a provider to it with the account's credentials.
    fn connect(emulator: &Emulator) -> Box<dyn Provider>;

    /// A provider of the same account presenting [`WRONG_SECRET`] instead of its secret.
    fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider>;

    /// A binding not yet prepared, mapping the fields [`Fake::member`] sets.
    fn binding() -> Binding;

    /// A member with a value for every mapped field.
    fn member(address: &str) -> Member;

    /// Makes the provider refuse `address` for good (as it refuses an invalid or blocked
    /// address); returns words the member's failure must carry, so the operator sees why.
    fn refuse(emulator: &Emulator, address: &str) -> &'static str;

    /// Whether the provider holds a contact for `address` anywhere in the account.
    fn knows(emulator: &Emulator, address: &str) -> bool;

    /// Whether `check` reads the body of the provider's answer, and so must take a cut-off
    /// one for a transient failure. A check that only needs a 2xx reads none.
    const CHECK_READS_THE_BODY: bool = true;
}

/// A provider that keeps consent of its own: an address can unsubscribe at the provider.
pub trait Consent: Fake {
    /// Unsubscribes `address`, a member of the prepared `binding`'s list, at the provider, as
    /// the contact would with the link in a mail.
    fn unsubscribe(emulator: &Emulator, binding: &Binding, address: &str);
}

/// A provider that erases contacts (GDPR) itself, in a way its fake shows.
pub trait Erasure: Fake {
    /// Whether `address` went through the provider's erasure, which forgets more than a
    /// deletion does where the provider has both.
    fn erased(emulator: &Emulator, address: &str) -> bool;
}

/// One `#[test]` per scenario for a [`Fake`], in a module `conformance`. The scenarios that not
/// every provider can have are named with either `supported` or `unsupported("why")`, so a
/// missing one is a decision written down, not an oversight:
///
/// ```ignore
/// conformance_suite!(MailerLiteFake { consent: supported, erasure: supported });
/// ```
macro_rules! conformance_suite {
    ($fake:ty { consent: $consent:ident $(($consent_why:literal))?, erasure: $erasure:ident $(($erasure_why:literal))? $(,)? }) => {
        mod conformance {
            use super::*;
            use $crate::providers::conformance as suite;

            #[test]
            fn transient_faults_lose_nothing() {
                suite::transient_faults_lose_nothing::<$fake>();
            }

            #[test]
            fn a_refused_member_fails_alone() {
                suite::a_refused_member_fails_alone::<$fake>();
            }

            #[test]
            fn upserting_twice_changes_nothing() {
                suite::upserting_twice_changes_nothing::<$fake>();
            }

            #[test]
            fn an_email_change_moves_the_member() {
                suite::an_email_change_moves_the_member::<$fake>();
            }

            #[test]
            fn a_garbled_success_is_never_taken_for_done() {
                suite::a_garbled_success_is_never_taken_for_done::<$fake>();
            }

            #[test]
            fn a_wrong_secret_is_an_auth_error() {
                suite::a_wrong_secret_is_an_auth_error::<$fake>();
            }

            $crate::providers::conformance::conformance_suite!(@consent $fake, $consent $(($consent_why))?);
            $crate::providers::conformance::conformance_suite!(@erasure $fake, $erasure $(($erasure_why))?);
        }
    };
    (@consent $fake:ty, supported) => {
        #[test]
        fn consent_is_never_overridden() {
            suite::consent_is_never_overridden::<$fake>();
        }
    };
    (@consent $fake:ty, unsupported($why:literal)) => {};
    (@erasure $fake:ty, supported) => {
        #[test]
        fn erase_forgets_the_member() {
            suite::erase_forgets_the_member::<$fake>();
        }
    };
    (@erasure $fake:ty, unsupported($why:literal)) => {};
}
pub(crate) use conformance_suite;

/// A provider connected to its fake with a prepared binding: where every scenario starts.
struct Prepared {
    emulator: Emulator,
    http: Http,
    provider: Box<dyn Provider>,
    binding: Binding,
}

impl Prepared {
    fn new<F: Fake>() -> Prepared {
        let emulator = Emulator::start();
        let mut provider = F::connect(&emulator);
        let mut http = Http::local(CALL_TIMEOUT);
        let mut binding = F::binding();
        provider.prepare(&mut http, &mut binding).expect("prepare");
        Prepared {
            emulator,
            http,
            provider,
            binding,
        }
    }

    fn try_upsert(&mut self, members: &[Member]) -> Result<Vec<Outcome>> {
        self.provider.upsert(&mut self.http, &self.binding, members)
    }

    fn upsert(&mut self, members: &[Member]) -> Vec<Outcome> {
        self.try_upsert(members).expect("upsert")
    }

    /// Upserts members that must all join, and returns them with the ids the provider
    /// reported, as the engine records them for later leaves and erasures.
    fn deliver(&mut self, members: &[Member]) -> Vec<Member> {
        let outcomes = self.upsert(members);
        members
            .iter()
            .zip(outcomes)
            .map(|(member, outcome)| match outcome {
                Outcome::Member { remote_id, .. } => Member {
                    remote_id,
                    ..member.clone()
                },
                other => panic!("{} did not join: {other:?}", member.address),
            })
            .collect()
    }

    /// The addresses in the binding's list that would receive mail.
    fn list<F: Fake>(&self) -> BTreeSet<String> {
        let list = self.binding.list_id.as_deref().expect("a prepared binding");
        self.emulator
            .list_members(F::SPEC.name, list)
            .into_keys()
            .collect()
    }
}

fn members<F: Fake>(addresses: &[&str]) -> Vec<Member> {
    addresses.iter().map(|a| F::member(a)).collect()
}

fn addresses(addresses: &[&str]) -> BTreeSet<String> {
    addresses.iter().map(|a| a.to_string()).collect()
}

fn is_member(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Member { .. })
}

/// The delay a transient failure asks for: an error for the whole call, or a `Retry` for every
/// member. Panics on anything else, which would lose or dead-letter members for a passing
/// problem.
fn transient_delay(result: Result<Vec<Outcome>>) -> Option<Duration> {
    match result {
        Err(ProviderError::Transient { retry_after, .. }) => retry_after,
        Ok(outcomes) if !outcomes.is_empty() => {
            let delays: BTreeSet<Option<Duration>> = outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Retry { retry_after, .. } => *retry_after,
                    other => panic!("not transient: {other:?} in {outcomes:?}"),
                })
                .collect();
            assert_eq!(delays.len(), 1, "one delay for one answer: {outcomes:?}");
            delays.into_iter().next().flatten()
        }
        other => panic!("not transient: {other:?}"),
    }
}

/// Throttling (with the provider's Retry-After honoured), outages, stalls, resets and broken
/// answers are transient, for the operator's check as for an upsert; a failed call applies
/// nothing, and once the provider is back the same batch delivers everyone. Each fault meets
/// the call's first request.
pub fn transient_faults_lose_nothing<F: Fake>() {
    let mut s = Prepared::new::<F>();
    let batch = members::<F>(&["ann@example.com", "bob@example.com"]);
    let faults = s.emulator.faults(F::SPEC.name);
    let retry_after = 3;
    let cases = [
        (
            Fault::too_many_requests(Some(retry_after)),
            Some(Duration::from_secs(retry_after.into())),
        ),
        (Fault::status(500), None),
        (Fault::status(503), None),
        (Fault::Timeout(DEFAULT_TIMEOUT), None),
        (Fault::Reset, None),
        (Fault::MalformedJson, None),
    ];
    for (fault, delay) in cases {
        if F::CHECK_READS_THE_BODY || fault != Fault::MalformedJson {
            faults.push(fault.clone());
            let checked = s.provider.check(&mut s.http);
            assert!(
                matches!(checked, Err(ProviderError::Transient { retry_after, .. }) if delay.is_none() || retry_after == delay),
                "check under {fault:?}: {checked:?}"
            );
        }
        faults.push(fault.clone());
        let upserted = transient_delay(s.try_upsert(&batch));
        if delay.is_some() {
            assert_eq!(upserted, delay, "upsert under {fault:?}");
        }
        for member in &batch {
            assert!(
                !F::knows(&s.emulator, &member.address),
                "{} applied despite {fault:?}",
                member.address
            );
        }
    }
    // Applied, but the answer never came: the engine delivers the batch again.
    faults.push(Fault::LostResponse);
    transient_delay(s.try_upsert(&batch));
    assert_eq!(faults.pending(), 0, "every fault met a request");
    assert!(s.upsert(&batch).iter().all(is_member));
    assert_eq!(
        s.list::<F>(),
        addresses(&["ann@example.com", "bob@example.com"])
    );
}

/// An address the provider refuses fails alone, with the provider's reason; the rest of the
/// batch joins.
pub fn a_refused_member_fails_alone<F: Fake>() {
    let mut s = Prepared::new::<F>();
    let reason = F::refuse(&s.emulator, "bad@example.com");
    let outcomes = s.upsert(&members::<F>(&[
        "ann@example.com",
        "bad@example.com",
        "cid@example.com",
    ]));
    assert!(is_member(&outcomes[0]), "{outcomes:?}");
    assert!(
        matches!(&outcomes[1], Outcome::Failed { message } if message.contains(reason)),
        "{reason:?} expected: {outcomes:?}"
    );
    assert!(is_member(&outcomes[2]), "{outcomes:?}");
    assert_eq!(
        s.list::<F>(),
        addresses(&["ann@example.com", "cid@example.com"])
    );
}

/// The same batch twice (the engine's retry after a lost answer) updates the same contacts:
/// the same outcomes, ids included, and the same list, fields included.
pub fn upserting_twice_changes_nothing<F: Fake>() {
    let mut s = Prepared::new::<F>();
    let batch = members::<F>(&["ann@example.com", "bob@example.com"]);
    let first = s.upsert(&batch);
    assert!(first.iter().all(is_member), "{first:?}");
    let list = s.binding.list_id.clone().expect("a prepared binding");
    let held = s.emulator.list_members(F::SPEC.name, &list);
    assert_eq!(s.upsert(&batch), first);
    assert_eq!(s.emulator.list_members(F::SPEC.name, &list), held);
    assert_eq!(
        held.into_keys().collect::<BTreeSet<_>>(),
        addresses(&["ann@example.com", "bob@example.com"])
    );
}

/// The engine sends an email change as a leave of the old address (with its recorded id) and
/// an upsert of the new one: the list then holds the new address, not the old one.
pub fn an_email_change_moves_the_member<F: Fake>() {
    let mut s = Prepared::new::<F>();
    let joined = s.deliver(&members::<F>(&["ann.old@example.com", "bob@example.com"]));
    let left = s
        .provider
        .remove(&mut s.http, &s.binding, LEAVE, &joined[..1])
        .expect("remove");
    assert_eq!(left, [Outcome::Removed]);
    let moved = s.deliver(&members::<F>(&["ann.new@example.com"]));
    assert_eq!(
        s.list::<F>(),
        addresses(&["ann.new@example.com", "bob@example.com"])
    );
    if let (Some(old), Some(new)) = (&joined[0].remote_id, &moved[0].remote_id) {
        assert_ne!(old, new, "the new address is a contact of its own");
    }
}

/// A 2xx whose body is cut short (the fake applies nothing then) is never reported as done, on
/// whichever request of an upsert or a removal it lands: an upsert reported `Member` is in the
/// list and a removal reported `Removed` is out of it. A removal taken for done while the
/// member stays would never be looked at again. Once answers are whole, both go through.
pub fn a_garbled_success_is_never_taken_for_done<F: Fake>() {
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        let mut s = Prepared::new::<F>();
        let faults = s.emulator.faults(F::SPEC.name);
        let ann = members::<F>(&["ann@example.com"]);
        faults.push(Fault::MalformedJson.on_method(method));
        let upserted = s.try_upsert(&ann);
        if matches!(&upserted, Ok(outcomes) if is_member(&outcomes[0])) {
            assert!(
                s.list::<F>().contains("ann@example.com"),
                "an upsert garbled on {method} reported {upserted:?} without applying it"
            );
        }
        faults.clear();
        let joined = s.deliver(&ann);
        faults.push(Fault::MalformedJson.on_method(method));
        let removed = s.provider.remove(&mut s.http, &s.binding, LEAVE, &joined);
        if matches!(&removed, Ok(outcomes) if outcomes[0] == Outcome::Removed) {
            assert!(
                s.list::<F>().is_empty(),
                "a removal garbled on {method} reported Removed; the member is still listed"
            );
        }
        faults.clear();
        let removed = s
            .provider
            .remove(&mut s.http, &s.binding, LEAVE, &joined)
            .expect("remove");
        assert_eq!(removed, [Outcome::Removed], "after a garbled {method}");
        assert!(s.list::<F>().is_empty(), "after a garbled {method}");
    }
}

/// Refused credentials are an authentication error, for every kind of call, and the message
/// never shows the secret.
pub fn a_wrong_secret_is_an_auth_error<F: Fake>() {
    let mut s = Prepared::new::<F>();
    let mut wrong = F::connect_with_wrong_secret(&s.emulator);
    match wrong.check(&mut s.http) {
        Err(ProviderError::Auth(message)) => {
            assert!(!message.contains(WRONG_SECRET), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let batch = members::<F>(&["ann@example.com"]);
    let upserted = wrong.upsert(&mut s.http, &s.binding, &batch);
    assert!(
        matches!(upserted, Err(ProviderError::Auth(_))),
        "{upserted:?}"
    );
    let removed = wrong.remove(&mut s.http, &s.binding, LEAVE, &batch);
    assert!(
        matches!(removed, Err(ProviderError::Auth(_))),
        "{removed:?}"
    );
    s.provider
        .check(&mut s.http)
        .expect("the right secret still works");
}

/// A member who unsubscribed at the provider is refused, never subscribed again, by a
/// subscribing binding as by a double opt-in one (which must not make it pending either); the
/// others in the batch are still delivered.
pub fn consent_is_never_overridden<F: Consent>() {
    let mut s = Prepared::new::<F>();
    let batch = members::<F>(&["ann@example.com", "bob@example.com"]);
    s.deliver(&batch);
    F::unsubscribe(&s.emulator, &s.binding, "ann@example.com");
    let statuses: &[MemberStatus] = if F::SPEC.capabilities.double_opt_in {
        &[MemberStatus::Subscribed, MemberStatus::Pending]
    } else {
        &[MemberStatus::Subscribed]
    };
    for status in statuses {
        s.binding.new_member_status = *status;
        let outcomes = s.upsert(&batch);
        assert!(
            matches!(
                outcomes[0],
                Outcome::Refused {
                    status: ConsentStatus::Unsubscribed,
                    ..
                }
            ),
            "{status:?}: {outcomes:?}"
        );
        assert!(is_member(&outcomes[1]), "{status:?}: {outcomes:?}");
        assert_eq!(s.list::<F>(), addresses(&["bob@example.com"]), "{status:?}");
    }
}

/// Erasing forgets contacts found by their recorded id or by address, and an address the
/// provider never knew is erased too (there is nothing to forget); nobody else is touched.
pub fn erase_forgets_the_member<F: Erasure>() {
    let mut s = Prepared::new::<F>();
    let joined = s.deliver(&members::<F>(&[
        "ann@example.com",
        "bob@example.com",
        "cid@example.com",
    ]));
    let bob_unrecorded = Member {
        remote_id: None,
        ..joined[1].clone()
    };
    let erasing = [
        joined[0].clone(),
        bob_unrecorded,
        F::member("ghost@example.com"),
    ];
    let outcomes = s
        .provider
        .erase(&mut s.http, &s.binding, &erasing)
        .expect("erase");
    assert_eq!(
        outcomes,
        [Outcome::Removed, Outcome::Removed, Outcome::Removed]
    );
    for gone in ["ann@example.com", "bob@example.com"] {
        assert!(!F::knows(&s.emulator, gone), "{gone} is still known");
        assert!(F::erased(&s.emulator, gone), "{gone} was not erased");
    }
    assert_eq!(s.list::<F>(), addresses(&["cid@example.com"]));
}
