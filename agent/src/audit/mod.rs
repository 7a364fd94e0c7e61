//! Tamper-evident audit trail: record schema, hash chain, durable writer, verify and tail.
pub mod chain;
pub mod record;
mod writer;

use std::{
    fs,
    io::{self, BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

pub use chain::ChainError;
pub use record::{
    Approved, Entry, Kind, Record, Refs, ResultBase, ResultRecord, StatementBase, StatementRecord, printable,
};
pub use writer::{AuditError, AuditLog, Payload, WriterThread, now_rfc3339, trail_path};

/// The audit directory inside a state dir.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Longest line `verify` and `tail` read: far past any record the agent writes (a statement
/// record holds at most 16 KiB of text), short of what would exhaust memory.
const MAX_LINE: usize = 16 << 20;

/// Reads one line (up to and with its newline) into `buf`; a line longer than MAX_LINE is an
/// error. Returns the bytes read.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let n = io::Read::take(&mut *reader, MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n > MAX_LINE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a line longer than {MAX_LINE} bytes")));
    }
    Ok(n)
}

/// What `verify` found: the last record's sequence number, and every break on the way (the
/// first MAX_BREAKS of them; `more_breaks` counts the rest).
#[derive(Debug, Default)]
pub struct Report {
    pub last_seq: u64,
    pub breaks: Vec<ChainError>,
    pub more_breaks: u64,
}

/// Breaks listed one by one; a trail rewritten throughout is not listed line by line.
const MAX_BREAKS: usize = 1000;

/// Verifies the whole trail, a line at a time, to its end.
pub fn verify(state_dir: &Path) -> Result<Report, VerifyError> {
    let path = trail_path(&dir(state_dir));
    let io_err = |source| VerifyError::Io { path: path.clone(), source };
    let mut reader = BufReader::new(fs::File::open(&path).map_err(io_err)?);
    let mut verifier = chain::Verifier::default();
    let mut report = Report::default();
    let mut line = Vec::new();
    loop {
        if read_line(&mut reader, &mut line).map_err(io_err)? == 0 {
            report.last_seq = verifier.head().seq;
            return Ok(report);
        }
        let complete = line.ends_with(b"\n");
        let text = String::from_utf8_lossy(if complete { &line[..line.len() - 1] } else { &line });
        if let Err(e) = verifier.line(&text, complete) {
            if report.breaks.len() < MAX_BREAKS {
                report.breaks.push(e);
            } else {
                report.more_breaks += 1;
            }
        }
    }
}

/// Prints the last `last` records, then (with `follow`) new ones as they are written.
pub fn tail(state_dir: &Path, last: usize, follow: bool, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    let path = trail_path(&dir(state_dir));
    let mut file = fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut reader = BufReader::new(&mut file);
    let mut lines: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    let mut line = Vec::new();
    let mut pos = 0u64;
    loop {
        let n = read_line(&mut reader, &mut line)?;
        if n == 0 || !line.ends_with(b"\n") {
            break;
        }
        pos += n as u64;
        lines.push_back(line.clone());
        if lines.len() > last {
            lines.pop_front();
        }
    }
    for l in &lines {
        print_line(l, json, out)?;
    }
    out.flush()?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        drop(reader);
        // `pos` never passes a line still being written: it is read again, whole, next time,
        // also when the agent cut it back (a torn write, at a restart) and wrote on from there.
        let len = file.metadata()?.len();
        pos = pos.min(len);
        file.seek(SeekFrom::Start(pos))?;
        reader = BufReader::new(&mut file);
        loop {
            let n = read_line(&mut reader, &mut line)?;
            if n == 0 || !line.ends_with(b"\n") {
                break;
            }
            pos += n as u64;
            print_line(&line, json, out)?;
        }
        out.flush()?;
    }
}

fn print_line(line: &[u8], json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    if json {
        return out.write_all(line);
    }
    match serde_json::from_slice::<Entry>(line) {
        Ok(e) => writeln!(out, "{}", e.display()),
        Err(err) => writeln!(out, "(unreadable record: {err})"),
    }
}
