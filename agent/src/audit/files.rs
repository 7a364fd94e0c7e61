//! The trail's files: the live one the agent appends to, and the segments rotated out of it.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The live file, where records are appended.
pub const TRAIL_FILE: &str = "trail.jsonl";

pub fn trail_path(dir: &Path) -> PathBuf {
    dir.join(TRAIL_FILE)
}

/// A segment rotated out of the live file, named by the sequence number of its first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    pub path: PathBuf,
}

pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("trail-{first_seq}.jsonl"))
}

/// The seq in a segment's file name; None for any other name.
fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("trail-")?.strip_suffix(".jsonl")?;
    // One spelling per number, so two files cannot claim the same place.
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The rotated segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first_seq) = entry.file_name().to_str().and_then(segment_seq) {
            out.push(Segment { first_seq, path: entry.path() });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_parse_one_way() {
        assert_eq!(segment_seq("trail-1.jsonl"), Some(1));
        assert_eq!(segment_seq("trail-18446744073709551615.jsonl"), Some(u64::MAX));
        for other in
            ["trail.jsonl", "trail-.jsonl", "trail-01.jsonl", "trail-1.jsonl.tmp", "trail-x.jsonl", "trail--1.jsonl"]
        {
            assert_eq!(segment_seq(other), None, "{other}");
        }
    }

    #[test]
    fn segments_come_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["trail-100.jsonl", "trail-9.jsonl", "trail.jsonl", "notes.txt", "trail-1.jsonl"] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        let names: Vec<String> = segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["trail-1.jsonl", "trail-9.jsonl", "trail-100.jsonl"]);
    }
}
