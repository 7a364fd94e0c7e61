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
pub use record::{Approved, Entry, Kind, Record, Refs, ResultBase, ResultRecord, StatementBase, StatementRecord};
pub use writer::{AuditError, AuditLog, Payload, WriterThread, now_rfc3339, trail_path};

/// The audit directory inside a state dir.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Chain { path: PathBuf, source: ChainError },
}

/// Verifies the whole trail; returns the number of records.
pub fn verify(state_dir: &Path) -> Result<u64, VerifyError> {
    let path = trail_path(&dir(state_dir));
    let text = fs::read(&path).map_err(|source| VerifyError::Io { path: path.clone(), source })?;
    let text = String::from_utf8_lossy(&text);
    chain::verify(&text).map(|h| h.seq).map_err(|source| VerifyError::Chain { path, source })
}

/// Prints the last `last` records, then (with `follow`) new ones as they are written.
pub fn tail(state_dir: &Path, last: usize, follow: bool, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    let path = trail_path(&dir(state_dir));
    let mut file = fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut reader = BufReader::new(&mut file);
    let mut lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut line = String::new();
    let mut pos = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
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
    let mut partial = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        drop(reader);
        file.seek(SeekFrom::Start(pos))?;
        reader = BufReader::new(&mut file);
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            partial.push_str(&line);
            if partial.ends_with('\n') {
                print_line(&partial, json, out)?;
                partial.clear();
            }
        }
        out.flush()?;
    }
}

fn print_line(line: &str, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    if json {
        return out.write_all(line.as_bytes());
    }
    match serde_json::from_str::<Entry>(line) {
        Ok(e) => writeln!(out, "{}", e.display()),
        Err(err) => writeln!(out, "(unreadable record: {err})"),
    }
}
