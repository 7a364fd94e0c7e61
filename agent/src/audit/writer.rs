//! The audit writer: one thread owns the trail file and group-commits records with fdatasync.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    thread,
};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::{mpsc, oneshot};

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
}

/// Handle to the trail. Cloning is cheap; the writer stops when every handle is dropped.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Msg>,
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
    if len == 0 {
        return Ok((Head::genesis(), 0));
    }
    // The last complete record is within the final window unless records are huge.
    let window = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - window)).map_err(io_err)?;
    let mut buf = Vec::with_capacity(window as usize);
    file.read_to_end(&mut buf).map_err(io_err)?;
    let complete_end = buf.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
    let cut = (buf.len() - complete_end) as u64;
    if cut > 0 {
        file.set_len(len - cut).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
    }
    let complete = &buf[..complete_end];
    let start =
        complete[..complete.len().saturating_sub(1)].iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
    if complete.is_empty() {
        return Ok((Head::genesis(), cut));
    }
    let last = String::from_utf8_lossy(&complete[start..complete.len() - 1]).into_owned();
    // Trust the last line's own hash and seq: `audit verify` checks the whole chain.
    let entry_head = last_head(&last).ok_or_else(|| AuditError::Chain {
        path: path.to_owned(),
        source: chain::ChainError::Malformed { line: 0, detail: "last record unreadable".into() },
    })?;
    Ok((entry_head, cut))
}

fn last_head(line: &str) -> Option<Head> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(Head { seq: v.get("seq")?.as_u64()?, hash: v.get("hash")?.as_str()?.to_string() })
}

impl AuditLog {
    /// Opens (or creates) the trail in `dir` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<(AuditLog, WriterThread), AuditError> {
        let io_err = |source| AuditError::Io { path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(io_err)?;
        let path = trail_path(dir);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|source| AuditError::Io { path: path.clone(), source })?;
        let (mut head, cut) = recover(&mut file, &path)?;
        let (tx, rx) = mpsc::unbounded_channel();
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
        Ok((AuditLog { tx }, WriterThread(handle)))
    }

    /// Queues a record; it is on disk within one group commit.
    pub fn append(&self, record: Record) {
        if self.tx.send(Msg { record, ack: None }).is_err() {
            tracing::error!("audit writer has stopped; a record was not written");
        }
    }

    /// Appends a record and returns once it is on disk; yields its sequence number.
    pub async fn append_durable(&self, record: Record) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(Msg { record, ack: Some(ack) }).map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }
}

/// Most records written per fdatasync; bounds the latency of the first record in a batch.
const MAX_BATCH: usize = 4096;

fn run(mut file: File, path: PathBuf, mut head: Head, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut buf = String::new();
    let mut acks: Vec<(Ack, u64)> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        buf.clear();
        let start_head = head.clone();
        let start_len = file.metadata().map(|m| m.len()).ok();
        for m in batch {
            let (line, h) = chain::seal(&head, now_rfc3339(), m.record);
            buf.push_str(&line);
            head = h;
            if let Some(a) = m.ack {
                acks.push((a, head.seq));
            }
        }
        let res = file.write_all(buf.as_bytes()).and_then(|_| file.sync_data());
        match res {
            Ok(()) => {
                for (a, seq) in acks.drain(..) {
                    let _ = a.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "audit write failed");
                // Roll the chain back so later records still link to what is on disk.
                head = start_head;
                // Cut back a partial write so the trail stays a valid chain.
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
}
