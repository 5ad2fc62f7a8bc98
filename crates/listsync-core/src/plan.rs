//! What to send for one dirty (binding, address) pair: the difference between the desired
//! state (the filter's rows, now) and the remote state recorded after earlier deliveries
//! (semantics 3). Pure logic; the same for delivery, resync and dry-run.

use crate::providers::{LeaveAction, MemberStatus, OnLeave};
use serde_json::{Map, Value};

/// What the worker recorded at the provider for an address.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub status: String,
    pub remote_id: Option<String>,
    pub fields: Map<String, Value>,
    /// False when a full resync asked for the member to be sent again whatever we recorded.
    pub verified: bool,
}

impl Recorded {
    pub fn is_member(&self) -> bool {
        MemberStatus::parse(&self.status).is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Not at the provider yet: add with the fields.
    Add,
    /// A member whose fields changed.
    Update,
    /// Left the filter: apply the binding's leave action at the provider.
    Leave(LeaveAction),
    /// Left the filter of an `on_leave => keep` binding: stop tracking it, call nothing.
    Forget,
    /// Erase it at the provider for good (a GDPR request).
    Erase,
    /// Wanted, but the provider holds a consent state we must not override.
    Refrain(String),
    /// Already right.
    Nothing,
}

impl Action {
    /// The operation's name in `listsync.dry_run` and the delivery log.
    pub fn describe(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Update => "update",
            Action::Leave(action) => action.as_str(),
            Action::Forget => OnLeave::Keep.as_str(),
            Action::Erase => "erase",
            Action::Refrain(_) => "skip",
            Action::Nothing => "none",
        }
    }
}

/// Decides what one pair needs. `desired` is the mapped fields of the row the filter matches
/// for the address (None: no row matches), `suppressed` says the address is on the local
/// suppression list, `erase` that a GDPR erasure was requested.
pub fn plan(
    desired: Option<&Map<String, Value>>,
    recorded: Option<&Recorded>,
    suppressed: bool,
    erase: bool,
    on_leave: OnLeave,
) -> Action {
    if erase {
        return if recorded.is_some() {
            Action::Erase
        } else {
            Action::Nothing
        };
    }
    let desired = if suppressed { None } else { desired };
    match (desired, recorded) {
        (Some(_), Some(r)) if !r.is_member() => Action::Refrain(format!(
            "the address is {} at the provider; it is not re-subscribed",
            r.status
        )),
        (Some(fields), Some(r)) if r.verified && *fields == r.fields => Action::Nothing,
        (Some(_), Some(_)) => Action::Update,
        (Some(_), None) => Action::Add,
        (None, Some(r)) if !r.is_member() => Action::Nothing,
        (None, Some(_)) => match on_leave {
            OnLeave::Keep => Action::Forget,
            OnLeave::Act(action) => Action::Leave(action),
        },
        (None, None) => Action::Nothing,
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::providers::ConsentStatus;
    use serde_json::json;

    const REMOVE: OnLeave = OnLeave::Act(LeaveAction::Remove);

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn recorded(status: &str, f: Value) -> Recorded {
        Recorded {
            status: status.into(),
            remote_id: None,
            fields: fields(f),
            verified: true,
        }
    }

    #[test]
    fn entering_changing_and_leaving() {
        let ann = fields(json!({"FNAME": "Ann"}));
        assert_eq!(plan(Some(&ann), None, false, false, REMOVE), Action::Add);
        assert_eq!(
            plan(
                Some(&ann),
                Some(&recorded("subscribed", json!({"FNAME": "Ann"}))),
                false,
                false,
                REMOVE
            ),
            Action::Nothing
        );
        assert_eq!(
            plan(
                Some(&ann),
                Some(&recorded("pending", json!({"FNAME": "Anne"}))),
                false,
                false,
                REMOVE
            ),
            Action::Update
        );
        assert_eq!(
            plan(
                None,
                Some(&recorded("subscribed", json!({}))),
                false,
                false,
                OnLeave::Act(LeaveAction::Archive)
            ),
            Action::Leave(LeaveAction::Archive)
        );
        assert_eq!(
            plan(
                None,
                Some(&recorded("subscribed", json!({}))),
                false,
                false,
                OnLeave::Keep
            ),
            Action::Forget
        );
        assert_eq!(plan(None, None, false, false, REMOVE), Action::Nothing);
    }

    /// `keep` is the absence of a leave action: a member who leaves the filter, or is
    /// suppressed, is only forgotten and nothing is sent for it.
    #[test]
    fn keep_forgets_and_every_other_setting_leaves_with_its_action() {
        let ann = fields(json!({}));
        let member = recorded("subscribed", json!({}));
        for (desired, suppressed) in [(None, false), (Some(&ann), true)] {
            let planned = |on_leave| plan(desired, Some(&member), suppressed, false, on_leave);
            assert_eq!(planned(OnLeave::Keep), Action::Forget);
            for action in [
                LeaveAction::Remove,
                LeaveAction::Archive,
                LeaveAction::Unsubscribe,
                LeaveAction::Delete,
            ] {
                assert_eq!(planned(OnLeave::Act(action)), Action::Leave(action));
            }
        }
    }

    /// `dry_run` and the delivery log name what happens to a leaving member as its binding's
    /// `on_leave` is written.
    #[test]
    fn leaving_is_described_by_the_setting() {
        let member = recorded("subscribed", json!({}));
        for on_leave in OnLeave::ALL {
            let action = plan(None, Some(&member), false, false, on_leave);
            assert_eq!(action.describe(), on_leave.as_str());
        }
    }

    #[test]
    fn a_full_resync_sends_members_again() {
        let ann = fields(json!({"FNAME": "Ann"}));
        let mut unverified = recorded("subscribed", json!({"FNAME": "Ann"}));
        unverified.verified = false;
        assert_eq!(
            plan(Some(&ann), Some(&unverified), false, false, REMOVE),
            Action::Update
        );
    }

    #[test]
    fn consent_only_moves_one_way() {
        let ann = fields(json!({"FNAME": "Ann"}));
        for status in ConsentStatus::ALL.map(ConsentStatus::as_str) {
            assert!(matches!(
                plan(
                    Some(&ann),
                    Some(&recorded(status, json!({}))),
                    false,
                    false,
                    REMOVE
                ),
                Action::Refrain(_)
            ));
            assert_eq!(
                plan(
                    None,
                    Some(&recorded(status, json!({}))),
                    false,
                    false,
                    REMOVE
                ),
                Action::Nothing
            );
        }
    }

    #[test]
    fn suppression_overrides_the_filter() {
        let ann = fields(json!({}));
        assert_eq!(
            plan(
                Some(&ann),
                Some(&recorded("subscribed", json!({}))),
                true,
                false,
                REMOVE
            ),
            Action::Leave(LeaveAction::Remove)
        );
        assert_eq!(plan(Some(&ann), None, true, false, REMOVE), Action::Nothing);
    }

    #[test]
    fn erasure_reaches_whatever_was_recorded() {
        assert_eq!(
            plan(
                None,
                Some(&recorded("unsubscribed", json!({}))),
                true,
                true,
                OnLeave::Keep
            ),
            Action::Erase
        );
        assert_eq!(plan(None, None, true, true, REMOVE), Action::Nothing);
    }
}
