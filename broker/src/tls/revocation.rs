//! Certificate revocation lists for client certificates (`--tls-client-crl`), read and checked
//! whenever the TLS files are: each list must parse as rustls will use it, and each CA of
//! `--tls-client-ca` must have its list in the file — without one, rustls cannot tell whether
//! a certificate that CA issued is revoked and refuses every one of them, which would shut the
//! whole farm out for a missing file rather than for a revocation.

use std::path::Path;

use anyhow::{anyhow, bail};
use rustls::pki_types::{CertificateRevocationListDer, TrustAnchor};
use tsbroker_common::pem;
use webpki::{BorrowedCertRevocationList, CertRevocationList};

const SETTING: &str = "--tls-client-crl";

/// The lists in `path`, each parsed, one of them issued by each of `client_cas` (the CAs of
/// the file `client_ca_path`, in its order).
pub fn load(
    path: &Path,
    client_cas: &[TrustAnchor<'_>],
    client_ca_path: &Path,
) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let lists = pem::read_revocation_lists(path, SETTING)?;
    let mut issuers = Vec::with_capacity(lists.len());
    for (index, list) in lists.iter().enumerate() {
        let parsed = BorrowedCertRevocationList::from_der(list).map_err(|error| {
            anyhow!(
                "{SETTING} {}: revocation list {} of {} cannot be used: {error:?}",
                path.display(),
                index + 1,
                lists.len()
            )
        })?;
        issuers.push(CertRevocationList::from(parsed).issuer().to_vec());
    }
    for (index, ca) in client_cas.iter().enumerate() {
        if !issuers.iter().any(|issuer| issuer[..] == ca.subject[..]) {
            bail!(
                "{SETTING} {}: no revocation list issued by certificate {} of --tls-client-ca \
                 {} (every client CA needs its current list, or the certificates it issued \
                 are all refused)",
                path.display(),
                index + 1,
                client_ca_path.display()
            );
        }
    }
    Ok(lists)
}
