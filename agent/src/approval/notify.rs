//! Webhook notification: POSTs each pending approval request as JSON, over http or https.
use std::{
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request as HttpRequest, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Request;
use crate::policy::Webhook;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot reach {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url}: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url}: answered {status}")]
    Status { url: String, status: hyper::StatusCode },
    #[error("{url}: no answer within {TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url}: cannot build the request: {source}")]
    Build { url: String, source: hyper::http::Error },
    #[error("{url}: {source}")]
    Tls { url: String, source: crate::tls::TlsError },
    #[error("{url}: TLS handshake failed: {source}")]
    Handshake { url: String, source: std::io::Error },
}

/// The webhook as logs and errors show it: without its path, where chat services put the
/// secret that lets anyone post.
fn shown(hook: &Webhook) -> String {
    let scheme = if hook.ca_file.is_some() { "https" } else { "http" };
    format!("{scheme}://{}/...", host_header(&hook.host, hook.port))
}

/// Sends one notification; the caller decides what a failure means (the request stays pending).
pub async fn post(hook: &Webhook, request: &Request, mark: u32) -> Result<(), NotifyError> {
    let url = shown(hook);
    let body = serde_json::to_vec(request).unwrap_or_default();
    let send = async {
        let addr = tokio::net::lookup_host((hook.host.as_str(), hook.port))
            .await
            .map_err(|source| NotifyError::Connect { url: url.clone(), source })?
            .next()
            .ok_or_else(|| NotifyError::Connect { url: url.clone(), source: std::io::ErrorKind::NotFound.into() })?;
        let stream = crate::proxy::tcp::connect_marked(addr, mark)
            .await
            .map_err(|source| NotifyError::Connect { url: url.clone(), source })?;
        let Some(ca_file) = &hook.ca_file else { return exchange(stream, hook, body).await };
        // Read for each request (notifications are rare, and a renewed bundle is picked up),
        // off the loop that relays sessions: a system bundle is hundreds of certificates.
        let ca_file = ca_file.clone();
        let config = tokio::task::spawn_blocking(move || crate::tls::verifying(&ca_file))
            .await
            .map_err(|e| NotifyError::Connect { url: url.clone(), source: std::io::Error::other(e.to_string()) })?
            .map_err(|source| NotifyError::Tls { url: url.clone(), source })?;
        let name =
            crate::tls::host_name(hook.host.clone()).map_err(|source| NotifyError::Tls { url: url.clone(), source })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|source| NotifyError::Handshake { url: url.clone(), source })?;
        exchange(tls, hook, body).await
    };
    match crate::timer::timeout(TIMEOUT, send).await {
        Ok(r) => r,
        Err(_) => Err(NotifyError::Timeout { url }),
    }
}

/// One POST over an open connection.
async fn exchange(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    hook: &Webhook,
    body: Vec<u8>,
) -> Result<(), NotifyError> {
    let url = &shown(hook);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|source| NotifyError::Http { url: url.clone(), source })?;
    tokio::spawn(conn);
    let req = HttpRequest::post(hook.path.as_str())
        .header(header::HOST, host_header(&hook.host, hook.port))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|source| NotifyError::Build { url: url.clone(), source })?;
    let resp = sender.send_request(req).await.map_err(|source| NotifyError::Http { url: url.clone(), source })?;
    let status = resp.status();
    // Drain the answer so the connection closes cleanly; its content does not matter, and
    // a server that sends without end is not kept in memory.
    let _ = http_body_util::Limited::new(resp.into_body(), 64 << 10).collect().await;
    if !status.is_success() {
        return Err(NotifyError::Status { url: url.clone(), status });
    }
    Ok(())
}

/// `Host: name:port`, an IPv6 address in brackets.
fn host_header(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Notifications one identity's requests may send in a `WINDOW`, and how many may be on
/// their way at once in all. A client may hold a statement, cancel it and hold it again
/// without end: unbounded, that floods the approvers' channel (burying, or rate-limiting away,
/// other identities' requests) and spends the agent's sockets and CPU on POSTs. A request not
/// notified is still pending and listed (`tollgate approvals list`).
const PER_WINDOW: u32 = 30;
const WINDOW: Duration = Duration::from_secs(60);
const IN_FLIGHT: usize = 8;

/// Notifications sent for one identity in its current window.
#[derive(Debug, Clone, Copy)]
struct Sent {
    since: Instant,
    count: u32,
}

impl Sent {
    /// Whether one more may go at `now`, counting it if so.
    fn admit(&mut self, now: Instant) -> bool {
        if now.duration_since(self.since) >= WINDOW {
            *self = Sent { since: now, count: 0 };
        }
        self.count += 1;
        self.count <= PER_WINDOW
    }
}

static SENT: LazyLock<Mutex<std::collections::HashMap<String, Sent>>> = LazyLock::new(Default::default);
static POSTING: AtomicUsize = AtomicUsize::new(0);

/// Whether `identity` may send a notification now; `false` also when `IN_FLIGHT` are on their way.
fn admit(identity: &str, now: Instant) -> bool {
    let mut sent = SENT.lock().unwrap_or_else(|e| e.into_inner());
    // Windows that have ended tell nothing: the map holds the identities notifying lately.
    sent.retain(|_, s| now.duration_since(s.since) < WINDOW);
    let mine = sent.entry(identity.to_string()).or_insert(Sent { since: now, count: 0 });
    if !mine.admit(now) {
        return false;
    }
    POSTING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < IN_FLIGHT).then_some(n + 1)).is_ok()
}

/// Fire and forget: a webhook that is down must not hold up, or fail, the statement's hold.
pub fn spawn(hook: Webhook, request: Request, mark: u32) {
    let identity = request.identity.clone().unwrap_or_default();
    if !admit(&identity, Instant::now()) {
        warn!(
            id = %request.id,
            identity,
            "approval webhook not called: more than {PER_WINDOW} requests of this identity in {WINDOW:?}, or \
             {IN_FLIGHT} notifications on their way; the request is pending (tollgate approvals list)"
        );
        return;
    }
    tokio::spawn(async move {
        match post(&hook, &request, mark).await {
            Ok(()) => info!(id = %request.id, webhook = %shown(&hook), "approval request sent to the webhook"),
            Err(e) => warn!(id = %request.id, error = %e, "approval webhook failed"),
        }
        POSTING.fetch_sub(1, Ordering::AcqRel);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_limited_per_identity_and_window() {
        let start = Instant::now();
        let mut sent = Sent { since: start, count: 0 };
        assert!((0..PER_WINDOW).all(|_| sent.admit(start)));
        assert!(!sent.admit(start + WINDOW / 2), "one too many in the window");
        assert!(sent.admit(start + WINDOW), "a new window");
        // In all: at most IN_FLIGHT at once (another identity each time, to pass its window).
        let now = Instant::now();
        assert!((0..IN_FLIGHT).all(|i| admit(&format!("flight-{i}"), now)));
        assert!(!admit("flight-last", now));
        POSTING.fetch_sub(IN_FLIGHT, Ordering::AcqRel);
        assert!(admit("flight-last", now));
        POSTING.fetch_sub(1, Ordering::AcqRel);
    }

    #[test]
    fn host_headers_bracket_ipv6_addresses() {
        assert_eq!(host_header("hooks.example", 443), "hooks.example:443");
        assert_eq!(host_header("::1", 8080), "[::1]:8080");
        assert_eq!(host_header("[::1]", 8080), "[::1]:8080");
    }

    #[test]
    fn logs_show_the_webhook_without_its_secret_path() {
        let hook = |url: &str| crate::policy::Webhook::parse(url, None).unwrap();
        assert_eq!(shown(&hook("http://hooks.example/T0/B1/s3cret")), "http://hooks.example:80/...");
    }
}
