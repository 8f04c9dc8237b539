//! QUIC endpoints and the TLS identity behind them.
//!
//! Owns: the node's identity on disk (a cluster CA made at first start and a
//! node certificate it signs, see [`NodeIdentity`]), the [`Fingerprint`]
//! people compare and clients pin, the client-side verifier that accepts only
//! the pinned CA (or records it on first contact), and building quinn
//! endpoints with raised UDP buffers and bounded streams.
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

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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

fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.max_concurrent_bidi_streams(limits::STREAMS_PER_CONNECTION_MAX.into());
    config.max_concurrent_uni_streams(0u32.into());
    // A value above the VarInt range is impossible for this constant.
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(limits::CONNECTION_IDLE_TIMEOUT_MS))
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000)));
    config.max_idle_timeout(Some(idle));
    config.keep_alive_interval(Some(Duration::from_millis(limits::CONNECTION_IDLE_TIMEOUT_MS / 4)));
    config
}

/// A server endpoint on `addr` speaking `alpn`, presenting the node certificate.
pub fn server_endpoint(identity: &NodeIdentity, addr: SocketAddr, alpn: &[u8]) -> Result<quinn::Endpoint, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain(), identity.private_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config()));
    endpoint(addr, Some(server))
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
    let provider = crypto_provider();
    let verifier = verify::PinnedCaVerifier::new(trust, provider.clone());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}
