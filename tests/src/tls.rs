//! Throwaway certificates for TLS tests, made by the real `openssl` command line: a CA, a
//! server certificate for `localhost` and 127.0.0.1, and client certificates, all signed by it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries::tool;

/// A CA's files in a directory, and what it signed there.
pub struct TestCa {
    dir: PathBuf,
    name: String,
}

/// A certificate and its key.
pub struct CertifiedKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let output = Command::new(tool("openssl", "apt-get install openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An EC P-256 key and a certificate request for `common_name`.
fn key_and_request(dir: &Path, name: &str, common_name: &str) {
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={common_name}"),
        ],
        dir,
    );
}

impl TestCa {
    /// A new CA named `name` (its files `name.pem`, `name.key`) in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        );
        TestCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The CA's certificate, what clients and servers are told to trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    fn sign(&self, name: &str, extensions: &str) -> CertifiedKey {
        let extensions_file = format!("{name}.ext");
        std::fs::write(self.dir.join(&extensions_file), extensions).expect("write extensions");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{}.pem", self.name),
                "-CAkey",
                &format!("{}.key", self.name),
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &extensions_file,
            ],
            &self.dir,
        );
        CertifiedKey {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, files `name.pem` and `name.key`.
    pub fn server(&self, name: &str) -> CertifiedKey {
        key_and_request(&self.dir, name, "localhost");
        self.sign(
            name,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
    }

    /// A client certificate for `common_name` (also its subjectAltName DNS name: the machine
    /// an agent's certificate names), files `name.pem` and `name.key`.
    pub fn client(&self, name: &str, common_name: &str) -> CertifiedKey {
        key_and_request(&self.dir, name, common_name);
        self.sign(
            name,
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=clientAuth\nsubjectAltName=DNS:{common_name}\n"
            ),
        )
    }
}
