//! TLS for PostgreSQL resources: the agent's own certificate authority (clients that ask for
//! TLS get a certificate for the resource's name, signed by it) and the upstream client
//! configuration (`require` or `verify-full` against a CA file).
use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};

use crate::policy::{Resource, ResourceAddress, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    Name(String),
}

const CA_NAME: &str = "tollgate agent CA";

/// A client configuration that checks the server's certificate and name against the CA
/// certificates in `ca_file` (PEM).
pub fn verifying(ca_file: &Path) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut roots = RootCertStore::empty();
    let pem_err = |message: String| TlsError::Pem { path: ca_file.to_path_buf(), message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    // A system bundle may hold a certificate this library cannot use; the rest still count.
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(pem_err("no usable CA certificates in the file".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// The agent's certificate authority, kept in `STATE_DIR/tls/` so clients can trust `ca.crt`
/// (`sslrootcert=`) across restarts, and server configurations issued from it per resource.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pub ca_file: PathBuf,
    servers: Mutex<HashMap<String, Arc<ServerConfig>>>,
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl Authority {
    /// Loads the CA key from `dir`, or creates key and certificate there.
    pub fn load_or_create(dir: &Path) -> Result<Authority, TlsError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key_path = dir.join("ca.key");
        let ca_file = dir.join("ca.crt");
        let key = match fs::read_to_string(&key_path) {
            Ok(pem) => {
                KeyPair::from_pem(&pem).map_err(|e| TlsError::Pem { path: key_path.clone(), message: e.to_string() })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate()?;
                let cert = ca_params().self_signed(&key)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(io(&key_path))?;
                f.write_all(key.serialize_pem().as_bytes()).and_then(|()| f.sync_all()).map_err(io(&key_path))?;
                fs::write(&ca_file, cert.pem()).map_err(io(&ca_file))?;
                key
            }
            Err(e) => return Err(TlsError::Io { path: key_path, source: e }),
        };
        if !ca_file.exists() {
            fs::write(&ca_file, ca_params().self_signed(&key)?.pem()).map_err(io(&ca_file))?;
        }
        // Same name and key as the stored certificate: what it signs verifies against ca.crt.
        Ok(Authority {
            issuer: Issuer::new(ca_params(), key),
            ca_file,
            servers: Mutex::default(),
            clients: Mutex::default(),
        })
    }

    /// A server configuration presenting a certificate for the resource's host name or IP.
    pub fn server_config(&self, resource: &Resource) -> Result<Arc<ServerConfig>, TlsError> {
        let name = host_of(&resource.address);
        let mut cache = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&name) {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        }];
        params.distinguished_name.push(DnType::CommonName, name.clone());
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Name(e.to_string()))?,
            )?;
        // As PostgreSQL 17: clients that name a protocol (libpq 17 does) must name this one.
        config.alpn_protocols = vec![POSTGRES_ALPN.to_vec()];
        let config = Arc::new(config);
        cache.insert(name, config.clone());
        Ok(config)
    }

    /// Forgets cached upstream configurations, so a policy reload rereads CA files.
    pub fn refresh(&self) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The upstream client configuration for a resource's `tls` mode (`None`: plain TCP).
    pub fn client_config(&self, tls: &UpstreamTls) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let key = format!("{tls:?}");
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(Some(c.clone()));
        }
        let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let config = match tls {
            UpstreamTls::Disable => return Ok(None),
            UpstreamTls::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
                .with_no_client_auth(),
            UpstreamTls::VerifyFull { ca_file } => verifying(ca_file)?,
        };
        let config = Arc::new(config);
        cache.insert(key, config.clone());
        Ok(Some(config))
    }
}

/// The name a resource's certificate is for, and that upstream certificates are checked against.
pub fn host_of(address: &ResourceAddress) -> String {
    match address {
        ResourceAddress::Socket(sa) => sa.ip().to_string(),
        ResourceAddress::Host { host, .. } => host.clone(),
    }
}

pub fn server_name(address: &ResourceAddress) -> Result<ServerName<'static>, TlsError> {
    host_name(host_of(address))
}

/// The name a server's certificate must carry: a DNS name or an IP address.
pub fn host_name(host: String) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.clone()).map_err(|_| TlsError::Name(host))
}

/// Fills `buf` from the system's random source, through the TLS provider's generator (a
/// secret the agent hands out, like a cancel key). The generator fails only where the kernel
/// has no randomness to give, which the agent does not run without (its hash maps' keys
/// need it too).
pub fn fill_random(buf: &mut [u8]) {
    // The generator alone, once: not a whole provider (its suites and algorithms) per call.
    static RANDOM: std::sync::LazyLock<&'static dyn rustls::crypto::SecureRandom> =
        std::sync::LazyLock::new(|| rustls::crypto::ring::default_provider().secure_random);
    RANDOM.fill(buf).expect("the system's random source");
}

/// The ALPN protocol id of PostgreSQL, which a client starting TLS directly (PostgreSQL 17's
/// `sslnegotiation=direct`) must ask for.
pub const POSTGRES_ALPN: &[u8] = b"postgresql";

/// RFC 5929's `tls-server-end-point` data for SCRAM channel binding: the hash of the server's
/// certificate, by the hash its signature uses (SHA-256 in place of MD5 and SHA-1). `None`
/// where the signature names no such hash (Ed25519, RSA-PSS): PostgreSQL has none to compare
/// with either.
pub fn end_point_binding(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let hash = match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1, dsa-with-sha1; then the SHA-256 ones.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.10045.4.1"
        | "1.2.840.10040.4.3"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.3.2"
        | "2.16.840.1.101.3.4.3.2" => sha2::Sha256::digest(cert).to_vec(),
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" => sha2::Sha224::digest(cert).to_vec(),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert).to_vec(),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert).to_vec(),
        _ => return None,
    };
    Some(hash)
}

/// `tls: require`: encrypted, but the server's certificate is not checked (libpq's
/// `sslmode=require`). The handshake signature is still verified, so the peer holds the key of
/// the certificate it shows.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_survives_a_restart_and_signs_per_resource() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_create(dir.path()).unwrap();
        let ca1 = fs::read_to_string(&a.ca_file).unwrap();
        let res = |addr: &str| Resource {
            name: "db".into(),
            protocol: crate::policy::Protocol::Postgres,
            address: ResourceAddress::parse(addr).unwrap(),
            credentials: None,
            tls: Default::default(),
            databases: None,
        };
        a.server_config(&res("127.0.0.1:5432")).unwrap();
        a.server_config(&res("orders-db.internal:5432")).unwrap();
        let b = Authority::load_or_create(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&b.ca_file).unwrap(), ca1, "same CA after a restart");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(a.client_config(&UpstreamTls::Disable).unwrap().is_none());
        assert!(a.client_config(&UpstreamTls::Require).unwrap().is_some());
        let missing = UpstreamTls::VerifyFull { ca_file: dir.path().join("nope.pem") };
        assert!(a.client_config(&missing).is_err());
        let ok = UpstreamTls::VerifyFull { ca_file: a.ca_file.clone() };
        assert!(a.client_config(&ok).unwrap().is_some());
    }

    #[test]
    fn channel_binding_hashes_the_certificate_as_its_signature_does() {
        use sha2::Digest;
        let cert = |alg: &'static rcgen::SignatureAlgorithm| {
            let key = KeyPair::generate_for(alg).unwrap();
            CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap().der().to_vec()
        };
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(end_point_binding(&p256), Some(sha2::Sha256::digest(&p256).to_vec()));
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(end_point_binding(&p384), Some(sha2::Sha384::digest(&p384).to_vec()));
        assert_eq!(end_point_binding(&cert(&rcgen::PKCS_ED25519)), None, "no hash to bind with");
        assert_eq!(end_point_binding(b"not a certificate"), None);
    }
}
