//! Decoding of ring-buffer events into typed values. Pure.
use std::net::SocketAddr;

use agent_common::{ConnRecord, Event, hook, reason, verdict};

use time::OffsetDateTime;

use super::plan::ip_of;
use crate::{ids::View, policy::Access};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes; expected {1}")]
    Size(usize, usize),
}

/// Parses a ring-buffer item; the kernel writes whole `Event`s, anything else is a bug.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len(), size_of::<Event>()));
    }
    // SAFETY: length checked; Event is plain old data, and read_unaligned has no alignment need.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

pub fn destination(rec: &ConnRecord) -> SocketAddr {
    SocketAddr::new(ip_of(&rec.dst_addr), rec.dst_port as u16)
}

pub fn comm(rec: &ConnRecord) -> String {
    let end = rec.comm.iter().position(|&b| b == 0).unwrap_or(rec.comm.len());
    String::from_utf8_lossy(&rec.comm[..end]).into_owned()
}

pub fn hook_name(h: u8) -> &'static str {
    match h {
        hook::CONNECT4 => "connect4",
        hook::CONNECT6 => "connect6",
        hook::SENDMSG4 => "sendmsg4",
        hook::SENDMSG6 => "sendmsg6",
        _ => "unknown",
    }
}

pub fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::ALLOW => "allow",
        verdict::REDIRECT => "redirect",
        verdict::DENY => "deny",
        _ => "unknown",
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::GRANTED => "granted",
        reason::NOT_GRANTED => "not_granted",
        reason::GRANT_EXPIRED => "grant_expired",
        reason::UNLISTED => "unlisted",
        reason::UDP_TO_RESOURCE => "udp_to_resource",
        reason::NO_PROXY => "no_proxy",
        _ => "unknown",
    }
}

/// The policy rule behind a kernel decision, as audit records name it.
pub fn rule(ev: &Event, view: &View, at: OffsetDateTime) -> String {
    match ev.reason {
        reason::GRANTED | reason::GRANT_EXPIRED | reason::NOT_GRANTED => {
            match (view.identity(ev.record.identity), view.resource(ev.record.resource)) {
                (Some((i, _)), Some((r, _))) => match view.policy.access(i, r, at) {
                    Access::Granted { grant } | Access::Expired { grant } => grant.to_string(),
                    Access::NotGranted => "no-grant".into(),
                },
                _ => "no-grant".into(),
            }
        }
        reason::UNLISTED => "spec.unlisted".into(),
        reason::UDP_TO_RESOURCE => "udp-to-resource".into(),
        reason::NO_PROXY => "fail-closed".into(),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_names() {
        let mut ev = Event::default();
        ev.record.dst_addr = agent_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 2]));
        ev.record.dst_port = 5432;
        ev.record.comm[..4].copy_from_slice(b"curl");
        ev.verdict = verdict::REDIRECT;
        // SAFETY: Event is repr(C) POD.
        let bytes = unsafe { std::slice::from_raw_parts((&ev as *const Event).cast::<u8>(), size_of::<Event>()) };
        let back = decode(bytes).unwrap();
        assert_eq!(back, ev);
        assert_eq!(destination(&back.record).to_string(), "127.0.0.2:5432");
        assert_eq!(comm(&back.record), "curl");
        assert_eq!(verdict_name(back.verdict), "redirect");
        assert_eq!(decode(&bytes[1..]), Err(DecodeError::Size(size_of::<Event>() - 1, size_of::<Event>())));
    }
}
