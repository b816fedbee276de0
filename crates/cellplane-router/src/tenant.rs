//! Which tenant a request belongs to.
//!
//! The tenant is the gRPC metadata `cellplane-tenant` if present, else the first
//! path segment of the key: `/acme/x` and `acme/x` both belong to `acme`. A range
//! belongs to tenant T only when it lies inside T's own prefix range (`[/T/,
//! prefix_end(/T/))`, or `[T/, prefix_end(T/))` for keys without a leading slash),
//! so `etcdctl get --prefix /acme/` (range end `/acme0`) routes to acme's cell and
//! a range that could touch two tenants is refused: cells are isolated, and no
//! request may read or write across them.

use thiserror::Error;

/// The metadata key that names the tenant explicitly.
pub const TENANT_METADATA: &str = "cellplane-tenant";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TenantError {
    /// The key has no tenant segment and no `cellplane-tenant` metadata was sent.
    #[error(
        "key {key:?} names no tenant: use /<tenant>/<key> or send the `cellplane-tenant` metadata"
    )]
    NoTenant { key: String },
    /// The request's keys reach beyond one tenant.
    #[error(
        "the request spans tenants ({detail}): each tenant lives in its own cell and cells are \
         isolated, so a range or txn must stay inside one tenant's prefix /<tenant>/"
    )]
    SpansTenants { detail: String },
    #[error("invalid `cellplane-tenant` metadata: {0}")]
    BadMetadata(String),
}

/// The smallest key after every key with `prefix` (etcd's prefix end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The tenant segment of `key` and the tenant's key prefix as written in this key
/// (`/T/` or `T/`).
fn segment(key: &[u8]) -> Option<(String, Vec<u8>)> {
    let (lead, rest) = match key.first() {
        Some(b'/') => (true, &key[1..]),
        _ => (false, key),
    };
    let end = rest.iter().position(|b| *b == b'/')?;
    if end == 0 {
        return None;
    }
    let tenant = std::str::from_utf8(&rest[..end]).ok()?.to_string();
    let mut prefix = Vec::with_capacity(end + 2);
    if lead {
        prefix.push(b'/');
    }
    prefix.extend_from_slice(&rest[..=end]);
    Some((tenant, prefix))
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The tenant of a request touching `[key, range_end)` (`range_end` empty: the one
/// key), given the optional metadata tenant.
///
/// With explicit metadata the keys still must not stray: a key with a tenant
/// segment naming another tenant is refused, so metadata cannot be used to read
/// another tenant's keys in the wrong cell by accident.
pub fn tenant_of(meta: Option<&str>, key: &[u8], range_end: &[u8]) -> Result<String, TenantError> {
    if let Some(t) = meta.filter(|t| t.is_empty() || t.contains('/')) {
        return Err(TenantError::BadMetadata(format!(
            "{t:?} is not a tenant name"
        )));
    }
    let seg = segment(key);
    let (tenant, prefix) = match (meta, seg) {
        (Some(t), Some((k, _))) if k != t => {
            return Err(TenantError::SpansTenants {
                detail: format!(
                    "metadata says tenant {t:?}, key {:?} belongs to {k:?}",
                    show(key)
                ),
            });
        }
        (_, Some((k, p))) => (k, p),
        // Metadata names the tenant, keys are the tenant's own (no segment).
        (Some(t), None) => return Ok(t.to_string()),
        (None, None) => return Err(TenantError::NoTenant { key: show(key) }),
    };
    if !range_end.is_empty() {
        let limit = prefix_end(&prefix);
        if range_end == [0] || range_end > limit.as_slice() {
            return Err(TenantError::SpansTenants {
                detail: format!(
                    "range [{:?}, {:?}) reaches past tenant {tenant:?}'s prefix {:?}",
                    show(key),
                    if range_end == [0] {
                        "\\0 (every key)".to_string()
                    } else {
                        show(range_end)
                    },
                    show(&prefix)
                ),
            });
        }
    }
    Ok(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_segment_with_or_without_leading_slash() {
        assert_eq!(tenant_of(None, b"/acme/x", b""), Ok("acme".into()));
        assert_eq!(tenant_of(None, b"acme/x", b""), Ok("acme".into()));
        assert_eq!(tenant_of(None, b"/acme/", b""), Ok("acme".into()));
    }

    #[test]
    fn prefix_ranges_stay_inside_the_tenant() {
        assert_eq!(tenant_of(None, b"/acme/", b"/acme0"), Ok("acme".into()));
        assert_eq!(tenant_of(None, b"/acme/a", b"/acme/b"), Ok("acme".into()));
        assert_eq!(tenant_of(None, b"acme/", b"acme0"), Ok("acme".into()));
        assert!(matches!(
            tenant_of(None, b"/acme/", b"/acmf"),
            Err(TenantError::SpansTenants { .. })
        ));
        assert!(matches!(
            tenant_of(None, b"/acme/", b"\0"),
            Err(TenantError::SpansTenants { .. })
        ));
    }

    #[test]
    fn keys_without_a_tenant_are_refused_unless_metadata_names_one() {
        assert!(matches!(
            tenant_of(None, b"acme", b""),
            Err(TenantError::NoTenant { .. })
        ));
        assert!(matches!(
            tenant_of(None, b"//x", b""),
            Err(TenantError::NoTenant { .. })
        ));
        assert_eq!(tenant_of(Some("acme"), b"config", b""), Ok("acme".into()));
        assert_eq!(tenant_of(Some("acme"), b"/acme/x", b""), Ok("acme".into()));
        assert!(matches!(
            tenant_of(Some("acme"), b"/globex/x", b""),
            Err(TenantError::SpansTenants { .. })
        ));
        assert!(matches!(
            tenant_of(Some(""), b"/a/x", b""),
            Err(TenantError::BadMetadata(_))
        ));
    }
}
