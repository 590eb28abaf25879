//! TLS on the broker's gRPC port: its certificate chain and key, and optionally a CA whose
//! certificates clients must present (checked per service in `service::auth`; health checks
//! and reflection stay open). The files are read and checked at start, so a bad one stops the
//! broker with the file's name and what is wrong with it; `listener.rs` serves connections with
//! them and takes up renewed files while the broker runs.

mod listener;
mod live;
mod own_certificate;
mod revocation;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use tsbroker_common::{cert_validity, pem};

pub use listener::TlsListener;
pub use live::Tracked;
pub use own_certificate::OwnCertificate;

/// Where the TLS files are, as the settings name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the broker's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CA(s) whose certificates clients must present; none asks for no certificate.
    pub client_ca: Option<PathBuf>,
    /// PEM: the revocation lists of the client CAs; none checks no revocation.
    pub client_crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The broker's own certificate and key, without the files that check clients.
    pub fn own_only(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: None,
            client_crl: None,
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        [
            Some(&self.cert),
            Some(&self.key),
            self.client_ca.as_ref(),
            self.client_crl.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

/// The files' contents, checked, as a rustls server configuration.
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    /// The broker's own certificate, which its health check trusts.
    leaf: CertificateDer<'static>,
    /// What checks client certificates (with a client CA), kept to check open connections again.
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Where the certificate came from, for what is said about it.
    cert: PathBuf,
}

impl ServerTls {
    /// Reads and checks the files: the key is the certificate's, the CA file holds
    /// certificates, the revocation lists parse and one comes from each CA. A client
    /// certificate is optional at the handshake, so that health checks and reflection work
    /// without one; the services that need one refuse calls without it (`service::auth`). One
    /// that is presented must be signed by the client CA.
    pub fn load(files: &TlsFiles) -> anyhow::Result<ServerTls> {
        let (chain, key) = pem::read_key_pair(&files.cert, &files.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?;
        let mut client_verifier = None;
        let builder = match &files.client_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in pem::read_certificates(path, "--tls-client-ca")?.certificates {
                    roots.add(certificate).with_context(|| {
                        format!("--tls-client-ca {}: not a CA certificate", path.display())
                    })?;
                }
                let revoked = match &files.client_crl {
                    Some(crl) => revocation::load(crl, &roots.roots, path)?,
                    None => Vec::new(),
                };
                // With lists, every certificate of a client's chain below the CA is checked,
                // and one whose issuer has no list is refused (rustls's default).
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .with_crls(revoked)
                        .allow_unauthenticated()
                        .build()
                        .with_context(|| format!("--tls-client-ca {}", path.display()))?;
                client_verifier = Some(verifier.clone());
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let leaf = chain.certificates[0].clone();
        let mut config = builder
            .with_single_cert(chain.certificates, key.key)
            .with_context(|| format!("--tls-cert {}", files.cert.display()))?;
        // gRPC is HTTP/2, and clients (grpcurl's Go stack among them) insist on being told so.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            leaf,
            client_verifier,
            cert: files.cert.clone(),
        })
    }

    /// Makes `reminder` say where the broker's own certificate stands, from now on.
    pub fn remind_with(&self, reminder: &cert_validity::Reminder) {
        reminder.loaded(std::slice::from_ref(&self.leaf), &self.cert);
    }

    /// Why peers refuse the broker's own certificate now (expired, not valid yet), if they do.
    pub fn own_certificate_refused(&self) -> Option<String> {
        let now = std::time::SystemTime::now();
        let standing = cert_validity::standing(&self.leaf, now)?;
        if !standing.refused() {
            return None;
        }
        standing.problem("--tls-cert", &self.cert, now)
    }

    /// A verifier for the broker's own health check: it accepts exactly this certificate (the
    /// check asks the broker on its listen address, whatever names the certificate carries).
    pub fn own_certificate(&self) -> Arc<OwnCertificate> {
        Arc::new(OwnCertificate {
            leaf: self.leaf.clone(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

/// Checks that a client certificate names `machine` among its subjectAltName entries (a DNS
/// name, or a wildcard as TLS allows it; an IP address for a machine named by one): an agent
/// whose certificate the client CA signed may speak only for the machine its certificate names.
pub fn certificate_names_machine(
    certificate: &CertificateDer<'_>,
    machine: &str,
) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from(machine).map_err(|_| {
        format!("machine name {machine:?} is not a DNS name a certificate can carry")
    })?;
    let parsed = webpki::EndEntityCert::try_from(certificate)
        .map_err(|error| format!("the client certificate cannot be read: {error}"))?;
    parsed.verify_is_valid_for_subject_name(&name).map_err(|_| {
        format!(
            "the client certificate does not name machine {machine:?} (a subjectAltName DNS \
             entry must)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    /// common/testdata/README.md says what it is.
    const NAMED: &str = include_str!("../../../common/testdata/ts1-example-com.pem");

    #[test]
    fn a_certificate_admits_the_machines_its_alternative_names_name() {
        let certificate = CertificateDer::from_pem_slice(NAMED.as_bytes()).unwrap();
        for admitted in [
            "ts1.example.com",
            "TS1.Example.com",
            "ts5.farm.example.com",
            "192.0.2.7",
        ] {
            assert_eq!(certificate_names_machine(&certificate, admitted), Ok(()));
        }
        for refused in [
            "ts2.example.com",
            "a.b.farm.example.com",
            "192.0.2.8",
            "ts1",
        ] {
            let why = certificate_names_machine(&certificate, refused).unwrap_err();
            assert!(why.contains("does not name machine"), "{refused}: {why}");
        }
        let why = certificate_names_machine(&certificate, "ts 1").unwrap_err();
        assert!(why.contains("not a DNS name"), "{why}");
    }
}
