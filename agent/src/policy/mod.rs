//! Policy: file format -> validated model -> pure evaluation. No I/O beyond reading the file.
mod file;
mod model;
pub mod rules;

use std::path::{Path, PathBuf};

pub use model::{
    API_VERSION, Access, Approvers, AuthMethod, AuthMethods, CgroupPath, Credentials, DEFAULT_LISTEN_PORT, Grant,
    Identity, Mode, Policy, Protocol, Resource, ResourceAddress, StatementAudit, Tls, Unlisted, UpstreamTls,
    ValidationError, Webhook, parse_duration,
};

/// Why a policy file was refused; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read policy: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{location}: {message}")]
    Syntax { path: PathBuf, location: String, message: String },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: ValidationError },
}

/// Largest policy file accepted; a policy is a few KiB, anything near this is a mistake.
const MAX_POLICY_BYTES: u64 = 4 << 20;

pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let read_err = |source| PolicyError::Read { path: path.to_owned(), source };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_POLICY_BYTES {
        return Err(PolicyError::Syntax {
            path: path.to_owned(),
            location: "1:1".into(),
            message: format!("file is {len} bytes; a policy may be at most {MAX_POLICY_BYTES}"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&text, path)
}

/// Parses and validates policy text; `path` only labels errors.
pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let raw: file::PolicyFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let location = e.location().map(|l| format!("{}:{}", l.line(), l.column())).unwrap_or_else(|| "1:1".into());
        // serde_yaml_ng appends " at line X column Y"; the location is already in front.
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        PolicyError::Syntax { path: path.to_owned(), location, message }
    })?;
    Policy::try_from(raw).map_err(|source| PolicyError::Invalid { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const EXAMPLE: &str = r#"
apiVersion: tollgate/v1alpha1
kind: Policy
metadata: { name: example }
spec:
  mode: enforce
  unlisted: deny
  identities:
    - name: planner-bot
      cgroup: /tollgate/planner
      uids: [1001]
      groups: [agents]
    - name: other
      cgroup: /tollgate/other/
  resources:
    - name: orders-db
      protocol: tcp
      address: 127.0.0.1:5432
    - name: cache
      protocol: tcp
      address: "[::1]:6379"
    - name: api
      protocol: tcp
      address: localhost:8080
  grants:
    - name: agents-orders
      to: [group:agents]
      resources: [orders-db]
      expires: 2026-12-31T00:00:00Z
    - name: other-all
      to: [identity:other]
      resources: [orders-db, cache, api]
"#;

    fn p(text: &str) -> Result<Policy, PolicyError> {
        parse(text, Path::new("test.yaml"))
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn example_parses() {
        let pol = p(EXAMPLE).unwrap();
        assert_eq!(pol.name, "example");
        assert_eq!(pol.mode, Mode::Enforce);
        assert_eq!(pol.unlisted, Unlisted::Deny);
        assert_eq!(pol.identities[1].cgroup.as_str(), "/tollgate/other");
        assert_eq!(pol.listen.len(), 2);
        assert_eq!(pol.grants[0].identities, vec![0]);
        assert_eq!(pol.resources[2].address, ResourceAddress::Host { host: "localhost".into(), port: 8080 });
    }

    #[test]
    fn access_honours_expiry_and_names_the_grant() {
        let pol = p(EXAMPLE).unwrap();
        let before = datetime!(2026-11-01 0:00 UTC);
        let after = datetime!(2027-01-01 0:00 UTC);
        assert_eq!(pol.access(0, 0, before), Access::Granted { grant: "agents-orders" });
        assert_eq!(pol.access(0, 0, after), Access::Expired { grant: "agents-orders" });
        assert_eq!(pol.access(0, 1, before), Access::NotGranted);
        assert_eq!(pol.access(1, 2, after), Access::Granted { grant: "other-all" });
    }

    #[test]
    fn grant_table_takes_the_most_permissive_expiry() {
        let text = EXAMPLE.replace(
            "resources: [orders-db, cache, api]",
            "resources: [orders-db, cache, api]\n    - name: forever\n      to: [identity:planner-bot]\n      resources: [orders-db]",
        );
        let pol = p(&text).unwrap();
        let t = pol.grant_table();
        assert!(t.contains(&(0, 0, None)));
        assert!(t.contains(&(1, 1, None)));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn unknown_fields_are_errors_with_location() {
        let e = err(&EXAMPLE.replace("mode: enforce", "mode: enforce\n  colour: blue"));
        assert!(e.starts_with("test.yaml:"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.starts_with("test.yaml:7:3:"), "line and column expected: {e}");
    }

    #[test]
    fn semantic_errors_name_the_location() {
        let cases = [
            (
                EXAMPLE.replace("resources: [orders-db]", "resources: [nope]"),
                "spec.grants[0].resources[0]: unknown resource",
            ),
            (EXAMPLE.replace("to: [group:agents]", "to: [group:nobody]"), "spec.grants[0].to[0]"),
            (EXAMPLE.replace("to: [group:agents]", "to: [agents]"), "must be identity:NAME or group:NAME"),
            (EXAMPLE.replace("cgroup: /tollgate/planner", "cgroup: /"), "root cgroup cannot be enrolled"),
            (EXAMPLE.replace("cgroup: /tollgate/planner", "cgroup: /a/../b"), "'..'"),
            (EXAMPLE.replace("cgroup: /tollgate/planner", "cgroup: tollgate"), "must start with '/'"),
            (EXAMPLE.replace("address: 127.0.0.1:5432", "address: 127.0.0.1"), "spec.resources[0].address"),
            (EXAMPLE.replace("address: 127.0.0.1:5432", "address: 127.0.0.1:0"), "port 0"),
            (
                EXAMPLE.replace("protocol: tcp\n      address: 127", "protocol: smtp\n      address: 127"),
                "unknown protocol",
            ),
            (EXAMPLE.replace("mode: enforce", "mode: lax"), "spec.mode"),
            (EXAMPLE.replace("unlisted: deny", "unlisted: maybe"), "spec.unlisted"),
            (EXAMPLE.replace("2026-12-31T00:00:00Z", "tomorrow"), "spec.grants[0].expires"),
            (EXAMPLE.replace("name: other\n", "name: planner-bot\n"), "duplicate identity"),
            (EXAMPLE.replace("tollgate/v1alpha1", "v2"), "apiVersion"),
            (
                EXAMPLE.replace("cgroup: /tollgate/other/", "cgroup: /tollgate/planner\n      uids: [1001]"),
                "both claim cgroup /tollgate/planner for uid 1001",
            ),
            (EXAMPLE.replace("address: localhost:8080", "address: 127.0.0.1:5432"), "already resource"),
            (EXAMPLE.replace("  mode: enforce", "  proxy: { listen: [\"10.0.0.1:1\"] }"), "loopback"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.starts_with("test.yaml"), "{e}");
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in ["", "[", "\0\0", "apiVersion: [", "a: b: c", "- 1\n- 2", "spec: 5"] {
            assert!(p(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn listen_defaults_and_overrides() {
        let pol = p(&EXAMPLE.replace("  mode: enforce", "  proxy: { listen: [\"127.0.0.1:0\"] }")).unwrap();
        assert_eq!(pol.listen, vec!["127.0.0.1:0".parse().unwrap()]);
        let e = err(&EXAMPLE.replace("  mode: enforce", "  proxy: { listen: [\"[::1]:0\"] }"));
        assert!(e.contains("IPv4 loopback address is required"), "{e}");
    }

    const PG: &str = r#"
apiVersion: tollgate/v1alpha1
kind: Policy
metadata: { name: pg }
spec:
  approvers: { uids: [0, 1000], gids: [27] }
  notify: { webhook: "http://127.0.0.1:9000/hooks" }
  identities:
    - { name: bot, cgroup: /tollgate/bot }
  resources:
    - name: orders-db
      protocol: postgres
      address: 127.0.0.1:5432
      credentials: { user: app, password_file: /etc/tollgate/orders-db }
      tls: { mode: verify-full, ca_file: /etc/tollgate/ca.pem, client: accept }
  grants:
    - name: bot-orders
      to: [identity:bot]
      resources: [orders-db]
      rules:
        - { name: hold-deletes, match: { statements: [delete] }, action: approve, timeout: 90s }
        - { name: reads, match: { statements: [select] }, action: allow }
      masking:
        - { columns: [email, "*ssn*"], style: redact }
        - { name: content, detect: [email, credit_card], style: hash }
"#;

    #[test]
    fn read_only_grants_validate_and_refuse_turning_it_off() {
        use crate::policy::rules::{Action, READ_ONLY_RULE, judge};
        assert!(!p(PG).unwrap().grants[0].read_only, "not unless the grant says so");
        let read_only = PG.replace(
            "      resources: [orders-db]\n      rules:",
            "      resources: [orders-db]\n      read_only: true\n      rules:",
        );
        let e = err(&read_only);
        assert!(
            e.contains("spec.grants[0].rules[0]") && e.contains("\"hold-deletes\" lets delete statements through"),
            "{e}"
        );
        let pol = p(&read_only.replace("action: approve, timeout: 90s", "action: deny")).unwrap();
        let g = &pol.grants[0];
        assert!(g.read_only);
        let verdict = |sql: &str| {
            let d = judge(g, &crate::sql::classify(sql));
            (d.action, d.rule.to_string())
        };
        assert_eq!(verdict("SELECT 1"), (Action::Allow, "reads".to_string()));
        assert_eq!(verdict("SELECT 1; BEGIN READ WRITE"), (Action::Deny, "bot-orders.default".to_string()));
        let mut allow_all = g.clone();
        allow_all.rules.clear();
        allow_all.default = Action::Allow;
        for sql in [
            "BEGIN READ WRITE",
            "SET default_transaction_read_only = off",
            "SELECT set_config('transaction_read_only', 'off', true)",
        ] {
            let d = judge(&allow_all, &crate::sql::classify(sql));
            assert_eq!((d.action, d.rule.as_str()), (Action::Deny, READ_ONLY_RULE), "{sql}");
        }
        allow_all.read_only = false;
        assert_eq!(judge(&allow_all, &crate::sql::classify("BEGIN READ WRITE")).action, Action::Allow);
    }

    #[test]
    fn postgres_features_validate() {
        use crate::{
            mask::{Kind, Style, Target},
            policy::{model::UpstreamTls, rules::Action},
        };
        let pol = p(PG).unwrap();
        assert_eq!(pol.approvers, Approvers { uids: vec![0, 1000], gids: vec![27] });
        assert_eq!(pol.statement_audit, StatementAudit::Durable, "durable unless the policy says otherwise");
        let written = p(&PG.replace("  approvers:", "  audit: { statements: written }\n  approvers:")).unwrap();
        assert_eq!(written.statement_audit, StatementAudit::Written);
        assert_eq!(pol.trail_rotation, crate::audit::Rotation { size: 1 << 30, keep: 0 }, "1 GiB, all kept");
        let rotate =
            |spec: &str| p(&PG.replace("  approvers:", &format!("  audit: {{ rotate: {spec} }}\n  approvers:")));
        assert_eq!(
            rotate("{ size: 256MiB, keep: 8 }").unwrap().trail_rotation,
            crate::audit::Rotation { size: 256 << 20, keep: 8 }
        );
        assert_eq!(rotate("{ size: 65536 }").unwrap().trail_rotation.size, 65536);
        for (bad, want) in [
            ("{ size: 1GB }", "not a size such as"),
            ("{ size: 1KiB }", "between 64KiB and 1PiB"),
            ("{ size: 99999999999GiB }", "not a size such as"),
            ("{ keep: -1 }", "spec.audit"),
            ("{ every: 1d }", "unknown field"),
        ] {
            let e = rotate(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: expected {want:?} in {e:?}");
        }
        assert_eq!(
            pol.webhook.as_ref().map(|w| (w.host.as_str(), w.port, w.path.as_str())),
            Some(("127.0.0.1", 9000, "/hooks"))
        );
        assert_eq!(pol.webhook.as_ref().unwrap().ca_file, None, "plain http");
        // https: port 443 and the system's CA bundle unless the policy names a CA file.
        let https = |notify: &str| p(&PG.replace("notify: { webhook: \"http://127.0.0.1:9000/hooks\" }", notify));
        let w = https("notify: { webhook: \"https://hooks.example/x\" }").unwrap().webhook.unwrap();
        assert_eq!((w.host.as_str(), w.port, w.path.as_str()), ("hooks.example", 443, "/x"));
        assert_eq!(w.ca_file, Some(model::SYSTEM_CA_FILE.into()));
        let w = https("notify: { webhook: \"https://127.0.0.1:8443/\", ca_file: /etc/tollgate/hooks-ca.pem }");
        assert_eq!(w.unwrap().webhook.unwrap().ca_file, Some("/etc/tollgate/hooks-ca.pem".into()));
        // Credentials before the host are refused, and not repeated in the error.
        for url in ["https://bot:s3cret@hooks.example/x", "https://bot:s3cret@hooks.example"] {
            let e = https(&format!("notify: {{ webhook: \"{url}\" }}")).unwrap_err().to_string();
            assert!(e.contains("credentials in the URL") && e.contains("https://...@hooks.example"), "{e}");
            assert!(!e.contains("s3cret") && !e.contains("bot:"), "{e}");
        }
        let r = &pol.resources[0];
        assert!(r.tls.accept_client);
        assert_eq!(r.databases, None, "any database unless the resource names them");
        let named = p(&PG.replace("      tls:", "      databases: [orders, Orders]\n      tls:")).unwrap();
        assert_eq!(named.resources[0].databases, Some(vec!["orders".to_string(), "Orders".to_string()]));
        assert_eq!(r.tls.upstream, UpstreamTls::VerifyFull { ca_file: "/etc/tollgate/ca.pem".into() });
        // The password in the clear only to a server whose certificate is checked, and never
        // a login the server does not check, unless `credentials.auth` says so.
        use crate::policy::AuthMethod::{Md5, None as NoAuth, Password, ScramSha256};
        assert_eq!(r.credentials.as_ref().unwrap().auth.names(), "scram-sha-256, md5, password");
        let auth = |tls: &str, auth: &str| {
            let text = PG.replace("mode: verify-full, ca_file: /etc/tollgate/ca.pem", tls).replace(
                "password_file: /etc/tollgate/orders-db }",
                &format!("password_file: /etc/tollgate/orders-db{auth} }}"),
            );
            p(&text).map(|pol| pol.resources[0].credentials.clone().unwrap().auth)
        };
        let require = auth("mode: require", "").unwrap();
        assert!(
            require.allows(ScramSha256) && require.allows(Md5) && !require.allows(Password) && !require.allows(NoAuth)
        );
        assert_eq!(auth("mode: disable", "").unwrap(), require);
        let listed = auth("mode: disable", ", auth: [password, none]").unwrap();
        assert!(listed.allows(Password) && listed.allows(NoAuth) && !listed.allows(ScramSha256));
        for (list, want) in [("[]", "at least one"), ("[md5, md5]", "listed twice"), ("[scram]", "unknown method")] {
            let e = auth("mode: disable", &format!(", auth: {list}")).unwrap_err().to_string();
            assert!(e.contains("spec.resources[0].credentials.auth") && e.contains(want), "{list}: {e}");
        }
        let g = &pol.grants[0];
        assert_eq!(g.rules[0].action, Action::Approve { timeout: std::time::Duration::from_secs(90) });
        // Table names are read as the server reads them: unquoted folds, quoted stays.
        let tables = |list: &str| {
            p(&PG.replace("statements: [delete] }", &format!("statements: [delete], tables: {list} }}")))
                .map(|pol| pol.grants[0].rules[0].tables.clone())
        };
        assert_eq!(
            tables(r#"[Orders, public.ORDERS, '"Orders"', '"My ""Q"".x".Y', 'Ä', '"my-table"', t_1$]"#).unwrap(),
            ["orders", "public.orders", "Orders", "\"My \"\"Q\"\".x\".y", "Ä", "my-table", "t_1$"]
        );
        // Cut to 63 bytes as the server cuts identifiers, on a character boundary.
        let long = format!("{}é", "a".repeat(62));
        assert_eq!(tables(&format!("[{long}x]")).unwrap(), ["a".repeat(62)]);
        for (bad, want) in [
            (r#"['"Orders']"#, "not closed"),
            (r#"['"a"b']"#, "must end at a dot"),
            ("[public.]", "is not a relation name"),
            (r#"['a b']"#, "quote the name"),
            ("[my-table]", "quote the name"),
            ("[1table]", "quote the name"),
            ("[db.public.orders]", "name or schema.name"),
        ] {
            let e = tables(bad).unwrap_err().to_string();
            assert!(e.contains("spec.grants[0].rules[0].match.tables[0]") && e.contains(want), "{bad}: {e}");
        }
        let default = p(&PG.replace("action: approve, timeout: 90s", "action: approve")).unwrap();
        assert_eq!(default.grants[0].rules[0].action, Action::Approve { timeout: std::time::Duration::from_secs(300) });
        assert_eq!(g.masking[0].name, "bot-orders.masking[0]", "unnamed masking rules get a name");
        assert_eq!(g.masking[0].style, Style::Redact);
        assert_eq!(g.masking[1].target, Target::Detect(vec![Kind::Email, Kind::CreditCard]));
        let cases = [
            (PG.replace("timeout: 90s", "timeout: 90"), "spec.grants[0].rules[0].timeout"),
            (PG.replace("timeout: 90s", "timeout: 0s"), "between 1s and 24h"),
            (
                PG.replace("action: approve, timeout: 90s", "action: deny, timeout: 90s"),
                "only approve rules take a timeout",
            ),
            (PG.replace("action: approve", "action: ask"), "expected allow, deny or approve"),
            (PG.replace("style: redact", "style: blur"), "spec.grants[0].masking[0].style"),
            (
                PG.replace("detect: [email, credit_card]", "detect: [email, iban]"),
                "spec.grants[0].masking[1].detect[1]",
            ),
            (
                PG.replace("{ columns: [email, \"*ssn*\"], style: redact }", "{ style: redact }"),
                "either columns or detect",
            ),
            (PG.replace("mode: verify-full, ca_file: /etc/tollgate/ca.pem", "mode: verify-full"), "needs the CA file"),
            (
                PG.replace("mode: verify-full, ca_file: /etc/tollgate/ca.pem", "mode: require, ca_file: /x"),
                "only verify-full",
            ),
            (PG.replace("mode: verify-full", "mode: verify-ca"), "unknown tls mode"),
            (PG.replace("client: accept", "client: maybe"), "spec.resources[0].tls.client"),
            (PG.replace("      tls:", "      databases: []\n      tls:"), "spec.resources[0].databases"),
            (PG.replace("      tls:", "      databases: [\"\"]\n      tls:"), "is not a database name"),
            (PG.replace("http://127.0.0.1:9000/hooks", "ftp://hooks.example/x"), "must start with http:// or https://"),
            (PG.replace("/hooks\" }", "/hooks\", ca_file: /x.pem }"), "ca_file applies only to https"),
            (PG.replace("9000/hooks", "9000/T0/s3cret path"), "\"http://127.0.0.1:9000/...\": the path must not"),
            (
                PG.replace("protocol: postgres", "protocol: tcp")
                    .replace("      credentials: { user: app, password_file: /etc/tollgate/orders-db }\n", "")
                    .replace("      tls: { mode: verify-full, ca_file: /etc/tollgate/ca.pem, client: accept }\n", ""),
                "apply only to postgres resources",
            ),
            (PG.replace("approvers: { uids: [0, 1000], gids: [27] }", "approvers: { users: [root] }"), "unknown field"),
            (PG.replace("  approvers:", "  audit: { statements: fast }\n  approvers:"), "spec.audit.statements"),
            (PG.replace("      rules:", "      read_only: yes please\n      rules:"), "spec.grants[0].read_only"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
    }
}
