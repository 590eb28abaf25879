//! Serving gRPC on a listener the caller bound: the accepted connections with `TCP_NODELAY`.

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// The connections `listener` accepts, each with `TCP_NODELAY` set, for tonic's
/// `serve_with_incoming*`. The server builder's `tcp_nodelay` reaches only a listener tonic
/// binds itself; without it an answer written in two pieces can wait for the client's delayed
/// ACK (40 ms on Linux).
pub fn accepted_connections(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_to_coalesce_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = super::accepted_connections(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
