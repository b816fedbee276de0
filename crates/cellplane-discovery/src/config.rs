//! Settings of the discovery service a member hosts, and the defaults and limits
//! of what a registration may ask for, including the addresses its active checks
//! may reach ([`AddressPolicy`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::error::DiscoveryError;

/// Between two runs of an active check, when the registration does not say.
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
/// Deadline of one run of an active check, when the registration does not say.
pub const DEFAULT_TIMEOUT_MS: u64 = 2_000;
/// How long an instance may stay unhealthy before it is removed, when the
/// registration does not say: Consul's minimum for
/// `deregister_critical_service_after`. A TTL instance's lease lasts `ttl` plus
/// this, so a finite default is needed.
pub const DEFAULT_DEREGISTER_AFTER_SECONDS: i64 = 60;

/// Bounds of what a registration may ask for (see `validate`).
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
pub const MIN_TIMEOUT_MS: u64 = 10;
pub const MAX_TIMEOUT_MS: u64 = 300_000;
pub const MAX_TTL_SECONDS: i64 = 86_400;
pub const MAX_DEREGISTER_AFTER_SECONDS: i64 = 7 * 86_400;

const fn v4(ip: [u8; 4], prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(
        Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        prefix,
    ))
}

const fn v6(s: [u16; 8], prefix: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
    ))
}

/// Default of `check_allow`: every address (what `check_deny` leaves).
pub const DEFAULT_CHECK_ALLOW: &[IpNet] = &[v4([0, 0, 0, 0], 0), v6([0; 8], 0)];

/// Default of `check_deny`: where a health check has no business and a probe
/// from inside the cell could do harm. Loopback and private networks are not in
/// it: instances live there (and tests check 127.0.0.1).
pub const DEFAULT_CHECK_DENY: &[IpNet] = &[
    // Link-local, where the metadata services of most clouds answer
    // (169.254.169.254: AWS, GCP, Azure, OpenStack...; 169.254.170.2: ECS task
    // credentials), and their IPv6 counterpart.
    v4([169, 254, 0, 0], 16),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    // Metadata and platform endpoints outside link-local.
    v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128), // AWS IMDS over IPv6
    v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0023], 128), // AWS EKS Pod Identity over IPv6
    v6([0xfd20, 0x00ce, 0, 0, 0, 0, 0, 0x0254], 128), // GCP metadata over IPv6
    v6([0xfd00, 0x0042, 0, 0, 0, 0, 0, 0x0042], 128), // Scaleway metadata over IPv6
    v4([100, 100, 100, 200], 32),                     // Alibaba Cloud metadata
    v4([168, 63, 129, 16], 32),                       // Azure WireServer
    v4([192, 0, 0, 192], 32),                         // Oracle Cloud (classic) metadata
    // "This network" and the unspecified address (a connect to 0.0.0.0 or ::
    // reaches the cell's own host).
    v4([0, 0, 0, 0], 8),
    v6([0; 8], 128),
    // Multicast and broadcast: not one instance.
    v4([224, 0, 0, 0], 4),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    v4([255, 255, 255, 255], 32),
];

/// The `[discovery]` section of a cell definition file: every field optional,
/// unknown fields refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Snapshots buffered per Watch stream. A client that lets the buffer fill is
    /// not reading: its stream is ended with the revision to resume from, and
    /// everything it held is freed.
    pub watch_buffer: usize,
    /// How often the checker asks how long each TTL instance's lease has left.
    pub ttl_poll_ms: u64,
    /// Deadline of one call to the member's own etcd API.
    pub call_timeout_ms: u64,
    /// Active checks running at once on the leader; more wait for a slot (so a
    /// burst of slow checks costs time, not unbounded sockets).
    pub max_concurrent_checks: usize,
    /// Wait before the checker re-reads the store after losing its watch.
    pub retry_backoff_ms: u64,
    /// Networks active checks may reach (`["10.0.0.0/8", "fd00::/8"]`): an
    /// address outside all of them is refused. Default: every address,
    /// [`DEFAULT_CHECK_ALLOW`]; must not be empty.
    ///
    /// Without it any tenant could make the cell's leader connect, every few
    /// seconds, to whatever its network reaches: set it to the networks instances
    /// live in.
    pub check_allow: Vec<IpNet>,
    /// Networks active checks never reach, even inside `check_allow` (deny wins).
    /// Default, [`DEFAULT_CHECK_DENY`]: link-local (169.254.0.0/16, fe80::/10,
    /// with the cloud metadata service at 169.254.169.254), other cloud metadata
    /// endpoints (fd00:ec2::254, fd00:ec2::23, fd20:ce::254, fd00:42::42,
    /// 100.100.100.200, 168.63.129.16, 192.0.0.192), "this network" and the
    /// unspecified address (0.0.0.0/8, ::/128), multicast (224.0.0.0/4,
    /// ff00::/8) and broadcast (255.255.255.255). Loopback is allowed. Setting
    /// the list replaces the default: keep its entries unless the cell must
    /// reach them.
    ///
    /// A check's host, when an IP literal, is judged at registration (refused
    /// with INVALID_ARGUMENT); a name is resolved and judged before every run,
    /// which fails if any address it resolves to is refused. An IPv4-mapped IPv6
    /// address (`::ffff:a.b.c.d`) is judged as its IPv4 address.
    pub check_deny: Vec<IpNet>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            watch_buffer: 64,
            ttl_poll_ms: 500,
            call_timeout_ms: 5_000,
            max_concurrent_checks: 64,
            retry_backoff_ms: 1_000,
            check_allow: DEFAULT_CHECK_ALLOW.to_vec(),
            check_deny: DEFAULT_CHECK_DENY.to_vec(),
        }
    }
}

impl Settings {
    /// Refuses a zero where a positive number is needed, or an empty
    /// `check_allow`, naming the field.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let positive = [
            ("discovery.watch_buffer", self.watch_buffer as u64),
            ("discovery.ttl_poll_ms", self.ttl_poll_ms),
            ("discovery.call_timeout_ms", self.call_timeout_ms),
            (
                "discovery.max_concurrent_checks",
                self.max_concurrent_checks as u64,
            ),
            ("discovery.retry_backoff_ms", self.retry_backoff_ms),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(DiscoveryError::invalid(field, "must be greater than 0"));
            }
        }
        if self.check_allow.is_empty() {
            // Likely a mistake rather than a way to turn checks off: every active
            // check would fail, and every such instance would be removed.
            return Err(DiscoveryError::invalid(
                "discovery.check_allow",
                "must name at least one network (everything: [\"0.0.0.0/0\", \"::/0\"])",
            ));
        }
        Ok(())
    }

    /// The addresses active checks may reach, as these settings say.
    pub fn check_policy(&self) -> AddressPolicy {
        AddressPolicy::new(&self.check_allow, &self.check_deny)
    }
}

/// Which addresses active checks may reach: inside a network of `check_allow`
/// and inside none of `check_deny`.
#[derive(Debug, Clone, PartialEq)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy of these networks. IPv4-mapped IPv6 networks
    /// (`::ffff:169.254.0.0/112`) become the IPv4 networks they map, as the
    /// addresses judged do.
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> AddressPolicy {
        let canonical = |nets: &[IpNet]| nets.iter().map(|n| canonical_net(*n)).collect();
        AddressPolicy {
            allow: canonical(allow),
            deny: canonical(deny),
        }
    }

    /// Whether an active check may connect to `ip`; if not, which setting refuses
    /// it. Deny wins over allow; an IPv4-mapped IPv6 address is judged as its IPv4
    /// address, so `::ffff:169.254.169.254` cannot slip past a rule for
    /// 169.254.0.0/16.
    pub fn permits(&self, ip: IpAddr) -> Result<(), String> {
        let judged = ip.to_canonical();
        let what = if judged == ip {
            format!("address {ip}")
        } else {
            format!("address {ip} (IPv4 {judged})")
        };
        if let Some(net) = self.deny.iter().find(|n| n.contains(&judged)) {
            return Err(format!(
                "{what} is in discovery.check_deny {net}: the cell does not probe it"
            ));
        }
        if !self.allow.iter().any(|n| n.contains(&judged)) {
            return Err(format!(
                "{what} is outside every network of discovery.check_allow: the cell does not \
                 probe it"
            ));
        }
        Ok(())
    }
}

/// `net` itself, or the IPv4 network it maps if it lies within `::ffff:0:0/96`.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && let Some(prefix) = n.prefix_len().checked_sub(96)
        && let Some(ip) = n.network().to_ipv4_mapped()
        && let Ok(v4) = Ipv4Net::new(ip, prefix)
    {
        return IpNet::V4(v4);
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zeros_name_the_field() {
        Settings::default().validate().unwrap();
        let s = Settings {
            ttl_poll_ms: 0,
            ..Settings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("discovery.ttl_poll_ms"), "{e}");
        let s = Settings {
            check_allow: vec![],
            ..Settings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("discovery.check_allow:"), "{e}");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn the_default_lists_are_the_documented_networks() {
        let shown = |l: &[IpNet]| l.iter().map(IpNet::to_string).collect::<Vec<_>>();
        assert_eq!(shown(DEFAULT_CHECK_ALLOW), ["0.0.0.0/0", "::/0"]);
        assert_eq!(
            shown(DEFAULT_CHECK_DENY),
            [
                "169.254.0.0/16",
                "fe80::/10",
                "fd00:ec2::254/128",
                "fd00:ec2::23/128",
                "fd20:ce::254/128",
                "fd00:42::42/128",
                "100.100.100.200/32",
                "168.63.129.16/32",
                "192.0.0.192/32",
                "0.0.0.0/8",
                "::/128",
                "224.0.0.0/4",
                "ff00::/8",
                "255.255.255.255/32",
            ]
        );
    }

    #[test]
    fn defaults_refuse_metadata_and_link_local_and_allow_instances() {
        let p = Settings::default().check_policy();
        for refused in [
            "169.254.169.254",
            "169.254.170.2",
            "fe80::1",
            "fd00:ec2::254",
            "fd20:ce::254",
            "100.100.100.200",
            "168.63.129.16",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
        ] {
            assert!(p.permits(ip(refused)).is_err(), "{refused}");
        }
        for allowed in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.0.7",
            "fd00::1",
            "8.8.8.8",
        ] {
            assert_eq!(p.permits(ip(allowed)), Ok(()), "{allowed}");
        }
        assert_eq!(
            p.permits(ip("169.254.169.254")).unwrap_err(),
            "address 169.254.169.254 is in discovery.check_deny 169.254.0.0/16: the cell does \
             not probe it"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = AddressPolicy::new(&nets(&["10.0.0.0/8"]), &nets(&["10.9.0.0/16"]));
        assert_eq!(p.permits(ip("10.1.2.3")), Ok(()));
        let e = p.permits(ip("10.9.0.1")).unwrap_err();
        assert!(e.contains("discovery.check_deny 10.9.0.0/16"), "{e}");
    }

    #[test]
    fn an_allow_list_refuses_what_it_does_not_name() {
        let p = AddressPolicy::new(&nets(&["10.0.0.0/8"]), &[]);
        assert_eq!(p.permits(ip("10.1.2.3")), Ok(()));
        let e = p.permits(ip("127.0.0.1")).unwrap_err();
        assert!(
            e.contains("outside every network of discovery.check_allow"),
            "{e}"
        );
        // An IPv4 allow-list says nothing of IPv6.
        assert!(p.permits(ip("::1")).is_err());
    }

    #[test]
    fn v4_mapped_v6_addresses_are_judged_as_ipv4() {
        let p = Settings::default().check_policy();
        let e = p.permits(ip("::ffff:169.254.169.254")).unwrap_err();
        assert_eq!(
            e,
            "address ::ffff:169.254.169.254 (IPv4 169.254.169.254) is in discovery.check_deny \
             169.254.0.0/16: the cell does not probe it"
        );
        assert_eq!(p.permits(ip("::ffff:127.0.0.1")), Ok(()));
        // Allowed by an IPv4 network, not by ::/0.
        let only_v4 = AddressPolicy::new(&nets(&["10.0.0.0/8"]), &[]);
        assert_eq!(only_v4.permits(ip("::ffff:10.0.0.1")), Ok(()));
        // A rule written as a mapped network applies to the IPv4 addresses too.
        let mapped_rule = AddressPolicy::new(DEFAULT_CHECK_ALLOW, &nets(&["::ffff:10.0.0.0/104"]));
        let e = mapped_rule.permits(ip("10.2.3.4")).unwrap_err();
        assert!(e.contains("check_deny 10.0.0.0/8"), "{e}");
        assert!(mapped_rule.permits(ip("::ffff:10.2.3.4")).is_err());
        // A wider IPv6 network is left as written.
        assert_eq!(
            canonical_net("::/64".parse().unwrap()),
            "::/64".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn the_lists_read_as_strings_and_a_bad_entry_is_refused() {
        use serde::de::value::{Error, MapDeserializer};
        let read = |entries: Vec<(&'static str, Vec<&'static str>)>| {
            Settings::deserialize(MapDeserializer::<_, Error>::new(entries.into_iter()))
        };
        let s = read(vec![
            ("check_allow", vec!["10.0.0.0/8", "fd00::/8"]),
            ("check_deny", vec![]),
        ])
        .unwrap();
        assert_eq!(s.check_allow, nets(&["10.0.0.0/8", "fd00::/8"]));
        assert!(s.check_deny.is_empty());
        assert_eq!(s.watch_buffer, Settings::default().watch_buffer);
        assert_eq!(
            read(vec![]).unwrap(),
            Settings::default(),
            "left out, the lists keep their defaults"
        );
        let e = read(vec![("check_deny", vec!["169.254.0.0/33"])]).unwrap_err();
        assert!(e.to_string().contains("invalid IP address syntax"), "{e}");
        let e = read(vec![("check_denny", vec![])]).unwrap_err();
        assert!(e.to_string().contains("check_denny"), "{e}");
    }
}
