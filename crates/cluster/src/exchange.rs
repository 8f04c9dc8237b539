//! One request and one answer on one bidi stream: how the admin and join
//! protocols talk (operators and joining nodes dial a fresh connection for
//! each request; the placement driver keeps one per member, see
//! [`crate::admin::AdminClient`]; raft traffic has its own in `network`).

use std::net::SocketAddr;
use std::time::Duration;

/// Dials `addr` with `config`, sends `request`, and returns the answer (at
/// most `answer_max` bytes), all within `timeout`. Errors are sentences.
pub(crate) async fn ask(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    request: &[u8],
    answer_max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let endpoint = hamgam_transport::client_endpoint(addr).map_err(|e| e.to_string())?;
    let exchange = async {
        let connection = connect(&endpoint, config, addr).await?;
        let answer = ask_over(&connection, request, answer_max).await;
        connection.close(0u32.into(), b"done");
        answer
    };
    let answer = tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("no answer within {timeout:?}"))?;
    // Lets the close reach the other side; never waits on a dead one.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    answer
}

/// Dials `addr` from `endpoint` with `config`.
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    endpoint
        .connect_with(config, addr, hamgam_transport::SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// Sends `request` on a new bidi stream of `connection` and returns the
/// answer (at most `answer_max` bytes). The caller bounds the time.
pub(crate) async fn ask_over(
    connection: &quinn::Connection,
    request: &[u8],
    answer_max: usize,
) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(request).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    recv.read_to_end(answer_max).await.map_err(|e| e.to_string())
}

/// Reads one request (at most `request_max` bytes) from a bidi stream,
/// `None` when it was cut off or too large.
pub(crate) async fn read_request(recv: &mut quinn::RecvStream, request_max: usize) -> Option<Vec<u8>> {
    recv.read_to_end(request_max).await.ok()
}

/// Writes the answer and waits until the other side has it.
pub(crate) async fn answer(mut send: quinn::SendStream, bytes: &[u8]) {
    if send.write_all(bytes).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}
