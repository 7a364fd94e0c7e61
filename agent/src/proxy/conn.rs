//! A proxied connection, plain or TLS on either side, as one stream type.
use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

pub enum Conn {
    Plain(TcpStream),
    /// TLS terminated by the agent (client side).
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS to the upstream server.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Conn::Plain(_))
    }

    /// The TCP socket under any TLS, for `peer_closed`.
    pub fn fd(&self) -> RawFd {
        match self {
            Conn::Plain(s) => s.as_raw_fd(),
            Conn::Server(s) => s.get_ref().0.as_raw_fd(),
            Conn::Client(s) => s.get_ref().0.as_raw_fd(),
        }
    }

    /// Independent read and write halves; plain TCP splits without a lock.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Whether the peer of socket `fd` has shut down its side (its FIN arrived), also while data it
/// sent before is still unread: a reader that has stopped reading learns of it only this way.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd that lives across the call, and no wait. A number that no longer
    // names the socket is answered with POLLNVAL, never touched memory.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
