//! ABI shared by the eBPF programs and the agent: map names, keys, values and event layout.
#![no_std]

/// Names of the maps the programs declare; the agent opens them by these names.
pub mod maps {
    /// `Array<Config>` with one slot: where the proxy listens and how to decide.
    pub const CONFIG: &str = "TG_CONFIG";
    /// `HashMap<IdentityKey, IdentityValue>`: enrolled cgroups (and optional uid) -> identity.
    pub const IDENTITIES: &str = "TG_IDENTITIES";
    /// `HashMap<DestKey, ResourceValue>`: protected destinations -> resource.
    pub const RESOURCES: &str = "TG_RESOURCES";
    /// `HashMap<GrantKey, GrantValue>`: which identity may reach which resource, until when.
    pub const GRANTS: &str = "TG_GRANTS";
    /// `LruHashMap<u64, ConnRecord>`: redirected sockets by socket cookie (for getpeername).
    pub const COOKIES: &str = "TG_COOKIES";
    /// `LruHashMap<PeerKey, ConnRecord>`: redirected connections by the client's own address,
    /// filled by sockops when the client's connection is established; read by the proxy.
    pub const ORIGINS: &str = "TG_ORIGINS";
    /// `RingBuf` of `Event`s.
    pub const EVENTS: &str = "TG_EVENTS";
    /// `PerCpuArray<u64>`: counters, indexed by `counters::*`.
    pub const COUNTERS: &str = "TG_COUNTERS";

    /// Every map, for pinning and clean-up.
    pub const ALL: [&str; 8] = [CONFIG, IDENTITIES, RESOURCES, GRANTS, COOKIES, ORIGINS, EVENTS, COUNTERS];
}

/// Program names as the ELF object exports them (function names, not section names).
pub mod programs {
    pub const CONNECT4: &str = "tg_connect4";
    pub const CONNECT6: &str = "tg_connect6";
    pub const SENDMSG4: &str = "tg_sendmsg4";
    pub const SENDMSG6: &str = "tg_sendmsg6";
    pub const GETPEERNAME4: &str = "tg_getpeername4";
    pub const GETPEERNAME6: &str = "tg_getpeername6";
    pub const SOCKOPS: &str = "tg_sockops";
}

/// Indexes into the `COUNTERS` per-CPU array.
pub mod counters {
    /// Ring-buffer reservations that failed: events the kernel could not deliver.
    pub const EVENTS_DROPPED: u32 = 0;
    /// Events delivered to the ring buffer.
    pub const EVENTS_SENT: u32 = 1;
    /// Redirect records sockops could not hand to the proxy (ORIGINS insert failed).
    pub const HANDOFF_FAILED: u32 = 2;
    pub const LEN: u32 = 3;
}

/// Map sizes.
pub const MAX_IDENTITIES: u32 = 4096;
pub const MAX_RESOURCES: u32 = 4096;
pub const MAX_GRANTS: u32 = 16384;
pub const MAX_TRACKED_SOCKETS: u32 = 65536;
pub const EVENTS_BYTES: u32 = 4 << 20;
/// Pending event bytes at which the kernel wakes the agent (about 170 events); below that the
/// agent drains the ring buffer every `EVENTS_POLL_MS`.
pub const EVENTS_WAKEUP_BYTES: u64 = 16 << 10;
pub const EVENTS_POLL_MS: u64 = 20;

/// Deepest cgroup level the programs walk looking for an enrolled ancestor.
pub const MAX_CGROUP_LEVEL: i32 = 16;

/// The default `Config::agent_mark` ("tlgt").
pub const AGENT_MARK: u32 = 0x746c_6774;

/// `IdentityKey::uid` value that matches every uid.
pub const ANY_UID: u32 = u32::MAX;
/// `Event::identity` / `Event::resource` when there is none.
pub const NONE: u32 = u32::MAX;

pub const MODE_ENFORCE: u32 = 0;
pub const MODE_MONITOR: u32 = 1;
pub const UNLISTED_ALLOW: u32 = 0;
pub const UNLISTED_DENY: u32 = 1;

/// Runtime configuration written by the agent. Addresses and ports are stored exactly as
/// `bpf_sock_addr` holds them (network byte order), so the programs copy them without swapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub proxy_ip4: u32,
    /// Network-order port in the low 16 bits, as in `bpf_sock_addr::user_port`.
    pub proxy_port4: u32,
    pub proxy_ip6: [u32; 4],
    pub proxy_port6: u32,
    /// SO_MARK the proxy sets on its upstream sockets: those are never redirected. Setting a
    /// mark needs CAP_NET_ADMIN, which enrolled agents must not have.
    pub agent_mark: u32,
    pub mode: u32,
    pub unlisted: u32,
    /// Non-zero once the agent has written a complete configuration.
    pub active: u32,
    pub _pad: u32,
}

/// IPv6 address words in network byte order; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`) so
/// connect4 and connect6 with a mapped address find the same entries.
pub type Addr6 = [u32; 4];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    pub cgroup_id: u64,
    pub uid: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    pub index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub addr: Addr6,
    /// Host-order port.
    pub port: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceValue {
    pub index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub identity: u32,
    pub resource: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantValue {
    /// `CLOCK_BOOTTIME` nanoseconds after which the grant no longer holds; 0 = never.
    pub expires_boot_ns: u64,
}

/// The client's own address as the proxy sees it after `accept`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: Addr6,
    /// Host-order port.
    pub port: u32,
}

/// What the kernel knows about a connection attempt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    pub cookie: u64,
    pub cgroup_id: u64,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts_boot_ns: u64,
    /// Original destination (v4-mapped for IPv4).
    pub dst_addr: Addr6,
    /// Original destination port, host order.
    pub dst_port: u32,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub identity: u32,
    pub resource: u32,
    /// Socket family (AF_INET = 2, AF_INET6 = 10).
    pub family: u32,
    pub comm: [u8; 16],
}

pub mod hook {
    pub const CONNECT4: u8 = 1;
    pub const CONNECT6: u8 = 2;
    pub const SENDMSG4: u8 = 3;
    pub const SENDMSG6: u8 = 4;
}

pub mod verdict {
    /// Passed untouched.
    pub const ALLOW: u8 = 1;
    /// Rewritten to the proxy.
    pub const REDIRECT: u8 = 2;
    /// Refused with EPERM.
    pub const DENY: u8 = 3;
}

pub mod reason {
    /// A grant names this identity and resource.
    pub const GRANTED: u8 = 1;
    /// The destination is a resource, but no grant gives it to this identity.
    pub const NOT_GRANTED: u8 = 2;
    /// A grant existed but has expired.
    pub const GRANT_EXPIRED: u8 = 3;
    /// No resource names the destination; the policy's `unlisted` action applied.
    pub const UNLISTED: u8 = 4;
    /// Datagrams towards a protected resource are never allowed: the proxy speaks TCP only.
    pub const UDP_TO_RESOURCE: u8 = 5;
    /// The agent has not configured a proxy (never started): fail closed.
    pub const NO_PROXY: u8 = 6;
}

pub const L4_TCP: u8 = 6;
pub const L4_UDP: u8 = 17;

/// One decision, sent on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub record: ConnRecord,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub l4: u8,
    /// Non-zero in monitor mode when enforcement would have denied.
    pub would_deny: u8,
    pub _pad: [u8; 3],
}

/// Converts an IPv4 address in network order (as `bpf_sock_addr::user_ip4`) to its v4-mapped
/// IPv6 form in network-order words.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Addr6 {
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], made of integers, and have no implicit padding
    // (checked by the layout tests below).
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for IdentityKey {}
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for DestKey {}
    unsafe impl aya::Pod for ResourceValue {}
    unsafe impl aya::Pod for GrantKey {}
    unsafe impl aya::Pod for GrantValue {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for ConnRecord {}
    unsafe impl aya::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 12 * 4);
        assert_eq!(size_of::<IdentityKey>(), 16);
        assert_eq!(size_of::<DestKey>(), 20);
        assert_eq!(size_of::<GrantKey>(), 8);
        assert_eq!(size_of::<GrantValue>(), 8);
        assert_eq!(size_of::<PeerKey>(), 20);
        assert_eq!(size_of::<ConnRecord>(), 3 * 8 + 16 + 8 * 4 + 16);
        assert_eq!(size_of::<Event>(), size_of::<ConnRecord>() + 8);
        assert_eq!(size_of::<Event>() % 8, 0);
    }

    #[test]
    fn v4_mapped_matches_ipv6_layout() {
        let ip = u32::from_ne_bytes([127, 0, 0, 1]);
        let m = v4_mapped(ip);
        let mut bytes = [0u8; 16];
        for (i, w) in m.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
    }
}
