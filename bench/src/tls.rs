//! `--tls`: the broker serves gRPC over TLS and every client of the tool (load, simulated
//! agents) connects with it, to measure what TLS costs against the same scenario without.
//! The certificates are made by the `openssl` command line for the run ([`Ca`]): a CA and a
//! broker certificate for localhost and 127.0.0.1 (EC P-256, what deploy/README.md makes too).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use anyhow::{Context, bail};
use tonic::transport::{Certificate, ClientTlsConfig};
use tsbroker::tls::TlsFiles;

/// The CA the tool's clients trust, once `--tls` set it up.
static CLIENT_CA: OnceLock<Vec<u8>> = OnceLock::new();

/// The broker's certificate files, made in `dir` (which must outlive the run); from then on
/// the tool's clients trust their CA.
pub fn set_up(dir: &Path) -> anyhow::Result<TlsFiles> {
    let ca = Ca::new(dir, "ca")?;
    let broker = ca.server("broker")?;
    if CLIENT_CA.set(std::fs::read(ca.cert())?).is_err() {
        bail!("TLS was set up twice");
    }
    Ok(TlsFiles {
        cert: broker.cert,
        key: broker.key,
        client_ca: None,
        client_crl: None,
    })
}

/// The CA the broker's certificate comes from (PEM), when TLS is set up.
pub fn broker_ca_pem() -> Option<&'static [u8]> {
    CLIENT_CA.get().map(Vec::as_slice)
}

/// The clients' TLS settings, when `--tls` set them up.
pub fn client_config() -> Option<ClientTlsConfig> {
    CLIENT_CA
        .get()
        .map(|ca| ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
}

/// A CA's files in a directory (`NAME.pem`, `NAME.key`), and what it signs there: EC P-256
/// keys, two days of validity. The end-to-end tests make theirs with it too.
pub struct Ca {
    dir: PathBuf,
    name: String,
}

/// A certificate and its key.
pub struct CertifiedKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
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
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Ca> {
        let (key, cert, subject) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        let fixed = [
            "req",
            "-x509",
            "-days",
            "2",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ];
        openssl(&[&fixed[..], &NEW_KEY].concat(), dir)?;
        Ok(Ca {
            dir: dir.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The CA's certificate, what clients and servers are told to trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A server certificate for `localhost` and 127.0.0.1, files `name.pem` and `name.key`.
    pub fn server(&self, name: &str) -> anyhow::Result<CertifiedKey> {
        self.sign(name, "localhost", SERVER_EXTENSIONS)
    }

    /// A client certificate for `common_name` (also its subjectAltName DNS name: the machine
    /// an agent's certificate names), files `name.pem` and `name.key`.
    pub fn client(&self, name: &str, common_name: &str) -> anyhow::Result<CertifiedKey> {
        self.sign(
            name,
            common_name,
            &format!("extendedKeyUsage=clientAuth\nsubjectAltName=DNS:{common_name}\n"),
        )
    }

    /// A server certificate as [`Ca::server`]'s, valid from now until `not_after` (to the
    /// second: `openssl ca`, as `openssl x509` counts in days).
    pub fn server_until(&self, name: &str, not_after: SystemTime) -> anyhow::Result<CertifiedKey> {
        let request = self.request(name, "localhost", SERVER_EXTENSIONS)?;
        let config = self.revocation_config()?;
        let serial = self.dir.join(format!("{}.srl", self.name));
        if !serial.exists() {
            std::fs::write(&serial, "01\n")?;
        }
        let end = humantime::format_rfc3339_seconds(not_after)
            .to_string()
            .replace(['-', ':', 'T'], "");
        openssl(
            &[
                "ca",
                "-config",
                &config,
                "-batch",
                "-notext",
                "-in",
                &request.csr,
                "-out",
                &request.cert,
                "-enddate",
                &end,
                "-extfile",
                &request.extensions,
            ],
            &self.dir,
        )?;
        Ok(request.certified_key(&self.dir))
    }

    /// Adds `cert` (one this CA signed) to the certificates it revokes.
    pub fn revoke(&self, cert: &Path) -> anyhow::Result<()> {
        let config = self.revocation_config()?;
        let cert = cert.display().to_string();
        openssl(&["ca", "-config", &config, "-revoke", &cert], &self.dir)
    }

    /// The CA's revocation list as it stands (PEM), written to `name` in its directory.
    pub fn revocation_list(&self, name: &str) -> anyhow::Result<PathBuf> {
        let config = self.revocation_config()?;
        openssl(
            &["ca", "-config", &config, "-gencrl", "-out", name],
            &self.dir,
        )?;
        Ok(self.dir.join(name))
    }

    /// `openssl ca`'s configuration for the CA's revocations and the certificates it signs
    /// with an exact end, and the database it keeps them in (`NAME-index.txt`,
    /// `NAME-crlnumber`: a numbered list is a version 2 CRL, the only kind rustls takes), made
    /// the first time.
    fn revocation_config(&self) -> anyhow::Result<String> {
        let name = &self.name;
        let config = format!("{name}-ca.cnf");
        if !self.dir.join(&config).exists() {
            std::fs::write(self.dir.join(format!("{name}-index.txt")), "")?;
            std::fs::write(self.dir.join(format!("{name}-crlnumber")), "01\n")?;
            std::fs::write(
                self.dir.join(&config),
                format!(
                    "[ca]\ndefault_ca = revocations\n[revocations]\n\
                     database = {name}-index.txt\ncrlnumber = {name}-crlnumber\n\
                     certificate = {name}.pem\nprivate_key = {name}.key\n\
                     default_md = sha256\ndefault_crl_days = 2\n\
                     new_certs_dir = .\nserial = {name}.srl\npolicy = any\n\
                     [any]\ncommonName = supplied\n"
                ),
            )?;
        }
        Ok(config)
    }

    /// A key and a request for `common_name`, with the file of `extensions` to sign it with.
    fn request(&self, name: &str, common_name: &str, extensions: &str) -> anyhow::Result<Request> {
        let request = Request {
            key: format!("{name}.key"),
            csr: format!("{name}.csr"),
            cert: format!("{name}.pem"),
            extensions: format!("{name}.ext"),
        };
        let subject = format!("/CN={common_name}");
        let fixed = [
            "req",
            "-new",
            "-keyout",
            &request.key,
            "-out",
            &request.csr,
            "-subj",
            &subject,
        ];
        openssl(&[&fixed[..], &NEW_KEY].concat(), &self.dir)?;
        std::fs::write(
            self.dir.join(&request.extensions),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}"),
        )?;
        Ok(request)
    }

    /// A key, a request for `common_name`, and the CA's signature with `extensions`.
    fn sign(
        &self,
        name: &str,
        common_name: &str,
        extensions: &str,
    ) -> anyhow::Result<CertifiedKey> {
        let request = self.request(name, common_name, extensions)?;
        let (ca_cert, ca_key) = (format!("{}.pem", self.name), format!("{}.key", self.name));
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &request.csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &request.cert,
                "-extfile",
                &request.extensions,
            ],
            &self.dir,
        )?;
        Ok(request.certified_key(&self.dir))
    }
}

/// A server certificate's extensions: for `localhost` and 127.0.0.1.
const SERVER_EXTENSIONS: &str =
    "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";

/// The files of a certificate request (names in the CA's directory).
struct Request {
    key: String,
    csr: String,
    cert: String,
    extensions: String,
}

impl Request {
    /// The certificate and key, once signed.
    fn certified_key(&self, dir: &Path) -> CertifiedKey {
        CertifiedKey {
            cert: dir.join(&self.cert),
            key: dir.join(&self.key),
        }
    }
}
