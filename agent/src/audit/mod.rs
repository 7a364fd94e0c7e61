//! Tamper-evident audit trail: record schema, hash chain, durable writer, verify and tail.
pub mod chain;
mod files;
pub mod record;
mod writer;

use std::{
    collections::VecDeque,
    fs,
    io::{self, BufRead, BufReader, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

pub use chain::ChainError;
pub use files::trail_path;
pub use record::{
    Approved, Entry, Kind, Record, Refs, ResultBase, ResultRecord, StatementBase, StatementRecord, printable,
};
pub use writer::{AuditError, AuditLog, Payload, Rotation, WriterThread, now_rfc3339};

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

/// A break in the chain, and the file it is in.
#[derive(Debug)]
pub struct Break {
    pub file: String,
    pub error: ChainError,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.error)
    }
}

/// What `verify` found: the first and last records' sequence numbers, and every break on the
/// way (the first MAX_BREAKS of them; `more_breaks` counts the rest).
#[derive(Debug, Default)]
pub struct Report {
    pub first_seq: u64,
    pub last_seq: u64,
    pub files: usize,
    pub breaks: Vec<Break>,
    pub more_breaks: u64,
}

impl Report {
    fn push(&mut self, file: &str, error: ChainError) {
        if self.breaks.len() < MAX_BREAKS {
            self.breaks.push(Break { file: file.to_owned(), error });
        } else {
            self.more_breaks += 1;
        }
    }
}

/// Breaks listed one by one; a trail rewritten throughout is not listed line by line.
const MAX_BREAKS: usize = 1000;

fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// Verifies the whole trail, its rotated segments and then the live file, a line at a time,
/// to its end, as one chain. A trail that starts after seq 1 must say, in an `audit_rotated`
/// record, that the records before were removed.
pub fn verify(state_dir: &Path) -> Result<Report, VerifyError> {
    let dir = dir(state_dir);
    let files = match files::in_order(&dir) {
        Ok(files) => files,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(VerifyError::Io { path: dir.clone(), source }),
    };
    if files.is_empty() {
        let source = io::Error::new(io::ErrorKind::NotFound, "no audit trail here");
        return Err(VerifyError::Io { path: trail_path(&dir), source });
    }
    let mut verifier: Option<chain::Verifier> = None;
    let mut report = Report { files: files.len(), ..Report::default() };
    let mut removed_through = 0u64;
    let mut line = Vec::new();
    for path in &files {
        let io_err = |source| VerifyError::Io { path: path.clone(), source };
        let mut reader = BufReader::new(fs::File::open(path).map_err(io_err)?);
        let name = file_name(path);
        if let Some(v) = &mut verifier {
            v.next_file();
        }
        while read_line(&mut reader, &mut line).map_err(io_err)? > 0 {
            let complete = line.ends_with(b"\n");
            let text = String::from_utf8_lossy(if complete { &line[..line.len() - 1] } else { &line });
            let v = verifier.get_or_insert_with(|| {
                let v = chain::Verifier::starting_at(&text);
                report.first_seq = v.head().seq + 1;
                v
            });
            match v.line(&text, complete) {
                Ok(entry) => {
                    if entry.record.kind == Kind::AuditRotated {
                        removed_through = removed_through.max(entry.record.removed_through.unwrap_or(0));
                    }
                }
                Err(e) => report.push(&name, e),
            }
        }
    }
    report.last_seq = verifier.as_ref().map_or(0, |v| v.head().seq);
    if report.first_seq > 1 && removed_through < report.first_seq - 1 {
        report.push(&file_name(&files[0]), ChainError::Unexplained { first: report.first_seq });
    }
    Ok(report)
}

/// Reads `file` from where it stands to its last complete line, keeping the last `keep` lines
/// in `lines`; returns how many bytes it read up to the end of that line.
fn read_complete(file: &mut fs::File, keep: usize, lines: &mut VecDeque<Vec<u8>>) -> io::Result<u64> {
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut read = 0u64;
    loop {
        let n = read_line(&mut reader, &mut line)?;
        if n == 0 || !line.ends_with(b"\n") {
            return Ok(read);
        }
        read += n as u64;
        lines.push_back(std::mem::take(&mut line));
        if lines.len() > keep {
            lines.pop_front();
        }
    }
}

fn open(path: &Path) -> io::Result<fs::File> {
    fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Prints the last `last` records (from older segments too, where the live file holds fewer),
/// then, with `follow`, new ones as they are written, across rotations.
pub fn tail(state_dir: &Path, last: usize, follow: bool, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    let dir = dir(state_dir);
    let path = trail_path(&dir);
    let mut file = open(&path)?;
    let mut lines = VecDeque::new();
    let mut pos = read_complete(&mut file, last, &mut lines)?;
    if lines.len() < last {
        for seg in files::segments(&dir)?.iter().rev() {
            let mut older = VecDeque::new();
            read_complete(&mut open(&seg.path)?, last - lines.len(), &mut older)?;
            older.append(&mut lines);
            lines = older;
            if lines.len() >= last {
                break;
            }
        }
    }
    for l in &lines {
        print_line(l, json, out)?;
    }
    out.flush()?;
    if !follow {
        return Ok(());
    }
    // The first record not yet printed (0: none printed yet).
    let mut next_seq = lines.back().and_then(|l| seq_of(l)).map_or(0, |s| s + 1);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // Once the live file has been moved aside nothing more is written to it: what it got
        // before is read, then what came after it, in segments rotated out since the last
        // look and in the new live file.
        let rotated = match fs::metadata(&path) {
            Ok(m) => m.ino() != file.metadata()?.ino(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        // `pos` never passes a line still being written: it is read again, whole, next time,
        // also when the agent cut it back (a torn write, at a restart) and wrote on from there.
        let len = file.metadata()?.len();
        pos = pos.min(len);
        file.seek(SeekFrom::Start(pos))?;
        let mut new = VecDeque::new();
        pos += read_complete(&mut file, usize::MAX, &mut new)?;
        show(new, &mut next_seq, json, out)?;
        if !rotated {
            continue;
        }
        let segments = files::segments(&dir)?;
        for (i, seg) in segments.iter().enumerate() {
            // Skipped unread when the next segment starts at or before what is still to show.
            if segments.get(i + 1).is_some_and(|next| next.first_seq <= next_seq) {
                continue;
            }
            let mut new = VecDeque::new();
            read_complete(&mut open(&seg.path)?, usize::MAX, &mut new)?;
            show(new, &mut next_seq, json, out)?;
        }
        file = open(&path)?;
        let mut new = VecDeque::new();
        pos = read_complete(&mut file, usize::MAX, &mut new)?;
        show(new, &mut next_seq, json, out)?;
    }
}

/// Prints the lines from `next_seq` on, and moves it past them.
fn show(lines: VecDeque<Vec<u8>>, next_seq: &mut u64, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    for l in lines {
        let seq = seq_of(&l);
        // Lines without a readable seq are shown, never hidden.
        if seq.is_none_or(|s| s >= *next_seq) {
            print_line(&l, json, out)?;
            *next_seq = seq.map_or(*next_seq, |s| s + 1);
        }
    }
    out.flush()
}

/// A line's `seq`, if it has one that can be read.
fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A trail in `state/audit` rotated every `size` bytes, keeping `keep` segments, with
    /// `n` records of about 200 bytes appended durably (each sync lets the writer rotate).
    async fn rotated_trail(state: &Path, size: u64, keep: usize, n: usize) -> u64 {
        let (log, thread) = AuditLog::open(&dir(state)).unwrap();
        log.set_rotation(Rotation { size, keep });
        let mut last = 0;
        for i in 0..n {
            let mut r = Record::new(Kind::Connect);
            r.detail = Some(format!("{i} {}", "x".repeat(150)));
            last = log.append_durable(r).await.unwrap();
        }
        drop(log);
        thread.join();
        last
    }

    fn seqs(state: &Path, last: usize) -> Vec<u64> {
        let mut out = Vec::new();
        tail(state, last, false, true, &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_rotated_trail_is_one_chain_to_verify_and_tail() {
        let state = tempfile::tempdir().unwrap();
        let last = rotated_trail(state.path(), 1000, 0, 40).await;
        let audit = dir(state.path());
        let segments = files::segments(&audit).unwrap();
        assert!(segments.len() >= 5, "{segments:?}");
        let live = fs::read_to_string(trail_path(&audit)).unwrap();
        assert!(live.lines().next().unwrap().contains("\"kind\":\"audit_rotated\""), "{live}");
        let report = verify(state.path()).unwrap();
        assert!(report.breaks.is_empty(), "{:?}", report.breaks);
        assert_eq!((report.first_seq, report.last_seq, report.files), (1, last, segments.len() + 1));
        // The last records come from as many files as they are in, in order.
        assert_eq!(seqs(state.path(), 12), (last - 11..=last).collect::<Vec<_>>());
        assert_eq!(seqs(state.path(), 10_000), (1..=last).collect::<Vec<_>>());

        // The next run goes on with the chain.
        let (log, thread) = AuditLog::open(&audit).unwrap();
        assert_eq!(log.append_durable(Record::new(Kind::AgentStart)).await.unwrap(), last + 1);
        drop(log);
        thread.join();

        // A segment taken out of the middle is a gap at the start of the next file.
        fs::remove_file(&segments[2].path).unwrap();
        let report = verify(state.path()).unwrap();
        assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
        let b = &report.breaks[0];
        assert_eq!(b.file, segments[3].path.file_name().unwrap().to_string_lossy());
        assert!(matches!(b.error, ChainError::Missing { line: 1, .. }), "{b}");
    }

    #[tokio::test]
    async fn removed_segments_are_recorded_and_only_those_may_be_missing() {
        let state = tempfile::tempdir().unwrap();
        let last = rotated_trail(state.path(), 1000, 2, 40).await;
        let audit = dir(state.path());
        let segments = files::segments(&audit).unwrap();
        assert_eq!(segments.len(), 2, "{segments:?}");
        let report = verify(state.path()).unwrap();
        assert!(report.breaks.is_empty(), "{:?}", report.breaks);
        assert_eq!((report.first_seq, report.last_seq), (segments[0].first_seq, last));
        let all = seqs(state.path(), 10_000);
        assert_eq!(all, (segments[0].first_seq..=last).collect::<Vec<_>>());

        // Removing the oldest segment by hand leaves a start no record explains.
        fs::remove_file(&segments[0].path).unwrap();
        let report = verify(state.path()).unwrap();
        assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
        assert!(
            matches!(report.breaks[0].error, ChainError::Unexplained { first } if first == segments[1].first_seq),
            "{}",
            report.breaks[0]
        );
    }

    #[tokio::test]
    async fn a_crash_between_rotation_and_the_first_record_loses_nothing() {
        let state = tempfile::tempdir().unwrap();
        let last = rotated_trail(state.path(), 1000, 0, 10).await;
        let audit = dir(state.path());
        // As if the agent died right after moving the live file aside.
        let live = trail_path(&audit);
        let text = fs::read_to_string(&live).unwrap();
        let first =
            serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).unwrap()["seq"].as_u64().unwrap();
        fs::rename(&live, files::segment_path(&audit, first)).unwrap();
        let (log, thread) = AuditLog::open(&audit).unwrap();
        assert_eq!(log.append_durable(Record::new(Kind::AgentStart)).await.unwrap(), last + 1);
        drop(log);
        thread.join();
        let report = verify(state.path()).unwrap();
        assert!(report.breaks.is_empty(), "{:?}", report.breaks);
        assert_eq!(report.last_seq, last + 1);
    }

    /// Collects the seqs of the lines it is given until an `agent_stop` record, then fails,
    /// which ends `tail --follow`.
    #[derive(Default)]
    struct UntilStop {
        seen: Vec<u64>,
        line: Vec<u8>,
        stopped: bool,
    }

    impl io::Write for UntilStop {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.line.extend_from_slice(buf);
            while let Some(i) = self.line.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.line.drain(..=i).collect();
                let v = serde_json::from_slice::<serde_json::Value>(&l).unwrap();
                self.seen.push(v["seq"].as_u64().unwrap());
                self.stopped |= v["kind"] == "agent_stop";
            }
            if self.stopped {
                return Err(io::Error::other("seen the last record"));
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn tail_follows_the_trail_across_rotations() {
        let state = tempfile::tempdir().unwrap();
        rotated_trail(state.path(), 1000, 0, 3).await;
        // With the rotation's own record: the follower starts after what is there.
        let before = verify(state.path()).unwrap().last_seq;
        let path = state.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = UntilStop::default();
            let _ = tail(&path, 0, true, true, &mut out);
            let _ = tx.send(out.seen);
        });
        // Let the follower open the live file before it is rotated.
        std::thread::sleep(Duration::from_millis(300));
        rotated_trail(state.path(), 1000, 0, 30).await;
        let (log, thread) = AuditLog::open(&dir(state.path())).unwrap();
        let end = log.append_durable(Record::new(Kind::AgentStop)).await.unwrap();
        drop(log);
        thread.join();
        assert!(files::segments(&dir(state.path())).unwrap().len() >= 5);
        let seen = rx.recv_timeout(Duration::from_secs(10)).expect("the follower saw the last record");
        assert_eq!(seen, (before + 1..=end).collect::<Vec<_>>());
    }
}
