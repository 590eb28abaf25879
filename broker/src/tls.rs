//! TLS on the broker's gRPC port: its certificate chain and key, and optionally a CA whose
//! certificates clients must present (checked per service in `service::auth`; health checks
//! and reflection stay open). The files are read and checked at start, so a bad one stops the
//! broker with the file's name and what is wrong with it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tsbroker_common::pem;

/// How long a client may take over its TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the TLS files are, as the settings name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the broker's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CA(s) whose certificates clients must present; none asks for no certificate.
    pub client_ca: Option<PathBuf>,
}

/// The files' contents, checked: they parse and the key is the certificate's.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    /// The broker's own certificate, which its health check trusts.
    leaf: CertificateDer<'static>,
}

impl ServerTls {
    pub fn load(files: &TlsFiles) -> anyhow::Result<ServerTls> {
        let (chain, key) = pem::read_key_pair(&files.cert, &files.key)?;
        let client_ca_pem = match &files.client_ca {
            Some(path) => Some(pem::read_certificates(path, "--tls-client-ca")?.pem),
            None => None,
        };
        Ok(ServerTls {
            leaf: chain.certificates[0].clone(),
            cert_pem: chain.pem,
            key_pem: key.pem,
            client_ca_pem,
        })
    }

    /// tonic's server settings. A client certificate is optional at the handshake, so that
    /// health checks and reflection work without one; the services that need one refuse calls
    /// without it (`service::auth`). One that is presented must be signed by the client CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.client_ca_pem {
            Some(pem) => config
                .client_ca_root(Certificate::from_pem(pem))
                .client_auth_optional(true),
            None => config,
        }
    }

    /// Whether calls must come with a client certificate the client CA signed.
    pub fn client_certificates_required(&self) -> bool {
        self.client_ca_pem.is_some()
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

/// Trusts one certificate, the broker's own; the handshake's signatures are still checked, so
/// the server proved it holds that certificate's key.
#[derive(Debug)]
pub struct OwnCertificate {
    leaf: CertificateDer<'static>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for OwnCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one in --tls-cert".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    /// common/testdata/README.md says what it is.
    const NAMED: &str = include_str!("../../common/testdata/ts1-example-com.pem");

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
