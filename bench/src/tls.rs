//! `--tls`: the broker serves gRPC over TLS and every client of the tool (load, simulated
//! agents) connects with it, to measure what TLS costs against the same scenario without.
//! The certificates are made by the `openssl` command line for the run: a CA and a broker
//! certificate for 127.0.0.1 (EC P-256, what deploy/README.md makes too).

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use tonic::transport::{Certificate, ClientTlsConfig};
use tsbroker::tls::TlsFiles;

/// The CA the tool's clients trust, once `--tls` set it up.
static CLIENT_CA: OnceLock<Vec<u8>> = OnceLock::new();

/// The broker's certificate files, made in `dir` (which must outlive the run); from then on
/// the tool's clients trust their CA.
pub fn set_up(dir: &Path) -> anyhow::Result<TlsFiles> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run openssl (Debian: apt-get install openssl)")?;
        if !output.status.success() {
            bail!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=tsbroker-bench-ca",
            ][..],
            &key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[
            &["req", "-new", "-subj", "/CN=127.0.0.1"][..],
            &key,
            &["-keyout", "broker.key", "-out", "broker.csr"],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("broker.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "broker.pem",
        "-extfile",
        "broker.ext",
    ])?;
    let ca = std::fs::read(dir.join("ca.pem"))?;
    if CLIENT_CA.set(ca).is_err() {
        bail!("TLS was set up twice");
    }
    Ok(TlsFiles {
        cert: dir.join("broker.pem"),
        key: dir.join("broker.key"),
        client_ca: None,
    })
}

/// The clients' TLS settings, when `--tls` set them up.
pub fn client_config() -> Option<ClientTlsConfig> {
    CLIENT_CA
        .get()
        .map(|ca| ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
}
