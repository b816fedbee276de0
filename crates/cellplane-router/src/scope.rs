//! Who may touch what: every tenant rule of the router, in one place.
//!
//! A request arrives with an [`Identity`] the router verified (a client
//! certificate or a token; anonymous when auth is off) and, optionally, the
//! `cellplane-tenant` metadata. [`scope`] turns them and what the request touches
//! ([`Action`]) into the one tenant the request acts for, or refuses it:
//!
//! - A tenant identity T acts for T. The metadata may only repeat T: it narrows,
//!   never widens.
//! - Anonymous callers (auth off) and operators act for the tenant the metadata
//!   names, else the tenant the first key names.
//! - Tenant T touches only keys in [`/T/`, prefix_end(`/T/`)): every key and
//!   range of a Range, Put, DeleteRange, every compare and op of a Txn, a watch's
//!   range. A key without the leading `/T/`, an empty key, a range ending at
//!   `\0` or past `/T0`, a range starting below `/T/`: refused, naming the tenant
//!   and the key.
//! - Tenant names follow [`check_tenant_name`]: names starting with `_` are the
//!   system's, so `/_cellplane/…` (discovery's records) is nobody's namespace.
//! - Operator actions (compaction, maintenance) need an operator identity.
//!
//! Knows nothing of gRPC messages or cells: [`crate::routes`] finds the cell.

use cellplane_security::{Identity, check_tenant_name};
use tonic::Status;

/// The metadata key that names the tenant explicitly.
pub const TENANT_METADATA: &str = "cellplane-tenant";

/// What a request touches.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Keys and ranges: `(key, range_end)`, `range_end` empty for one key.
    Keys(&'a [(&'a [u8], &'a [u8])]),
    /// Something of the tenant's that names no key: a lease grant, a lease by ID,
    /// the tenant's lease list.
    Tenant,
    /// A discovery namespace (which is the tenant).
    Namespace(&'a str),
    /// Acts on a whole cell (compaction, maintenance): operators only.
    Operator,
}

/// The checked outcome: the tenant a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Acts for this tenant, inside its namespace.
    Tenant(String),
    /// A tenant-less action by an anonymous caller with auth off (a lease by ID
    /// with no metadata): the cell answers as it would on its own port.
    Unscoped,
    /// An operator's cell-wide action.
    Operator,
}

impl Scope {
    /// The tenant, if the scope names one.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::Tenant(t) => Some(t),
            _ => None,
        }
    }
}

/// Why a request is refused, as a gRPC status the client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Outside the namespace, or another tenant than proven: PERMISSION_DENIED.
    #[error("{0}")]
    Denied(String),
    /// The request is malformed for routing: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
}

impl From<ScopeError> for Status {
    fn from(e: ScopeError) -> Status {
        match e {
            ScopeError::Denied(m) => Status::permission_denied(m),
            ScopeError::Invalid(m) => Status::invalid_argument(m),
        }
    }
}

use cellplane_proto::prefix_end;

/// `/T/`: the first key of tenant T's namespace.
pub fn namespace(tenant: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(tenant.len() + 2);
    p.push(b'/');
    p.extend_from_slice(tenant.as_bytes());
    p.push(b'/');
    p
}

/// A key for a message: lossy UTF-8, at most 80 characters.
fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s.into_owned()
    }
}

/// The tenant a key names by its first segment (`/T/...`), if it names a valid one.
pub fn tenant_of_key(key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(b"/")?;
    let end = rest.iter().position(|b| *b == b'/')?;
    let t = std::str::from_utf8(&rest[..end]).ok()?;
    check_tenant_name(t).ok().map(|_| t)
}

/// Whether `[key, range_end)` lies inside tenant `t`'s namespace.
fn inside(t: &str, key: &[u8], range_end: &[u8]) -> bool {
    let start = namespace(t);
    let end = prefix_end(&start);
    if !key.starts_with(&start) {
        return false;
    }
    range_end.is_empty() || (range_end != [0] && range_end <= end.as_slice())
}

/// The tenant named by the `cellplane-tenant` metadata, checked.
pub fn metadata_tenant(value: Option<&[u8]>) -> Result<Option<String>, ScopeError> {
    let Some(v) = value else { return Ok(None) };
    let t = std::str::from_utf8(v)
        .map_err(|_| ScopeError::Invalid("`cellplane-tenant` metadata must be ASCII".into()))?;
    check_tenant_name(t)
        .map_err(|e| ScopeError::Invalid(format!("`cellplane-tenant` metadata: {e}")))?;
    Ok(Some(t.to_string()))
}

/// The tenant a caller acts for before looking at keys: its identity's, or the
/// metadata's. `Err` when the two disagree or the identity is not a client's.
fn asserted(identity: &Identity, header: Option<&str>) -> Result<Option<String>, ScopeError> {
    match identity {
        Identity::Tenant(t) => match header {
            Some(h) if h != t => Err(ScopeError::Denied(format!(
                "you are tenant {t:?}; the `cellplane-tenant` metadata names {h:?}: it may \
                 narrow what you touch, never name another tenant"
            ))),
            _ => Ok(Some(t.clone())),
        },
        Identity::Anonymous | Identity::Operator(_) => Ok(header.map(str::to_string)),
        Identity::Router(_) | Identity::Member { .. } => Err(ScopeError::Denied(format!(
            "{identity} is not a client identity: clients use a tenant or operator \
             certificate, or a password"
        ))),
    }
}

/// The scope of a request: who it acts for, checked against what it touches.
pub fn scope(
    identity: &Identity,
    header: Option<&str>,
    action: Action<'_>,
) -> Result<Scope, ScopeError> {
    let asserted = asserted(identity, header)?;
    match action {
        Action::Operator => {
            if identity.is_operator() {
                Ok(Scope::Operator)
            } else {
                Err(ScopeError::Denied(format!(
                    "{identity} may not do this: it acts on every tenant of a cell and needs an \
                     operator identity (an operator certificate or password)"
                )))
            }
        }
        Action::Tenant => Ok(match asserted {
            Some(t) => Scope::Tenant(t),
            None => Scope::Unscoped,
        }),
        Action::Namespace(ns) => {
            check_tenant_name(ns)
                .map_err(|e| ScopeError::Invalid(format!("namespace: {e} (it is the tenant)")))?;
            match asserted {
                Some(t) if t != ns => Err(ScopeError::Denied(format!(
                    "tenant {t:?} may not use discovery namespace {ns:?}: a namespace is the \
                     tenant it belongs to"
                ))),
                _ => Ok(Scope::Tenant(ns.to_string())),
            }
        }
        Action::Keys(ranges) => keys_scope(asserted, ranges),
    }
}

fn keys_scope(asserted: Option<String>, ranges: &[(&[u8], &[u8])]) -> Result<Scope, ScopeError> {
    let Some(&(first, _)) = ranges.first() else {
        return match asserted {
            Some(t) => Ok(Scope::Tenant(t)),
            None => Err(ScopeError::Invalid(
                "the request names no key and no `cellplane-tenant` metadata: the router \
                 cannot tell which tenant it is for"
                    .into(),
            )),
        };
    };
    let tenant = match asserted {
        Some(t) => t,
        None => tenant_of_key(first).map(str::to_string).ok_or_else(|| {
            ScopeError::Invalid(format!(
                "key {:?} names no tenant: write /<tenant>/<key> (tenant names are letters, \
                 digits, '-', '_' and '.', not starting with '_'), or send the \
                 `cellplane-tenant` metadata",
                show(first)
            ))
        })?,
    };
    for &(key, end) in ranges {
        if !inside(&tenant, key, end) {
            let what = if end.is_empty() {
                format!("key {:?}", show(key))
            } else if end == [0] {
                format!("range [{:?}, \\0 (every key))", show(key))
            } else {
                format!("range [{:?}, {:?})", show(key), show(end))
            };
            return Err(ScopeError::Denied(format!(
                "tenant {tenant:?} touches only keys in [{:?}, {:?}); {what} reaches outside it",
                show(&namespace(&tenant)),
                show(&prefix_end(&namespace(&tenant)))
            )));
        }
    }
    Ok(Scope::Tenant(tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<'a>(r: &'a [(&'a [u8], &'a [u8])]) -> Action<'a> {
        Action::Keys(r)
    }

    fn tenant(t: &str) -> Identity {
        Identity::Tenant(t.into())
    }

    #[test]
    fn keys_name_their_tenant_when_nothing_else_does() {
        let a = Identity::Anonymous;
        assert_eq!(
            scope(&a, None, keys(&[(b"/acme/x", b"")])),
            Ok(Scope::Tenant("acme".into()))
        );
        assert_eq!(
            scope(&a, None, keys(&[(b"/acme/", b"/acme0")])),
            Ok(Scope::Tenant("acme".into()))
        );
        for bad in [
            &b"acme/x"[..],
            b"acme",
            b"",
            b"//x",
            b"/_cellplane/discovery/a/x",
        ] {
            let e = scope(&a, None, keys(&[(bad, b"")])).unwrap_err();
            assert!(matches!(e, ScopeError::Invalid(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_range_must_stay_inside_the_namespace() {
        let a = Identity::Anonymous;
        for (k, e) in [
            (&b"/acme/"[..], &b"/acmf"[..]),
            (b"/acme/", b"\0"),
            (b"/acme/", b"/acme0\0"),
            (b"/acme/", b"\xff"),
        ] {
            let err = scope(&a, None, keys(&[(k, e)])).unwrap_err();
            assert!(matches!(err, ScopeError::Denied(_)), "[{k:?}, {e:?})");
        }
        // Starting below `/acme/` (where `/acme-x/` lives): no tenant named by the
        // key, and with acme named by the header, outside its namespace.
        let e = scope(&a, None, keys(&[(b"/acme", b"/acme0")])).unwrap_err();
        assert!(matches!(e, ScopeError::Invalid(_)), "{e}");
        let e = scope(&a, Some("acme"), keys(&[(b"/acme", b"/acme0")])).unwrap_err();
        assert!(matches!(e, ScopeError::Denied(_)), "{e}");
        // The prefix end itself is allowed as the (exclusive) end.
        assert!(scope(&a, None, keys(&[(b"/acme/a", b"/acme0")])).is_ok());
        assert!(scope(&a, None, keys(&[(b"/acme/\xff\xff", b"/acme0")])).is_ok());
    }

    #[test]
    fn the_header_narrows_and_never_widens() {
        // The hole from the issue: header b with an empty key or a bare key.
        for k in [&b""[..], b"config", b"/a/x"] {
            let e = scope(&Identity::Anonymous, Some("b"), keys(&[(k, b"")])).unwrap_err();
            assert!(matches!(e, ScopeError::Denied(_)), "{k:?}: {e}");
            let e = scope(&Identity::Anonymous, Some("b"), keys(&[(k, b"\0")])).unwrap_err();
            assert!(matches!(e, ScopeError::Denied(_)), "{k:?}: {e}");
        }
        assert!(scope(&Identity::Anonymous, Some("b"), keys(&[(b"/b/x", b"")])).is_ok());
        // A tenant identity may repeat itself, not name another.
        assert!(scope(&tenant("b"), Some("b"), keys(&[(b"/b/x", b"")])).is_ok());
        let e = scope(&tenant("b"), Some("a"), keys(&[(b"/a/x", b"")])).unwrap_err();
        assert!(matches!(e, ScopeError::Denied(_)));
        // A tenant identity with keys of another tenant.
        let e = scope(&tenant("b"), None, keys(&[(b"/a/x", b"")])).unwrap_err();
        assert!(e.to_string().contains("\"b\""), "{e}");
    }

    #[test]
    fn every_range_of_a_txn_is_checked() {
        let r: &[(&[u8], &[u8])] = &[(b"/a/x", b""), (b"/a/", b"/a0"), (b"/b/y", b"")];
        assert!(scope(&Identity::Anonymous, None, keys(r)).is_err());
        assert!(scope(&tenant("a"), None, keys(r)).is_err());
    }

    #[test]
    fn operator_actions_need_an_operator() {
        for who in [Identity::Anonymous, tenant("a")] {
            assert!(scope(&who, None, Action::Operator).is_err());
        }
        assert_eq!(
            scope(&Identity::Operator("o".into()), None, Action::Operator),
            Ok(Scope::Operator)
        );
        assert!(scope(&Identity::Router(1), None, keys(&[(b"/a/x", b"")])).is_err());
    }

    #[test]
    fn tenant_things_and_namespaces() {
        assert_eq!(
            scope(&tenant("a"), None, Action::Tenant),
            Ok(Scope::Tenant("a".into()))
        );
        assert_eq!(
            scope(&Identity::Anonymous, None, Action::Tenant),
            Ok(Scope::Unscoped)
        );
        assert!(scope(&tenant("a"), None, Action::Namespace("b")).is_err());
        assert!(scope(&Identity::Anonymous, None, Action::Namespace("_cellplane")).is_err());
        assert_eq!(
            scope(&Identity::Anonymous, None, Action::Namespace("b")),
            Ok(Scope::Tenant("b".into()))
        );
    }

    #[test]
    fn metadata_must_be_a_tenant_name() {
        assert_eq!(metadata_tenant(None), Ok(None));
        assert_eq!(metadata_tenant(Some(b"acme")), Ok(Some("acme".into())));
        for bad in [&b""[..], b"a/b", b"_x", b"\xff"] {
            assert!(metadata_tenant(Some(bad)).is_err(), "{bad:?}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Keys near tenant boundaries: prefixes of `/a/`, `/ab/`, `/b/`, their
        /// prefix ends, `\0`, `\xff` and random bytes.
        fn key() -> impl Strategy<Value = Vec<u8>> {
            let near = prop::sample::select(vec![
                b"".to_vec(),
                b"\0".to_vec(),
                b"/".to_vec(),
                b"/a".to_vec(),
                b"/a/".to_vec(),
                b"/a0".to_vec(),
                b"/a/x".to_vec(),
                b"/ab/".to_vec(),
                b"/b/".to_vec(),
                b"/b0".to_vec(),
                b"/_cellplane/".to_vec(),
                b"a/".to_vec(),
                b"\xff".to_vec(),
                b"/a/\xff\xff".to_vec(),
            ]);
            (near, prop::collection::vec(any::<u8>(), 0..6)).prop_map(|(mut k, tail)| {
                k.extend(tail);
                k
            })
        }

        fn identity() -> impl Strategy<Value = Identity> {
            prop_oneof![
                Just(Identity::Anonymous),
                Just(Identity::Tenant("a".into())),
                Just(Identity::Tenant("ab".into())),
                Just(Identity::Operator("o".into())),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever the request, an admitted one acts for one tenant, the
            /// proven one if there is one, and every range lies in its namespace.
            #[test]
            fn an_admitted_request_stays_in_one_namespace(
                who in identity(),
                header in prop::option::of(prop::sample::select(vec!["a", "ab", "b"])),
                ranges in prop::collection::vec((key(), prop_oneof![Just(vec![]), key()]), 0..4),
            ) {
                let borrowed: Vec<(&[u8], &[u8])> =
                    ranges.iter().map(|(k, e)| (k.as_slice(), e.as_slice())).collect();
                if let Ok(s) = scope(&who, header, Action::Keys(&borrowed)) {
                    let Scope::Tenant(t) = s else {
                        return Err(TestCaseError::fail("keys gave a tenant-less scope"));
                    };
                    if let Identity::Tenant(proven) = &who {
                        prop_assert_eq!(&t, proven);
                    }
                    if let Some(h) = header {
                        prop_assert_eq!(t.as_str(), h);
                    }
                    let start = namespace(&t);
                    let end = prefix_end(&start);
                    for (k, e) in &borrowed {
                        prop_assert!(*k >= start.as_slice() && *k < end.as_slice());
                        prop_assert!(e.is_empty() || (*e != [0u8].as_slice() && *e <= end.as_slice()));
                    }
                    prop_assert!(!t.starts_with('_'));
                }
            }
        }
    }
}
