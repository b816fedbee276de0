//! Who a caller is.
//!
//! An identity is proven two ways: by a client certificate issued by the
//! environment's CA, whose subject alternative name carries a `cellplane://` URI,
//! or (tenants and operators only) by a token the router signed after checking a
//! password. The URIs are:
//!
//! | identity | URI |
//! |---|---|
//! | tenant `acme` | `cellplane://tenant/acme` |
//! | operator `alice` | `cellplane://operator/alice` |
//! | router 1 | `cellplane://router/1` |
//! | member 2 of cell `alpha` | `cellplane://member/alpha/2` |
//!
//! A certificate without such a URI proves nothing here: it is refused, never
//! taken for anonymous.

use std::fmt;

/// The caller of a request, as proven (never as claimed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Nothing was proven: the local mode with auth off.
    Anonymous,
    /// A tenant: touches only its own namespace `/T/`.
    Tenant(String),
    /// An operator: compaction, maintenance, membership and the map.
    Operator(String),
    /// A router: forwards tenants' requests it has already checked.
    Router(u64),
    /// A member of a cell: talks Raft to its own cell's members.
    Member { cell: String, id: u64 },
}

/// Why a certificate or name does not make an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error(
        "the certificate names no cellplane identity: it needs a URI subject alternative \
         name such as cellplane://tenant/<name> (`cellplane certs issue` makes one)"
    )]
    NoIdentity,
    #[error("the certificate names two cellplane identities ({0} and {1}); it must name one")]
    Ambiguous(String, String),
    #[error("`{0}` is not a cellplane identity URI")]
    BadUri(String),
    #[error("{0}")]
    BadName(String),
}

const SCHEME: &str = "cellplane://";

/// Longest tenant or operator name.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a tenant name: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, starting
/// with a letter or digit. Names starting with `_` are the system's own (its keys
/// live under `/_cellplane/`), so no tenant can ever be named into them.
pub fn check_tenant_name(name: &str) -> Result<(), IdentityError> {
    check_name("tenant", name)
}

fn check_name(what: &str, name: &str) -> Result<(), IdentityError> {
    let bad = |why: &str| IdentityError::BadName(format!("{what} name {name:?} {why}"));
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(bad("may hold only ASCII letters, digits, '-', '_' and '.'"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad(
            "must start with a letter or digit (names starting with '_' or '.' are reserved)",
        ));
    }
    Ok(())
}

impl Identity {
    /// A tenant identity, with its name checked.
    pub fn tenant(name: &str) -> Result<Identity, IdentityError> {
        check_tenant_name(name)?;
        Ok(Identity::Tenant(name.to_string()))
    }

    /// An operator identity, with its name checked (the same rule as tenants').
    pub fn operator(name: &str) -> Result<Identity, IdentityError> {
        check_name("operator", name)?;
        Ok(Identity::Operator(name.to_string()))
    }

    /// The `cellplane://` URI a certificate carries for this identity (none for
    /// anonymous).
    pub fn uri(&self) -> Option<String> {
        Some(match self {
            Identity::Anonymous => return None,
            Identity::Tenant(t) => format!("{SCHEME}tenant/{t}"),
            Identity::Operator(o) => format!("{SCHEME}operator/{o}"),
            Identity::Router(id) => format!("{SCHEME}router/{id}"),
            Identity::Member { cell, id } => format!("{SCHEME}member/{cell}/{id}"),
        })
    }

    /// Parses a `cellplane://` URI. `Ok(None)` for a URI of another scheme (a
    /// certificate may carry other URIs too).
    pub fn from_uri(uri: &str) -> Result<Option<Identity>, IdentityError> {
        let Some(rest) = uri.strip_prefix(SCHEME) else {
            return Ok(None);
        };
        let bad = || IdentityError::BadUri(uri.to_string());
        let parts: Vec<&str> = rest.split('/').collect();
        let id = match parts.as_slice() {
            ["tenant", t] => Identity::tenant(t)?,
            ["operator", o] => Identity::operator(o)?,
            ["router", n] => Identity::Router(n.parse().map_err(|_| bad())?),
            ["member", cell, n] => {
                check_name("cell", cell)?;
                Identity::Member {
                    cell: cell.to_string(),
                    id: n.parse().map_err(|_| bad())?,
                }
            }
            _ => return Err(bad()),
        };
        Ok(Some(id))
    }

    /// The identity named by a DER certificate (the leaf a TLS peer presented; the
    /// handshake has already checked it chains to the CA).
    pub fn from_certificate(der: &[u8]) -> Result<Identity, IdentityError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut found: Option<Identity> = None;
        for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            if let Some(id) = Identity::from_uri(uri)? {
                if let Some(first) = &found {
                    return Err(IdentityError::Ambiguous(first.to_string(), id.to_string()));
                }
                found = Some(id);
            }
        }
        found.ok_or(IdentityError::NoIdentity)
    }

    /// The tenant this identity is, if it is one.
    pub fn as_tenant(&self) -> Option<&str> {
        match self {
            Identity::Tenant(t) => Some(t),
            _ => None,
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Identity::Operator(_))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Anonymous => f.write_str("anonymous"),
            Identity::Tenant(t) => write!(f, "tenant {t}"),
            Identity::Operator(o) => write!(f, "operator {o}"),
            Identity::Router(id) => write!(f, "router {id}"),
            Identity::Member { cell, id } => write!(f, "member {id} of cell {cell}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for id in [
            Identity::Tenant("acme".into()),
            Identity::Operator("alice".into()),
            Identity::Router(2),
            Identity::Member {
                cell: "alpha".into(),
                id: 3,
            },
        ] {
            let uri = id.uri().unwrap();
            assert_eq!(Identity::from_uri(&uri), Ok(Some(id)));
        }
        assert_eq!(Identity::from_uri("spiffe://x/y"), Ok(None));
        for bad in [
            "cellplane://tenant/",
            "cellplane://tenant/_cellplane",
            "cellplane://tenant/a/b",
            "cellplane://router/x",
            "cellplane://member/alpha",
            "cellplane://root",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tenant_names_exclude_the_reserved_and_the_odd() {
        for ok in ["a", "acme", "team-1.prod", "A_b", &"x".repeat(64)] {
            assert!(check_tenant_name(ok).is_ok(), "{ok} refused");
        }
        for bad in [
            "",
            "_cellplane",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(check_tenant_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
