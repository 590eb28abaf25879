//! Throwaway certificates for TLS tests, made by the real `openssl` command line with the
//! benchmark tool's CA maker (`tsbroker_bench::tls::Ca`): a CA, server certificates for
//! `localhost` and 127.0.0.1, client certificates, all signed by it, and its revocation lists.
//! Failures panic.

use std::path::{Path, PathBuf};

use tsbroker_bench::tls::Ca;
pub use tsbroker_bench::tls::CertifiedKey;

use crate::binaries::tool;

/// A CA's files in a directory, and what it signed there.
pub struct TestCa(Ca);

impl TestCa {
    /// A new CA named `name` (its files `name.pem`, `name.key`) in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        // Fails with the way to get it when openssl is missing.
        tool("openssl", "apt-get install openssl");
        TestCa(Ca::new(dir, name).unwrap_or_else(|error| panic!("{error:#}")))
    }

    /// The CA's certificate, what clients and servers are told to trust.
    pub fn cert(&self) -> PathBuf {
        self.0.cert()
    }

    /// A server certificate for `localhost` and 127.0.0.1, files `name.pem` and `name.key`.
    pub fn server(&self, name: &str) -> CertifiedKey {
        self.0
            .server(name)
            .unwrap_or_else(|error| panic!("{error:#}"))
    }

    /// A server certificate as [`TestCa::server`]'s that expires at `not_after`.
    pub fn server_until(&self, name: &str, not_after: std::time::SystemTime) -> CertifiedKey {
        self.0
            .server_until(name, not_after)
            .unwrap_or_else(|error| panic!("{error:#}"))
    }

    /// A client certificate for `common_name` (also its subjectAltName DNS name: the machine
    /// an agent's certificate names), files `name.pem` and `name.key`.
    pub fn client(&self, name: &str, common_name: &str) -> CertifiedKey {
        self.0
            .client(name, common_name)
            .unwrap_or_else(|error| panic!("{error:#}"))
    }

    /// Adds `cert` (one this CA signed) to the certificates it revokes.
    pub fn revoke(&self, cert: &Path) {
        self.0
            .revoke(cert)
            .unwrap_or_else(|error| panic!("{error:#}"))
    }

    /// The CA's revocation list as it stands (PEM), written to `name` in its directory.
    pub fn revocation_list(&self, name: &str) -> PathBuf {
        self.0
            .revocation_list(name)
            .unwrap_or_else(|error| panic!("{error:#}"))
    }
}
