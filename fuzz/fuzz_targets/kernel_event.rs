//! Ring-buffer items: any length or content decodes or errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::kernel::event;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = event::decode(data) {
        let _ = event::destination(&ev.record);
        let _ = event::comm(&ev.record);
        let _ = (event::hook_name(ev.hook), event::verdict_name(ev.verdict), event::reason_name(ev.reason));
    }
});
