//! The policy file format as written by admins (serde; unknown fields are errors).
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyFile {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub unlisted: Option<String>,
    #[serde(default)]
    pub proxy: Option<ProxySpec>,
    #[serde(default)]
    pub identities: Vec<IdentitySpec>,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
    #[serde(default)]
    pub approvers: Option<ApproversSpec>,
    #[serde(default)]
    pub notify: Option<NotifySpec>,
    #[serde(default)]
    pub audit: Option<AuditSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSpec {
    /// `durable` or `written`: how far a statement record must get before the statement is
    /// forwarded.
    #[serde(default)]
    pub statements: Option<String>,
    /// When the live trail file is moved aside as a segment, and how many segments stay.
    #[serde(default)]
    pub rotate: Option<RotateSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateSpec {
    /// `256MiB`, `1GiB`, or a number of bytes.
    #[serde(default)]
    pub size: Option<SizeSpec>,
    /// Segments kept; 0 (the default) keeps them all.
    #[serde(default)]
    pub keep: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproversSpec {
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    pub webhook: String,
    /// CA certificates (PEM) an https webhook's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    #[serde(default)]
    pub listen: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    pub name: String,
    pub cgroup: String,
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub name: String,
    pub protocol: String,
    pub address: String,
    #[serde(default)]
    pub credentials: Option<CredentialsSpec>,
    #[serde(default)]
    pub tls: Option<TlsSpec>,
    /// Postgres: the databases sessions may open (default: any the credential can).
    #[serde(default)]
    pub databases: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSpec {
    pub user: String,
    pub password_file: String,
    /// How the server may check the credential: scram-sha-256, md5, password, none.
    #[serde(default)]
    pub auth: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub mode: String,
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Whether clients asking for TLS get it (terminated by the agent) or are declined.
    #[serde(default)]
    pub client: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    pub name: String,
    pub to: Vec<String>,
    pub resources: Vec<String>,
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub masking: Vec<MaskingSpec>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub detect: Vec<String>,
    pub style: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchSpec,
    pub action: String,
    #[serde(default)]
    pub message: Option<String>,
    /// How long an `approve` rule holds a statement before denying it (`30s`, `5m`, `1h`).
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub statements: Vec<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub functions: Vec<String>,
    #[serde(default, rename = "where")]
    pub where_: Option<String>,
}
