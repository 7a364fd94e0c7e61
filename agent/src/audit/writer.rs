//! The audit writer: a queue of records, the trail file behind its own lock, and a thread that
//! writes the queue in rounds and group-commits it with fdatasync.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError},
};

use tokio::sync::oneshot;

use super::{
    chain::{self, Head},
    files::{self, trail_path},
    record::{Kind, Record, ResultRecord, StatementRecord},
    stamp::Stamp,
};

/// When the live trail file is moved aside as a segment, and how many segments stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The live file is rotated once it holds this many bytes.
    pub size: u64,
    /// Segments kept on the host; the oldest beyond this are removed. 0: all are kept.
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation { size: 1 << 30, keep: 0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The last record's `seq` or `hash` cannot be read, so the next record cannot link to it.
    #[error(
        "audit trail {path}: the last record has no readable seq and hash to continue the chain from \
         (`tollgate audit verify` shows where the trail went wrong; move the file aside to start a new trail)"
    )]
    Unlinkable { path: PathBuf },
    #[error("audit writer has stopped")]
    Closed,
    #[error("audit write failed: {0}")]
    Write(String),
}

type Reply = oneshot::Sender<Result<u64, AuditError>>;

/// Someone waits for a queued record, and how far it must get.
enum Ack {
    /// On disk (fdatasync).
    Synced(Reply),
    /// In the trail file (write(2)).
    Written(Reply),
}

/// What a queued message puts on the trail.
pub enum Payload {
    /// Boxed: a `Record` is several hundred bytes, and every message is moved into the queue
    /// and out again; the proxy's own (below) are a fraction of that.
    Record(Box<Record>),
    /// Serialised by hand: the proxy writes one per statement.
    Statement(StatementRecord),
    /// Serialised by hand: the proxy writes one per execution.
    Result(ResultRecord),
}

impl From<Record> for Payload {
    fn from(r: Record) -> Self {
        Payload::Record(Box::new(r))
    }
}

impl From<StatementRecord> for Payload {
    fn from(r: StatementRecord) -> Self {
        Payload::Statement(r)
    }
}

struct Msg {
    payload: Payload,
    ack: Option<Ack>,
}

/// The trail file and the end of its chain, as far as it has been written.
struct Trail {
    file: File,
    dir: PathBuf,
    path: PathBuf,
    head: Head,
    /// The seq of the live file's first record (of the next one, while it is empty): its name
    /// once it is rotated.
    first_seq: u64,
    /// File length after the last successful write: a failed write is cut back to it.
    len: u64,
    buf: Vec<u8>,
    /// Records of failed writes not yet reported in the trail, and why.
    lost: u64,
    last_error: String,
    /// A failed write could not be cut back: what follows would be glued to its remains and
    /// the chain broken for good, so nothing more is written (every appender gets an error).
    stuck: Option<String>,
    /// The queue's records are swapped in here to be written, so neither allocates per round.
    spare: VecDeque<Msg>,
}

/// Records not yet written, in order, and what the writer thread has to do. Appenders hold
/// its lock only to queue a record, never while records are sealed or written.
struct Queue {
    items: VecDeque<Msg>,
    /// When the oldest queued record arrived.
    since: Option<Instant>,
    /// A queued record waits for fdatasync, or for the writer thread to write it now.
    urgent: bool,
    /// A queued record's appender waits to see it in the file (`append_written`).
    awaited: bool,
    /// Written records someone waits to see on disk, with their sequence numbers.
    to_sync: Vec<(Reply, u64)>,
    /// Records were written but not synced since then.
    unsynced_since: Option<Instant>,
    /// Sequence number of the last record written.
    written: u64,
    /// The writer sleeps with nothing to do and no deadline: the next record must wake it.
    idle: bool,
    /// When the writer, asleep, wakes by itself (to sync): the first record of a round wakes
    /// it if that is later than the record's LAZY.
    wakes_at: Option<Instant>,
    closed: bool,
}

/// Whoever writes holds `trail` and takes all the queued records under it, so records reach
/// the file in the order they were queued: the writer thread, on its rounds, or a caller of
/// `append_written` that finds `trail` free. One that finds it taken does not block its thread
/// (an event loop serving other sessions): it leaves its record to the holder, which looks at
/// the queue again after letting go. Lock order: `trail`, then `queue`.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    trail: Mutex<Trail>,
    rotation: Mutex<Rotation>,
    /// Runs in `write_queued` between taking the queue and letting go of `trail`, as an
    /// appender on another thread may.
    #[cfg(test)]
    mid_write: Mutex<Option<MidWrite>>,
}

#[cfg(test)]
type MidWrite = Box<dyn FnOnce(&Shared) + Send>;

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn trail(&self) -> MutexGuard<'_, Trail> {
        self.trail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `trail` if nobody holds it.
    fn try_trail(&self) -> Option<MutexGuard<'_, Trail>> {
        match self.trail.try_lock() {
            Ok(t) => Some(t),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Writes everything queued in one piece and lets go of `trail`; durable waiters move to
    /// `to_sync`, written ones are answered. Then, if records queued meanwhile are awaited and
    /// `trail` is free, writes those too: their appenders found it taken and rely on whoever
    /// held it. A holder that other loops keep busy this way for MAX_ROUNDS hands what is
    /// left to the writer thread, and goes back to its own work.
    fn write_queued<'a>(&'a self, mut trail: MutexGuard<'a, Trail>) {
        for round in 1.. {
            let mut items = std::mem::take(&mut trail.spare);
            {
                let mut q = self.queue();
                std::mem::swap(&mut q.items, &mut items);
                q.since = None;
                q.urgent = false;
                q.awaited = false;
            }
            #[cfg(test)]
            {
                let hook = self.mid_write.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(f) = hook {
                    f(self);
                }
            }
            let wrote = !items.is_empty();
            // A failed write has told its waiters and will be reported by the next one.
            let (synced, written) = trail.write(&mut items).unwrap_or_default();
            trail.spare = items;
            let seq = trail.head.seq;
            drop(trail);
            // Answered outside the lock: a wake-up can cost a syscall.
            for (a, seq) in written {
                let _ = a.send(Ok(seq));
            }
            let mut q = self.queue();
            // Another holder may have written later records and told already.
            q.written = q.written.max(seq);
            if wrote {
                q.unsynced_since.get_or_insert_with(Instant::now);
            }
            // Records written here are synced by the writer thread: if it sleeps without a
            // deadline, or durable records came along, it must know.
            let wake = (wrote && std::mem::take(&mut q.idle)) || (q.to_sync.is_empty() && !synced.is_empty());
            q.to_sync.extend(synced);
            let more = q.awaited && round < MAX_ROUNDS;
            let hand_over = q.awaited && !more;
            q.urgent |= hand_over;
            drop(q);
            if wake || hand_over {
                self.wake.notify_one();
            }
            match more.then(|| self.try_trail()).flatten() {
                Some(t) => trail = t,
                None => return,
            }
        }
    }
}

impl Trail {
    /// Seals `items` and writes them in one piece; returns the durable and the written waiters
    /// with their sequence numbers. On a failed write the chain is rolled back, the partial
    /// write cut, the waiters told, and the loss reported by the next record that reaches the
    /// file.
    fn write(&mut self, items: &mut VecDeque<Msg>) -> Result<Waiters, AuditError> {
        if items.is_empty() {
            return Ok(Waiters::default());
        }
        let t = self;
        if let Some(why) = &t.stuck {
            for m in items.drain(..) {
                if let Some(Ack::Synced(a) | Ack::Written(a)) = m.ack {
                    let _ = a.send(Err(AuditError::Write(why.clone())));
                }
            }
            return Err(AuditError::Write(why.clone()));
        }
        t.buf.clear();
        let start_head = t.head.clone();
        // One write, one time: the records of a round are written together.
        let stamp = Stamp::now();
        let time = stamp.as_str();
        let mut count = 0u64;
        let (mut synced, mut in_file) = Waiters::default();
        if t.lost > 0 {
            let mut r = Record::new(Kind::AuditRecovered);
            r.count = Some(t.lost);
            r.error = Some(t.last_error.clone());
            r.detail = Some(format!("{} records could not be written and are missing from the trail", t.lost));
            t.head = chain::seal(&t.head, time, &r, &mut t.buf);
        }
        for m in items.drain(..) {
            t.head = match &m.payload {
                Payload::Record(r) => chain::seal(&t.head, time, r, &mut t.buf),
                Payload::Statement(o) => chain::seal_with(&t.head, time, &mut t.buf, |b| o.write_json(b)),
                Payload::Result(o) => chain::seal_with(&t.head, time, &mut t.buf, |b| o.write_json(b)),
            };
            count += 1;
            match m.ack {
                Some(Ack::Synced(a)) => synced.push((a, t.head.seq)),
                Some(Ack::Written(a)) => in_file.push((a, t.head.seq)),
                None => {}
            }
        }
        let written = t.file.write_all(&t.buf).map(|()| t.buf.len() as u64);
        // One burst must not pin its buffer for the agent's lifetime.
        if t.buf.capacity() > 1 << 20 {
            t.buf = Vec::new();
        }
        match written {
            Ok(n) => {
                t.len += n;
                t.lost = 0;
                Ok((synced, in_file))
            }
            Err(e) => {
                t.lost += count;
                t.last_error = e.to_string();
                tracing::error!(path = %t.path.display(), error = %e, lost = t.lost, "audit write failed");
                t.head = start_head;
                if let Err(cut) = t.file.set_len(t.len) {
                    tracing::error!(path = %t.path.display(), error = %cut, "cutting back a failed audit write failed: no more records are written");
                    t.stuck = Some(format!("a failed write could not be cut back ({cut}); restart the agent"));
                }
                for (a, _) in synced.into_iter().chain(in_file) {
                    let _ = a.send(Err(AuditError::Write(e.to_string())));
                }
                Err(AuditError::Write(e.to_string()))
            }
        }
    }
}

impl Trail {
    /// Moves the live file aside as the segment `trail-FIRST_SEQ.jsonl` once it holds
    /// `rotation.size` bytes, and starts a new one with an `audit_rotated` record; then removes
    /// the oldest segments beyond `rotation.keep` once a record saying so is on disk. Returns
    /// the new file for syncing: once there is one, also when what follows fails (which is
    /// logged), since from then on records go to it. Runs on the writer thread: a rotation
    /// syncs (the old file before it is moved, the new one and the directory after).
    fn rotate(&mut self, rotation: Rotation) -> Result<Option<Rotated>, AuditError> {
        if self.len < rotation.size || self.stuck.is_some() {
            return Ok(None);
        }
        let path_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AuditError::Io { path, source }
        };
        let dir_err = path_err(&self.dir);
        // The segment is complete on disk before anything starts after it.
        self.file.sync_data().map_err(path_err(&self.path))?;
        let segment = files::segment_path(&self.dir, self.first_seq);
        if segment.exists() {
            return Err(AuditError::Io {
                path: segment,
                source: io::Error::new(io::ErrorKind::AlreadyExists, "a segment of that name exists already"),
            });
        }
        fs::rename(&self.path, &segment).map_err(path_err(&self.path))?;
        let back = |e: io::Error, created: bool| {
            // Back to the old file, so records keep a place to go.
            if created {
                let _ = fs::remove_file(&self.path);
            }
            let _ = fs::rename(&segment, &self.path);
            AuditError::Io { path: self.path.clone(), source: e }
        };
        let file =
            OpenOptions::new().create_new(true).read(true).append(true).open(&self.path).map_err(|e| back(e, false))?;
        let sync_file = file.try_clone().map_err(|e| back(e, true))?;
        self.file = file;
        self.len = 0;
        let last = self.head.seq;
        let first = std::mem::replace(&mut self.first_seq, last + 1);
        let mut r = Record::new(Kind::AuditRotated);
        r.detail = Some(format!(
            "{} bytes reached: records {first}..={last} are in {}",
            rotation.size,
            segment.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut records = vec![r];
        let segments = files::segments(&self.dir).unwrap_or_else(|e| {
            tracing::error!(dir = %self.dir.display(), error = %e, "listing audit segments failed: none removed");
            Vec::new()
        });
        let remove = match rotation.keep {
            0 => 0,
            keep => segments.len().saturating_sub(keep),
        };
        if remove > 0 {
            let through = segments[remove].first_seq - 1;
            let names: Vec<String> = segments[..remove]
                .iter()
                .map(|s| s.path.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect();
            let mut r = Record::new(Kind::AuditRotated);
            r.removed_through = Some(through);
            r.detail = Some(format!(
                "removing {} (records up to {through}): spec.audit.rotate.keep is {}",
                names.join(", "),
                rotation.keep
            ));
            records.push(r);
        }
        let mut items = records.into_iter().map(|r| Msg { payload: r.into(), ack: None }).collect();
        // The new file's name is on disk before any record in it is reported so, and no
        // segment goes before the record of its removal is on disk.
        let durable = self
            .write(&mut items)
            .and_then(|_| self.file.sync_data().map_err(path_err(&self.path)))
            .and_then(|()| File::open(&self.dir).and_then(|d| d.sync_all()).map_err(dir_err));
        tracing::info!(segment = %segment.display(), first, last, "audit trail rotated");
        if let Err(e) = durable {
            tracing::error!(error = %e, "starting a new audit file: its first records may not be on disk; no segment removed");
            return Ok(Some(Rotated { sync_file, remove: Vec::new() }));
        }
        let remove = segments.into_iter().take(remove).map(|s| s.path).collect();
        Ok(Some(Rotated { sync_file, remove }))
    }
}

/// A rotation's new live file (for syncing) and the segments to remove, oldest first.
struct Rotated {
    sync_file: File,
    remove: Vec<PathBuf>,
}

/// Removes old segments oldest first, outside the trail's lock (large files take a while); stops
/// at the first that cannot go, so what is left is still one chain from its start.
fn remove_segments(paths: &[PathBuf]) {
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "old audit segment removed"),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "removing an old audit segment failed; newer ones are kept");
                return;
            }
        }
    }
}

/// Durable and written waiters of one write, with the sequence numbers of their records.
/// Inline for the few of a usual round: a write per statement must not allocate for them.
type Waiters = (WaiterList, WaiterList);
type WaiterList = smallvec::SmallVec<[(Reply, u64); 4]>;

/// Closes the trail when the last `AuditLog` handle goes.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.queue().closed = true;
        self.0.wake.notify_one();
    }
}

/// Handle to the trail. Cloning is cheap; the writer stops when every handle is dropped.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

pub struct WriterThread(thread::JoinHandle<()>);

impl WriterThread {
    /// Waits until every queued record is on disk (all `AuditLog` handles must be dropped).
    pub fn join(self) {
        let _ = self.0.join();
    }
}

pub fn now_rfc3339() -> String {
    Stamp::now().as_str().to_owned()
}

/// Reads the chain head from the end of the live file, cutting back an incomplete last line
/// (left by a crash mid-write). Returns the head (None: the file holds no record) and how many
/// bytes were cut.
fn recover(file: &mut File, path: &Path) -> Result<(Option<Head>, u64), AuditError> {
    let io_err = |source| AuditError::Io { path: path.to_owned(), source };
    let len = file.metadata().map_err(io_err)?.len();
    let (mut last, complete_end) = files::last_lines(file, 1, |_| true).map_err(io_err)?;
    let last = last.pop_back();
    let cut = len - complete_end;
    if cut > 0 {
        file.set_len(complete_end).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
    }
    let Some(last) = last else { return Ok((None, cut)) };
    // Trust the last line's own hash and seq here: `audit verify` checks the whole chain.
    let head =
        last_head(&String::from_utf8_lossy(&last)).ok_or_else(|| AuditError::Unlinkable { path: path.to_owned() })?;
    Ok((Some(head), cut))
}

/// The head at the end of a rotated segment (None: it holds no record).
fn segment_head(path: &Path) -> Result<Option<Head>, AuditError> {
    let io_err = |source| AuditError::Io { path: path.to_owned(), source };
    let (mut last, _) = files::last_lines(&mut File::open(path).map_err(io_err)?, 1, |_| true).map_err(io_err)?;
    let Some(last) = last.pop_back() else { return Ok(None) };
    let head =
        last_head(&String::from_utf8_lossy(&last)).ok_or_else(|| AuditError::Unlinkable { path: path.to_owned() })?;
    Ok(Some(head))
}

fn last_head(line: &str) -> Option<Head> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(Head { seq: v.get("seq")?.as_u64()?, hash: chain::Hash::parse(v.get("hash")?.as_str()?)? })
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
        let path_err = |source| AuditError::Io { path: path.clone(), source };
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(&path).map_err(path_err)?;
        // The file's directory entry must be durable too, or a crash can lose the whole trail.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        let (head, cut) = recover(&mut file, &path)?;
        let len = file.metadata().map_err(path_err)?.len();
        let (head, first_seq) = match head {
            // An empty live file (a rotation, then a crash before its first record): the
            // chain goes on from the newest segment.
            None => {
                let newest = files::segments(dir).map_err(io_err)?.pop();
                let head = match newest {
                    Some(seg) => segment_head(&seg.path)?.unwrap_or_else(Head::genesis),
                    None => Head::genesis(),
                };
                let next = head.seq + 1;
                (head, next)
            }
            // Unreadable, it is named after its last record: still after every older segment.
            Some(head) => (head.clone(), files::first_seq(&file).ok().flatten().unwrap_or(head.seq)),
        };
        // The log (journald, syslog) keeps the head outside the file: a trail rewritten whole,
        // which its own chain cannot show, no longer ends where the log says it did.
        tracing::info!(path = %path.display(), seq = head.seq, hash = %head.hash.as_str(), "audit trail continues from this record");
        // fdatasync runs on its own descriptor, outside the lock, while others write.
        let sync_file = file.try_clone().map_err(path_err)?;
        let mut trail = Trail {
            file,
            dir: dir.to_owned(),
            path: path.clone(),
            head,
            first_seq,
            len,
            buf: Vec::new(),
            lost: 0,
            last_error: String::new(),
            stuck: None,
            spare: VecDeque::new(),
        };
        if cut > 0 {
            let mut r = Record::new(Kind::AuditRecovered);
            r.detail = Some(format!("cut {cut} bytes of an incomplete record at the end of the trail"));
            trail.write(&mut VecDeque::from([Msg { payload: r.into(), ack: None }]))?;
        }
        let queue = Queue {
            items: VecDeque::new(),
            since: None,
            urgent: false,
            awaited: false,
            to_sync: Vec::new(),
            unsynced_since: None,
            written: trail.head.seq,
            idle: false,
            wakes_at: None,
            closed: false,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            wake: Condvar::new(),
            trail: Mutex::new(trail),
            rotation: Mutex::new(Rotation::default()),
            #[cfg(test)]
            mid_write: Mutex::new(None),
        });
        let rx = shared.clone();
        let handle = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(&rx, sync_file, &path))
            .map_err(io_err)?;
        let closer = Arc::new(Closer(shared.clone()));
        Ok((AuditLog { shared, _closer: closer }, WriterThread(handle)))
    }

    fn push(&self, m: Msg) -> Result<(), AuditError> {
        let urgent = matches!(m.ack, Some(Ack::Synced(_)));
        let awaited = matches!(m.ack, Some(Ack::Written(_)));
        let mut st = self.shared.queue();
        if st.closed {
            return Err(AuditError::Closed);
        }
        st.items.push_back(m);
        // A writer with records pending wakes on its own deadline; only an idle one, one that
        // would sleep past this round's LAZY (waiting to sync), or someone waiting for
        // fdatasync costs the appender a wake-up (which would otherwise land on the hot path).
        let mut late = false;
        if st.since.is_none() {
            let now = Instant::now();
            st.since = Some(now);
            late = st.wakes_at.is_some_and(|t| t > now + LAZY);
        }
        st.urgent |= urgent;
        st.awaited |= awaited;
        let wake = urgent || late || std::mem::take(&mut st.idle);
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Queues a record: written within LAZY and on disk within SYNC_LAZY (both sooner when
    /// someone appends a record they wait for).
    pub fn append(&self, record: Record) {
        if self.push(Msg { payload: record.into(), ack: None }).is_err() {
            tracing::error!("audit writer has stopped; a record was not written");
        }
    }

    /// Queues a statement's outcome, like `append`.
    pub fn append_result(&self, result: ResultRecord) {
        if self.push(Msg { payload: Payload::Result(result), ack: None }).is_err() {
            tracing::error!("audit writer has stopped; a record was not written");
        }
    }

    /// Sets when the live file is rotated and how many segments are kept; the writer applies it
    /// at its next sync.
    pub fn set_rotation(&self, rotation: Rotation) {
        *self.shared.rotation.lock().unwrap_or_else(|e| e.into_inner()) = rotation;
    }

    /// Appends a record and returns once it is on disk; yields its sequence number.
    pub async fn append_durable(&self, record: impl Into<Payload>) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.push(Msg { payload: record.into(), ack: Some(Ack::Synced(ack)) })?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Appends a record and returns once it is written to the trail file (so it survives the
    /// agent dying, not the host); on disk within SYNC_LAZY. Writes in the calling thread, with
    /// everything queued before it (a write(2) to the page cache, no hand-off), unless someone
    /// else is writing: then that one writes it, and this waits without blocking the thread.
    pub async fn append_written(&self, record: impl Into<Payload>) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.push(Msg { payload: record.into(), ack: Some(Ack::Written(ack)) })?;
        if let Some(trail) = self.shared.try_trail() {
            self.shared.write_queued(trail);
        }
        done.await.map_err(|_| AuditError::Closed)?
    }
}

/// Longest a record nobody waits for stays queued, then unsynced: the writer works in rounds
/// of at most this, not per record (a busy proxy writes thousands of records a second).
const LAZY: Duration = Duration::from_millis(10);

/// Longest a written record nobody waits for stays unsynced. Syncing every LAZY round cost
/// about 8 % of the agent's CPU at a few thousand statements a second (BENCHMARKS.md); a
/// durable append syncs everything written before it anyway. Each sync can stall appends to
/// the page it writes back; syncing every second instead did not measurably pay (BENCHMARKS.md,
/// fourteenth session).
const SYNC_LAZY: Duration = Duration::from_millis(200);

/// Most rounds `write_queued` writes for others before it hands over to the writer thread.
const MAX_ROUNDS: u32 = 4;

/// The writer thread: writes queued records at once when someone waits for them to be on
/// disk or a holder handed them over, within LAZY otherwise, and syncs with one fdatasync everything written before it began (group commit):
/// at once for waiters, within SYNC_LAZY otherwise.
fn run(shared: &Shared, mut sync_file: File, path: &Path) {
    let mut rotate_after = Instant::now();
    loop {
        let mut q = shared.queue();
        let (write, sync) = loop {
            let now = Instant::now();
            let due = |since: Option<Instant>, after| since.is_some_and(|t| now.duration_since(t) >= after);
            let write = !q.items.is_empty() && (q.urgent || q.closed || due(q.since, LAZY));
            let sync =
                !q.to_sync.is_empty() || due(q.unsynced_since, SYNC_LAZY) || (q.closed && q.unsynced_since.is_some());
            if write || sync {
                break (write, sync);
            }
            if q.closed {
                drop(q);
                let head = shared.trail().head.clone();
                tracing::info!(seq = head.seq, hash = %head.hash.as_str(), "audit trail closed at this record");
                return;
            }
            let left =
                |since: Option<Instant>, after: Duration| since.map(|t| after.saturating_sub(now.duration_since(t)));
            let deadline = left(q.since, LAZY).into_iter().chain(left(q.unsynced_since, SYNC_LAZY)).min();
            q = match deadline {
                None => {
                    q.idle = true;
                    shared.wake.wait(q).unwrap_or_else(|e| e.into_inner())
                }
                Some(wait) => {
                    q.wakes_at = Some(now + wait);
                    let mut q = shared.wake.wait_timeout(q, wait).unwrap_or_else(|e| e.into_inner()).0;
                    q.wakes_at = None;
                    q
                }
            };
        };
        drop(q);
        if write {
            shared.write_queued(shared.trail());
            if !sync {
                continue;
            }
        }
        let (waiters, upto) = {
            let mut q = shared.queue();
            q.unsynced_since = None;
            (std::mem::take(&mut q.to_sync), q.written)
        };
        // Everything in `waiters` was written before this began.
        match sync_file.sync_data() {
            Ok(()) => {
                for (a, seq) in waiters {
                    let _ = a.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "audit sync failed");
                for (a, _) in waiters {
                    let _ = a.send(Err(AuditError::Write(format!("fdatasync: {e}"))));
                }
                let mut r = Record::new(Kind::AuditRecovered);
                r.error = Some(e.to_string());
                r.detail = Some(format!("an fdatasync failed: records up to seq {upto} may not have reached the disk"));
                let mut q = shared.queue();
                q.items.push_back(Msg { payload: r.into(), ack: None });
                q.since.get_or_insert_with(Instant::now);
                continue;
            }
        }
        let now = Instant::now();
        if now < rotate_after {
            continue;
        }
        rotate_after = now + ROTATE_CHECK;
        let rotation = *shared.rotation.lock().unwrap_or_else(|e| e.into_inner());
        let mut trail = shared.trail();
        let mut remove = Vec::new();
        match trail.rotate(rotation) {
            Ok(Some(rotated)) => (sync_file, remove) = (rotated.sync_file, rotated.remove),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "audit trail rotation failed; the live file grows on, tried again in a minute");
                rotate_after = Instant::now() + ROTATE_RETRY;
            }
        }
        // Appenders that found the trail taken meanwhile left their records to its holder.
        shared.write_queued(trail);
        remove_segments(&remove);
    }
}

/// How often, at most, the writer looks whether the live file is due for rotation (after a
/// sync): in durable mode it syncs thousands of times a second.
const ROTATE_CHECK: Duration = if cfg!(test) { Duration::ZERO } else { Duration::from_secs(1) };

/// How long after a failed rotation the writer tries again.
const ROTATE_RETRY: Duration = Duration::from_secs(60);

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

    #[tokio::test]
    async fn a_written_append_carries_what_was_queued_before_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        let rec = |pid: u32| {
            let mut r = Record::new(Kind::Connect);
            r.pid = Some(pid);
            r
        };
        log.append(rec(1));
        log.append(rec(2));
        assert_eq!(log.append_written(rec(3)).await.unwrap(), 3);
        let text = fs::read_to_string(trail_path(dir.path())).unwrap();
        let pids: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["pid"].as_u64().unwrap())
            .collect();
        assert_eq!(pids, [1, 2, 3], "queued records first, in the file when the call returns");
        // A durable record queued before a written one is written by it and still synced.
        let (durable, written) = tokio::join!(log.append_durable(rec(4)), log.append_written(rec(5)));
        assert_eq!((durable.unwrap(), written.unwrap()), (4, 5));
        drop(log);
        thread.join();
        assert_eq!(chain::verify(&fs::read_to_string(trail_path(dir.path())).unwrap()).unwrap().seq, 5);
    }

    #[tokio::test]
    async fn a_written_append_finding_the_trail_taken_waits_for_its_holder_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        let held = log.shared.trail();
        let mut append = Box::pin(log.append_written(Record::new(Kind::Statement)));
        // Polled on this thread while another holds the lock: pending, not blocked.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(append.as_mut().poll(&mut cx).is_pending());
        assert_eq!(fs::read_to_string(trail_path(dir.path())).unwrap(), "");
        // The holder writes what was queued while it held the trail.
        log.shared.write_queued(held);
        assert_eq!(append.await.unwrap(), 1);
        assert_eq!(fs::read_to_string(trail_path(dir.path())).unwrap().lines().count(), 1);
        drop(log);
        thread.join();
    }

    /// The thread that queued a record, and where its answer comes.
    type Seen = (String, oneshot::Receiver<Result<u64, AuditError>>);

    /// Queues an awaited record, as an appender on another loop does while a write is under
    /// way, and does so again in each of the next `rounds - 1` rounds of writing; notes the
    /// thread each time. Without `since`, the writer thread's LAZY round never takes it.
    fn keep_busy(shared: &Shared, rounds: u32, seen: Arc<Mutex<Vec<Seen>>>) {
        let (tx, rx) = oneshot::channel();
        seen.lock().unwrap().push((thread::current().name().unwrap_or_default().to_string(), rx));
        let mut q = shared.queue();
        q.items.push_back(Msg { payload: Record::new(Kind::Statement).into(), ack: Some(Ack::Written(tx)) });
        q.awaited = true;
        drop(q);
        if rounds > 1 {
            *shared.mid_write.lock().unwrap() = Some(Box::new(move |s: &Shared| keep_busy(s, rounds - 1, seen)));
        }
    }

    #[test]
    fn a_holder_writes_what_was_awaited_meanwhile_then_hands_over_to_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = seen.clone();
        *log.shared.mid_write.lock().unwrap() = Some(Box::new(move |s: &Shared| keep_busy(s, 10, hook)));
        std::thread::Builder::new()
            .name("holder".into())
            .spawn({
                let log = log.clone();
                // Nothing queued the writer thread would take on its own: it stays out.
                move || log.shared.write_queued(log.shared.trail())
            })
            .unwrap()
            .join()
            .unwrap();
        // Every record is written: the holder's own rounds took the first ones, the writer
        // thread the rest, at once although none of them is due.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().len() < 10 {
            assert!(Instant::now() < deadline, "the writer thread did not take over");
            std::thread::sleep(Duration::from_millis(1));
        }
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let threads: Vec<String> = seen.iter().map(|(t, _)| t.clone()).collect();
        for (i, (_, rx)) in seen.into_iter().enumerate() {
            let seq = rt.block_on(crate::timer::timeout(Duration::from_secs(5), rx)).expect("left behind").unwrap();
            assert_eq!(seq.unwrap(), i as u64 + 1);
        }
        let holder = threads.iter().take_while(|t| *t == "holder").count();
        assert_eq!(holder, MAX_ROUNDS as usize, "{threads:?}");
        assert!(threads[holder..].iter().all(|t| t == "audit-writer"), "{threads:?}");
        drop(log);
        thread.join();
    }

    #[test]
    fn written_appends_from_many_loops_each_return_once_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        let path = trail_path(dir.path());
        // Four single-threaded runtimes, as the proxy's event loops, each with 8 tasks.
        let seqs: Vec<u64> = std::thread::scope(|s| {
            let loops: Vec<_> = (0..4u32)
                .map(|l| {
                    let (log, path) = (log.clone(), path.clone());
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                        let local = tokio::task::LocalSet::new();
                        local.block_on(&rt, async {
                            let tasks: Vec<_> = (0..8u32)
                                .map(|t| {
                                    let (log, path) = (log.clone(), path.clone());
                                    tokio::task::spawn_local(async move {
                                        let mut seqs = Vec::new();
                                        for i in 0..200u32 {
                                            let mut r = Record::new(Kind::Statement);
                                            r.pid = Some(l * 1000 + t);
                                            r.count = Some(i.into());
                                            let seq = log.append_written(r).await.unwrap();
                                            if i % 50 == 0 {
                                                let lines = fs::read_to_string(&path).unwrap().lines().count();
                                                assert!(
                                                    lines as u64 >= seq,
                                                    "seq {seq} returned with {lines} lines written"
                                                );
                                            }
                                            seqs.push(seq);
                                            // Lazy records in between, as results are.
                                            log.append(Record::new(Kind::Connect));
                                        }
                                        seqs
                                    })
                                })
                                .collect();
                            let mut all = Vec::new();
                            for t in tasks {
                                all.extend(t.await.unwrap());
                            }
                            all
                        })
                    })
                })
                .collect();
            loops.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        drop(log);
        thread.join();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(chain::verify(&text).unwrap().seq, 4 * 8 * 200 * 2);
        // Each call got its own record's sequence number.
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), seqs.len());
        for seq in seqs {
            assert_eq!(lines[seq as usize - 1]["kind"], "statement", "seq {seq}");
        }
    }

    #[test]
    fn a_lone_lazy_record_is_written_and_synced_without_further_activity() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        log.append(Record::new(Kind::AgentStart));
        std::thread::sleep(LAZY * 4);
        let text = fs::read_to_string(trail_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 1, "written within LAZY, not held until the next record");
        // The writer now sleeps until it is due to sync; a record meanwhile must not wait that
        // long to reach the file.
        log.append(Record::new(Kind::AgentStart));
        std::thread::sleep(LAZY * 4);
        let text = fs::read_to_string(trail_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 2, "written within LAZY, not at the next sync");
        std::thread::sleep(SYNC_LAZY * 2);
        assert!(log.shared.queue().unsynced_since.is_none(), "synced within SYNC_LAZY");
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
        assert_eq!(chain::verify(&text).unwrap().seq, 2002);
        let mut last = [None::<u64>; 4];
        for l in text.lines().skip(2) {
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

    #[tokio::test]
    async fn a_last_record_with_no_hash_to_link_to_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = AuditLog::open(dir.path()).unwrap();
        log.append_durable(Record::new(Kind::AgentStart)).await.unwrap();
        drop(log);
        thread.join();
        let path = trail_path(dir.path());
        let text = fs::read_to_string(&path).unwrap();
        // A hash that is not 64 hex digits (here one with a quote) could not be linked to.
        let hash_at = text.find("\"hash\":\"").unwrap() + 8;
        fs::write(&path, format!("{}\\\"{}", &text[..hash_at], &text[hash_at + 2..])).unwrap();
        let e = AuditLog::open(dir.path()).map(drop).unwrap_err();
        assert!(matches!(e, AuditError::Unlinkable { .. }), "{e}");
        assert!(e.to_string().contains("move the file aside"), "{e}");
    }
}
