//! Server answers as the masking proxy reads them: any sequence of requests and response frames
//! is masked, passed on or refused with an error, never a panic; masked rows stay well-formed.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tollgate::{
    mask::{DETECTORS, Glob, Masker, Rule, Style, Target},
    proxy::postgres::{
        track::{Op, Tracker},
        wire,
    },
    sql,
};

fuzz_target!(|data: &[u8]| {
    let [ops, format, rest @ ..] = data else { return };
    let (ops, rest) = (*ops, rest);
    // The second byte: whether the extended-protocol requests describe their statement first
    // (its answer is relayed, not used for the portal).
    let describe = format & 1 == 1;
    let rules = [
        Rule { name: "c".into(), target: Target::Columns(vec![Glob::new("*a*")]), style: Style::Partial },
        Rule { name: "d".into(), target: Target::Detect(DETECTORS.to_vec()), style: Style::Hash },
    ];
    let masker = Arc::new(Masker::new(&rules, [3; 32]));
    let mut t = Tracker::new(masker.clone());
    let copy = sql::classify("COPY t (a, b) TO STDOUT (FORMAT csv, HEADER)").copy_out;
    // The first byte picks the requests the frames answer.
    for i in 0..8 {
        if (ops >> i) & 1 == 0 {
            t.push(Op::Query { copies: copy.iter().cloned().collect(), computed: false, cursors: sql::Deallocates::None, hold: false });
        } else {
            let copy = copy.first().cloned();
            // Computed columns masked too: the path a statement reading masked columns takes.
            let computed = true;
            if describe {
                t.push(Op::DescribeStatement);
            }
            t.push(Op::Bind { portal: String::new(), copy, computed, cursors: sql::Deallocates::None, hold: false });
            t.push(Op::Execute { portal: String::new(), constant: false });
        }
        if (ops >> i) & 3 == 3 {
            t.push(Op::DescribePortal { portal: String::new(), hidden: true });
            t.push(Op::Sync);
        }
    }
    let mut buf = bytes::BytesMut::from(rest);
    while let Ok(Some(f)) = wire::decode(&mut buf) {
        if t.on_frame(f).is_err() {
            break;
        }
    }
    let mut counts = Default::default();
    let _ = masker.detect(rest, &mut counts);
});
