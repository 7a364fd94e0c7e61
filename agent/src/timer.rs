//! Sleeps and deadlines served by a thread of their own, so the agent's runtime parks without a timer wheel.
//!
//! tokio's time driver reads the clock and walks its wheel every time its runtime parks, which
//! the proxy does twice per relayed round trip: about 2 µs of CPU per `pgbench -S` transaction
//! in a profile, on the path between server and client. The agent's runtime is therefore built
//! without it (`enable_io` only), and its few timers (login deadlines, approval holds, the event
//! ring's poll) are registered with this thread's driver instead. A tokio timer belongs to the
//! runtime it was created in but wakes whichever task polls it, on any runtime.
//!
//! Calling `tokio::time::*` directly on the agent's runtime panics ("timers are disabled"), so
//! clippy (`clippy.toml`, `disallowed-methods`) refuses those calls outside this module.
use std::{future::IntoFuture, sync::OnceLock, time::Duration};

use tokio::{
    runtime::{Builder, Handle},
    time::{Interval, Sleep, Timeout},
};

static TIMERS: OnceLock<Handle> = OnceLock::new();

/// Starts the timer thread; later calls do nothing. Called before the agent's runtime starts,
/// so a failure is an error at start instead of a panic at the first timer.
pub fn start() -> std::io::Result<()> {
    if TIMERS.get().is_some() {
        return Ok(());
    }
    let rt = Builder::new_current_thread().enable_time().build()?;
    let handle = rt.handle().clone();
    if TIMERS.set(handle).is_ok() {
        // The runtime lives as long as the process: a timer whose driver shut down panics when
        // polled, and nothing ever needs this thread to stop.
        std::thread::Builder::new().name("timers".into()).spawn(move || rt.block_on(std::future::pending::<()>()))?;
    } else {
        // Another thread (a test) started it first. Dropping a runtime blocks, which panics
        // when the caller is itself inside a runtime.
        rt.shutdown_background();
    }
    Ok(())
}

fn handle() -> &'static Handle {
    if TIMERS.get().is_none() {
        // `tollgate run` calls `start` first; the library's tests start it at their first timer.
        start().expect("cannot start the timer thread");
    }
    TIMERS.get().expect("timer thread started")
}

/// `tokio::time::sleep`, on the timer thread.
#[allow(clippy::disallowed_methods)]
pub fn sleep(duration: Duration) -> Sleep {
    let _in = handle().enter();
    tokio::time::sleep(duration)
}

/// `tokio::time::timeout`, on the timer thread.
#[allow(clippy::disallowed_methods)]
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    let _in = handle().enter();
    tokio::time::timeout(duration, future)
}

/// `tokio::time::interval`, on the timer thread.
#[allow(clippy::disallowed_methods)]
pub fn interval(period: Duration) -> Interval {
    let _in = handle().enter();
    tokio::time::interval(period)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The point of the module: timers work from a runtime that has no time driver.
    #[test]
    fn timers_fire_on_a_runtime_without_a_time_driver() {
        let rt = Builder::new_current_thread().enable_io().build().unwrap();
        rt.block_on(async {
            let t = Instant::now();
            sleep(Duration::from_millis(20)).await;
            assert!(t.elapsed() >= Duration::from_millis(20));
            assert!(timeout(Duration::from_millis(10), std::future::pending::<()>()).await.is_err());
            assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await.unwrap(), 7);
            let mut tick = interval(Duration::from_millis(5));
            for _ in 0..3 {
                tick.tick().await;
            }
        });
    }
}
