//! PEM files named by a setting (`--tls-cert FILE` and the like), read and parsed at start so
//! that a missing or wrong file stops the program with the setting, the path and the reason.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A file's bytes (what tonic takes) and the certificates in it, at least one.
pub struct CertificateFile {
    pub pem: Vec<u8>,
    pub certificates: Vec<CertificateDer<'static>>,
}

/// A file's bytes and the private key in it.
pub struct KeyFile {
    pub pem: Vec<u8>,
    pub key: PrivateKeyDer<'static>,
}

pub fn read_certificates(path: &Path, setting: &str) -> anyhow::Result<CertificateFile> {
    let pem = read(path, setting)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow!("{setting} {}: bad PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        bail!(
            "{setting} {}: no certificate in it (PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        );
    }
    Ok(CertificateFile { pem, certificates })
}

pub fn read_private_key(path: &Path, setting: &str) -> anyhow::Result<KeyFile> {
    let pem = read(path, setting)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
        anyhow!(
            "{setting} {}: no private key in PEM form ({error})",
            path.display()
        )
    })?;
    Ok(KeyFile { pem, key })
}

/// `--tls-cert` and `--tls-key` (the names both programs give them): a certificate chain and
/// the private key of its first certificate.
pub fn read_key_pair(cert: &Path, key: &Path) -> anyhow::Result<(CertificateFile, KeyFile)> {
    let chain = read_certificates(cert, "--tls-cert")?;
    let private = read_private_key(key, "--tls-key")?;
    rustls::sign::CertifiedKey::from_der(
        chain.certificates.clone(),
        private.key.clone_key(),
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|error| {
        anyhow!(
            "--tls-key {} does not go with --tls-cert {}: {error}",
            key.display(),
            cert.display()
        )
    })?;
    Ok((chain, private))
}

/// Certificate revocation lists ("BEGIN X509 CRL" blocks), at least one.
pub fn read_revocation_lists(
    path: &Path,
    setting: &str,
) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let pem = read(path, setting)?;
    let lists = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow!("{setting} {}: bad PEM: {error}", path.display()))?;
    if lists.is_empty() {
        bail!(
            "{setting} {}: no revocation list in it (PEM \"BEGIN X509 CRL\" blocks)",
            path.display()
        );
    }
    Ok(lists)
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{setting} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_empty_and_wrong_files_say_which_setting() {
        let dir = std::env::temp_dir().join(format!("tsbroker-pem-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let error = read_certificates(&missing, "--tls-cert")
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.starts_with("--tls-cert ") && error.contains("missing.pem"),
            "{error}"
        );
        let text = dir.join("notes.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let error = format!(
            "{:#}",
            read_certificates(&text, "--broker-ca").err().unwrap()
        );
        assert!(error.contains("no certificate"), "{error}");
        let error = format!("{:#}", read_private_key(&text, "--tls-key").err().unwrap());
        assert!(error.contains("no private key"), "{error}");
        let error = format!(
            "{:#}",
            read_revocation_lists(&text, "--tls-client-crl")
                .err()
                .unwrap()
        );
        assert!(error.contains("no revocation list"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
