//! The validated policy: every name resolved to an index, every value checked.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    file::{GrantSpec, IdentitySpec, MaskingSpec, PolicyFile, ResourceSpec, RuleSpec, SizeSpec},
    rules::{Action, DEFAULT_APPROVAL_TIMEOUT, Rule},
};
use crate::sql::Kind;

pub const API_VERSION: &str = "tollgate/v1alpha1";
pub const DEFAULT_LISTEN_PORT: u16 = 15001;

/// A policy-level problem: where it is (a path into the document) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ValidationError {
    pub location: String,
    pub message: String,
}

fn invalid(location: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError { location: location.into(), message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Monitor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlisted {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Postgres,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Postgres => f.write_str("postgres"),
        }
    }
}

/// A cgroup path relative to the cgroup2 mount, normalised to `/a/b`; never the root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("cgroup path {s:?} must start with '/' (it is relative to the cgroup2 mount)"));
        }
        let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err("the root cgroup cannot be enrolled; name a child cgroup such as /tollgate/agents".into());
        }
        for p in &parts {
            if *p == "." || *p == ".." {
                return Err(format!("cgroup path {s:?} must not contain '.' or '..'"));
            }
            if p.starts_with("cgroup.") {
                return Err(format!("cgroup path {s:?} names a cgroup control file"));
            }
        }
        Ok(Self(format!("/{}", parts.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path relative to the cgroup2 mount, without the leading '/'.
    pub fn relative(&self) -> &str {
        &self.0[1..]
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a resource lives, before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceAddress {
    Socket(SocketAddr),
    Host { host: String, port: u16 },
}

impl ResourceAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("address {s:?} has port 0"));
            }
            if sa.ip().is_unspecified() {
                return Err(format!("address {s:?} is the unspecified address"));
            }
            return Ok(Self::Socket(sa));
        }
        let (host, port) =
            s.rsplit_once(':').ok_or_else(|| format!("address {s:?} must be ip:port, [v6]:port or host:port"))?;
        let port: u16 = port.parse().map_err(|_| format!("address {s:?} has an invalid port {port:?}"))?;
        if port == 0 {
            return Err(format!("address {s:?} has port 0"));
        }
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            });
        if !valid_host {
            return Err(format!("address {s:?} has an invalid host name {host:?}"));
        }
        Ok(Self::Host { host: host.to_ascii_lowercase(), port })
    }
}

impl fmt::Display for ResourceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(sa) => write!(f, "{sa}"),
            Self::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub cgroup: CgroupPath,
    pub uids: Vec<u32>,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub protocol: Protocol,
    pub address: ResourceAddress,
    /// How the proxy logs in upstream (`postgres` resources).
    pub credentials: Option<Credentials>,
    pub tls: Tls,
    /// `postgres`: the only databases a session may open; `None`: any the credential reaches.
    pub databases: Option<Vec<String>>,
}

/// TLS on both legs of a `postgres` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub upstream: UpstreamTls,
    /// Clients that ask for TLS get it, terminated with a certificate the agent generates.
    pub accept_client: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpstreamTls {
    #[default]
    Disable,
    /// Encrypted, server certificate not checked (libpq's `sslmode=require`).
    Require,
    /// Encrypted, certificate chain checked against `ca_file` and the name against the host.
    VerifyFull { ca_file: std::path::PathBuf },
}

/// The real credential of a resource: the proxy logs in with it; the client never sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password_file: std::path::PathBuf,
    /// The ways the server may check it; the login fails on any other.
    pub auth: AuthMethods,
}

/// A way the server checks the proxy's credential at login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    /// The password itself, in the clear inside whatever the connection's TLS is.
    Password,
    /// The server let the proxy in without checking anything (`trust`).
    None,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 4] = [AuthMethod::ScramSha256, AuthMethod::Md5, AuthMethod::Password, AuthMethod::None];

    /// As libpq's `require_auth` and the policy file name it.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Password => "password",
            AuthMethod::None => "none",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The set of `AuthMethod`s a resource allows (`credentials.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthMethods(u8);

impl AuthMethods {
    /// Without `credentials.auth`: SCRAM and md5, and the password in the clear only to a
    /// server whose certificate is checked (`verify-full`). A server posing as the real one
    /// could otherwise ask for the password and keep it; nor may it skip the check (`none`),
    /// which would let it read every statement as if logged in.
    pub fn default_for(tls: &UpstreamTls) -> Self {
        let mut m = AuthMethods::of(&[AuthMethod::ScramSha256, AuthMethod::Md5]);
        if matches!(tls, UpstreamTls::VerifyFull { .. }) {
            m.0 |= AuthMethod::Password.bit();
        }
        m
    }

    pub fn of(methods: &[AuthMethod]) -> Self {
        AuthMethods(methods.iter().fold(0, |acc, m| acc | m.bit()))
    }

    pub fn allows(self, m: AuthMethod) -> bool {
        self.0 & m.bit() != 0
    }

    /// The allowed methods' names, comma-separated, for messages.
    pub fn names(self) -> String {
        AuthMethod::ALL.iter().filter(|m| self.allows(**m)).map(|m| m.name()).collect::<Vec<_>>().join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    /// Indices into `Policy::identities` this grant covers (groups expanded).
    pub identities: Vec<usize>,
    /// Indices into `Policy::resources`.
    pub resources: Vec<usize>,
    pub expires: Option<OffsetDateTime>,
    /// Statement rules for PostgreSQL resources, first match wins.
    pub rules: Vec<Rule>,
    /// For statements no rule matches: `deny` when rules are given, `allow` otherwise.
    pub default: Action,
    /// Response masking, in order.
    pub masking: Vec<crate::mask::Rule>,
    /// PostgreSQL sessions log in with `default_transaction_read_only` on, so the server itself
    /// refuses writes, also those hidden in functions; statements that would turn it off are
    /// refused by the proxy (rule `read-only`).
    pub read_only: bool,
}

/// Statement kinds the server refuses in a read-only transaction (writes to tables other than
/// temporary ones, schema and privilege changes): a read-only grant's rules may not let them
/// through.
const READ_ONLY_REFUSES: [Kind; 7] =
    [Kind::Insert, Kind::Update, Kind::Delete, Kind::Merge, Kind::Truncate, Kind::Ddl, Kind::Grant];

/// Who may decide approvals besides root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Approvers {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub unlisted: Unlisted,
    pub listen: Vec<SocketAddr>,
    pub identities: Vec<Identity>,
    pub resources: Vec<Resource>,
    pub grants: Vec<Grant>,
    pub approvers: Approvers,
    /// Where pending approval requests are POSTed as JSON.
    pub webhook: Option<Webhook>,
    pub statement_audit: StatementAudit,
    pub trail_rotation: crate::audit::Rotation,
}

/// How far a statement's audit record gets before the statement is forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatementAudit {
    /// On disk (fdatasync, group commit): survives the host crashing.
    #[default]
    Durable,
    /// Written to the trail file: survives the agent dying; on disk within about 200 ms.
    Written,
}

/// Where https webhooks' certificates are checked when the policy names no `ca_file`: the
/// system's bundle (Debian's ca-certificates).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// An `http://` or `https://host:port/path` address for approval notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// For https: the CA certificates the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
}

impl Webhook {
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Webhook, String> {
        // Errors (which reach logs and the trail's policy_rejected records) show no path: chat
        // services put the secret that lets anyone post there.
        let shown = match url.find("://") {
            Some(i) => url[i + 3..].find('/').map_or(url, |j| &url[..i + 3 + j]),
            None => url.split('/').next().unwrap_or_default(),
        };
        let mut url_shown = if shown.len() < url.len() { format!("{shown}/...") } else { shown.to_string() };
        // Nor a password before the host (`https://user:secret@host`).
        if let Some(at) = shown.rfind('@') {
            let start = shown.find("://").map_or(0, |i| i + 3);
            url_shown = format!("{}...{}", &shown[..start], &url_shown[at..]);
            return Err(format!(
                "webhook {url_shown:?}: credentials in the URL (user:password@) are not sent; a webhook's secret \
                 belongs in its path"
            ));
        }
        let (rest, default_port, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, 80, false),
            (_, Some(rest)) => (rest, 443, true),
            _ => return Err(format!("webhook {url_shown:?} must start with http:// or https://")),
        };
        if ca_file.is_some() && !tls {
            return Err(format!("ca_file applies only to https webhooks, not {url_shown:?}"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = ResourceAddress::parse(authority)
            .or_else(|_| ResourceAddress::parse(&format!("{authority}:{default_port}")))
            .map_err(|m| format!("webhook {url_shown:?}: {m}"))?;
        let (host, port) = match addr {
            ResourceAddress::Socket(sa) => (sa.ip().to_string(), sa.port()),
            ResourceAddress::Host { host, port } => (host, port),
        };
        if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(format!("webhook {url_shown:?}: the path must not contain spaces or control characters"));
        }
        let ca_file = tls.then(|| ca_file.map_or_else(|| PathBuf::from(SYSTEM_CA_FILE), Path::to_path_buf));
        Ok(Webhook { url: url.to_string(), host, port, path: path.to_string(), ca_file })
    }
}

/// Whether an identity may reach a resource at a given time, and which grant says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access<'a> {
    Granted { grant: &'a str },
    Expired { grant: &'a str },
    NotGranted,
}

impl Policy {
    pub fn identity_index(&self, name: &str) -> Option<usize> {
        self.identities.iter().position(|i| i.name == name)
    }

    pub fn resource_index(&self, name: &str) -> Option<usize> {
        self.resources.iter().position(|r| r.name == name)
    }

    /// First grant (in file order) that gives `identity` access to `resource` at `now`; if none
    /// is valid, the most recently expired one is reported so the audit names it.
    pub fn access(&self, identity: usize, resource: usize, now: OffsetDateTime) -> Access<'_> {
        let mut expired: Option<&Grant> = None;
        for g in self.grants.iter().filter(|g| g.identities.contains(&identity) && g.resources.contains(&resource)) {
            match g.expires {
                Some(at) if at <= now => {
                    if expired.is_none_or(|e| e.expires < g.expires) {
                        expired = Some(g);
                    }
                }
                _ => return Access::Granted { grant: &g.name },
            }
        }
        match expired {
            Some(g) => Access::Expired { grant: &g.name },
            None => Access::NotGranted,
        }
    }

    /// One entry per (identity, resource) pair that some grant covers, with the latest expiry
    /// (`None` when any covering grant never expires). Expired pairs are kept so the kernel can
    /// tell "expired" from "never granted".
    pub fn grant_table(&self) -> Vec<(usize, usize, Option<OffsetDateTime>)> {
        let mut table: HashMap<(usize, usize), Option<OffsetDateTime>> = HashMap::new();
        for g in &self.grants {
            for &i in &g.identities {
                for &r in &g.resources {
                    table
                        .entry((i, r))
                        .and_modify(|cur| {
                            *cur = match (*cur, g.expires) {
                                (None, _) | (_, None) => None,
                                (Some(a), Some(b)) => Some(a.max(b)),
                            }
                        })
                        .or_insert(g.expires);
                }
            }
        }
        let mut v: Vec<_> = table.into_iter().map(|((i, r), e)| (i, r, e)).collect();
        v.sort_by_key(|&(i, r, _)| (i, r));
        v
    }

    pub fn grant(&self, name: &str) -> Option<&Grant> {
        self.grants.iter().find(|g| g.name == name)
    }

    /// Distinct cgroups the identities name, in file order.
    pub fn cgroups(&self) -> Vec<&CgroupPath> {
        let mut seen = HashSet::new();
        self.identities.iter().map(|i| &i.cgroup).filter(|c| seen.insert(*c)).collect()
    }
}

fn check_name(location: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(location, format!("invalid name {name:?}: use 1-63 characters from a-z, A-Z, 0-9, '-', '_', '.'")))
    }
}

/// A relation name as PostgreSQL reads it, in the form `Classification::tables` holds: each
/// dot-separated part folded to lower case unless double-quoted (`Orders` is `orders`;
/// `"Orders"` stays `Orders`; `""` inside quotes is `"`), cut to 63 bytes as the server cuts
/// identifiers, `name` or `schema.name`.
fn fold_relation(name: &str) -> Result<String, String> {
    let mut parts: Vec<String> = Vec::new();
    let mut chars = name.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("{name:?}: a quoted name is not closed")),
                }
            }
            if !matches!(chars.peek(), None | Some('.')) {
                return Err(format!("{name:?}: a quoted name must end at a dot or the end"));
            }
        } else {
            while let Some(&c) = chars.peek().filter(|&&c| c != '.') {
                // What the server reads unquoted: letters, digits, `_` and `$`, not first.
                let first = part.is_empty();
                if !(c.is_alphabetic() || c == '_' || !first && (c.is_ascii_digit() || c == '$')) {
                    return Err(format!("{name:?}: {c:?} is not part of a name unquoted; quote the name, whole"));
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("{name:?} is not a relation name (or schema.name)"));
        }
        let mut end = part.len().min(63);
        while !part.is_char_boundary(end) {
            end -= 1;
        }
        part.truncate(end);
        parts.push(crate::sql::relation_part(&part).into_owned());
        if chars.next().is_none() {
            break;
        }
    }
    if parts.len() > 2 {
        return Err(format!("{name:?}: a table is named as name or schema.name (the database is the resource's)"));
    }
    Ok(parts.join("."))
}

fn parse_listen(location: &str, s: &str) -> Result<SocketAddr, ValidationError> {
    let sa: SocketAddr = s.parse().map_err(|_| invalid(location, format!("{s:?} is not an ip:port or [v6]:port")))?;
    if !sa.ip().is_loopback() {
        return Err(invalid(
            location,
            format!("{s:?}: the proxy must listen on a loopback address (127.0.0.0/8 or ::1)"),
        ));
    }
    Ok(sa)
}

impl TryFrom<PolicyFile> for Policy {
    type Error = ValidationError;

    fn try_from(f: PolicyFile) -> Result<Self, Self::Error> {
        if f.api_version != API_VERSION {
            return Err(invalid("apiVersion", format!("expected {API_VERSION:?}, found {:?}", f.api_version)));
        }
        if f.kind != "Policy" {
            return Err(invalid("kind", format!("expected \"Policy\", found {:?}", f.kind)));
        }
        check_name("metadata.name", &f.metadata.name)?;
        let spec = f.spec;
        let mode = match spec.mode.as_deref() {
            None | Some("enforce") => Mode::Enforce,
            Some("monitor") => Mode::Monitor,
            Some(other) => return Err(invalid("spec.mode", format!("expected enforce or monitor, found {other:?}"))),
        };
        let unlisted = match spec.unlisted.as_deref() {
            None | Some("deny") => Unlisted::Deny,
            Some("allow") => Unlisted::Allow,
            Some(other) => return Err(invalid("spec.unlisted", format!("expected allow or deny, found {other:?}"))),
        };

        let listen = match spec.proxy {
            Some(p) if !p.listen.is_empty() => {
                let mut v = Vec::new();
                for (i, s) in p.listen.iter().enumerate() {
                    v.push(parse_listen(&format!("spec.proxy.listen[{i}]"), s)?);
                }
                if v.iter().filter(|a| a.is_ipv4()).count() > 1 || v.iter().filter(|a| a.is_ipv6()).count() > 1 {
                    return Err(invalid("spec.proxy.listen", "at most one IPv4 and one IPv6 address"));
                }
                if !v.iter().any(|a| a.is_ipv4()) {
                    return Err(invalid("spec.proxy.listen", "an IPv4 loopback address is required"));
                }
                v
            }
            _ => vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_LISTEN_PORT),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DEFAULT_LISTEN_PORT),
            ],
        };

        let identities = validate_identities(&spec.identities)?;
        let resources = validate_resources(&spec.resources)?;
        let grants = validate_grants(&spec.grants, &identities, &resources)?;
        let approvers = spec
            .approvers
            .as_ref()
            .map(|a| Approvers { uids: a.uids.clone(), gids: a.gids.clone() })
            .unwrap_or_default();
        let webhook = match &spec.notify {
            None => None,
            Some(n) => {
                Some(Webhook::parse(&n.webhook, n.ca_file.as_deref()).map_err(|m| invalid("spec.notify.webhook", m))?)
            }
        };
        let statement_audit = match spec.audit.as_ref().and_then(|a| a.statements.as_deref()) {
            None | Some("durable") => StatementAudit::Durable,
            Some("written") => StatementAudit::Written,
            Some(other) => {
                return Err(invalid(
                    "spec.audit.statements",
                    format!("unknown value {other:?}; expected durable or written"),
                ));
            }
        };
        let trail_rotation = match spec.audit.as_ref().and_then(|a| a.rotate.as_ref()) {
            None => crate::audit::Rotation::default(),
            Some(r) => {
                let default = crate::audit::Rotation::default();
                let size = match &r.size {
                    None => Ok(default.size),
                    Some(SizeSpec::Bytes(n)) => check_size(*n),
                    Some(SizeSpec::Text(t)) => parse_size(t).and_then(check_size),
                }
                .map_err(|m| invalid("spec.audit.rotate.size", m))?;
                crate::audit::Rotation { size, keep: r.keep.unwrap_or(default.keep) }
            }
        };
        Ok(Policy {
            name: f.metadata.name,
            mode,
            unlisted,
            listen,
            identities,
            resources,
            grants,
            approvers,
            webhook,
            statement_audit,
            trail_rotation,
        })
    }
}

fn validate_identities(specs: &[IdentitySpec]) -> Result<Vec<Identity>, ValidationError> {
    let mut names = HashSet::new();
    let mut keys: HashMap<(CgroupPath, Option<u32>), String> = HashMap::new();
    let mut out = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let at = format!("spec.identities[{i}]");
        check_name(&format!("{at}.name"), &s.name)?;
        if !names.insert(s.name.clone()) {
            return Err(invalid(format!("{at}.name"), format!("duplicate identity {:?}", s.name)));
        }
        let cgroup = CgroupPath::parse(&s.cgroup).map_err(|m| invalid(format!("{at}.cgroup"), m))?;
        for (j, g) in s.groups.iter().enumerate() {
            check_name(&format!("{at}.groups[{j}]"), g)?;
        }
        // Two identities on one cgroup must be told apart by uid, or attribution is ambiguous.
        let uid_keys: Vec<Option<u32>> =
            if s.uids.is_empty() { vec![None] } else { s.uids.iter().copied().map(Some).collect() };
        for k in uid_keys {
            if k == Some(agent_common::ANY_UID) {
                return Err(invalid(format!("{at}.uids"), format!("uid {} is reserved", agent_common::ANY_UID)));
            }
            if let Some(other) = keys.insert((cgroup.clone(), k), s.name.clone()) {
                return Err(invalid(
                    format!("{at}.cgroup"),
                    format!(
                        "identity {:?} and {other:?} both claim cgroup {cgroup}{}",
                        s.name,
                        match k {
                            Some(u) => format!(" for uid {u}"),
                            None => String::new(),
                        }
                    ),
                ));
            }
        }
        out.push(Identity { name: s.name.clone(), cgroup, uids: s.uids.clone(), groups: s.groups.clone() });
    }
    Ok(out)
}

fn validate_resources(specs: &[ResourceSpec]) -> Result<Vec<Resource>, ValidationError> {
    let mut names = HashSet::new();
    let mut addrs: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let at = format!("spec.resources[{i}]");
        check_name(&format!("{at}.name"), &s.name)?;
        if !names.insert(s.name.clone()) {
            return Err(invalid(format!("{at}.name"), format!("duplicate resource {:?}", s.name)));
        }
        let protocol = match s.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "postgres" => Protocol::Postgres,
            "http" => {
                return Err(invalid(
                    format!("{at}.protocol"),
                    format!("protocol {:?} is not supported by this version yet; use tcp", s.protocol),
                ));
            }
            other => {
                return Err(invalid(format!("{at}.protocol"), format!("unknown protocol {other:?}; expected tcp")));
            }
        };
        let tls = match &s.tls {
            None => Tls::default(),
            Some(_) if protocol != Protocol::Postgres => {
                return Err(invalid(format!("{at}.tls"), "only postgres resources take tls settings"));
            }
            Some(t) => {
                let upstream = match (t.mode.as_str(), &t.ca_file) {
                    ("disable", None) => UpstreamTls::Disable,
                    ("require", None) => UpstreamTls::Require,
                    ("verify-full", Some(ca)) if ca.starts_with('/') => UpstreamTls::VerifyFull { ca_file: ca.into() },
                    ("verify-full", Some(_)) => {
                        return Err(invalid(format!("{at}.tls.ca_file"), "must be an absolute path"));
                    }
                    ("verify-full", None) => {
                        return Err(invalid(
                            format!("{at}.tls.ca_file"),
                            "verify-full needs the CA file to check against",
                        ));
                    }
                    ("disable" | "require", Some(_)) => {
                        return Err(invalid(format!("{at}.tls.ca_file"), "only verify-full takes a ca_file"));
                    }
                    (other, _) => {
                        return Err(invalid(
                            format!("{at}.tls.mode"),
                            format!("unknown tls mode {other:?}; expected disable, require or verify-full"),
                        ));
                    }
                };
                let accept_client = match t.client.as_deref() {
                    None | Some("decline") => false,
                    Some("accept") => true,
                    Some(other) => {
                        return Err(invalid(
                            format!("{at}.tls.client"),
                            format!("unknown value {other:?}; expected accept or decline"),
                        ));
                    }
                };
                Tls { upstream, accept_client }
            }
        };
        let credentials = match (protocol, &s.credentials) {
            (Protocol::Postgres, Some(c)) => {
                if c.user.is_empty() {
                    return Err(invalid(format!("{at}.credentials.user"), "must not be empty"));
                }
                if !c.password_file.starts_with('/') {
                    return Err(invalid(format!("{at}.credentials.password_file"), "must be an absolute path"));
                }
                let auth = match &c.auth {
                    None => AuthMethods::default_for(&tls.upstream),
                    Some(names) => auth_methods(names).map_err(|m| invalid(format!("{at}.credentials.auth"), m))?,
                };
                Some(Credentials { user: c.user.clone(), password_file: c.password_file.clone().into(), auth })
            }
            (Protocol::Postgres, None) => {
                return Err(invalid(
                    format!("{at}.credentials"),
                    "a postgres resource needs credentials: { user, password_file }",
                ));
            }
            (Protocol::Tcp, Some(_)) => {
                return Err(invalid(format!("{at}.credentials"), "only postgres resources take credentials"));
            }
            (Protocol::Tcp, None) => None,
        };
        let address = ResourceAddress::parse(&s.address).map_err(|m| invalid(format!("{at}.address"), m))?;
        if let Some(other) = addrs.insert(address.to_string(), s.name.clone()) {
            return Err(invalid(format!("{at}.address"), format!("{address} is already resource {other:?}")));
        }
        let databases = match (&s.databases, protocol) {
            (None, _) => None,
            (Some(_), Protocol::Tcp) => {
                return Err(invalid(format!("{at}.databases"), "only postgres resources take databases"));
            }
            (Some(list), Protocol::Postgres) => {
                if list.is_empty() {
                    return Err(invalid(format!("{at}.databases"), "must name at least one database (or be left out)"));
                }
                if let Some(bad) = list.iter().find(|d| d.is_empty() || d.len() > 63 || d.contains('\0')) {
                    return Err(invalid(
                        format!("{at}.databases"),
                        format!("{bad:?} is not a database name (1 to 63 bytes, as the server names them)"),
                    ));
                }
                Some(list.clone())
            }
        };
        out.push(Resource { name: s.name.clone(), protocol, address, credentials, tls, databases });
    }
    Ok(out)
}

/// `credentials.auth`: known names, each once, at least one.
fn auth_methods(names: &[String]) -> Result<AuthMethods, String> {
    let mut methods = Vec::new();
    for n in names {
        let Some(m) = AuthMethod::ALL.into_iter().find(|m| m.name() == n) else {
            return Err(format!("unknown method {n:?}; expected scram-sha-256, md5, password or none"));
        };
        if methods.contains(&m) {
            return Err(format!("{n} is listed twice"));
        }
        methods.push(m);
    }
    if methods.is_empty() {
        return Err("must name at least one method".into());
    }
    Ok(AuthMethods::of(&methods))
}

fn validate_grants(
    specs: &[GrantSpec],
    identities: &[Identity],
    resources: &[Resource],
) -> Result<Vec<Grant>, ValidationError> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let at = format!("spec.grants[{i}]");
        check_name(&format!("{at}.name"), &s.name)?;
        if !names.insert(s.name.clone()) {
            return Err(invalid(format!("{at}.name"), format!("duplicate grant {:?}", s.name)));
        }
        if s.to.is_empty() {
            return Err(invalid(format!("{at}.to"), "a grant must name at least one subject"));
        }
        let mut ids = Vec::new();
        for (j, subject) in s.to.iter().enumerate() {
            let loc = format!("{at}.to[{j}]");
            let matched: Vec<usize> = match subject.split_once(':') {
                Some(("identity", name)) => identities.iter().position(|x| x.name == name).into_iter().collect(),
                Some(("group", name)) => identities
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.groups.iter().any(|g| g == name))
                    .map(|(k, _)| k)
                    .collect(),
                _ => return Err(invalid(loc, format!("{subject:?} must be identity:NAME or group:NAME"))),
            };
            if matched.is_empty() {
                return Err(invalid(loc, format!("{subject:?} matches no identity")));
            }
            for k in matched {
                if !ids.contains(&k) {
                    ids.push(k);
                }
            }
        }
        if s.resources.is_empty() {
            return Err(invalid(format!("{at}.resources"), "a grant must name at least one resource"));
        }
        let mut res = Vec::new();
        for (j, name) in s.resources.iter().enumerate() {
            let k = resources
                .iter()
                .position(|r| &r.name == name)
                .ok_or_else(|| invalid(format!("{at}.resources[{j}]"), format!("unknown resource {name:?}")))?;
            if !res.contains(&k) {
                res.push(k);
            }
        }
        let expires = match &s.expires {
            None => None,
            Some(t) => Some(OffsetDateTime::parse(t, &Rfc3339).map_err(|e| {
                invalid(
                    format!("{at}.expires"),
                    format!("{t:?} is not an RFC 3339 time (e.g. 2026-12-31T00:00:00Z): {e}"),
                )
            })?),
        };
        let rules = s
            .rules
            .iter()
            .enumerate()
            .map(|(j, r)| validate_rule(&format!("{at}.rules[{j}]"), r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rule_names = HashSet::new();
        for (j, r) in rules.iter().enumerate() {
            if !rule_names.insert(&r.name) {
                return Err(invalid(format!("{at}.rules[{j}].name"), format!("duplicate rule {:?}", r.name)));
            }
        }
        let default = match s.default.as_deref() {
            None if rules.is_empty() => Action::Allow,
            None => Action::Deny,
            Some(a) => parse_action(&format!("{at}.default"), a)?,
        };
        let masking = s
            .masking
            .iter()
            .enumerate()
            .map(|(j, m)| validate_masking(&format!("{at}.masking[{j}]"), &s.name, j, m))
            .collect::<Result<Vec<_>, _>>()?;
        if (!masking.is_empty() || !rules.is_empty() || s.read_only)
            && let Some(&k) = res.iter().find(|&&k| resources[k].protocol != Protocol::Postgres)
        {
            return Err(invalid(
                format!("{at}.resources"),
                format!(
                    "{:?} is a {} resource; statement rules, masking and read_only apply only to postgres resources",
                    resources[k].name, resources[k].protocol
                ),
            ));
        }
        if s.read_only {
            let writes = |kinds: &[Kind]| kinds.iter().copied().find(|k| READ_ONLY_REFUSES.contains(k));
            let lets_through = |a: Action| a != Action::Deny;
            if let Some((j, r, k)) = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| lets_through(r.action))
                .find_map(|(j, r)| writes(&r.statements).map(|k| (j, r, k)))
            {
                return Err(invalid(
                    format!("{at}.rules[{j}]"),
                    format!(
                        "rule {:?} lets {k} statements through, but the grant is read_only: the server would refuse them",
                        r.name
                    ),
                ));
            }
        }
        out.push(Grant {
            name: s.name.clone(),
            identities: ids,
            resources: res,
            expires,
            rules,
            default,
            masking,
            read_only: s.read_only,
        });
    }
    Ok(out)
}

fn parse_action(location: &str, a: &str) -> Result<Action, ValidationError> {
    match a {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        "approve" => Ok(Action::Approve { timeout: DEFAULT_APPROVAL_TIMEOUT }),
        other => Err(invalid(location, format!("unknown action {other:?}; expected allow, deny or approve"))),
    }
}

/// `64KiB`, `256MiB`, `1GiB`: a whole number and a binary unit.
fn parse_size(s: &str) -> Result<u64, String> {
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(unit_at);
    let bad = || format!("{s:?} is not a size such as 64KiB, 256MiB or 1GiB");
    let n: u64 = n.parse().map_err(|_| bad())?;
    let shift = match unit {
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Segment sizes a trail can rotate at: not so small that it rotates many times a second under
/// load, and a number of bytes a file can hold.
fn check_size(n: u64) -> Result<u64, String> {
    if (64 << 10..=1 << 50).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} bytes: a segment size must be between 64KiB and 1PiB"))
    }
}

/// `30s`, `5m`, `1h`: a whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(unit_at);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration such as 30s, 5m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?} is not a duration such as 30s, 5m or 1h")),
    };
    if secs == 0 || secs > 24 * 3600 {
        return Err(format!("{s:?} must be between 1s and 24h"));
    }
    Ok(Duration::from_secs(secs))
}

fn validate_masking(
    at: &str,
    grant: &str,
    index: usize,
    m: &MaskingSpec,
) -> Result<crate::mask::Rule, ValidationError> {
    use crate::mask::{Glob, Rule, Target};
    let name = match &m.name {
        Some(n) => {
            check_name(&format!("{at}.name"), n)?;
            n.clone()
        }
        None => format!("{grant}.masking[{index}]"),
    };
    let target = match (m.columns.is_empty(), m.detect.is_empty()) {
        (false, true) => {
            if let Some(j) = m.columns.iter().position(|c| c.is_empty()) {
                return Err(invalid(format!("{at}.columns[{j}]"), "must not be empty"));
            }
            Target::Columns(m.columns.iter().map(|c| Glob::new(c)).collect())
        }
        (true, false) => Target::Detect(
            m.detect
                .iter()
                .enumerate()
                .map(|(j, d)| d.parse().map_err(|e| invalid(format!("{at}.detect[{j}]"), e)))
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err(invalid(at, "a masking rule names either columns or detect, not both and not neither")),
    };
    let style = m.style.parse().map_err(|e| invalid(format!("{at}.style"), e))?;
    Ok(Rule { name, target, style })
}

fn validate_rule(at: &str, r: &RuleSpec) -> Result<Rule, ValidationError> {
    check_name(&format!("{at}.name"), &r.name)?;
    let statements = r
        .matcher
        .statements
        .iter()
        .enumerate()
        .map(|(k, s)| s.parse::<Kind>().map_err(|m| invalid(format!("{at}.match.statements[{k}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    let where_missing = match r.matcher.where_.as_deref() {
        None => false,
        Some("missing") => true,
        Some(other) => return Err(invalid(format!("{at}.match.where"), format!("expected missing, found {other:?}"))),
    };
    let action = match (parse_action(&format!("{at}.action"), &r.action)?, &r.timeout) {
        (Action::Approve { .. }, Some(t)) => {
            Action::Approve { timeout: parse_duration(t).map_err(|m| invalid(format!("{at}.timeout"), m))? }
        }
        (_, Some(_)) => return Err(invalid(format!("{at}.timeout"), "only approve rules take a timeout")),
        (a, None) => a,
    };
    Ok(Rule {
        name: r.name.as_str().into(),
        statements,
        tables: r
            .matcher
            .tables
            .iter()
            .enumerate()
            .map(|(k, t)| fold_relation(t).map_err(|m| invalid(format!("{at}.match.tables[{k}]"), m)))
            .collect::<Result<_, _>>()?,
        functions: r.matcher.functions.iter().map(|f| f.to_lowercase()).collect(),
        where_missing,
        action,
        message: r.message.clone(),
    })
}
