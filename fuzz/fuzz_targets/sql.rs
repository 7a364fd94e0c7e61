//! SQL classification: any text gives a classification (unparseable at worst), never a panic;
//! and texts of one shape (equal but for literals) classify the same, as the proxy's cache
//! assumes; and the fast shape lexer agrees with pg_query's scanner wherever it answers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::sql::{classify, scanned_shape, shape};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let c = classify(text);
        // The fast lexer either gives up or produces the scanner's key exactly.
        assert_eq!(shape(text), scanned_shape(text), "{text:?}");
        // A variant with other digits and other string contents.
        let other: String = text
            .chars()
            .map(|ch| match ch {
                '0'..='8' => char::from(ch as u8 + 1),
                'a'..='y' => char::from(ch as u8 + 1),
                other => other,
            })
            .collect();
        if let (Some(a), Some(b)) = (shape(text), shape(&other))
            && a == b
        {
            let d = classify(&other);
            assert_eq!((&c.kinds, &c.tables, c.where_missing, c.statements), (&d.kinds, &d.tables, d.where_missing, d.statements), "{text:?} vs {other:?}");
            assert_eq!(c.copy_out, d.copy_out);
        }
    }
});
