//! Audit trail lines, as `audit verify` reads them: any bytes give a verdict, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::audit::chain;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = chain::verify(&text);
    let _ = chain::check_line(&chain::Head::genesis(), 1, &text);
});
