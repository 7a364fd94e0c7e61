//! Tamper-evident audit trail: record schema, hash chain, durable writer, verify and tail.
pub mod chain;
mod files;
pub mod record;
mod stamp;
mod writer;

use std::{
    fs,
    io::{self, BufReader, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

pub use chain::ChainError;
pub use files::trail_path;
use files::{first_seq, last_lines, read_line, seq_of};
pub use record::{
    Approved, Cut, Entry, Kind, Record, Refs, ResultBase, ResultRecord, StatementBase, StatementRecord, printable,
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

/// Every file of the trail, in order, opened: the live file first, then the segments, so a
/// rotation meanwhile (which moves names, not what an open file holds) cannot leave a gap: the
/// live file, renamed into a segment, is not read twice, and what is written after it was
/// opened is not read. A segment removed between listing and opening (by `keep`), or a
/// rotation before the segments were listed (whose removal record would be in a file not
/// read), makes it start again.
fn open_all(dir: &Path) -> Result<Vec<(PathBuf, fs::File)>, VerifyError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| VerifyError::Io { path, source }
    };
    let live_path = trail_path(dir);
    let mut attempts = 0;
    'again: loop {
        attempts += 1;
        let retry = attempts < 3;
        let live = open_if_there(&live_path).map_err(err(&live_path))?;
        let (live_ino, live_first) = match &live {
            Some(f) => (Some(ino(f).map_err(err(&live_path))?), first_seq(f).map_err(err(&live_path))?),
            None => (None, None),
        };
        let segments = match files::segments(dir) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(dir)(e)),
        };
        let mut opened = Vec::with_capacity(segments.len() + 1);
        for seg in segments {
            // Rotated out of the live file after it was opened.
            if live_first.is_some_and(|first| seg.first_seq >= first) {
                continue;
            }
            match fs::File::open(&seg.path) {
                Ok(f) if Some(ino(&f).map_err(err(&seg.path))?) == live_ino => {}
                Ok(f) => opened.push((seg.path, f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && retry => continue 'again,
                Err(e) => return Err(err(&seg.path)(e)),
            }
        }
        let now = fs::metadata(&live_path).ok().map(|m| m.ino());
        if retry && now != live_ino {
            continue 'again;
        }
        if let Some(f) = live {
            opened.push((live_path, f));
        }
        return Ok(opened);
    }
}

/// Verifies the whole trail, its rotated segments and then the live file, a line at a time,
/// to its end, as one chain. A trail that starts after seq 1 must say, in an `audit_rotated`
/// record, that the records before were removed.
pub fn verify(state_dir: &Path) -> Result<Report, VerifyError> {
    let dir = dir(state_dir);
    let files = open_all(&dir)?;
    if files.is_empty() {
        let source = io::Error::new(io::ErrorKind::NotFound, "no audit trail here");
        return Err(VerifyError::Io { path: trail_path(&dir), source });
    }
    let mut verifier: Option<chain::Verifier> = None;
    let mut report = Report { files: files.len(), ..Report::default() };
    let mut removed_through = 0u64;
    let mut line = Vec::new();
    for (path, file) in &files {
        let io_err = |source| VerifyError::Io { path: path.clone(), source };
        let mut reader = BufReader::new(file);
        let name = file_name(path);
        if let Some(v) = &mut verifier {
            v.next_file();
        }
        while read_line(&mut reader, &mut line).map_err(io_err)? > 0 {
            let complete = line.ends_with(b"\n");
            let raw = if complete { &line[..line.len() - 1] } else { &line[..] };
            let v = verifier.get_or_insert_with(|| {
                let v = chain::Verifier::starting_at(&String::from_utf8_lossy(raw));
                report.first_seq = v.head().seq + 1;
                v
            });
            match v.line_bytes(raw, complete) {
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
        report.push(&file_name(&files[0].0), ChainError::Unexplained { first: report.first_seq });
    }
    Ok(report)
}

/// Prints the complete lines `file` holds from where it stands whose seq is `next_seq` or later
/// (and any without a readable seq: shown, never hidden), a line at a time, moving `next_seq`
/// past them; returns how many bytes it read up to the end of the last complete line.
fn show_new(file: &mut fs::File, next_seq: &mut u64, json: bool, out: &mut dyn io::Write) -> io::Result<u64> {
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut read = 0u64;
    loop {
        let n = read_line(&mut reader, &mut line)?;
        if n == 0 || !line.ends_with(b"\n") {
            out.flush()?;
            return Ok(read);
        }
        read += n as u64;
        let seq = seq_of(&line);
        if seq.is_none_or(|s| s >= *next_seq) {
            print_line(&line, json, out)?;
            *next_seq = seq.map_or(*next_seq, |s| s.saturating_add(1));
        }
    }
}

fn open(path: &Path) -> io::Result<fs::File> {
    fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// `path` opened; None if it is gone (a segment removed, or the live file between its rename
/// and its successor's creation).
fn open_if_there(path: &Path) -> io::Result<Option<fs::File>> {
    match open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn ino(file: &fs::File) -> io::Result<u64> {
    Ok(file.metadata()?.ino())
}

/// Prints the last `last` records (from older segments too, where the live file holds fewer),
/// then, with `follow`, new ones as they are written, across rotations.
pub fn tail(state_dir: &Path, last: usize, follow: bool, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    let dir = dir(state_dir);
    let path = trail_path(&dir);
    // Between a rotation's rename and its new file there is, for a moment, no live file.
    let mut file = match open_if_there(&path)? {
        Some(f) => f,
        None => {
            std::thread::sleep(Duration::from_millis(100));
            open(&path)?
        }
    };
    // At least the last record: following starts after it.
    let want = last.max(1);
    let (mut lines, mut pos) = last_lines(&mut file, want, |_| true)?;
    if lines.len() < want {
        let live = ino(&file)?;
        for seg in files::segments(&dir)?.iter().rev() {
            let Some(mut f) = open_if_there(&seg.path)? else { continue };
            // A rotation since the live file was read lists it (and what followed) here too.
            if ino(&f)? == live {
                continue;
            }
            let oldest = lines.iter().find_map(|l| seq_of(l));
            let before = |l: &[u8]| oldest.is_none_or(|o| seq_of(l).is_none_or(|s| s < o));
            let (mut older, _) = last_lines(&mut f, want - lines.len(), before)?;
            older.append(&mut lines);
            lines = older;
            if lines.len() >= want {
                break;
            }
        }
    }
    let mut next_seq = lines.iter().rev().find_map(|l| seq_of(l)).map_or(0, |s| s.saturating_add(1));
    for l in lines.iter().skip(lines.len().saturating_sub(last)) {
        print_line(l, json, out)?;
    }
    out.flush()?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // Once the live file has been moved aside nothing more is written to it: what it got
        // before is read, then what came after it, in segments rotated out since the last
        // look and in the new live file.
        let rotated = match fs::metadata(&path) {
            Ok(m) => m.ino() != ino(&file)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        // `pos` never passes a line still being written: it is read again, whole, next time,
        // also when the agent cut it back (a torn write, at a restart) and wrote on from there.
        let len = file.metadata()?.len();
        pos = pos.min(len);
        file.seek(SeekFrom::Start(pos))?;
        pos += show_new(&mut file, &mut next_seq, json, out)?;
        if rotated && let Some((live, at)) = catch_up(&dir, ino(&file)?, &mut next_seq, json, out)? {
            (file, pos) = (live, at);
        }
    }
}

/// After a rotation: prints what the segments rotated out since the file `done` (read to its
/// end) hold, then the new live file, which it returns with the bytes read. A rotation between
/// listing the segments and opening the live file leaves a segment unlisted: the live file then
/// starts past `next_seq`, and the segments are listed again. None: no live file yet.
fn catch_up(
    dir: &Path,
    done: u64,
    next_seq: &mut u64,
    json: bool,
    out: &mut dyn io::Write,
) -> io::Result<Option<(fs::File, u64)>> {
    for attempt in 0.. {
        let segments = files::segments(dir)?;
        for (i, seg) in segments.iter().enumerate() {
            // Skipped unread when the next segment starts at or before what is still to show.
            if segments.get(i + 1).is_some_and(|next| next.first_seq <= *next_seq) {
                continue;
            }
            let Some(mut f) = open_if_there(&seg.path)? else { continue };
            if ino(&f)? != done {
                show_new(&mut f, next_seq, json, out)?;
            }
        }
        let Some(mut live) = open_if_there(&trail_path(dir))? else { return Ok(None) };
        if attempt < 2 && *next_seq > 0 && first_seq(&live)?.is_some_and(|s| s > *next_seq) {
            continue;
        }
        let at = show_new(&mut live, next_seq, json, out)?;
        return Ok(Some((live, at)));
    }
    Ok(None)
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

        // As `verify` sees a rotation that happens after it opened the live file: the same
        // file under a segment's name too. It is read once.
        let first = seq_of(live.lines().next().unwrap().as_bytes()).unwrap();
        let link = files::segment_path(&audit, first);
        fs::hard_link(trail_path(&audit), &link).unwrap();
        let report = verify(state.path()).unwrap();
        assert!(report.breaks.is_empty() && report.last_seq == last, "{:?}", report.breaks);
        assert_eq!(seqs(state.path(), 10_000), (1..=last).collect::<Vec<_>>(), "tail reads it once too");
        fs::remove_file(link).unwrap();

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

    #[tokio::test]
    async fn a_live_file_with_a_damaged_first_line_is_rotated_under_its_first_seq() {
        let state = tempfile::tempdir().unwrap();
        rotated_trail(state.path(), 1000, 0, 10).await;
        let audit = dir(state.path());
        let live = trail_path(&audit);
        let text = fs::read_to_string(&live).unwrap();
        let first = seq_of(text.lines().next().unwrap().as_bytes()).unwrap();
        let damaged = text.replacen("{", "#", 1);
        fs::write(&live, &damaged).unwrap();
        rotated_trail(state.path(), 1000, 0, 10).await;
        let names: Vec<u64> = files::segments(&audit).unwrap().iter().map(|s| s.first_seq).collect();
        assert!(names.contains(&first), "the damaged file is named after its first record {first}: {names:?}");
        let report = verify(state.path()).unwrap();
        assert_eq!(report.breaks.len(), 1, "only the damage: {:?}", report.breaks);
        assert_eq!(report.breaks[0].file, files::segment_path(&audit, first).file_name().unwrap().to_string_lossy());
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
        assert_eq!(files::segments(&dir(state.path())).unwrap().len(), 1, "rotated once before following");
        // With the rotation's own record: the follower starts after what is there, and shows
        // none of it again when the next rotation sends it back to the segments.
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
