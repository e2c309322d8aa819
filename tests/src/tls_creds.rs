//! TLS credentials for migration tests, made here with rcgen in QEMU's
//! tls-creds-x509 layout (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::TwoHosts;

/// The name the destination's certificate carries besides host B's address.
pub const SERVER_NAME: &str = "dst.godwit.test";

pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate and its key, as PEM.
    pub fn issue(
        &self,
        names: &[String],
        purpose: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.to_vec()).unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("godwit source", |n| n.as_str()),
        );
        p.extended_key_usages = vec![purpose];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// What goes into one credentials directory.
pub struct Creds<'a> {
    /// The CA this side trusts.
    pub trust: &'a Ca,
    /// The CA that signs this side's own certificates.
    pub signer: &'a Ca,
    pub expired: bool,
}

/// Writes a tls-creds-x509 directory for both roles; the server
/// certificate names `SERVER_NAME` and host B's address.
pub fn write_creds(dir: &Path, hosts: &TwoHosts, creds: Creds<'_>) -> PathBuf {
    write_creds_for(dir, &hosts.addr_b(), creds)
}

/// [`write_creds`] for a destination at `addr`.
pub fn write_creds_for(dir: &Path, addr: &str, creds: Creds<'_>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let server_names = vec![SERVER_NAME.to_string(), addr.to_string()];
    let (server_cert, server_key) = creds.signer.issue(
        &server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        creds.expired,
    );
    let (client_cert, client_key) = creds.signer.issue(
        &["src.godwit.test".to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        creds.expired,
    );
    for (name, text) in [
        ("ca-cert.pem", creds.trust.cert.pem()),
        ("server-cert.pem", server_cert),
        ("server-key.pem", server_key),
        ("client-cert.pem", client_cert),
        ("client-key.pem", client_key),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir.to_path_buf()
}

/// One good directory: a fresh CA that signs both roles and is trusted.
pub fn good_creds(dir: &Path, hosts: &TwoHosts) -> PathBuf {
    good_creds_for(dir, &hosts.addr_b())
}

/// [`good_creds`] for a destination at `addr`.
pub fn good_creds_for(dir: &Path, addr: &str) -> PathBuf {
    let ca = Ca::new("godwit test CA");
    write_creds_for(
        dir,
        addr,
        Creds {
            trust: &ca,
            signer: &ca,
            expired: false,
        },
    )
}
