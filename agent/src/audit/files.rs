//! The trail's files (the live one the agent appends to, the segments rotated out of it) and reading their lines.
use std::{
    collections::VecDeque,
    fs,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
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

/// Longest line `verify` and `tail` read: far past any record the agent writes (a statement
/// record holds at most 16 KiB of text), short of what would exhaust memory.
const MAX_LINE: usize = 16 << 20;

/// Reads one line (up to and with its newline) into `buf`; a line longer than MAX_LINE is an
/// error. Returns the bytes read.
pub fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let n = Read::take(&mut *reader, MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n > MAX_LINE {
        return Err(too_long());
    }
    Ok(n)
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("a line longer than {MAX_LINE} bytes"))
}

/// The last `keep` complete lines of `file` that `take` accepts, read backwards from its end
/// (a segment or live file can be a GiB), and where its last complete line ends.
pub fn last_lines(
    file: &mut fs::File,
    keep: usize,
    take: impl Fn(&[u8]) -> bool,
) -> io::Result<(VecDeque<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 << 10;
    let mut lines = VecDeque::new();
    let mut pos = file.metadata()?.len();
    // Where the last complete line ends; bytes after it are a line still being written.
    let mut complete_end = None;
    // The start of the line being assembled, from the chunks read so far.
    let mut acc: Vec<u8> = Vec::new();
    let emit = |line: Vec<u8>, lines: &mut VecDeque<Vec<u8>>| {
        if take(&line) {
            lines.push_front(line);
        }
        lines.len() >= keep
    };
    while pos > 0 && lines.len() < keep {
        let start = pos.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        pos = start;
        let mut seg_end = buf.len();
        for i in (0..buf.len()).rev() {
            if buf[i] != b'\n' {
                continue;
            }
            if complete_end.is_none() {
                complete_end = Some(start + i as u64 + 1);
            } else {
                let mut line = buf[i + 1..seg_end].to_vec();
                line.append(&mut acc);
                if emit(line, &mut lines) {
                    return Ok((lines, complete_end.unwrap_or(0)));
                }
            }
            acc.clear();
            seg_end = i + 1;
        }
        if complete_end.is_some() {
            let mut head = buf[..seg_end].to_vec();
            head.append(&mut acc);
            acc = head;
        }
        if acc.len() > MAX_LINE {
            return Err(too_long());
        }
    }
    // The file's first line.
    if pos == 0 && !acc.is_empty() && lines.len() < keep {
        emit(acc, &mut lines);
    }
    Ok((lines, complete_end.unwrap_or(0)))
}

/// A line's `seq`, if it has one that can be read.
pub fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

/// How many lines `first_seq` reads past unreadable ones before it gives up.
const FIRST_SCAN: usize = 1000;

/// The seq of `file`'s first record; leaves the file at its start. Unreadable lines before it
/// (a damaged start, which `verify` reports) are counted back from the first readable one, so a
/// segment named by this starts where its records do. None if the first FIRST_SCAN lines hold
/// no readable record.
pub fn first_seq(file: &fs::File) -> io::Result<Option<u64>> {
    let mut line = Vec::new();
    let mut at = file;
    at.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(at);
    let mut found = None;
    for skipped in 0..FIRST_SCAN as u64 {
        if read_line(&mut reader, &mut line)? == 0 {
            break;
        }
        if let Some(seq) = seq_of(&line) {
            found = Some(seq.saturating_sub(skipped).max(1));
            break;
        }
    }
    at.seek(SeekFrom::Start(0))?;
    Ok(found)
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

    #[test]
    fn the_first_seq_is_counted_back_past_unreadable_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let first = |text: &str| {
            fs::write(&path, text).unwrap();
            let f = fs::File::open(&path).unwrap();
            let seq = first_seq(&f).unwrap();
            assert_eq!((&f).stream_position().unwrap(), 0, "left at the start");
            seq
        };
        assert_eq!(first("{\"seq\":41}\n{\"seq\":42}\n"), Some(41));
        assert_eq!(first("garbage\n{\"seq\":41\n{\"seq\":42}\n{\"seq\":43}\n"), Some(40));
        assert_eq!(first("x\ny\n{\"seq\":2}\n"), Some(1), "never before the first record");
        assert_eq!(first(""), None);
        assert_eq!(first(&"x\n".repeat(FIRST_SCAN + 1)), None);
    }

    #[test]
    fn last_lines_are_read_backwards_across_chunks_without_the_line_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let long = |c: char| format!("{}\n", c.to_string().repeat(100_000));
        let text = format!("a\n{}b\n{}c\nincomplete", long('x'), long('y'));
        fs::write(&path, &text).unwrap();
        let mut f = fs::File::open(&path).unwrap();
        let (lines, end) = last_lines(&mut f, 10, |_| true).unwrap();
        let lines: Vec<String> = lines.into_iter().map(|l| String::from_utf8(l).unwrap()).collect();
        assert_eq!(lines, ["a\n".to_string(), long('x'), "b\n".into(), long('y'), "c\n".into()]);
        assert_eq!(end, (text.len() - "incomplete".len()) as u64);
        let (lines, _) = last_lines(&mut f, 2, |l| l.len() > 2).unwrap();
        assert_eq!(lines, [long('x').into_bytes(), long('y').into_bytes()], "only those taken count");
        fs::write(&path, "no newline yet").unwrap();
        assert_eq!(last_lines(&mut fs::File::open(&path).unwrap(), 5, |_| true).unwrap(), (VecDeque::new(), 0));
    }
}
