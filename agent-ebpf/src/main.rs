//! tollgate's kernel side: cgroup socket hooks that redirect, deny and record connection attempts.
#![no_std]
#![no_main]

use agent_common::{
    counters, hook, reason, v4_mapped, verdict, Addr6, Config, ConnRecord, DestKey, Event, GrantKey, GrantValue,
    IdentityKey, IdentityValue, PeerKey, ResourceValue, ANY_UID, EVENTS_BYTES, EVENTS_WAKEUP_BYTES as WAKEUP_BYTES,
    L4_TCP, L4_UDP, MAX_CGROUP_LEVEL, MAX_GRANTS, MAX_IDENTITIES, MAX_RESOURCES, MAX_TRACKED_SOCKETS, MODE_MONITOR,
    NONE, UNLISTED_DENY,
};
use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
        },
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};

// Map statics are named exactly as `agent_common::maps` says; every map is pinned by name so a
// restarted agent adopts the state the running programs use.
#[map]
static TG_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static TG_IDENTITIES: HashMap<IdentityKey, IdentityValue> = HashMap::pinned(MAX_IDENTITIES, 0);
#[map]
static TG_RESOURCES: HashMap<DestKey, ResourceValue> = HashMap::pinned(MAX_RESOURCES, 0);
#[map]
static TG_GRANTS: HashMap<GrantKey, GrantValue> = HashMap::pinned(MAX_GRANTS, 0);
#[map]
static TG_COOKIES: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);
#[map]
static TG_ORIGINS: LruHashMap<PeerKey, ConnRecord> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);
#[map]
static TG_EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map]
static TG_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::LEN, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_DGRAM: u32 = 2;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[cgroup_sock_addr(connect4)]
pub fn tg_connect4(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, hook::CONNECT4) {
        Ok(v) => v,
        Err(_) => DENY,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn tg_connect6(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, hook::CONNECT6) {
        Ok(v) => v,
        Err(_) => DENY,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tg_sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, hook::SENDMSG4) {
        Ok(v) => v,
        Err(_) => DENY,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tg_sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, hook::SENDMSG6) {
        Ok(v) => v,
        Err(_) => DENY,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn tg_getpeername4(ctx: SockAddrContext) -> i32 {
    // getpeername hooks must return 1; a rewrite failure only loses the cosmetic address.
    let _ = try_getpeername(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn tg_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, true);
    ALLOW
}

#[sock_ops]
pub fn tg_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = TG_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn is_ipv6(h: u8) -> bool {
    h == hook::CONNECT6 || h == hook::SENDMSG6
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier rejects the byte-wise copies the
/// compiler would otherwise emit for an array.
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> Addr6 {
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` one 32-bit word at a time (see `read_ip6`).
#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, ip: &Addr6) {
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], ip[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], ip[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], ip[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
}

/// The destination the caller asked for, v4-mapped when it is IPv4.
#[inline(always)]
fn destination(sa: &bpf_sock_addr, v6: bool) -> (Addr6, u32) {
    let port = u16::from_be(sa.user_port as u16) as u32;
    if v6 {
        (read_ip6(sa), port)
    } else {
        (v4_mapped(sa.user_ip4), port)
    }
}

/// Finds the identity of the calling process: its own cgroup first, then its ancestors from the
/// deepest up, each with the caller's uid and then with any uid.
#[inline(always)]
fn identity_of(uid: u32) -> u32 {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(i) = lookup_identity(own, uid) {
        return i;
    }
    let mut found = NONE;
    let mut level = 1;
    while level < MAX_CGROUP_LEVEL {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == own {
            break;
        }
        if let Some(i) = lookup_identity(id, uid) {
            found = i;
        }
        level += 1;
    }
    found
}

#[inline(always)]
fn lookup_identity(cgroup_id: u64, uid: u32) -> Option<u32> {
    let exact = IdentityKey { cgroup_id, uid, _pad: 0 };
    if let Some(v) = unsafe { TG_IDENTITIES.get(exact) } {
        return Some(v.index);
    }
    let any = IdentityKey { cgroup_id, uid: ANY_UID, _pad: 0 };
    unsafe { TG_IDENTITIES.get(any) }.map(|v: &IdentityValue| v.index)
}

#[inline(always)]
fn is_proxy(cfg: &Config, sa: &bpf_sock_addr, v6: bool) -> bool {
    if cfg.active == 0 {
        return false;
    }
    if v6 {
        sa.user_port == cfg.proxy_port6 && read_ip6(sa) == cfg.proxy_ip6
    } else {
        sa.user_port == cfg.proxy_port4 && sa.user_ip4 == cfg.proxy_ip4
    }
}

#[inline(always)]
fn try_decide(ctx: &SockAddrContext, h: u8) -> Result<i32, i64> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cfg = match TG_CONFIG.get(0) {
        Some(c) => *c,
        None => return Ok(ALLOW),
    };
    // The proxy's own upstream sockets carry its mark.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if cfg.active != 0 && !sk.is_null() && unsafe { (*sk).mark } == cfg.agent_mark {
        return Ok(ALLOW);
    }
    let v6 = is_ipv6(h);
    // Connections to the proxy itself: already rewritten by an earlier copy of this program
    // (during an agent restart both generations are attached) or dialled directly, which the
    // proxy refuses because it finds no kernel record for them.
    if is_proxy(&cfg, sa, v6) {
        return Ok(ALLOW);
    }
    let udp = sa.type_ == SOCK_DGRAM;
    let (dst_addr, dst_port) = destination(sa, v6);
    let uid_gid = bpf_get_current_uid_gid();
    let uid = uid_gid as u32;
    let identity = identity_of(uid);
    // In an enrolled cgroup but not the identity (its `uids` narrow it): not enrolled.
    if identity == NONE {
        return Ok(ALLOW);
    }
    let pid_tgid = bpf_get_current_pid_tgid();

    let mut rec = ConnRecord {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ts_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        dst_addr,
        dst_port,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid,
        gid: (uid_gid >> 32) as u32,
        identity,
        resource: NONE,
        family: sa.family,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };

    let key = DestKey { addr: dst_addr, port: dst_port };
    let (mut v, r) = match unsafe { TG_RESOURCES.get(key) } {
        Some(res) => {
            rec.resource = res.index;
            if udp {
                (verdict::DENY, reason::UDP_TO_RESOURCE)
            } else {
                match grant_state(identity, res.index, rec.ts_boot_ns) {
                    reason::GRANTED if cfg.active == 0 => (verdict::DENY, reason::NO_PROXY),
                    reason::GRANTED => (verdict::REDIRECT, reason::GRANTED),
                    other => (verdict::DENY, other),
                }
            }
        }
        None if cfg.unlisted == UNLISTED_DENY => (verdict::DENY, reason::UNLISTED),
        None => (verdict::ALLOW, reason::UNLISTED),
    };

    let mut would_deny = 0;
    if v == verdict::DENY && cfg.mode == MODE_MONITOR {
        would_deny = 1;
        // Monitor mode still sends protected TCP traffic through the proxy so it is audited.
        v = if rec.resource != NONE && !udp && cfg.active != 0 { verdict::REDIRECT } else { verdict::ALLOW };
    }

    if v == verdict::REDIRECT {
        if v6 {
            write_ip6(sa, &cfg.proxy_ip6);
            sa.user_port = cfg.proxy_port6;
        } else {
            sa.user_ip4 = cfg.proxy_ip4;
            sa.user_port = cfg.proxy_port4;
        }
        if TG_COOKIES.insert(rec.cookie, rec, 0).is_err() {
            // Without the record the proxy cannot attribute the connection; refuse it.
            v = verdict::DENY;
        }
    }

    // Datagrams that pass are not connection attempts; an event per packet would flood.
    let quiet = v == verdict::ALLOW && would_deny == 0 && (h == hook::SENDMSG4 || h == hook::SENDMSG6);
    if !quiet {
        emit(&rec, h, v, r, if udp { L4_UDP } else { L4_TCP }, would_deny);
    }
    Ok(if v == verdict::DENY { DENY } else { ALLOW })
}

#[inline(always)]
fn grant_state(identity: u32, resource: u32, now: u64) -> u8 {
    if identity == NONE {
        return reason::NOT_GRANTED;
    }
    let key = GrantKey { identity, resource };
    match unsafe { TG_GRANTS.get(key) } {
        Some(GrantValue { expires_boot_ns }) if *expires_boot_ns == 0 || *expires_boot_ns > now => reason::GRANTED,
        Some(_) => reason::GRANT_EXPIRED,
        None => reason::NOT_GRANTED,
    }
}

#[inline(always)]
fn emit(rec: &ConnRecord, h: u8, v: u8, r: u8, l4: u8, would_deny: u8) {
    match TG_EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event { record: *rec, hook: h, verdict: v, reason: r, l4, would_deny, _pad: [0; 3] });
            // Waking the reader for every event costs more than the hook itself under load;
            // wake it only once a batch is pending. The agent also drains on a short timer.
            // Redirects and denials wake it at once, so /proc still has the process's exe.
            let urgent = v != verdict::ALLOW || would_deny != 0;
            let flags = if urgent || TG_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(flags as u64);
            bump(counters::EVENTS_SENT);
        }
        None => bump(counters::EVENTS_DROPPED),
    }
}

#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Result<(), i64> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rec = unsafe { TG_COOKIES.get(cookie) }.ok_or(0i64)?;
    let port = ((rec.dst_port as u16).to_be()) as u32;
    if v6 {
        write_ip6(sa, &rec.dst_addr);
        sa.user_port = port;
    } else {
        sa.user_ip4 = rec.dst_addr[3];
        sa.user_port = port;
    }
    Ok(())
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(());
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rec = unsafe { TG_COOKIES.get(cookie) }.ok_or(0i64)?;
    let addr = match ctx.family() {
        AF_INET => v4_mapped(ctx.local_ip4()),
        // Word by word, as for bpf_sock_addr: ctx arrays must not be copied byte-wise.
        AF_INET6 => unsafe {
            let ip = &(*ctx.ops).local_ip6;
            [
                core::ptr::read_volatile(&ip[0]),
                core::ptr::read_volatile(&ip[1]),
                core::ptr::read_volatile(&ip[2]),
                core::ptr::read_volatile(&ip[3]),
            ]
        },
        _ => return Ok(()),
    };
    let key = PeerKey { addr, port: ctx.local_port() };
    if TG_ORIGINS.insert(key, rec, 0).is_err() {
        bump(counters::HANDOFF_FAILED);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
