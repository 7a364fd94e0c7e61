//! The event loops sessions run on: the agent's own and, with `--threads N`, N-1 more.
//!
//! Each extra loop is a single-threaded runtime on a thread of its own. A session stays on the
//! loop it was given, and new sessions go round the loops in turn, as haproxy spreads
//! connections over its threads: no work stealing, whose wake-ups cost CPU per message, yet a
//! second core can relay while the first is busy or preempted (one loop is a single queue for
//! every session on the node, and leaves CPU idle under load; BENCHMARKS.md, tenth session).
use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::runtime::{Builder, Handle};

#[derive(Debug, Default)]
pub struct Loops {
    /// The loops beyond the agent's own runtime.
    extra: Vec<Handle>,
    next: AtomicUsize,
}

impl Loops {
    /// Starts `threads - 1` loops (none for 1). They live as long as the process: a session on
    /// one may outlast the agent's own shutdown wait.
    pub fn start(threads: usize) -> io::Result<Loops> {
        let mut extra = Vec::new();
        for i in 1..threads {
            // Like the agent's own runtime, without a time driver (see `timer`).
            let rt = Builder::new_current_thread().enable_io().build()?;
            extra.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(Loops { extra, next: AtomicUsize::new(0) })
    }

    /// The loop for the next session: `None` for the agent's own.
    pub fn pick(&self) -> Option<&Handle> {
        if self.extra.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % (self.extra.len() + 1);
        self.extra.get(i)
    }

    /// How many loops sessions run on.
    pub fn count(&self) -> usize {
        self.extra.len() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_go_round_every_loop() {
        let loops = Loops::start(3).unwrap();
        assert_eq!(loops.count(), 3);
        let picks: Vec<Option<*const Handle>> = (0..6).map(|_| loops.pick().map(std::ptr::from_ref)).collect();
        assert_eq!(picks[..3], picks[3..], "round robin");
        assert_eq!(picks.iter().filter(|p| p.is_none()).count(), 2, "the agent's own loop takes its turn");
        assert!(picks[0] != picks[1] && picks[1] != picks[2] && picks[0] != picks[2]);
        assert!(Loops::start(1).unwrap().pick().is_none());
    }
}
