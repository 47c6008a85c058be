//! Where a bound address can be reached from: loopback, the local link, a
//! private network, or the internet.
//!
//! Classification follows the IANA special-purpose address registries, with
//! these deliberate choices:
//!
//! * IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are classified as the IPv4
//!   address they carry; `::ffff:0.0.0.0` is the IPv4 wildcard.
//! * Private covers RFC 1918, CGNAT shared space 100.64/10, IETF protocol
//!   assignments 192.0.0/24, benchmarking 198.18/15, IPv6 ULA fc00::/7 and the
//!   deprecated site-local fec0::/10: none is globally routed, but other hosts
//!   can reach them.
//! * Documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24,
//!   2001:db8::/32) are treated as **public**: they never appear on a real
//!   network, so a host that has one is a lab or test stand-in for a public
//!   address, and alerting is the conservative answer.
//! * Reserved 240/4 and every other unlisted range are public, again because
//!   erring towards an alert is cheaper than missing one.
//! * Multicast groups get their own [`Scope::Multicast`]: a socket bound to a
//!   group address only receives datagrams sent to that group, which are not
//!   routed in from the internet, so it counts as local-network exposure.
//!   Limited broadcast 255.255.255.255 is link-local.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use serde::{Serialize, Serializer};

/// Address scope of a bound address.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// 127.0.0.0/8, ::1, ::ffff:127.x: only this host (or network namespace).
    Loopback,
    /// 169.254/16, fe80::/10, 255.255.255.255: the directly attached link.
    LinkLocal,
    /// RFC 1918, CGNAT, ULA and other non-global unicast space.
    Private,
    /// Globally routable unicast.
    Public,
    /// The wildcard address 0.0.0.0 or `::`: every address of the namespace.
    AllInterfaces,
    /// A multicast group address (224/4, ff00::/8).
    Multicast,
}

impl Scope {
    /// Every scope, in declaration order.
    pub const ALL: [Scope; 6] = [
        Scope::Loopback,
        Scope::LinkLocal,
        Scope::Private,
        Scope::Public,
        Scope::AllInterfaces,
        Scope::Multicast,
    ];

    /// Stable lowercase name: "loopback", "link-local", "private", "public",
    /// "all-interfaces", "multicast".
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Loopback => "loopback",
            Scope::LinkLocal => "link-local",
            Scope::Private => "private",
            Scope::Public => "public",
            Scope::AllInterfaces => "all-interfaces",
            Scope::Multicast => "multicast",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A small set of [`Scope`]s (a bitmask, so [`Exposure`] stays `Copy` and
/// building one never allocates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(u8);

impl ScopeSet {
    /// The empty set.
    pub const EMPTY: ScopeSet = ScopeSet(0);

    /// Adds `s`.
    pub fn insert(&mut self, s: Scope) {
        self.0 |= s.bit();
    }

    /// Whether `s` is in the set.
    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The scopes in the set, in [`Scope::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl Serialize for ScopeSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// Which address families a wildcard socket accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stack {
    /// 0.0.0.0 (or `::ffff:0.0.0.0`).
    Ipv4Only,
    /// `::` with IPV6_V6ONLY set.
    Ipv6Only,
    /// `::` accepting IPv4 too (Linux default, `net.ipv6.bindv6only = 0`).
    DualStack,
}

/// Scope of one unicast, multicast or wildcard address (no interface lookup).
///
/// IPv4-mapped IPv6 addresses are classified as their IPv4 address.
pub fn scope_of(addr: IpAddr) -> Scope {
    match addr.to_canonical() {
        IpAddr::V4(a) => scope_v4(a),
        IpAddr::V6(a) => scope_v6(a),
    }
}

fn scope_v4(a: Ipv4Addr) -> Scope {
    let o = a.octets();
    if a.is_unspecified() {
        Scope::AllInterfaces
    } else if a.is_loopback() {
        Scope::Loopback
    } else if a.is_multicast() {
        Scope::Multicast
    } else if a.is_link_local() || a.is_broadcast() {
        Scope::LinkLocal
    } else if a.is_private()
        // 100.64.0.0/10 CGNAT shared address space (RFC 6598).
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        // 192.0.0.0/24 IETF protocol assignments (not globally reachable).
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        // 198.18.0.0/15 benchmarking (RFC 2544): lab networks, never routed.
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        // 0.0.0.0/8 "this network": cannot be a destination from outside.
        || o[0] == 0
    {
        Scope::Private
    } else {
        Scope::Public
    }
}

fn scope_v6(a: Ipv6Addr) -> Scope {
    let seg0 = a.segments()[0];
    if a.is_unspecified() {
        Scope::AllInterfaces
    } else if a.is_loopback() {
        Scope::Loopback
    } else if a.is_multicast() {
        Scope::Multicast
    } else if a.is_unicast_link_local() {
        Scope::LinkLocal
    } else if a.is_unique_local() || (seg0 & 0xffc0) == 0xfec0 {
        // fc00::/7 ULA, fec0::/10 deprecated site-local.
        Scope::Private
    } else {
        Scope::Public
    }
}

/// Where a bound address is reachable from.
///
/// Built per event by [`Exposure::new`]; `Copy` and allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Exposure {
    /// The bound address, canonicalised (v4-mapped shown as IPv4).
    pub addr: IpAddr,
    /// Scope of the bound address itself.
    pub scope: Scope,
    /// For wildcard binds: which families the socket accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<Stack>,
    /// For `::`: whether the dual-stack answer came from the socket's
    /// IPV6_V6ONLY flag (`true`) or was assumed (`false`, Linux default).
    pub stack_known: bool,
    /// Scopes of the namespace's addresses the socket accepts traffic for.
    /// For a specific address this is just its own scope.
    pub reachable: ScopeSet,
    /// Whether a public address can reach the socket. For a wildcard bind whose
    /// namespace addresses are unknown this is `true` (assume the worst).
    pub reachable_public: bool,
    /// Whether the namespace's addresses were known when this was computed.
    pub interfaces_known: bool,
    /// One public address that reaches the socket, for messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_addr: Option<IpAddr>,
    /// The host firewall's verdict for a new connection from where the listener is
    /// exposed (its details are on the event, `portwatch.exposure.firewall`); `None`
    /// when not evaluated.
    #[serde(skip)]
    pub firewall: Option<crate::classify::firewall::State>,
    /// A NAT rule publishes the listener on a host port reachable from this scope
    /// (its details are on the event, `portwatch.exposure.published`): the listener
    /// is that exposed, whatever its own address says.
    #[serde(skip)]
    pub published: Option<Scope>,
}

impl Exposure {
    /// Classifies a bind of `addr`.
    ///
    /// `v6only` is the socket's IPV6_V6ONLY flag if known; `interfaces` are the
    /// addresses of the socket's network namespace (from [`interface_addrs`] or
    /// [`interface_addrs_in_netns`]), or `None` if unknown. They only matter for
    /// wildcard binds.
    pub fn new(addr: IpAddr, v6only: Option<bool>, interfaces: Option<&[IpAddr]>) -> Exposure {
        let canon = addr.to_canonical();
        let scope = scope_of(canon);
        let mut e = Exposure {
            addr: canon,
            scope,
            stack: None,
            stack_known: true,
            reachable: ScopeSet::EMPTY,
            reachable_public: false,
            interfaces_known: interfaces.is_some(),
            public_addr: None,
            firewall: None,
            published: None,
        };
        if scope != Scope::AllInterfaces {
            e.reachable.insert(scope);
            if scope == Scope::Public {
                e.reachable_public = true;
                e.public_addr = Some(canon);
            }
            return e;
        }
        let stack = match (canon, v6only) {
            (IpAddr::V4(_), _) => Stack::Ipv4Only,
            (IpAddr::V6(_), Some(true)) => Stack::Ipv6Only,
            (IpAddr::V6(_), Some(false)) => Stack::DualStack,
            (IpAddr::V6(_), None) => {
                // Linux defaults to net.ipv6.bindv6only=0, so an unknown flag
                // most likely means dual-stack, which is also the wider answer.
                e.stack_known = false;
                Stack::DualStack
            }
        };
        e.stack = Some(stack);
        let Some(ifaces) = interfaces else {
            e.reachable_public = true;
            return e;
        };
        for a in ifaces {
            let a = a.to_canonical();
            let accepted = matches!(
                (a, stack),
                (IpAddr::V4(_), Stack::Ipv4Only | Stack::DualStack)
                    | (IpAddr::V6(_), Stack::Ipv6Only | Stack::DualStack)
            );
            if !accepted {
                continue;
            }
            let s = scope_of(a);
            e.reachable.insert(s);
            if s == Scope::Public {
                e.reachable_public = true;
                e.public_addr.get_or_insert(a);
            }
        }
        e
    }

    /// Whether this is a wildcard (all-interfaces) bind.
    pub fn is_wildcard(&self) -> bool {
        self.scope == Scope::AllInterfaces
    }

    /// The scope that decides alerting: the bound address's scope, except for
    /// wildcard binds, which are [`Scope::Public`] when a public address (or an
    /// unknown set of addresses) reaches them and [`Scope::Private`] otherwise.
    ///
    /// A wildcard is never rated below private even when the namespace has only
    /// loopback or link-local addresses right now: it will follow any address
    /// added later (DHCP, a VPN, a veth set up after the bind) without a new
    /// bind event, so the sensor would never get another chance to alert.
    pub fn effective_scope(&self) -> Scope {
        let own = match self.scope {
            Scope::AllInterfaces if self.reachable_public => Scope::Public,
            Scope::AllInterfaces => Scope::Private,
            s => s,
        };
        match self.published {
            Some(p) if exposure_rank(p) > exposure_rank(own) => p,
            _ => own,
        }
    }

    /// The scope its own address gives it, before any NAT publication.
    pub fn own_scope(&self) -> Scope {
        Exposure {
            published: None,
            ..*self
        }
        .effective_scope()
    }

    /// Stable lowercase string of [`Exposure::scope`].
    pub fn as_str(&self) -> &'static str {
        self.scope.as_str()
    }
}

/// How far a scope reaches, for comparing a listener's own exposure with the one a NAT
/// publication gives it.
pub fn exposure_rank(s: Scope) -> u8 {
    match s {
        Scope::Loopback => 0,
        Scope::LinkLocal | Scope::Multicast => 1,
        Scope::Private => 2,
        Scope::Public | Scope::AllInterfaces => 3,
    }
}

/// Addresses of all interfaces in the calling thread's network namespace
/// (via `getifaddrs(3)`), IPv4 and IPv6, including loopback and interfaces
/// that are down (they can come up without a new bind event).
pub fn interface_addrs() -> io::Result<Vec<IpAddr>> {
    Ok(interface_addrs_named()?
        .into_iter()
        .map(|i| i.addr)
        .collect())
}

fn prefix_len(bytes: &[u8]) -> u8 {
    bytes.iter().map(|b| b.count_ones() as u8).sum()
}

/// [`interface_addrs`] with each address's interface name and prefix length: what the
/// firewall verdict needs to send its probe in on the right interface.
pub fn interface_addrs_named() -> io::Result<Vec<crate::classify::firewall::IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head` on success.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Frees the list however we leave this function.
    struct Guard(*mut libc::ifaddrs);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: the pointer came from a successful getifaddrs call and
            // is freed exactly once.
            unsafe { libc::freeifaddrs(self.0) }
        }
    }
    let _guard = Guard(head);
    let mut out = Vec::new();
    let mut named = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs, which
        // stays valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family
        // field tells which concrete struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means the storage is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let addr = IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                    prefix_len(&m.sin_addr.s_addr.to_ne_bytes())
                };
                out.push((addr, prefix));
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means the storage is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let addr = IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                    prefix_len(&m.sin6_addr.s6_addr)
                };
                out.push((addr, prefix));
            }
            _ => continue,
        }
        let name = if ifa.ifa_name.is_null() {
            String::new()
        } else {
            // SAFETY: ifa_name is a NUL-terminated string valid until freeifaddrs.
            unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned()
        };
        if let Some((addr, prefix)) = out.pop() {
            named.push(crate::classify::firewall::IfAddr {
                ifname: name,
                addr,
                prefix,
            });
        }
    }
    Ok(named)
}

/// Addresses of all interfaces in the network namespace at `ns_path` (e.g.
/// `/proc/PID/ns/net` or `/run/netns/NAME`).
///
/// Works by `setns(CLONE_NEWNET)` in a fresh thread that exits afterwards, so
/// the caller's threads never change namespace. Needs CAP_SYS_ADMIN (root).
/// Callers should cache the result per namespace inode: this costs a thread
/// spawn and a netlink dump.
pub fn interface_addrs_in_netns(ns_path: &Path) -> io::Result<Vec<IpAddr>> {
    Ok(interface_addrs_named_in_netns(ns_path)?
        .into_iter()
        .map(|i| i.addr)
        .collect())
}

/// [`interface_addrs_named`] of the network namespace at `ns_path`, read as
/// [`interface_addrs_in_netns`] does.
pub fn interface_addrs_named_in_netns(
    ns_path: &Path,
) -> io::Result<Vec<crate::classify::firewall::IfAddr>> {
    let file = std::fs::File::open(ns_path)?;
    let fd: OwnedFd = file.into();
    let handle = std::thread::Builder::new()
        .name("pw-netns-addrs".into())
        // glibc's getifaddrs keeps netlink buffers on the stack; be generous.
        .stack_size(256 * 1024)
        .spawn(
            move || -> io::Result<Vec<crate::classify::firewall::IfAddr>> {
                // SAFETY: plain syscall on a valid, owned fd; only this thread's
                // network namespace changes, and the thread ends right after.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                interface_addrs_named()
            },
        )?;
    handle
        .join()
        .map_err(|_| io::Error::other("netns address thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().expect("test literal"))
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().expect("test literal"))
    }

    #[test]
    fn ipv4_scopes() {
        let cases = [
            ("127.0.0.1", Scope::Loopback),
            ("127.255.0.9", Scope::Loopback),
            ("169.254.10.1", Scope::LinkLocal),
            ("255.255.255.255", Scope::LinkLocal),
            ("10.1.2.3", Scope::Private),
            ("172.16.0.1", Scope::Private),
            ("172.31.255.254", Scope::Private),
            ("192.168.1.1", Scope::Private),
            ("100.64.0.1", Scope::Private),
            ("100.127.255.255", Scope::Private),
            ("192.0.0.8", Scope::Private),
            ("198.18.0.1", Scope::Private),
            ("198.19.255.1", Scope::Private),
            ("172.32.0.1", Scope::Public),
            ("100.128.0.1", Scope::Public),
            ("8.8.8.8", Scope::Public),
            ("203.0.113.5", Scope::Public),
            ("198.51.100.7", Scope::Public),
            ("192.0.2.1", Scope::Public),
            ("198.20.0.1", Scope::Public),
            ("0.0.0.0", Scope::AllInterfaces),
            ("224.0.0.251", Scope::Multicast),
            ("239.255.255.250", Scope::Multicast),
        ];
        for (a, want) in cases {
            assert_eq!(scope_of(v4(a)), want, "{a}");
        }
    }

    #[test]
    fn ipv6_scopes() {
        let cases = [
            ("::1", Scope::Loopback),
            ("fe80::1", Scope::LinkLocal),
            ("febf::1", Scope::LinkLocal),
            ("fd00::1", Scope::Private),
            ("fc12:3456::1", Scope::Private),
            ("fec0::1", Scope::Private),
            ("2001:db8::1", Scope::Public),
            ("2a00:1450:4001::1", Scope::Public),
            ("::", Scope::AllInterfaces),
            ("ff02::fb", Scope::Multicast),
        ];
        for (a, want) in cases {
            assert_eq!(scope_of(v6(a)), want, "{a}");
        }
    }

    #[test]
    fn v4_mapped_scopes() {
        let cases = [
            ("::ffff:127.0.0.1", Scope::Loopback),
            ("::ffff:127.1.2.3", Scope::Loopback),
            ("::ffff:169.254.1.1", Scope::LinkLocal),
            ("::ffff:10.0.0.1", Scope::Private),
            ("::ffff:100.64.1.1", Scope::Private),
            ("::ffff:203.0.113.5", Scope::Public),
            ("::ffff:0.0.0.0", Scope::AllInterfaces),
            ("::ffff:224.0.0.1", Scope::Multicast),
        ];
        for (a, want) in cases {
            assert_eq!(scope_of(v6(a)), want, "{a}");
        }
        let e = Exposure::new(v6("::ffff:0.0.0.0"), None, Some(&[v6("2001:db8::5")]));
        assert_eq!(e.stack, Some(Stack::Ipv4Only));
        assert!(!e.reachable_public, "v4 wildcard must not see v6 addresses");
        assert_eq!(e.addr, v4("0.0.0.0"));
    }

    #[test]
    fn scope_strings_are_stable() {
        let names: Vec<_> = Scope::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "loopback",
                "link-local",
                "private",
                "public",
                "all-interfaces",
                "multicast"
            ]
        );
        assert_eq!(
            serde_json::to_string(&Scope::AllInterfaces).expect("serialize"),
            "\"all-interfaces\""
        );
    }

    #[test]
    fn specific_address_exposure() {
        let e = Exposure::new(v4("203.0.113.5"), None, None);
        assert_eq!(e.scope, Scope::Public);
        assert!(e.reachable_public);
        assert_eq!(e.public_addr, Some(v4("203.0.113.5")));
        assert_eq!(e.effective_scope(), Scope::Public);
        let e = Exposure::new(v4("10.0.0.5"), None, None);
        assert!(!e.reachable_public);
        assert_eq!(e.effective_scope(), Scope::Private);
        assert_eq!(e.as_str(), "private");
    }

    #[test]
    fn wildcard_resolution() {
        let ifaces = [
            v4("127.0.0.1"),
            v4("10.0.0.5"),
            v6("::1"),
            v6("fe80::1"),
            v6("2001:db8::5"),
        ];
        // 0.0.0.0 sees only the v4 addresses: private, not public.
        let e = Exposure::new(v4("0.0.0.0"), None, Some(&ifaces));
        assert_eq!(e.stack, Some(Stack::Ipv4Only));
        assert!(!e.reachable_public);
        assert!(e.reachable.contains(Scope::Private));
        assert!(!e.reachable.contains(Scope::LinkLocal));
        assert_eq!(e.effective_scope(), Scope::Private);
        // :: dual-stack sees everything, including the public v6 address.
        let e = Exposure::new(v6("::"), Some(false), Some(&ifaces));
        assert_eq!(e.stack, Some(Stack::DualStack));
        assert!(e.stack_known);
        assert!(e.reachable_public);
        assert_eq!(e.public_addr, Some(v6("2001:db8::5")));
        assert_eq!(e.effective_scope(), Scope::Public);
        // :: v6-only does not see 10.0.0.5.
        let e = Exposure::new(
            v6("::"),
            Some(true),
            Some(&[v4("203.0.113.5"), v6("fd00::1")]),
        );
        assert_eq!(e.stack, Some(Stack::Ipv6Only));
        assert!(!e.reachable_public);
        assert!(e.reachable.contains(Scope::Private));
        // Unknown v6only: assumed dual-stack, and recorded as assumed.
        let e = Exposure::new(v6("::"), None, Some(&[v4("203.0.113.5")]));
        assert_eq!(e.stack, Some(Stack::DualStack));
        assert!(!e.stack_known);
        assert!(e.reachable_public);
        // Unknown interfaces: assume public.
        let e = Exposure::new(v4("0.0.0.0"), None, None);
        assert!(e.reachable_public && !e.interfaces_known);
        assert_eq!(e.public_addr, None);
        // Loopback-only namespace: still rated private (addresses may be added).
        let e = Exposure::new(v4("0.0.0.0"), None, Some(&[v4("127.0.0.1")]));
        assert_eq!(e.effective_scope(), Scope::Private);
        let json = serde_json::to_value(e).expect("serialize");
        assert_eq!(json["scope"], "all-interfaces");
        assert_eq!(json["reachable"], serde_json::json!(["loopback"]));
    }

    #[test]
    fn own_namespace_addresses_classify() {
        let addrs = interface_addrs().expect("getifaddrs");
        // Every netns with lo up has 127.0.0.1; a CI sandbox might not bring lo
        // up, so only check the call works and returns sane values.
        for a in &addrs {
            let _ = scope_of(*a);
        }
    }

    #[test]
    fn netns_lookup_enters_the_namespace() {
        // Make a fresh, empty network namespace in a helper thread and read its
        // addresses through /proc/<tid>/ns/net while the thread keeps it alive.
        let (tx, rx) = std::sync::mpsc::channel::<Result<String, io::Error>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: unshare only affects this helper thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(io::Error::last_os_error()));
                return;
            }
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let _ = tx.send(Ok(format!("/proc/self/task/{tid}/ns/net")));
            let _ = done_rx.recv();
        });
        let path = match rx.recv().expect("helper thread") {
            Ok(p) => p,
            // No CAP_SYS_ADMIN, or a sandbox without netns support: the
            // environment cannot run this test, which says nothing of the code.
            Err(e) => {
                eprintln!("skipping: cannot create a network namespace ({e})");
                let _ = t.join();
                return;
            }
        };
        let res = interface_addrs_in_netns(Path::new(&path));
        let _ = done_tx.send(());
        let _ = t.join();
        // A new namespace has only `lo`, down and without addresses.
        assert_eq!(res.expect("addresses of new netns"), Vec::<IpAddr>::new());
        let err = interface_addrs_in_netns(Path::new("/nonexistent/ns")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
