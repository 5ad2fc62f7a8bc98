//! Addresses: suppression (never send) and erasure (forget everywhere).

use super::*;

/// Addresses never to be sent anywhere (semantics 6). Every binding holding the address is
/// marked dirty, so the provider side follows (by the binding's `on_leave`).
#[pg_extern]
fn suppress(address: Option<&str>, reason: default!(Option<&str>, "NULL")) {
    suppression(required(address, "address"), reason, true).or_raise()
}

#[pg_extern]
fn unsuppress(address: Option<&str>) {
    suppression(required(address, "address"), None, false).or_raise()
}

fn suppression(address: &str, reason: Option<&str>, add: bool) -> Result<()> {
    privilege::require_admin(if add {
        "suppress an address"
    } else {
        "unsuppress an address"
    })?;
    let normalized = listsync_core::address::normalize_identity(address).ok_or_else(|| {
        Error::invalid(format!(
            "\"{address}\" is neither an email address nor tel: and a phone number"
        ))
    })?;
    AsExtension::run(|| {
        if add {
            Spi::run_with_args(
                "INSERT INTO listsync.suppressions (address, reason) VALUES ($1, $2)
                 ON CONFLICT (address) DO UPDATE SET reason = EXCLUDED.reason",
                &[normalized.clone().into(), reason.into()],
            )?;
        } else {
            Spi::run_with_args(
                "DELETE FROM listsync.suppressions WHERE address = $1",
                &[normalized.clone().into()],
            )?;
        }
        Spi::run_with_args(
            &format!(
                "INSERT INTO listsync.outbox AS o (binding_id, address)
                 SELECT id, $1 FROM listsync.bindings WHERE state <> 'inactive' {ON_CONFLICT_DIRTY}"
            ),
            &[normalized.into()],
        )?;
        crate::wake::request_wake();
        Ok(())
    })
}

/// GDPR erasure: suppresses the address everywhere and erases it at the provider of every
/// binding that ever delivered it. Returns the number of bindings asked to erase it.
#[pg_extern]
fn forget(address: Option<&str>) -> i64 {
    forget_impl(required(address, "address")).or_raise()
}

fn forget_impl(address: &str) -> Result<i64> {
    privilege::require_admin("erase an address")?;
    let normalized = listsync_core::address::normalize_identity(address).ok_or_else(|| {
        Error::invalid(format!(
            "\"{address}\" is neither an email address nor tel: and a phone number"
        ))
    })?;
    AsExtension::run(|| {
        Spi::run_with_args(
            "INSERT INTO listsync.suppressions (address, reason) VALUES ($1, 'erased (listsync.forget)')
             ON CONFLICT (address) DO UPDATE SET reason = EXCLUDED.reason",
            &[normalized.clone().into()],
        )?;
        let n = Spi::get_one_with_args::<i64>(
            &format!(
                "WITH asked AS (
                     INSERT INTO listsync.erasures (binding_id, address)
                     SELECT binding_id, address FROM listsync.members WHERE address = $1
                     ON CONFLICT DO NOTHING RETURNING binding_id, address),
                 marked AS (
                     INSERT INTO listsync.outbox AS o (binding_id, address) SELECT binding_id, address FROM asked
                     {ON_CONFLICT_DIRTY} RETURNING 1)
                 SELECT count(*) FROM marked"
            ),
            &[normalized.into()],
        )?
        .unwrap_or(0);
        crate::wake::request_wake();
        Ok(n)
    })
}
