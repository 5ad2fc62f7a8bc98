//! Email identity (semantics 4): the normalized address is what a binding keeps at a provider.
//!
//! Normalization is trimming and lower-casing; validation is deliberately the practical subset
//! providers accept (one `@`, a dot-separated domain of letters, digits and hyphens, no spaces or
//! control characters), so that an address we send is not refused for its syntax.

/// The address a binding keeps for `raw`, or `None` when `raw` is not a deliverable address.
pub fn normalize(raw: &str) -> Option<String> {
    let address = raw.trim().to_lowercase();
    is_valid(&address).then_some(address)
}

fn is_valid(address: &str) -> bool {
    if address.len() > 254 {
        return false;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    valid_local_part(local) && valid_domain(domain)
}

fn valid_local_part(local: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+/=?^_`{|}~.-";
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || SPECIALS.contains(c))
}

fn valid_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && !tld.chars().all(|c| c.is_ascii_digit()))
}

/// The identity of a contact known by its phone: `tel:` and the number without spaces,
/// dashes, dots or parentheses, `00` read as `+`; 7 to 15 digits (E.164's range). `None` when
/// it is not a phone number.
pub fn phone_identity(raw: &str) -> Option<String> {
    let compact: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}'))
        .collect();
    let (international, digits) = match (compact.strip_prefix('+'), compact.strip_prefix("00")) {
        (Some(rest), _) | (None, Some(rest)) => (true, rest),
        (None, None) => (false, compact.as_str()),
    };
    let valid = (7..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit());
    valid.then(|| format!("tel:{}{digits}", if international { "+" } else { "" }))
}

/// An identity as given to `suppress`/`forget`: an email address, or `tel:` and a phone number.
pub fn normalize_identity(raw: &str) -> Option<String> {
    match raw.trim().strip_prefix("tel:") {
        Some(phone) => phone_identity(phone),
        None => normalize(raw),
    }
}

#[cfg(test)]
mod unit {
    use super::normalize;

    #[test]
    fn trims_and_lowercases() {
        assert_eq!(
            normalize("  Ann.Lee@Example.COM \n").as_deref(),
            Some("ann.lee@example.com")
        );
    }

    #[test]
    fn accepts_common_shapes() {
        for ok in [
            "a@b.co",
            "first.last+tag@sub.example.org",
            "o'brien@example.ie",
            "имя@пример.рф",
        ] {
            assert!(normalize(ok).is_some(), "{ok} should be valid");
        }
    }

    #[test]
    fn rejects_what_providers_refuse() {
        for bad in [
            "",
            "   ",
            "plain",
            "@example.com",
            "ann@",
            "ann@localhost",
            "ann@@example.com",
            "a b@example.com",
            "ann@exa mple.com",
            ".ann@example.com",
            "ann.@example.com",
            "an..n@example.com",
            "ann@-example.com",
            "ann@example.c",
            "ann@example.123",
            "ann@example..com",
            "ann\u{0}@example.com",
        ] {
            assert!(normalize(bad).is_none(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn phone_identities() {
        use super::phone_identity;
        assert_eq!(
            phone_identity("+49 (30) 123-45.67").as_deref(),
            Some("tel:+49301234567")
        );
        assert_eq!(
            phone_identity("0049 30 1234567").as_deref(),
            Some("tel:+49301234567")
        );
        assert_eq!(
            phone_identity("8 (916) 123-45-67").as_deref(),
            Some("tel:89161234567")
        );
        for bad in [
            "",
            "12345",
            "+1234567890123456",
            "call me",
            "+49 30 12a4567",
        ] {
            assert_eq!(phone_identity(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rejects_overlong_parts() {
        let local = "a".repeat(65);
        assert!(normalize(&format!("{local}@example.com")).is_none());
        let label = "b".repeat(64);
        assert!(normalize(&format!("ann@{label}.com")).is_none());
    }
}
