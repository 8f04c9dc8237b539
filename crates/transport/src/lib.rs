//! QUIC endpoints and the TLS identity behind them.
//!
//! Owns: the node's identity on disk (a cluster CA made at first start and a
//! node certificate it signs, see [`NodeIdentity`]), the [`Fingerprint`]
//! people compare and clients pin, the client-side verifier that accepts only
//! the pinned CA (or records it on first contact), and building quinn
//! endpoints with raised UDP buffers, bounded streams and TLS that prefers
//! AES-128-GCM, and
//! [`write_with_owned_body`], which gives quinn a buffer instead of a copy.
//! Between nodes, both sides prove membership: [`peer_server_endpoint`]
//! refuses a client certificate the cluster CA did not issue,
//! [`peer_client_config`] presents one, and [`peer_node`] tells which node a
//! connection belongs to (none for a caller without a certificate, which
//! only the join protocol admits).
//!
//! Must not know: what travels over the connections (frames, requests, raft
//! messages are the layers above).

mod identity;
mod verify;

pub use identity::{Fingerprint, NodeIdentity};
pub use verify::{ObservedCa, Trust};

use hamgam_types::limits;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The name every node certificate carries and every client asks for. Nodes
/// are told apart by the cluster CA, not by DNS names.
pub const SERVER_NAME: &str = "hamgam";

/// UDP socket buffers; the kernel default drops packets under load.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Writes `head`, then `body`, on a stream, handing quinn `body`'s buffer
/// instead of copying it into the stream's own (chunks are most of the
/// bytes a node sends). Fails as `write_all` on the stream would.
pub async fn write_with_owned_body(
    send: &mut quinn::SendStream,
    head: &[u8],
    body: bytes::Bytes,
) -> std::io::Result<()> {
    let mut parts = [bytes::Bytes::copy_from_slice(head), body];
    send.write_all_chunks(&mut parts).await.map_err(std::io::Error::from)
}

/// Errors setting up TLS or QUIC.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS identity I/O failed on {path}")]
    Io { path: String, source: std::io::Error },
    #[error("cannot make a certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("cannot open a UDP socket on {addr}")]
    Socket { addr: SocketAddr, source: std::io::Error },
    #[error("not a fingerprint (expected 32 hex bytes, colons optional): {0}")]
    BadFingerprint(String),
}

/// ring's TLS provider, preferring AES-128-GCM to its default AES-256-GCM:
/// every byte of a transfer is sealed once and opened once, and 10 AES rounds
/// instead of 14 took 2-4% off raw quinn's CPU for 512 MiB on one stream
/// (docs/benchmarks.md). The other TLS 1.3 suites stay, after it.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|suite| suite.suite() != TLS13_AES_128_GCM_SHA256.suite());
    provider.cipher_suites.insert(0, TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket_error = |source| TransportError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(socket_error)?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    if let Err(error) = socket.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(%error, "could not raise the UDP receive buffer");
    }
    if let Err(error) = socket.set_send_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(%error, "could not raise the UDP send buffer");
    }
    socket.bind(&addr.into()).map_err(socket_error)?;
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = udp_socket(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
        .map_err(|source| TransportError::Socket { addr, source })
}

fn transport_config(uni_streams: u32, idle_ms: u64) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.max_concurrent_bidi_streams(limits::STREAMS_PER_CONNECTION_MAX.into());
    config.max_concurrent_uni_streams(uni_streams.into());
    // A value above the VarInt range is impossible for these constants.
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(idle_ms))
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000)));
    config.max_idle_timeout(Some(idle));
    config.keep_alive_interval(Some(Duration::from_millis(idle_ms / 4)));
    config
}

/// Client connections, where a silent phone should not be dropped early.
fn client_transport_config() -> quinn::TransportConfig {
    transport_config(0, limits::CONNECTION_IDLE_TIMEOUT_MS)
}

/// Node-to-node connections: a peer that restarted must be noticed within
/// seconds, or messages go on into a connection nobody reads.
fn peer_transport_config() -> quinn::TransportConfig {
    transport_config(PEER_UNI_STREAMS_MAX, limits::PEER_IDLE_TIMEOUT_MS)
}

fn tls_error(error: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(error.to_string())
}

/// A server endpoint on `addr` speaking any of `alpns`, presenting the node
/// certificate; `clients` decides whether callers must present one too.
fn serve(
    identity: &NodeIdentity,
    addr: SocketAddr,
    alpns: &[&[u8]],
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    transport: quinn::TransportConfig,
) -> Result<quinn::Endpoint, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(clients)
        .with_single_cert(identity.chain(), identity.private_key())
        .map_err(tls_error)?;
    tls.alpn_protocols = alpns.iter().map(|alpn| alpn.to_vec()).collect();
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    endpoint(addr, Some(server))
}

/// The client-facing endpoint on `addr`: clients present no certificate.
pub fn server_endpoint(identity: &NodeIdentity, addr: SocketAddr, alpn: &[u8]) -> Result<quinn::Endpoint, TransportError> {
    let anyone = Arc::new(rustls::server::NoClientAuth);
    serve(identity, addr, &[alpn], anyone, client_transport_config())
}

/// Uni streams a peer may have open at once (raft messages, snapshots).
const PEER_UNI_STREAMS_MAX: u32 = 16;

/// The node-to-node endpoint on `addr`: mutual TLS, where a client that
/// presents a certificate must present one issued by this cluster's CA. A
/// client may present none (a node joining with a token has no certificate
/// yet): the protocol above admits such a connection only for joining, so
/// every other use must check [`peer_node`]. It speaks each of `alpns`;
/// [`negotiated_alpn`] tells a connection which one it got.
pub fn peer_server_endpoint(
    identity: &NodeIdentity,
    addr: SocketAddr,
    alpns: &[&[u8]],
) -> Result<quinn::Endpoint, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.ca()).map_err(tls_error)?;
    let members = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
        .allow_unauthenticated()
        .build()
        .map_err(tls_error)?;
    serve(identity, addr, alpns, members, peer_transport_config())
}

/// Dialling configuration: trusts servers per `trust`, presents `identity`'s
/// certificate if given, speaks `alpn`.
fn dial(
    trust: Trust,
    identity: Option<&NodeIdentity>,
    alpn: &[u8],
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = crypto_provider();
    let verifier = verify::PinnedCaVerifier::new(trust, provider.clone());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match identity {
        Some(identity) => builder.with_client_auth_cert(identity.chain(), identity.private_key()).map_err(tls_error)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Client configuration for dialling another node: presents this node's
/// certificate and accepts only a server under the same cluster CA.
pub fn peer_client_config(identity: &NodeIdentity, alpn: &[u8]) -> Result<quinn::ClientConfig, TransportError> {
    dial(Trust::Pinned(identity.ca_fingerprint()), Some(identity), alpn, peer_transport_config())
}

/// The protocol a connection agreed on during its handshake.
pub fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    let data = connection.handshake_data()?;
    data.downcast_ref::<quinn::crypto::rustls::HandshakeData>()?.protocol.clone()
}

/// Which of `candidates` the other end of `connection` is, judged by the
/// node name in the certificate it proved it holds (TLS has already checked
/// that the cluster CA issued it). `None` if it names none of them.
pub fn peer_node(connection: &quinn::Connection, candidates: impl IntoIterator<Item = hamgam_types::NodeId>) -> Option<hamgam_types::NodeId> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<rustls::pki_types::CertificateDer<'static>>>()?;
    let cert = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
    candidates.into_iter().find(|node| {
        rustls::pki_types::ServerName::try_from(NodeIdentity::node_name(*node))
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// A client endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    let bind: SocketAddr = if server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| TransportError::Tls("bad bind address".into()))?;
    endpoint(bind, None)
}

/// Client configuration that trusts per `trust` and speaks `alpn`.
pub fn client_config(trust: Trust, alpn: &[u8]) -> Result<quinn::ClientConfig, TransportError> {
    dial(trust, None, alpn, client_transport_config())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamgam_types::NodeId;

    /// Dials `server` as `dialer` (or with no certificate) and returns which
    /// node the server decided it was, or the error.
    async fn dial(server: &NodeIdentity, dialer: Option<&NodeIdentity>) -> Result<Option<NodeId>, String> {
        let endpoint = peer_server_endpoint(server, "127.0.0.1:0".parse().unwrap(), &[b"peer-test/1"]).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let connection = endpoint.accept().await?.await.ok()?;
            Some(peer_node(&connection, (1..=5).map(NodeId)))
        });
        let config = match dialer {
            Some(identity) => peer_client_config(identity, b"peer-test/1").unwrap(),
            None => client_config(Trust::Pinned(server.ca_fingerprint()), b"peer-test/1").unwrap(),
        };
        let client = client_endpoint(addr).unwrap();
        let connecting = client.connect_with(config, addr, SERVER_NAME).unwrap();
        let _client_side = tokio::time::timeout(Duration::from_secs(5), connecting).await;
        // The server's view decides: a refused client certificate fails its
        // side of the handshake even when the client's side completed.
        match tokio::time::timeout(Duration::from_secs(5), accept).await {
            Ok(Ok(Some(node))) => Ok(node),
            other => Err(format!("refused: {other:?}")),
        }
    }

    #[tokio::test]
    async fn peers_must_hold_a_certificate_from_the_cluster_ca_and_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeIdentity::load_or_create(&dir.path().join("n1"), NodeId(1)).unwrap();
        let third = NodeIdentity::issue(&dir.path().join("n1"), NodeId(3), &dir.path().join("n3")).unwrap();
        assert_eq!(third.ca_fingerprint(), first.ca_fingerprint());
        assert!(!dir.path().join("n3/ca.key").exists(), "an issued identity does not carry the CA key");

        assert_eq!(dial(&first, Some(&third)).await, Ok(Some(NodeId(3))));
        assert_eq!(dial(&third, Some(&first)).await, Ok(Some(NodeId(1))));

        let stranger = NodeIdentity::load_or_create(&dir.path().join("other"), NodeId(3)).unwrap();
        assert!(dial(&first, Some(&stranger)).await.is_err(), "a node of another cluster is refused");
        assert_eq!(dial(&first, None).await, Ok(None), "a caller without a certificate is no node");
    }

    #[test]
    fn aes_128_gcm_comes_first_and_the_other_suites_stay() {
        let default = rustls::crypto::ring::default_provider().cipher_suites;
        let ours = crypto_provider().cipher_suites.clone();
        assert_eq!(ours[0].suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(ours.len(), default.len(), "a suite went missing or came twice: {ours:?}");
        assert!(default.iter().all(|suite| ours.iter().any(|s| s.suite() == suite.suite())));
    }
}
