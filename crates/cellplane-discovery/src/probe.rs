//! Active checks: one run of an HTTP, TCP or gRPC health check against an
//! instance. Each run opens its own connection and is bounded by the check's
//! timeout; the result is `Ok` or the reason it failed.

use std::time::Duration;

use cellplane_proto::discovery::check::Active;
use cellplane_proto::grpc_health::health_check_response::ServingStatus;
use cellplane_proto::grpc_health::{HealthCheckRequest, health_client::HealthClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes of an HTTP answer read to find its status line.
const HTTP_HEAD_BYTES: usize = 1024;

/// Runs `check` once within `timeout`.
pub async fn run(check: &Active, timeout: Duration) -> Result<(), String> {
    let fut = async {
        match check {
            Active::Http(h) => http_get(&h.url).await,
            Active::Tcp(t) => tcp(&t.address).await,
            Active::Grpc(g) => grpc(&g.address, &g.service, timeout).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn tcp(address: &str) -> Result<(), String> {
    TcpStream::connect(address)
        .await
        .map(drop)
        .map_err(|e| format!("TCP connect to {address}: {e}"))
}

/// A GET with HTTP/1.1 over a fresh connection; a 2xx status is healthy. Only the
/// status line is read: a health endpoint's body does not matter.
async fn http_get(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("URL {url} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut s = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("GET {url}: connect: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: cellplane-discovery\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET {url}: send: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < HTTP_HEAD_BYTES {
        let n = s
            .read(&mut buf)
            .await
            .map_err(|e| format!("GET {url}: read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let code = status_code(&head).ok_or_else(|| format!("GET {url}: not an HTTP answer"))?;
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {url}: HTTP {code}"))
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

async fn grpc(address: &str, service: &str, timeout: Duration) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("gRPC {address}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("gRPC {address}: connect: {e}"))?;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("gRPC health of {address}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    match ServingStatus::try_from(r.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!(
            "gRPC health of {address}{}: {}",
            if service.is_empty() {
                String::new()
            } else {
                format!(" ({service})")
            },
            other.as_str_name()
        )),
        Err(_) => Err(format!("gRPC health of {address}: status {}", r.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::discovery::{HttpCheck, TcpCheck};
    use tokio::net::TcpListener;

    /// A server answering each connection with the next status of `codes`.
    async fn http_server(codes: Vec<u16>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for code in codes {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}/health")
    }

    #[tokio::test]
    async fn http_2xx_is_healthy_anything_else_is_not() {
        let url = http_server(vec![200, 204, 500, 301]).await;
        let check = Active::Http(HttpCheck { url: url.clone() });
        let t = Duration::from_secs(5);
        assert_eq!(run(&check, t).await, Ok(()));
        assert_eq!(run(&check, t).await, Ok(()));
        assert_eq!(run(&check, t).await, Err(format!("GET {url}: HTTP 500")));
        assert!(run(&check, t).await.unwrap_err().ends_with("HTTP 301"));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_closed_port_refuses() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let check = Active::Http(HttpCheck {
            url: format!("http://{addr}/"),
        });
        let e = run(&check, Duration::from_millis(200)).await.unwrap_err();
        assert!(e.contains("no answer within 200 ms"), "{e}");
        let tcp = Active::Tcp(TcpCheck {
            address: addr.to_string(),
        });
        assert_eq!(run(&tcp, Duration::from_secs(5)).await, Ok(()));
        drop(l);
        let e = run(&tcp, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with("TCP connect"), "{e}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }
}
