//! The event loops sessions run on, and the hand-off of each new connection to one of them.
//!
//! With `--threads N` above 1 there are N session loops, each a single-threaded runtime on a
//! thread of its own; the agent's own runtime keeps the control plane (accepting, the control
//! socket, kernel events, reloads) and no sessions. A session stays on the loop it was given,
//! and new sessions take the loops in turn, as haproxy spreads connections over its threads:
//! no work stealing, whose wake-ups cost CPU per message, yet a second core relays while the
//! first is busy or preempted (one loop is a single queue for every session on the node and
//! leaves CPU idle under load; BENCHMARKS.md, tenth session). With 1, sessions run on the
//! agent's own runtime.
use std::{
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::{
    net::TcpStream,
    runtime::{Builder, Handle},
};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

#[derive(Debug, Default)]
pub struct Loops {
    /// Session loops; empty when sessions run on the agent's own runtime.
    loops: Vec<Handle>,
    next: AtomicUsize,
}

impl Loops {
    /// Starts the session loops for `threads` (none for 1). They live as long as the process.
    pub fn start(threads: usize) -> io::Result<Loops> {
        let mut loops = Vec::new();
        let n = if threads > 1 { threads } else { 0 };
        for i in 1..=n {
            // Built and run on its own thread: a runtime dropped inside another's context (here,
            // had the thread not started) panics.
            let (tx, rx) = std::sync::mpsc::channel();
            // The SQL classifier runs here: libpg_query recurses as deep as a statement nests.
            // `sql::classify` refuses texts nested past its bound; this leaves a wide margin
            // (the main thread, which serves sessions with one loop, has the usual 8 MiB).
            let thread = std::thread::Builder::new().name(format!("proxy-{i}")).stack_size(16 << 20);
            thread.spawn(move || {
                // Like the agent's own runtime, without a time driver (see `timer`).
                match Builder::new_current_thread().enable_io().build() {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(std::future::pending::<()>())
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
            loops.push(rx.recv().map_err(|_| io::Error::other("a session loop's thread ended at its start"))??);
        }
        Ok(Loops { loops, next: AtomicUsize::new(0) })
    }

    /// How many loops sessions run on.
    pub fn count(&self) -> usize {
        self.loops.len().max(1)
    }

    /// Runs `session` on the next loop, with the connection moved there (a socket wakes the
    /// runtime it is registered with). `session` gets the error when the move fails, to answer
    /// for the connection.
    pub fn spawn<F, Fut>(&self, tracker: &TaskTracker, stream: TcpStream, span: Span, session: F)
    where
        F: FnOnce(io::Result<TcpStream>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.loops.is_empty() {
            tracker.spawn(session(Ok(stream)).instrument(span));
            return;
        }
        let on = &self.loops[self.next.fetch_add(1, Ordering::Relaxed) % self.loops.len()];
        match stream.into_std() {
            Ok(stream) => {
                tracker.spawn_on(async move { session(TcpStream::from_std(stream)).await }.instrument(span), on);
            }
            Err(e) => {
                tracker.spawn(session(Err(e)).instrument(span));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sessions run on the loops' threads in turn, with working sockets and timers there, and
    /// the tracker waits for them.
    #[test]
    fn sessions_move_to_the_loops_in_turn() {
        let loops = Loops::start(2).unwrap();
        assert_eq!(loops.count(), 2);
        assert_eq!(Loops::start(1).unwrap().count(), 1);
        crate::timer::start().unwrap();
        let rt = Builder::new_current_thread().enable_io().build().unwrap();
        let threads = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let tracker = TaskTracker::new();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut clients = Vec::new();
            for _ in 0..4 {
                let client = TcpStream::connect(addr).await.unwrap();
                let (server, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                loops.spawn(&tracker, server, Span::none(), move |s| async move {
                    let mut s = s.unwrap();
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).await.unwrap();
                    // Timers serve every loop (none has a time driver).
                    crate::timer::sleep(std::time::Duration::from_millis(10)).await;
                    s.write_all(&buf).await.unwrap();
                    let _ = tx.send(std::thread::current().name().map(str::to_string));
                });
                clients.push(client);
            }
            for c in &mut clients {
                c.write_all(b"ping").await.unwrap();
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"ping");
            }
            tracker.close();
            tracker.wait().await;
            drop(tx);
            let mut threads = Vec::new();
            while let Some(t) = rx.recv().await {
                threads.push(t.unwrap_or_default());
            }
            threads.sort();
            threads
        });
        assert_eq!(threads, ["proxy-1", "proxy-1", "proxy-2", "proxy-2"]);
    }
}
