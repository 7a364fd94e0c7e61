//! L4 relay: bytes both ways, half-close passed on, counted.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Client -> upstream.
    pub bytes_up: u64,
    /// Upstream -> client.
    pub bytes_down: u64,
    pub error: Option<String>,
}

/// Dials `dst` with the agent's socket mark, so the kernel hooks let it through.
pub async fn connect_marked(dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)?;
    socket.connect(dst).await
}

/// Closes with RST rather than FIN, so a peer never mistakes a failure for a clean end.
fn abort(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

pub async fn relay(mut client: TcpStream, dst: SocketAddr, timeout: Duration, stop: &CancellationToken) -> Outcome {
    let connect = tokio::select! {
        biased;
        // A shutdown does not wait for the connect's own deadline.
        _ = stop.cancelled() => {
            abort(&client);
            return Outcome { error: Some("agent shutting down".into()), ..Default::default() };
        }
        c = crate::timer::timeout(timeout, connect_marked(dst, agent_common::AGENT_MARK)) => c,
    };
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            abort(&client);
            return Outcome { error: Some(format!("upstream {dst}: {e}")), ..Default::default() };
        }
        Err(_) => {
            abort(&client);
            return Outcome {
                error: Some(format!("upstream {dst}: connect timed out after {timeout:?}")),
                ..Default::default()
            };
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let outcome = pump(&mut client, &mut upstream, stop).await;
    if outcome.error.is_some() {
        abort(&client);
        abort(&upstream);
    }
    outcome
}

/// Copies both directions until both have ended; an EOF in one direction is passed on as a
/// shutdown of the other side's write half, so half-closed protocols keep working.
async fn pump<A, B>(a: &mut A, b: &mut B, stop: &CancellationToken) -> Outcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut counted = CountingCopy::default();
    tokio::select! {
        r = counted.run(a, b) => match r {
            Ok(()) => counted.outcome(None),
            Err(e) => counted.outcome(Some(e.to_string())),
        },
        _ = stop.cancelled() => counted.outcome(Some("agent shutting down".into())),
    }
}

#[derive(Default)]
struct CountingCopy {
    up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    down: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingCopy {
    async fn run<A, B>(&mut self, a: &mut A, b: &mut B) -> std::io::Result<()>
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let up = self.up.clone();
        let down = self.down.clone();
        let a_to_b = async move {
            let n = copy_counted(&mut ar, &mut bw, &up).await;
            let _ = bw.shutdown().await;
            n
        };
        let b_to_a = async move {
            let n = copy_counted(&mut br, &mut aw, &down).await;
            let _ = aw.shutdown().await;
            n
        };
        let (r1, r2) = tokio::join!(a_to_b, b_to_a);
        r1.and(r2)
    }

    fn outcome(&self, error: Option<String>) -> Outcome {
        use std::sync::atomic::Ordering::Relaxed;
        Outcome { bytes_up: self.up.load(Relaxed), bytes_down: self.down.load(Relaxed), error }
    }
}

/// Like `tokio::io::copy`, but the running count stays visible if the copy is cancelled.
async fn copy_counted<R, W>(r: &mut R, w: &mut W, count: &std::sync::atomic::AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, proxy_a) = duplex(64);
        let (proxy_b, mut server) = duplex(64);
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move {
            let (mut a, mut b) = (proxy_a, proxy_b);
            pump(&mut a, &mut b, &stop).await
        });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        // The server sees the client's EOF (half-close) and can still answer.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        server.write_all(b"world!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let out = relay.await.unwrap();
        assert_eq!(out, Outcome { bytes_up: 5, bytes_down: 6, error: None });
    }
}
