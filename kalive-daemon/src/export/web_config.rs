//! `--web.config.file`: TLS and basic auth in the file format Prometheus exporters share
//! (prometheus/exporter-toolkit), so operators can reuse the files they already have.
//!
//! Supported: `tls_server_config` (cert_file/key_file or inline cert/key, client_auth_type,
//! client_ca_file, min_version, max_version, prefer_server_cipher_suites),
//! `http_server_config.headers`, and `basic_auth_users` with bcrypt hashes. Settings kalive
//! cannot honour (cipher_suites, curve_preferences, client_allowed_sans, TLS 1.0/1.1) are
//! refused with an error rather than silently ignored.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read the web config file {path}: {source}; check the path given to --web.config.file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the web config file {path} is not valid: {message}; see the exporter-toolkit web-configuration format (README, \"TLS and basic auth\")")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsFile>,
    http_server_config: Option<HttpFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_ca: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    prefer_server_cipher_suites: Option<bool>,
    cipher_suites: Option<Vec<String>>,
    curve_preferences: Option<Vec<String>>,
    client_allowed_sans: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The parsed web configuration.
#[derive(Clone, Default)]
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub basic_auth: Option<BasicAuth>,
    /// Extra response headers (http_server_config.headers).
    pub headers: Vec<(String, String)>,
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|message| WebConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the file's text; relative paths in it are relative to `base` (its directory).
    pub fn parse(text: &str, base: &Path) -> Result<WebConfig, String> {
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            serde_norway::from_str(text).map_err(|err| err.to_string())?
        };
        let tls = file
            .tls_server_config
            .map(|tls| tls_config(&tls, base).map(Arc::new))
            .transpose()?;
        let basic_auth = file
            .basic_auth_users
            .filter(|users| !users.is_empty())
            .map(BasicAuth::new)
            .transpose()?;
        let http = file.http_server_config.unwrap_or_default();
        if http.http2 == Some(true) {
            log::info!("http_server_config.http2: kalive serves HTTP/1.1 only");
        }
        let headers = http.headers.unwrap_or_default().into_iter().collect();
        Ok(WebConfig {
            tls,
            basic_auth,
            headers,
        })
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

fn pem_source(
    base: &Path,
    file: Option<&PathBuf>,
    inline: Option<&String>,
    what: &str,
) -> Result<Vec<u8>, String> {
    match (file, inline) {
        (Some(_), Some(_)) => Err(format!(
            "tls_server_config sets both {what}_file and {what}: keep one"
        )),
        (Some(path), None) => {
            let path = resolve(base, path);
            std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))
        }
        (None, Some(text)) => Ok(text.as_bytes().to_vec()),
        (None, None) => Err(format!("tls_server_config needs {what}_file (or {what})")),
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{what}: {err}"))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no PEM certificate"));
    }
    Ok(certs)
}

/// TLS12 -> 12, TLS13 -> 13.
fn tls_version(name: &str) -> Result<u8, String> {
    match name {
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        "TLS10" | "TLS11" => Err(format!(
            "{name} is not supported (it is insecure); use TLS12 or TLS13"
        )),
        other => Err(format!("unknown TLS version {other:?}; use TLS12 or TLS13")),
    }
}

fn tls_config(tls: &TlsFile, base: &Path) -> Result<ServerConfig, String> {
    for (name, set) in [
        ("cipher_suites", tls.cipher_suites.is_some()),
        ("curve_preferences", tls.curve_preferences.is_some()),
        ("client_allowed_sans", tls.client_allowed_sans.is_some()),
    ] {
        if set {
            return Err(format!(
                "tls_server_config.{name} is not supported by kalive; remove it \
                 (kalive uses rustls' safe defaults)"
            ));
        }
    }
    let cert_pem = pem_source(base, tls.cert_file.as_ref(), tls.cert.as_ref(), "cert")?;
    let key_pem = pem_source(base, tls.key_file.as_ref(), tls.key.as_ref(), "key")?;
    let chain = certificates(&cert_pem, "the certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|err| format!("the private key: {err} (expected a PEM private key)"))?;

    let min = tls_version(tls.min_version.as_deref().unwrap_or("TLS12"))?;
    let max = tls_version(tls.max_version.as_deref().unwrap_or("TLS13"))?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(number, _)| (min..=max).contains(number))
            .map(|(_, version)| version)
            .collect();
    if versions.is_empty() {
        return Err("min_version is above max_version".to_owned());
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|err| format!("TLS versions: {err}"))?;

    let auth_type = tls.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let roots = || -> Result<Arc<RootCertStore>, String> {
        let pem = pem_source(
            base,
            tls.client_ca_file.as_ref(),
            tls.client_ca.as_ref(),
            "client_ca",
        )
        .map_err(|err| format!("client_auth_type {auth_type}: {err}"))?;
        let mut store = RootCertStore::empty();
        for cert in certificates(&pem, "client_ca_file")? {
            store
                .add(cert)
                .map_err(|err| format!("client_ca_file: {err}"))?;
        }
        Ok(Arc::new(store))
    };
    let builder = match auth_type {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots()?, provider);
            let verifier = if auth_type == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|err| format!("client certificate verifier: {err}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(format!(
                "client_auth_type {auth_type} (accepting unverified client certificates) is not \
                 supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with \
                 client_ca_file"
            ))
        }
        other => {
            return Err(format!(
                "unknown client_auth_type {other:?}; use NoClientCert, VerifyClientCertIfGiven \
                 or RequireAndVerifyClientCert"
            ))
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| format!("the certificate and key do not go together: {err}"))?;
    config.ignore_client_order = tls.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Users and their bcrypt password hashes; successful checks are remembered so that a scraper
/// does not pay bcrypt's cost on every request.
#[derive(Clone)]
pub struct BasicAuth {
    users: Arc<BTreeMap<String, String>>,
    verified: Arc<Mutex<HashSet<String>>>,
}

/// At most this many verified credentials are remembered (then the memory starts over).
const VERIFIED_CACHE: usize = 256;

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<BasicAuth, String> {
        for (user, hash) in &users {
            if !hash.starts_with("$2") {
                return Err(format!(
                    "basic_auth_users.{user} is not a bcrypt hash (expected $2a$, $2b$ or $2y$...); \
                     create one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
                ));
            }
        }
        Ok(BasicAuth {
            users: Arc::new(users),
            verified: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// True when the Authorization header carries a known user and the right password.
    /// bcrypt is slow on purpose: call this off the async threads.
    pub fn check(&self, authorization: Option<&str>) -> bool {
        let Some(encoded) = authorization.and_then(|value| value.strip_prefix("Basic ")) else {
            return false;
        };
        let encoded = encoded.trim();
        let lock = || {
            self.verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if lock().contains(encoded) {
            return true;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return false;
        }
        let mut verified = lock();
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(encoded.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "secret", hashed by glibc's libxcrypt (Python's crypt module), not by the bcrypt crate.
    const SECRET_HASH: &str = "$2b$04$YiWcsWNFRG1QWKRdn7aXIOokq2E7CIf48IePGil/Osa0WRt3jgw8i";

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn basic_auth_accepts_the_right_password_only() {
        let config = WebConfig::parse(
            &format!("basic_auth_users:\n  alice: '{SECRET_HASH}'\n"),
            Path::new("."),
        )
        .unwrap();
        let auth = config.basic_auth.unwrap();
        assert!(auth.check(Some(&basic("alice", "secret"))));
        assert!(auth.check(Some(&basic("alice", "secret"))), "cached");
        assert!(!auth.check(Some(&basic("alice", "wrong"))));
        assert!(!auth.check(Some(&basic("bob", "secret"))));
        assert!(!auth.check(Some("Basic !!!not-base64")));
        assert!(!auth.check(Some("Bearer abc")));
        assert!(!auth.check(None));
    }

    #[test]
    fn empty_file_means_plain_http_without_auth() {
        let config = WebConfig::parse("", Path::new(".")).unwrap();
        assert!(config.tls.is_none() && config.basic_auth.is_none());
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("tls_server_config:\n  cert: inline\n", "needs key_file"),
            ("basic_auth_users:\n  alice: plain\n", "not a bcrypt hash"),
            ("unknown_section: 1\n", "unknown field"),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [X]\n",
                "cipher_suites is not supported",
            ),
            (
                "tls_server_config:\n  cert_file: /nonexistent/c.pem\n  key_file: k\n",
                "cannot read /nonexistent/c.pem",
            ),
            ("basic_auth_users: [", "expected a map"),
            ("tls_server_config: {cert: \"unterminated", "line 1"),
        ];
        for (text, expected) in cases {
            let err = WebConfig::parse(text, Path::new("/tmp")).err().unwrap();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        assert!(tls_version("TLS10").unwrap_err().contains("TLS12 or TLS13"));
    }
}
