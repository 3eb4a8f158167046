//! A private CA and the certificates it signs, made in process with rcgen (the test suite needs
//! no openssl binary): P-256 keys, PEM files in a temp dir that lives as long as the [`Pki`].

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub use rcgen::ExtendedKeyUsagePurpose as Usage;

/// A test CA (`ca.pem`, `ca.key`) and the certificates it signed, all in one temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// One certificate signed by the CA: `NAME.pem` (the certificate), `NAME-chain.pem`
/// (certificate then CA), `NAME.key` (PKCS#8), and the certificate's DER.
pub struct Leaf {
    pub cert: PathBuf,
    pub chain: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&key).unwrap().pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("ca.key"), key.serialize_pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// A file in the PKI's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA certificate (PEM), the one root a client should trust.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A certificate `name` with common name `common_name`, subject alternative names `sans`
    /// (IP addresses or DNS names), extended key usages `usages` and serial `serial`.
    pub fn leaf(
        &self,
        name: &str,
        common_name: &str,
        sans: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
        serial: u64,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        params.serial_number = Some(serial.into());
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: self.path(&format!("{name}.pem")),
            chain: self.path(&format!("{name}-chain.pem")),
            key: self.path(&format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.chain, format!("{}{}", cert.pem(), self.ca_pem)).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    /// A server certificate for 127.0.0.1 and localhost, common name "tollgate NAME".
    pub fn server(&self, name: &str, serial: u64) -> Leaf {
        self.leaf(
            name,
            &format!("tollgate {name}"),
            &["127.0.0.1", "localhost"],
            &[Usage::ServerAuth],
            serial,
        )
    }
}
