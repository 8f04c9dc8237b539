use crate::TransportError;
use hamgam_types::NodeId;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// SHA-256 of a certificate (DER). Shown as 32 colon-separated hex bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        let bad = || TransportError::BadFingerprint(s.to_string());
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(bytes))
    }
}

/// A node's TLS identity: the cluster CA and this node's certificate.
///
/// Files in the identity directory: `ca.der` (the CA certificate), `ca.key`
/// (its PKCS#8 key, kept by every member: it signs the certificates of
/// nodes that join and keys the join tokens), `node.der` and `node.key`. Keys are written with mode
/// 0600. A node certificate names the node twice: `hamgam` (what clients
/// ask for) and `node-<id>.hamgam` (what peers check, see
/// [`NodeIdentity::node_name`]).
pub struct NodeIdentity {
    ca_der: Vec<u8>,
    node_der: Vec<u8>,
    node_key: Vec<u8>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity").field("ca", &self.ca_fingerprint()).finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
    move |source| TransportError::Io { path: path.display().to_string(), source }
}

fn cert_error(error: rcgen::Error) -> TransportError {
    TransportError::Certificate(error.to_string())
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TransportError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

impl NodeIdentity {
    /// Loads the identity from `dir`, or makes a new cluster CA and this
    /// node's certificate there (the first node of a new cluster).
    pub fn load_or_create(dir: &Path, node: NodeId) -> Result<NodeIdentity, TransportError> {
        if let Some(identity) = NodeIdentity::load(dir)? {
            return Ok(identity);
        }
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let ca_key = KeyPair::generate().map_err(cert_error)?;
        let ca_cert = ca_params().self_signed(&ca_key).map_err(cert_error)?;
        write_file(&dir.join("ca.key"), &ca_key.serialize_der(), true)?;
        let identity = NodeIdentity::sign_node(ca_cert.der().to_vec(), &ca_key, node)?;
        identity.write(dir)?;
        Ok(identity)
    }

    /// Loads the identity in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<NodeIdentity>, TransportError> {
        let paths = ["ca.der", "node.der", "node.key"].map(|name| dir.join(name));
        if !paths.iter().all(|p| p.exists()) {
            return Ok(None);
        }
        let [ca, node, key] = paths.map(|p| std::fs::read(&p).map_err(io_error(&p)));
        Ok(Some(NodeIdentity { ca_der: ca?, node_der: node?, node_key: key? }))
    }

    /// Uses the cluster CA held in `ca_dir` (its `ca.der` and `ca.key`) to
    /// make the identity of another node, written to `dir` without the CA key.
    pub fn issue(ca_dir: &Path, node: NodeId, dir: &Path) -> Result<NodeIdentity, TransportError> {
        let read = |name: &str| {
            let path = ca_dir.join(name);
            std::fs::read(&path).map_err(io_error(&path))
        };
        let ca_der = read("ca.der")?;
        let ca_key = KeyPair::try_from(read("ca.key")?.as_slice()).map_err(cert_error)?;
        let identity = NodeIdentity::sign_node(ca_der, &ca_key, node)?;
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        identity.write(dir)?;
        Ok(identity)
    }

    /// The CA key kept in `dir`, if this member holds one.
    pub fn ca_key(dir: &Path) -> Result<Option<Vec<u8>>, TransportError> {
        let path = dir.join("ca.key");
        match std::fs::read(&path) {
            Ok(key) => Ok(Some(key)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error(&path)(error)),
        }
    }

    /// Keeps the CA key in `dir` (mode 0600).
    pub fn write_ca_key(dir: &Path, ca_key: &[u8]) -> Result<(), TransportError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        write_file(&dir.join("ca.key"), ca_key, true)
    }

    /// A new identity for `node`, signed with the CA key `ca_key` (PKCS#8).
    pub fn sign(ca_der: Vec<u8>, ca_key: &[u8], node: NodeId) -> Result<NodeIdentity, TransportError> {
        let ca_key = KeyPair::try_from(ca_key).map_err(cert_error)?;
        NodeIdentity::sign_node(ca_der, &ca_key, node)
    }

    /// An identity received whole (a joining node's, from the member that signed it).
    pub fn from_parts(ca_der: Vec<u8>, node_der: Vec<u8>, node_key: Vec<u8>) -> NodeIdentity {
        NodeIdentity { ca_der, node_der, node_key }
    }

    /// The CA certificate, the node certificate and the node key (PKCS#8), as DER.
    pub fn parts(&self) -> (&[u8], &[u8], &[u8]) {
        (&self.ca_der, &self.node_der, &self.node_key)
    }

    fn sign_node(ca_der: Vec<u8>, ca_key: &KeyPair, node: NodeId) -> Result<NodeIdentity, TransportError> {
        let node_key = KeyPair::generate().map_err(cert_error)?;
        let names = vec![crate::SERVER_NAME.to_string(), NodeIdentity::node_name(node)];
        let mut node_params = CertificateParams::new(names).map_err(cert_error)?;
        node_params.distinguished_name.push(DnType::CommonName, format!("node-{}", node.0));
        node_params.is_ca = IsCa::NoCa;
        node_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        node_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        node_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        node_params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        // The issuer is named by the CA's parameters, rebuilt identically.
        let issuer = Issuer::new(ca_params(), ca_key);
        let node_cert = node_params.signed_by(&node_key, &issuer).map_err(cert_error)?;
        Ok(NodeIdentity { ca_der, node_der: node_cert.der().to_vec(), node_key: node_key.serialize_der() })
    }

    /// Writes the identity into `dir` (keys with mode 0600), durably.
    pub fn write(&self, dir: &Path) -> Result<(), TransportError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        write_file(&dir.join("ca.der"), &self.ca_der, false)?;
        write_file(&dir.join("node.key"), &self.node_key, true)?;
        write_file(&dir.join("node.der"), &self.node_der, false)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
    }

    /// The name a node's certificate carries for its peers to check.
    pub fn node_name(node: NodeId) -> String {
        format!("node-{}.hamgam", node.0)
    }

    /// What clients pin: the cluster CA's fingerprint.
    pub fn ca_fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.ca_der)
    }

    pub(crate) fn ca(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.ca_der.clone())
    }

    pub(crate) fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.node_der.clone()), CertificateDer::from(self.ca_der.clone())]
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.node_key.clone()))
    }
}

/// The cluster CA's parameters. Certificates name their issuer by these, so
/// they must never change for an existing cluster.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Hamgam cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}
