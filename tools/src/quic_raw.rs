//! `hamgam-bench quic-raw`: bytes over one quinn stream on loopback, with the
//! transport settings clients use, and nothing else: the ceiling a large
//! file upload is measured against in the same run.

use hamgam_transport::{NodeIdentity, Trust};
use hamgam_types::NodeId;
use std::time::Instant;

const ALPN: &[u8] = b"hamgam-bench-raw";

/// Sends `mib` MiB on one stream and returns MB/s (10^6 bytes per second).
pub async fn run(mib: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let identity = NodeIdentity::load_or_create(dir.path(), NodeId(1))?;
    let server = hamgam_transport::server_endpoint(&identity, "127.0.0.1:0".parse()?, ALPN)?;
    let addr = server.local_addr()?;
    let receiver = tokio::spawn(async move {
        let connection = server.accept().await.ok_or_else(|| anyhow::anyhow!("no connection"))?.await?;
        // Bidirectional, as clients may open no uni streams.
        let (_send, mut stream) = connection.accept_bi().await?;
        let mut received = 0u64;
        while let Some(chunk) = stream.read_chunk(1 << 20, true).await? {
            received += chunk.bytes.len() as u64;
        }
        connection.close(0u32.into(), b"done");
        anyhow::Ok(received)
    });
    let client = hamgam_transport::client_endpoint(addr)?;
    let config = hamgam_transport::client_config(Trust::Pinned(identity.ca_fingerprint()), ALPN)?;
    let connection = client.connect_with(config, addr, hamgam_transport::SERVER_NAME)?.await?;
    let buffer = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let (mut stream, _recv) = connection.open_bi().await?;
    for _ in 0..mib {
        stream.write_all(&buffer).await?;
    }
    stream.finish()?;
    let received = receiver.await??;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(received == mib << 20, "received {received} of {} bytes", mib << 20);
    Ok(received as f64 / seconds / 1e6)
}
