//! Audit trail lines, as `audit verify` reads them: any bytes give a verdict, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::audit::chain;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = chain::verify(&text);
    // As `audit verify` goes on after a break, re-anchoring at the broken line; and as it
    // starts a trail whose oldest segments were removed, at its first line.
    let mut v = chain::Verifier::starting_at(text.split('\n').next().unwrap_or_default());
    for line in text.split_inclusive('\n') {
        let _ = v.line(line.trim_end_matches('\n'), line.ends_with('\n'));
    }
    let _ = chain::check_line(&chain::Head::genesis(), 1, &text);
});
