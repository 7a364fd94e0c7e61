//! The audit writer: one thread owns the trail file and group-commits records with fdatasync.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex, MutexGuard},
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use tokio::sync::oneshot;

use super::{
    chain::{self, Head},
    record::{Kind, Record},
};

pub const TRAIL_FILE: &str = "trail.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("audit trail {path}: cannot continue the chain: {source}")]
    Chain { path: PathBuf, source: chain::ChainError },
    #[error("audit writer has stopped")]
    Closed,
    #[error("audit write failed: {0}")]
    Write(String),
}

type Ack = oneshot::Sender<Result<u64, AuditError>>;

struct Msg {
    record: Record,
    ack: Option<Ack>,
    /// The waiter needs the record on disk (fdatasync), not just written to the file.
    durable: bool,
}

/// Records on their way to the writer, in order. A record someone waits for wakes the writer at
/// once; others are gathered for up to GATHER, so the writer wakes per batch, not per record.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Msg>,
    /// When the oldest queued record arrived.
    since: Option<Instant>,
    urgent: bool,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, m: Msg) -> Result<(), AuditError> {
        let urgent = m.ack.is_some();
        let mut q = self.lock();
        if q.closed {
            return Err(AuditError::Closed);
        }
        q.items.push_back(m);
        // The writer hears of the first record of a batch (to time its gathering) and of
        // urgent ones; the rest just queue.
        let first = q.since.is_none();
        q.since.get_or_insert_with(Instant::now);
        q.urgent |= urgent;
        drop(q);
        if first || urgent {
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// Closes the queue when the last `AuditLog` handle goes.
struct Closer(Arc<Queue>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// Handle to the trail. Cloning is cheap; the writer stops when every handle is dropped.
#[derive(Clone)]
pub struct AuditLog {
    queue: Arc<Queue>,
    _closer: Arc<Closer>,
}

pub struct WriterThread(thread::JoinHandle<()>);

impl WriterThread {
    /// Waits until every queued record is on disk (all `AuditLog` handles must be dropped).
    pub fn join(self) {
        let _ = self.0.join();
    }
}

pub fn trail_path(dir: &Path) -> PathBuf {
    dir.join(TRAIL_FILE)
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

/// Reads the chain head from the end of the trail, cutting back an incomplete last line
/// (left by a crash mid-write). Returns the head and how many bytes were cut.
fn recover(file: &mut File, path: &Path) -> Result<(Head, u64), AuditError> {
    let io_err = |source| AuditError::Io { path: path.to_owned(), source };
    let len = file.metadata().map_err(io_err)?.len();
    // Scan backwards in chunks for the last two newlines: the end of the last complete record
    // and the start of it.
    const CHUNK: u64 = 64 << 10;
    let mut newlines: Vec<u64> = Vec::new();
    let mut end = len;
    while end > 0 && newlines.len() < 2 {
        let start = end.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start)).map_err(io_err)?;
        file.read_exact(&mut buf).map_err(io_err)?;
        for (i, b) in buf.iter().enumerate().rev() {
            if *b == b'\n' {
                newlines.push(start + i as u64);
                if newlines.len() == 2 {
                    break;
                }
            }
        }
        end = start;
    }
    let complete_end = newlines.first().map_or(0, |&n| n + 1);
    let cut = len - complete_end;
    if cut > 0 {
        file.set_len(complete_end).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
    }
    if complete_end == 0 {
        return Ok((Head::genesis(), cut));
    }
    let line_start = newlines.get(1).map_or(0, |&n| n + 1);
    let mut last = vec![0u8; (complete_end - 1 - line_start) as usize];
    file.seek(SeekFrom::Start(line_start)).map_err(io_err)?;
    file.read_exact(&mut last).map_err(io_err)?;
    // Trust the last line's own hash and seq here: `audit verify` checks the whole chain.
    let head = last_head(&String::from_utf8_lossy(&last)).ok_or_else(|| AuditError::Chain {
        path: path.to_owned(),
        source: chain::ChainError::Malformed { line: 0, detail: "last record unreadable".into() },
    })?;
    Ok((head, cut))
}

fn last_head(line: &str) -> Option<Head> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(Head { seq: v.get("seq")?.as_u64()?, hash: v.get("hash")?.as_str()?.to_string() })
}

impl AuditLog {
    /// Opens (or creates) the trail in `dir` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<(AuditLog, WriterThread), AuditError> {
        let io_err = |source| AuditError::Io { path: dir.to_owned(), source };
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err)?;
            // The trail holds statements and process details: owner only.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        }
        let path = trail_path(dir);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|source| AuditError::Io { path: path.clone(), source })?;
        // The file's directory entry must be durable too, or a crash can lose the whole trail.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        let (mut head, cut) = recover(&mut file, &path)?;
        let queue = Arc::new(Queue::default());
        let rx = queue.clone();
        if cut > 0 {
            let mut r = Record::new(Kind::AuditRecovered);
            r.detail = Some(format!("cut {cut} bytes of an incomplete record at the end of the trail"));
            let (line, h) = chain::seal(&head, now_rfc3339(), r);
            file.write_all(line.as_bytes()).map_err(|source| AuditError::Io { path: path.clone(), source })?;
            head = h;
        }
        let handle = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(file, path, head, rx))
            .map_err(io_err)?;
        let closer = Arc::new(Closer(queue.clone()));
        Ok((AuditLog { queue, _closer: closer }, WriterThread(handle)))
    }

    /// Queues a record: written within GATHER, on disk within LAZY_SYNC after that.
    pub fn append(&self, record: Record) {
        if self.queue.push(Msg { record, ack: None, durable: false }).is_err() {
            tracing::error!("audit writer has stopped; a record was not written");
        }
    }

    /// Appends a record and returns once it is on disk; yields its sequence number.
    pub async fn append_durable(&self, record: Record) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.queue.push(Msg { record, ack: Some(ack), durable: true })?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Appends a record and returns once it is written to the trail file (so it survives the
    /// agent dying, not the host), on disk within LAZY_SYNC; yields its sequence number.
    pub async fn append_written(&self, record: Record) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.queue.push(Msg { record, ack: Some(ack), durable: false })?;
        done.await.map_err(|_| AuditError::Closed)?
    }
}

/// Most records written per fdatasync; bounds the latency of the first record in a batch.
const MAX_BATCH: usize = 4096;
/// Longest a record nobody waits for stays in the page cache before an fdatasync.
const LAZY_SYNC: Duration = Duration::from_millis(10);
/// Longest a record nobody waits for stays queued before it is written: the writer wakes per
/// batch, not per record (a busy proxy writes thousands of records a second).
const GATHER: Duration = Duration::from_millis(2);

/// What the writer does next.
enum Next {
    Batch(Vec<Msg>),
    /// Records were written lazily LAZY_SYNC ago: sync them.
    Sync,
    Stop,
}

/// Waits for the next batch: at once for a record someone waits for, within GATHER otherwise.
fn next(queue: &Queue, unsynced_since: Option<Instant>) -> Next {
    let mut q = queue.lock();
    loop {
        let now = Instant::now();
        let gathered = q.since.is_some_and(|t| now.duration_since(t) >= GATHER);
        if q.urgent || gathered || (q.closed && !q.items.is_empty()) {
            q.urgent = false;
            q.since = None;
            let n = q.items.len().min(MAX_BATCH);
            let batch: Vec<Msg> = q.items.drain(..n).collect();
            if !q.items.is_empty() {
                q.since = Some(now);
                q.urgent = q.items.iter().any(|m| m.ack.is_some());
            }
            return Next::Batch(batch);
        }
        if q.closed {
            return Next::Stop;
        }
        let sync_due = unsynced_since.map(|t| LAZY_SYNC.saturating_sub(now.duration_since(t)));
        if sync_due == Some(Duration::ZERO) {
            return Next::Sync;
        }
        let gather_due = q.since.map(|t| GATHER.saturating_sub(now.duration_since(t)));
        q = match (gather_due, sync_due) {
            (None, None) => queue.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
            (a, b) => {
                let wait = a.into_iter().chain(b).min().unwrap_or(GATHER);
                queue.wake.wait_timeout(q, wait).unwrap_or_else(|e| e.into_inner()).0
            }
        };
    }
}

fn run(mut file: File, path: PathBuf, mut head: Head, rx: Arc<Queue>) {
    let mut buf = String::new();
    let mut acks: Vec<(Ack, u64)> = Vec::new();
    let mut durable_waiters = false;
    // A lazy fdatasync failed: records up to this seq were written but may not be on disk.
    let mut sync_failed: Option<(u64, String)> = None;
    // Records of failed batches: the next batch that reaches disk says how many are missing,
    // so a gap is never silent even though the chain itself stays intact.
    let mut lost: u64 = 0;
    let mut last_error = String::new();
    // Records nobody waits for may sit unsynced for up to LAZY_SYNC; a record someone waits
    // for syncs everything before it too.
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let batch = match next(&rx, unsynced_since) {
            Next::Batch(b) => b,
            Next::Sync => {
                if let Err(e) = file.sync_data() {
                    tracing::error!(path = %path.display(), error = %e, "audit sync failed");
                    sync_failed = Some((head.seq, e.to_string()));
                }
                unsynced_since = None;
                continue;
            }
            Next::Stop => {
                let _ = file.sync_data();
                break;
            }
        };
        buf.clear();
        let start_head = head.clone();
        let start_len = file.metadata().map(|m| m.len()).ok();
        let batch_len = batch.len() as u64;
        if let Some((upto, error)) = sync_failed.take() {
            let mut r = Record::new(Kind::AuditRecovered);
            r.error = Some(error);
            r.detail = Some(format!("an fdatasync failed: records up to seq {upto} may not have reached the disk"));
            let (line, h) = chain::seal(&head, now_rfc3339(), r);
            buf.push_str(&line);
            head = h;
        }
        if lost > 0 {
            let mut r = Record::new(Kind::AuditRecovered);
            r.count = Some(lost);
            r.error = Some(last_error.clone());
            r.detail = Some(format!("{lost} records could not be written and are missing from the trail"));
            let (line, h) = chain::seal(&head, now_rfc3339(), r);
            buf.push_str(&line);
            head = h;
        }
        for m in batch {
            let (line, h) = chain::seal(&head, now_rfc3339(), m.record);
            buf.push_str(&line);
            head = h;
            if let Some(a) = m.ack {
                acks.push((a, head.seq));
                durable_waiters |= m.durable;
            }
        }
        let must_sync =
            std::mem::take(&mut durable_waiters) || unsynced_since.is_some_and(|t| t.elapsed() >= LAZY_SYNC);
        let written = file.write_all(buf.as_bytes()).and_then(|_| if must_sync { file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                unsynced_since = if must_sync { None } else { unsynced_since.or(Some(Instant::now())) };
                lost = 0;
                for (a, seq) in acks.drain(..) {
                    let _ = a.send(Ok(seq));
                }
            }
            Err(e) => {
                lost += batch_len;
                last_error = e.to_string();
                tracing::error!(path = %path.display(), error = %e, lost, "audit write failed");
                // Roll the chain back and cut a partial write, so the trail stays a valid chain.
                head = start_head;
                if let Some(len) = start_len {
                    let _ = file.set_len(len);
                }
                for (a, _) in acks.drain(..) {
                    let _ = a.send(Err(AuditError::Write(e.to_string())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn written_appends_return_their_sequence_once_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append_written(Record::new(Kind::Statement)).await.unwrap(), 1);
        let text = fs::read_to_string(trail_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 1, "in the file when the call returns");
        assert_eq!(log.append_durable(Record::new(Kind::Statement)).await.unwrap(), 2);
        drop(log);
        thread.join();
    }

    #[test]
    fn a_lone_lazy_record_is_written_and_synced_without_further_activity() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        log.append(Record::new(Kind::AgentStart));
        std::thread::sleep(GATHER * 20);
        let text = fs::read_to_string(trail_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 1, "written within GATHER, not held until the next record");
        // Many lazy records from several threads arrive in one piece, in order per thread.
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..500u32 {
                        let mut r = Record::new(Kind::Connect);
                        r.pid = Some(t);
                        r.count = Some(i.into());
                        log.append(r);
                    }
                });
            }
        });
        drop(log);
        thread.join();
        let text = fs::read_to_string(trail_path(dir.path())).unwrap();
        assert_eq!(chain::verify(&text).unwrap().seq, 2001);
        let mut last = [None::<u64>; 4];
        for l in text.lines().skip(1) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let t = v["pid"].as_u64().unwrap() as usize;
            let n = v["count"].as_u64().unwrap();
            assert!(last[t].is_none_or(|p| p + 1 == n), "thread {t}: {n} after {:?}", last[t]);
            last[t] = Some(n);
        }
    }

    #[tokio::test]
    async fn durable_appends_chain_and_survive_reopen_with_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        for i in 0..3 {
            let mut r = Record::new(Kind::Connect);
            r.pid = Some(i);
            assert_eq!(log.append_durable(r).await.unwrap(), u64::from(i) + 1);
        }
        log.append(Record::new(Kind::AgentStop));
        drop(log);
        thread.join();
        let path = trail_path(dir.path());
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(chain::verify(&text).unwrap().seq, 4);

        // Simulate a crash mid-write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"hash\":\"abc").unwrap();
        drop(f);
        assert!(matches!(
            chain::verify(&fs::read_to_string(&path).unwrap()),
            Err(chain::ChainError::Truncated { after_seq: 4, .. })
        ));
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append_durable(Record::new(Kind::AgentStart)).await.unwrap(), 6);
        drop(log);
        thread.join();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(chain::verify(&text).unwrap().seq, 6);
        assert!(text.contains("audit_recovered"));
    }

    #[tokio::test]
    async fn recovery_finds_the_head_behind_records_larger_than_a_read_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        for n in [10, 300_000, 200_000] {
            let mut r = Record::new(Kind::PolicyRejected);
            r.error = Some("x".repeat(n));
            log.append_durable(r).await.unwrap();
        }
        drop(log);
        thread.join();
        let path = trail_path(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all("y".repeat(100_000).as_bytes()).unwrap();
        drop(f);
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        // seq 4 is the audit_recovered note, so the next record is 5.
        assert_eq!(log.append_durable(Record::new(Kind::AgentStart)).await.unwrap(), 5);
        drop(log);
        thread.join();
        assert_eq!(chain::verify(&fs::read_to_string(&path).unwrap()).unwrap().seq, 5);
    }
}
