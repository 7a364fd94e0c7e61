//! PostgreSQL wire input from a client: startup packets and framed messages, as the proxy reads
//! them. Any bytes decode or fail with an error, never a panic or an oversized allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::proxy::postgres::wire;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        if let Ok(len) = wire::startup_len(data[..4].try_into().unwrap()) {
            let body = &data[4..];
            let _ = wire::parse_startup(&body[..body.len().min(len - 4)]);
        }
    }
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(f)) = wire::decode(&mut buf) {
        // Client and server tags overlap (E is Execute or ErrorResponse): both readings run.
        match f.tag {
            b'Q' => drop(wire::query_text(&f.body)),
            b'P' => drop(wire::parse_message(&f.body)),
            b'B' => {
                drop(wire::bind_names(&f.body));
                drop(wire::bind_parameters(&f.body));
                drop(wire::bind(&f.body).map(|b| b.result_formats()));
            }
            b'D' | b'C' => drop(wire::describe_target(&f.body)),
            b'Z' => drop(wire::ready_status(&f.body)),
            b'K' => drop(wire::backend_key(&f.body)),
            b'E' => {
                drop(wire::execute_portal(&f.body));
                drop(wire::error_message(&f.body));
            }
            _ => {}
        }
    }
});
