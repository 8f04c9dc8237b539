//! Client-side trust: a node is accepted only if its chain ends in the pinned
//! cluster CA, the node certificate verifies under that CA, and the handshake
//! is signed by the node certificate's key. On first contact the CA's
//! fingerprint is recorded instead of compared, for the caller to store.

use crate::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::{Arc, Mutex};

/// The CA a node presented, recorded on first contact.
#[derive(Debug, Default)]
pub struct ObservedCa {
    fingerprint: Mutex<Option<Fingerprint>>,
}

impl ObservedCa {
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        *self.fingerprint.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a client decides to trust a node.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Accept only a cluster CA with this fingerprint.
    Pinned(Fingerprint),
    /// Accept whichever CA the node presents (its chain must still verify)
    /// and record it here: trust on first use.
    FirstUse(Arc<ObservedCa>),
}

#[derive(Debug)]
pub(crate) struct PinnedCaVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    pub(crate) fn new(trust: Trust, provider: Arc<CryptoProvider>) -> Self {
        PinnedCaVerifier { trust, provider }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.last() else {
            return Err(rustls::Error::General("the node sent no cluster CA certificate".into()));
        };
        let presented = Fingerprint::of(ca);
        match &self.trust {
            Trust::Pinned(expected) if *expected != presented => {
                return Err(rustls::Error::General(format!(
                    "the node's certificate changed: expected cluster CA {expected}, got {presented}"
                )));
            }
            Trust::Pinned(_) => {}
            Trust::FirstUse(observed) => {
                *observed.fingerprint.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use crate::{NodeIdentity, SERVER_NAME, Trust, client_config, client_endpoint, server_endpoint};
    use std::sync::Arc;

    async fn connect(identity: &NodeIdentity, trust: Trust) -> Result<(), String> {
        let server = server_endpoint(identity, "127.0.0.1:0".parse().unwrap(), b"test/1").unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            if let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        let client = client_endpoint(addr).unwrap();
        let config = client_config(trust, b"test/1").unwrap();
        let result = match client.connect_with(config, addr, SERVER_NAME).unwrap().await {
            Ok(_) => Ok(()),
            Err(error) => Err(error.to_string()),
        };
        accept.abort();
        result
    }

    #[tokio::test]
    async fn first_use_records_the_ca_then_pinning_refuses_another_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let identity = NodeIdentity::load_or_create(dir.path(), hamgam_types::NodeId(1)).unwrap();
        let reloaded = NodeIdentity::load_or_create(dir.path(), hamgam_types::NodeId(1)).unwrap();
        assert_eq!(identity.ca_fingerprint(), reloaded.ca_fingerprint(), "the identity is reused after a restart");

        let observed = Arc::new(crate::ObservedCa::default());
        connect(&identity, Trust::FirstUse(observed.clone())).await.unwrap();
        assert_eq!(observed.fingerprint(), Some(identity.ca_fingerprint()));
        connect(&identity, Trust::Pinned(identity.ca_fingerprint())).await.unwrap();

        let other_dir = tempfile::tempdir().unwrap();
        let impostor = NodeIdentity::load_or_create(other_dir.path(), hamgam_types::NodeId(1)).unwrap();
        let error = connect(&impostor, Trust::Pinned(identity.ca_fingerprint())).await.unwrap_err();
        assert!(error.contains("certificate changed"), "{error}");
    }

    #[test]
    fn fingerprints_round_trip_through_text() {
        let fp = crate::Fingerprint::of(b"certificate");
        let text = fp.to_string();
        assert_eq!(text.len(), 95);
        assert_eq!(text.parse::<crate::Fingerprint>().unwrap(), fp);
        assert_eq!(text.replace(':', "").to_lowercase().parse::<crate::Fingerprint>().unwrap(), fp);
        assert!("abc".parse::<crate::Fingerprint>().is_err());
    }
}
