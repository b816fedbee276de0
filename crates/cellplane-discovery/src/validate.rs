//! Checks of every request, each failure naming the field and what to do.
//!
//! Names (namespace, service, id) become path segments of the instance key, so
//! they are limited to letters, digits and `-`, `_`, `.` (ids also `:`, for
//! host:port ids): no `/` that would let one name reach into another's prefix.
//!
//! An active check's host given as an IP literal must be an address the cell
//! probes ([`AddressPolicy`]); a name is judged when the check runs.

use std::net::IpAddr;

use cellplane_proto::discovery::{Check, Health, Instance, RegisterRequest, check};

use crate::config::*;
use crate::error::DiscoveryError;

const MAX_NAME: usize = 128;
const MAX_ADDRESS: usize = 253;
const MAX_TAGS: usize = 64;
const MAX_TAG: usize = 128;
const MAX_METADATA: usize = 64;
const MAX_META_KEY: usize = 128;
const MAX_META_VALUE: usize = 512;
const MAX_URL: usize = 2048;

fn name(field: &str, value: &str, extra: &[char]) -> Result<(), DiscoveryError> {
    if value.is_empty() {
        return Err(DiscoveryError::invalid(field, "is required"));
    }
    if value.len() > MAX_NAME {
        return Err(DiscoveryError::invalid(
            field,
            format!("is longer than {MAX_NAME} bytes"),
        ));
    }
    let ok =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(&c);
    if let Some(c) = value.chars().find(|c| !ok(*c)) {
        let allowed = if extra.is_empty() {
            "letters, digits, '-', '_' and '.'"
        } else {
            "letters, digits, '-', '_', '.' and ':'"
        };
        return Err(DiscoveryError::invalid(
            field,
            format!("{value:?} contains {c:?}; use only {allowed}"),
        ));
    }
    if value == "." || value == ".." {
        return Err(DiscoveryError::invalid(
            field,
            format!("{value:?} is not a name"),
        ));
    }
    Ok(())
}

/// A namespace: the tenant the service belongs to (the router routes by it).
pub fn namespace(value: &str) -> Result<(), DiscoveryError> {
    name("namespace", value, &[])
}

pub fn service(value: &str) -> Result<(), DiscoveryError> {
    name("service", value, &[])
}

pub fn instance_id(value: &str) -> Result<(), DiscoveryError> {
    name("id", value, &[':'])
}

/// Namespace, service and id of a request naming one instance.
pub fn instance_ref(ns: &str, svc: &str, id: &str) -> Result<(), DiscoveryError> {
    namespace(ns)?;
    service(svc)?;
    instance_id(id)
}

fn text(field: &str, value: &str, max: usize) -> Result<(), DiscoveryError> {
    if value.len() > max {
        return Err(DiscoveryError::invalid(
            field,
            format!("is longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(DiscoveryError::invalid(
            field,
            "contains control characters",
        ));
    }
    Ok(())
}

/// `host:port` with a non-empty host and a port from 1 to 65535; the host,
/// without the brackets of an IPv6 literal.
fn host_port<'a>(field: &str, value: &'a str) -> Result<&'a str, DiscoveryError> {
    let bad = || DiscoveryError::invalid(field, format!("{value:?} is not host:port"));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(host),
        _ => Err(DiscoveryError::invalid(
            field,
            format!("{value:?}: the port must be a number from 1 to 65535"),
        )),
    }
}

/// An `http://host[:port]/path` URL.
pub fn http_url(field: &str, value: &str) -> Result<http::Uri, DiscoveryError> {
    text(field, value, MAX_URL)?;
    let uri: http::Uri = value
        .parse()
        .map_err(|e| DiscoveryError::invalid(field, format!("{value:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(DiscoveryError::invalid(
                field,
                "https is not supported: check over http:// or use a TCP check",
            ));
        }
        _ => {
            return Err(DiscoveryError::invalid(
                field,
                format!("{value:?} must start with http://"),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(DiscoveryError::invalid(
            field,
            format!("{value:?} has no host"),
        ));
    }
    Ok(uri)
}

/// Refuses a check target whose host is an IP literal `policy` refuses. A name
/// passes: it may not resolve yet, and whatever it resolves to is judged before
/// every run of the check (an answer now would prove nothing then).
fn target(field: &str, host: &str, policy: &AddressPolicy) -> Result<(), DiscoveryError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => policy
            .permits(ip)
            .map_err(|reason| DiscoveryError::invalid(field, reason)),
        Err(_) => Ok(()),
    }
}

/// The check with defaults filled in. `has_lease` says whether the registration
/// attaches the instance to an existing lease; `policy`, which addresses active
/// checks may reach.
pub fn check(
    c: Option<&Check>,
    has_lease: bool,
    policy: &AddressPolicy,
) -> Result<Check, DiscoveryError> {
    let mut c = c.cloned().unwrap_or_default();
    if c.ttl_seconds < 0 {
        return Err(DiscoveryError::invalid(
            "check.ttl_seconds",
            "must not be negative",
        ));
    }
    if c.ttl_seconds > MAX_TTL_SECONDS {
        return Err(DiscoveryError::invalid(
            "check.ttl_seconds",
            format!("must be at most {MAX_TTL_SECONDS}"),
        ));
    }
    if c.ttl_seconds > 0 && has_lease {
        return Err(DiscoveryError::invalid(
            "lease_id",
            "give either a TTL (the cell grants a lease) or an existing lease, not both",
        ));
    }
    match &c.active {
        Some(check::Active::Http(h)) => {
            let uri = http_url("check.http.url", &h.url)?;
            target("check.http.url", uri.host().unwrap_or_default(), policy)?;
        }
        Some(check::Active::Tcp(t)) => {
            let host = host_port("check.tcp.address", &t.address)?;
            target("check.tcp.address", host, policy)?;
        }
        Some(check::Active::Grpc(g)) => {
            let host = host_port("check.grpc.address", &g.address)?;
            target("check.grpc.address", host, policy)?;
            text("check.grpc.service", &g.service, MAX_NAME)?;
        }
        None => {
            if c.interval_ms != 0 || c.timeout_ms != 0 {
                return Err(DiscoveryError::invalid(
                    "check",
                    "interval and timeout need an active check (http, tcp or grpc); the \
                     check kind is missing or unknown to this server",
                ));
            }
        }
    }
    if c.ttl_seconds == 0 && c.active.is_none() && !has_lease {
        return Err(DiscoveryError::invalid(
            "check",
            "an instance needs a TTL (check.ttl_seconds > 0), an existing lease (lease_id) or \
             an active check (http, tcp or grpc) to tell whether it is alive",
        ));
    }
    if c.active.is_some() {
        if c.interval_ms == 0 {
            c.interval_ms = DEFAULT_INTERVAL_MS;
        }
        if c.timeout_ms == 0 {
            c.timeout_ms = DEFAULT_TIMEOUT_MS.min(c.interval_ms);
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&c.interval_ms) {
            return Err(DiscoveryError::invalid(
                "check.interval_ms",
                format!("must be from {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS}"),
            ));
        }
        if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&c.timeout_ms) {
            return Err(DiscoveryError::invalid(
                "check.timeout_ms",
                format!("must be from {MIN_TIMEOUT_MS} to {MAX_TIMEOUT_MS}"),
            ));
        }
    }
    if c.deregister_after_seconds < 0 {
        return Err(DiscoveryError::invalid(
            "check.deregister_after_seconds",
            "must not be negative",
        ));
    }
    if c.deregister_after_seconds == 0 {
        c.deregister_after_seconds = DEFAULT_DEREGISTER_AFTER_SECONDS;
    }
    if c.deregister_after_seconds > MAX_DEREGISTER_AFTER_SECONDS {
        return Err(DiscoveryError::invalid(
            "check.deregister_after_seconds",
            format!("must be at most {MAX_DEREGISTER_AFTER_SECONDS}"),
        ));
    }
    Ok(c)
}

/// The instance to store for a registration: the caller's fields checked, the
/// check's defaults filled in, the fields the cell owns reset. Health starts
/// HEALTHY (registering is a sign of life), or UNKNOWN until an active check runs.
/// `policy` says which addresses active checks may reach.
pub fn register(req: &RegisterRequest, policy: &AddressPolicy) -> Result<Instance, DiscoveryError> {
    let i = req
        .instance
        .as_ref()
        .ok_or_else(|| DiscoveryError::invalid("instance", "is required"))?;
    instance_ref(&i.namespace, &i.service, &i.id)?;
    if i.address.is_empty() {
        return Err(DiscoveryError::invalid("address", "is required"));
    }
    text("address", &i.address, MAX_ADDRESS)?;
    if i.address.chars().any(char::is_whitespace) {
        return Err(DiscoveryError::invalid("address", "contains whitespace"));
    }
    if i.port == 0 || i.port > u32::from(u16::MAX) {
        return Err(DiscoveryError::invalid(
            "port",
            format!("{} is not a port: use 1 to 65535", i.port),
        ));
    }
    if i.tags.len() > MAX_TAGS {
        return Err(DiscoveryError::invalid(
            "tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    for t in &i.tags {
        if t.is_empty() {
            return Err(DiscoveryError::invalid("tags", "a tag is empty"));
        }
        text("tags", t, MAX_TAG)?;
    }
    if i.metadata.len() > MAX_METADATA {
        return Err(DiscoveryError::invalid(
            "metadata",
            format!("at most {MAX_METADATA} entries"),
        ));
    }
    for (k, v) in &i.metadata {
        if k.is_empty() {
            return Err(DiscoveryError::invalid("metadata", "a key is empty"));
        }
        text("metadata key", k, MAX_META_KEY)?;
        text(&format!("metadata[{k}]"), v, MAX_META_VALUE)?;
    }
    if req.lease_id < 0 {
        return Err(DiscoveryError::invalid("lease_id", "must not be negative"));
    }
    let check = self::check(i.check.as_ref(), req.lease_id != 0, policy)?;
    let mut tags = i.tags.clone();
    tags.sort();
    tags.dedup();
    let health = if check.active.is_some() {
        Health::Unknown
    } else {
        Health::Healthy
    };
    Ok(Instance {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        id: i.id.clone(),
        address: i.address.clone(),
        port: i.port,
        tags,
        metadata: i.metadata.clone(),
        check: Some(check),
        health: health as i32,
        health_reason: String::new(),
        unhealthy_since_unix_ms: 0,
        lease_id: req.lease_id,
        lease_owned: false,
        mod_revision: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::discovery::{GrpcCheck, HttpCheck, TcpCheck};

    fn req(check: Option<Check>, lease_id: i64) -> RegisterRequest {
        RegisterRequest {
            instance: Some(Instance {
                namespace: "a".into(),
                service: "web".into(),
                id: "web-1".into(),
                address: "127.0.0.1".into(),
                port: 8080,
                tags: vec!["v2".into(), "blue".into(), "v2".into()],
                check,
                ..Default::default()
            }),
            lease_id,
        }
    }

    fn ttl(s: i64) -> Option<Check> {
        Some(Check {
            ttl_seconds: s,
            ..Default::default()
        })
    }

    fn register(r: &RegisterRequest) -> Result<Instance, DiscoveryError> {
        super::register(r, &Settings::default().check_policy())
    }

    fn err(r: &RegisterRequest) -> String {
        register(r).unwrap_err().to_string()
    }

    #[test]
    fn a_ttl_registration_is_healthy_with_defaults_filled_in() {
        let i = register(&req(ttl(10), 0)).unwrap();
        assert_eq!(i.health, Health::Healthy as i32);
        assert_eq!(i.tags, vec!["blue", "v2"], "sorted, deduplicated");
        let c = i.check.unwrap();
        assert_eq!(c.deregister_after_seconds, DEFAULT_DEREGISTER_AFTER_SECONDS);
    }

    #[test]
    fn an_active_check_starts_unknown_with_default_timing() {
        let c = Check {
            active: Some(check::Active::Http(HttpCheck {
                url: "http://127.0.0.1:9/health".into(),
            })),
            ..Default::default()
        };
        let i = register(&req(Some(c), 0)).unwrap();
        assert_eq!(i.health, Health::Unknown as i32);
        let c = i.check.unwrap();
        assert_eq!(
            (c.interval_ms, c.timeout_ms),
            (DEFAULT_INTERVAL_MS, DEFAULT_TIMEOUT_MS)
        );
    }

    #[test]
    fn bad_names_say_which_field_and_why() {
        let mut r = req(ttl(10), 0);
        r.instance.as_mut().unwrap().service = String::new();
        assert_eq!(err(&r), "service: is required");
        let mut r = req(ttl(10), 0);
        r.instance.as_mut().unwrap().namespace = "a/b".into();
        assert!(
            err(&r).starts_with("namespace: \"a/b\" contains '/'"),
            "{}",
            err(&r)
        );
        let mut r = req(ttl(10), 0);
        r.instance.as_mut().unwrap().id = "10.0.0.1:80".into();
        register(&r).unwrap();
        let mut r = req(ttl(10), 0);
        r.instance.as_mut().unwrap().id = "..".into();
        assert!(err(&r).starts_with("id:"));
        assert!(err(&RegisterRequest::default()).starts_with("instance:"));
    }

    #[test]
    fn bad_ports_addresses_and_liveness_are_refused() {
        let mut r = req(ttl(10), 0);
        r.instance.as_mut().unwrap().port = 0;
        assert!(err(&r).starts_with("port:"));
        r.instance.as_mut().unwrap().port = 70_000;
        assert!(err(&r).starts_with("port:"));
        let mut r = req(ttl(10), 0);
        r.instance.as_mut().unwrap().address = "a b".into();
        assert!(err(&r).starts_with("address:"));
        assert!(err(&req(None, 0)).starts_with("check: an instance needs a TTL"));
        assert!(err(&req(ttl(-1), 0)).starts_with("check.ttl_seconds:"));
        assert!(err(&req(ttl(5), 42)).starts_with("lease_id:"));
        assert!(err(&req(None, -3)).starts_with("lease_id:"));
        // An existing lease alone is enough.
        let i = register(&req(None, 42)).unwrap();
        assert_eq!(i.lease_id, 42);
    }

    #[test]
    fn check_kinds_and_timing_are_checked() {
        let with = |a: check::Active| {
            req(
                Some(Check {
                    active: Some(a),
                    ..Default::default()
                }),
                0,
            )
        };
        let https = with(check::Active::Http(HttpCheck {
            url: "https://x/health".into(),
        }));
        assert!(err(&https).contains("https is not supported"));
        let tcp = with(check::Active::Tcp(TcpCheck {
            address: "localhost".into(),
        }));
        assert!(err(&tcp).starts_with("check.tcp.address:"));
        let grpc = with(check::Active::Grpc(GrpcCheck {
            address: "127.0.0.1:0".into(),
            service: String::new(),
        }));
        assert!(err(&grpc).contains("port must be"));
        register(&with(check::Active::Tcp(TcpCheck {
            address: "[::1]:80".into(),
        })))
        .unwrap();
        // Timing without a kind: a check kind this server does not know decodes
        // as no kind at all.
        let unknown = req(
            Some(Check {
                interval_ms: 1000,
                ..Default::default()
            }),
            0,
        );
        assert!(err(&unknown).contains("unknown to this server"));
        let mut fast = with(check::Active::Tcp(TcpCheck {
            address: "h:1".into(),
        }));
        fast.instance
            .as_mut()
            .unwrap()
            .check
            .as_mut()
            .unwrap()
            .interval_ms = 5;
        assert!(err(&fast).starts_with("check.interval_ms:"));
    }

    #[test]
    fn a_check_of_a_refused_ip_literal_is_refused_naming_the_field() {
        let with = |a: check::Active| {
            req(
                Some(Check {
                    active: Some(a),
                    ..Default::default()
                }),
                0,
            )
        };
        let metadata = with(check::Active::Http(HttpCheck {
            url: "http://169.254.169.254/latest/meta-data/".into(),
        }));
        assert_eq!(
            err(&metadata),
            "check.http.url: address 169.254.169.254 is in discovery.check_deny \
             169.254.0.0/16: the cell does not probe it"
        );
        let status = tonic::Status::from(register(&metadata).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let mapped = with(check::Active::Http(HttpCheck {
            url: "http://[::ffff:169.254.169.254]:80/".into(),
        }));
        assert!(err(&mapped).starts_with("check.http.url: address ::ffff:169.254.169.254"));
        let tcp = with(check::Active::Tcp(TcpCheck {
            address: "[fe80::1]:22".into(),
        }));
        assert!(
            err(&tcp).starts_with("check.tcp.address: address fe80::1 is in discovery.check_deny"),
            "{}",
            err(&tcp)
        );
        let grpc = with(check::Active::Grpc(GrpcCheck {
            address: "100.100.100.200:80".into(),
            service: String::new(),
        }));
        assert!(err(&grpc).starts_with("check.grpc.address: address 100.100.100.200"));
        // A name is judged when the check runs, not here.
        register(&with(check::Active::Http(HttpCheck {
            url: "http://metadata.google.internal/".into(),
        })))
        .unwrap();
        // The cell's own policy decides: one allowing only 10.0.0.0/8 refuses
        // loopback.
        let narrow = AddressPolicy::new(&["10.0.0.0/8".parse().unwrap()], &[]);
        let local = with(check::Active::Tcp(TcpCheck {
            address: "127.0.0.1:80".into(),
        }));
        register(&local).unwrap();
        let e = super::register(&local, &narrow).unwrap_err().to_string();
        assert!(e.contains("discovery.check_allow"), "{e}");
    }

    #[test]
    fn fields_the_cell_owns_are_reset() {
        let mut r = req(ttl(10), 0);
        {
            let i = r.instance.as_mut().unwrap();
            i.health = Health::Unhealthy as i32;
            i.lease_owned = true;
            i.mod_revision = 5;
            i.unhealthy_since_unix_ms = 9;
        }
        let i = register(&r).unwrap();
        assert_eq!(
            (
                i.health,
                i.lease_owned,
                i.mod_revision,
                i.unhealthy_since_unix_ms
            ),
            (Health::Healthy as i32, false, 0, 0)
        );
    }
}
