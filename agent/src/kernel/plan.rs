//! What the kernel maps must hold for a policy: computed without touching the kernel.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use agent_common::{
    AGENT_MARK, ANY_UID, Addr6, Config, DestKey, GrantKey, GrantValue, IdentityKey, IdentityValue, MODE_ENFORCE,
    MODE_MONITOR, ResourceValue, UNLISTED_ALLOW, UNLISTED_DENY,
};
use time::OffsetDateTime;

use crate::{
    cgroup::CgroupId,
    ids::Ids,
    policy::{CgroupPath, Mode, Policy, Unlisted},
};

/// Where the proxy accepts redirected connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyAddrs {
    pub v4: SocketAddr,
    /// Without an IPv6 listener, IPv6 sockets are sent to the IPv4 listener v4-mapped.
    pub v6: Option<SocketAddr>,
}

/// A wall-clock instant paired with the `CLOCK_BOOTTIME` reading taken at the same moment,
/// to turn grant expiry times into the kernel's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub wall: OffsetDateTime,
    pub boot_ns: u64,
}

impl Clock {
    pub fn now() -> Self {
        Self { wall: OffsetDateTime::now_utc(), boot_ns: boot_ns() }
    }

    /// Kernel-clock deadline for a wall-clock time; 1 (long past) for times already gone.
    pub fn boot_deadline(&self, at: OffsetDateTime) -> u64 {
        let delta = (at - self.wall).whole_nanoseconds();
        if delta <= 0 { 1 } else { self.boot_ns.saturating_add(delta.min(u64::MAX as i128) as u64) }
    }

    /// Wall-clock time of a kernel timestamp.
    pub fn wall_of(&self, ts_boot_ns: u64) -> OffsetDateTime {
        let delta = self.boot_ns as i128 - ts_boot_ns as i128;
        self.wall - time::Duration::nanoseconds(delta.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }
}

pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// IP in the kernel's layout: network-order words, IPv4 v4-mapped.
pub fn addr6(ip: IpAddr) -> Addr6 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// Inverse of `addr6`; v4-mapped addresses come back as IPv4.
pub fn ip_of(addr: &Addr6) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn port_be(port: u16) -> u32 {
    u32::from(port.to_be())
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub config: Config,
    pub identities: Vec<(IdentityKey, IdentityValue)>,
    pub resources: Vec<(DestKey, ResourceValue)>,
    pub grants: Vec<(GrantKey, GrantValue)>,
    /// Addresses that resolve to two resources; the first named wins.
    pub conflicts: Vec<(SocketAddr, String, String)>,
}

pub struct Inputs<'a> {
    pub policy: &'a Policy,
    pub cgroup_ids: &'a HashMap<CgroupPath, CgroupId>,
    /// Resolved addresses, one list per resource (same order as `policy.resources`).
    pub resolved: &'a [Vec<SocketAddr>],
    pub proxy: ProxyAddrs,
    /// Stable ids; must have seen `policy` (`Ids::assign`).
    pub ids: &'a Ids,
    pub clock: Clock,
}

pub fn plan(i: &Inputs<'_>) -> Plan {
    let p = i.policy;
    let (proxy_ip6, proxy_port6) = match i.proxy.v6 {
        Some(sa) => (addr6(sa.ip()), port_be(sa.port())),
        None => (addr6(i.proxy.v4.ip()), port_be(i.proxy.v4.port())),
    };
    let IpAddr::V4(v4) = i.proxy.v4.ip() else { unreachable!("validated: proxy v4 address is IPv4") };
    let config = Config {
        proxy_ip4: u32::from_ne_bytes(v4.octets()),
        proxy_port4: port_be(i.proxy.v4.port()),
        proxy_ip6,
        proxy_port6,
        agent_mark: AGENT_MARK,
        mode: match p.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Monitor => MODE_MONITOR,
        },
        unlisted: match p.unlisted {
            Unlisted::Allow => UNLISTED_ALLOW,
            Unlisted::Deny => UNLISTED_DENY,
        },
        active: 1,
        _pad: 0,
    };

    let mut identities = Vec::new();
    for id in &p.identities {
        let Some(cg) = i.cgroup_ids.get(&id.cgroup) else { continue };
        let uids: Vec<u32> = if id.uids.is_empty() { vec![ANY_UID] } else { id.uids.clone() };
        for uid in uids {
            identities.push((
                IdentityKey { cgroup_id: cg.0, uid, _pad: 0 },
                IdentityValue { index: i.ids.identity(&id.name) },
            ));
        }
    }

    let mut resources = Vec::new();
    let mut seen: HashMap<DestKey, usize> = HashMap::new();
    let mut conflicts = Vec::new();
    for (index, addrs) in i.resolved.iter().enumerate() {
        let mut mine = HashSet::new();
        for sa in addrs {
            let key = DestKey { addr: addr6(sa.ip()), port: u32::from(sa.port()) };
            if !mine.insert(key) {
                continue;
            }
            match seen.get(&key) {
                Some(&other) => conflicts.push((*sa, p.resources[other].name.clone(), p.resources[index].name.clone())),
                None => {
                    seen.insert(key, index);
                    resources.push((key, ResourceValue { index: i.ids.resource(&p.resources[index].name) }));
                }
            }
        }
    }

    let grants = p
        .grant_table()
        .into_iter()
        .map(|(id, res, exp)| {
            (
                GrantKey {
                    identity: i.ids.identity(&p.identities[id].name),
                    resource: i.ids.resource(&p.resources[res].name),
                },
                GrantValue { expires_boot_ns: exp.map_or(0, |e| i.clock.boot_deadline(e)) },
            )
        })
        .collect();

    Plan { config, identities, resources, grants, conflicts }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;
    use std::path::Path;
    use time::macros::datetime;

    const POLICY: &str = r#"
apiVersion: tollgate/v1alpha1
kind: Policy
metadata: { name: t }
spec:
  unlisted: allow
  identities:
    - { name: a, cgroup: /x/a, uids: [1, 2], groups: [g] }
    - { name: b, cgroup: /x/b }
  resources:
    - { name: db, protocol: tcp, address: "127.0.0.1:5432" }
    - { name: db6, protocol: tcp, address: "[::1]:5432" }
  grants:
    - { name: g1, to: [group:g], resources: [db], expires: "2026-12-01T00:00:00Z" }
    - { name: g2, to: [identity:b], resources: [db, db6] }
    - { name: old, to: [identity:b], resources: [db6], expires: "2020-01-01T00:00:00Z" }
"#;

    #[test]
    fn plan_maps_policy_to_kernel_entries() {
        let pol = policy::parse(POLICY, Path::new("t")).unwrap();
        let ids: HashMap<_, _> =
            [(CgroupPath::parse("/x/a").unwrap(), CgroupId(11)), (CgroupPath::parse("/x/b").unwrap(), CgroupId(22))]
                .into();
        let resolved = vec![vec!["127.0.0.1:5432".parse().unwrap()], vec!["[::1]:5432".parse().unwrap()]];
        let clock = Clock { wall: datetime!(2026-11-30 0:00 UTC), boot_ns: 1_000 };
        let mut names = Ids::default();
        // Ids are stable across policy versions: an earlier version had "zz" first.
        names.assign(&policy::parse(&POLICY.replace("name: a,", "name: zz,"), Path::new("t")).unwrap());
        names.assign(&pol);
        let (a, b) = (names.identity("a"), names.identity("b"));
        assert_eq!((b, a), (1, 2));
        let plan = plan(&Inputs {
            policy: &pol,
            cgroup_ids: &ids,
            resolved: &resolved,
            proxy: ProxyAddrs { v4: "127.0.0.1:15001".parse().unwrap(), v6: None },
            ids: &names,
            clock,
        });
        assert_eq!(plan.config.proxy_port4, u32::from(15001u16.to_be()));
        assert_eq!(plan.config.proxy_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
        // No IPv6 listener: IPv6 sockets go to the IPv4 listener, v4-mapped.
        assert_eq!(plan.config.proxy_ip6, agent_common::v4_mapped(plan.config.proxy_ip4));
        assert_eq!(plan.config.unlisted, UNLISTED_ALLOW);
        assert_eq!(plan.config.agent_mark, AGENT_MARK);
        assert_eq!(plan.identities.len(), 3);
        assert!(
            plan.identities
                .contains(&(IdentityKey { cgroup_id: 22, uid: ANY_UID, _pad: 0 }, IdentityValue { index: b }))
        );
        assert!(
            plan.identities.contains(&(IdentityKey { cgroup_id: 11, uid: 2, _pad: 0 }, IdentityValue { index: a }))
        );
        assert_eq!(
            plan.resources[0].0,
            DestKey { addr: agent_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 1])), port: 5432 }
        );
        let g = |i, r| {
            plan.grants
                .iter()
                .find(|(k, _)| *k == GrantKey { identity: i, resource: r })
                .map(|(_, v)| v.expires_boot_ns)
        };
        let (db, db6) = (names.resource("db"), names.resource("db6"));
        assert_eq!(g(a, db), Some(1_000 + 86_400 * 1_000_000_000));
        assert_eq!(g(b, db), Some(0));
        // g2 never expires, so the expired grant "old" does not shorten b's access to db6.
        assert_eq!(g(b, db6), Some(0));
        assert_eq!(g(a, db6), None);
    }

    #[test]
    fn addresses_round_trip() {
        for s in ["127.0.0.1", "::1", "192.0.2.7", "2001:db8::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_of(&addr6(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(addr6(mapped), addr6("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn clock_conversions() {
        let c = Clock { wall: datetime!(2026-11-30 0:00 UTC), boot_ns: 5_000_000_000 };
        assert_eq!(c.boot_deadline(datetime!(2026-11-29 0:00 UTC)), 1);
        assert_eq!(c.wall_of(4_000_000_000), datetime!(2026-11-29 23:59:59 UTC));
    }
}
