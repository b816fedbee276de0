//! Active checks: one run of an HTTP, TCP or gRPC health check against an
//! instance. Each run opens its own connection and is bounded by the check's
//! timeout; the result is `Ok` or the reason it failed.
//!
//! Before connecting, a run resolves the target and judges every address it
//! resolves to by the cell's [`AddressPolicy`], then connects to those
//! addresses, never to the name again: a DNS answer that changes between the
//! two (rebinding) cannot send the connection somewhere the policy refuses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cellplane_proto::discovery::check::Active;
use cellplane_proto::grpc_health::health_check_response::ServingStatus;
use cellplane_proto::grpc_health::{HealthCheckRequest, health_client::HealthClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::config::AddressPolicy;

/// Bytes of an HTTP answer read to find its status line.
const HTTP_HEAD_BYTES: usize = 1024;

/// Runs `check` once within `timeout` (name resolution included), connecting
/// only to addresses `policy` permits.
pub async fn run(check: &Active, timeout: Duration, policy: &AddressPolicy) -> Result<(), String> {
    let fut = async {
        match check {
            Active::Http(h) => http_get(&h.url, policy).await,
            Active::Tcp(t) => tcp(&t.address, policy).await,
            Active::Grpc(g) => grpc(&g.address, &g.service, timeout, policy).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// The host and port of `host:port` (an IPv6 host in brackets).
fn split_host_port(address: &str) -> Result<(&str, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} is not host:port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{address:?}: the port is not a number"))?;
    Ok((host, port))
}

/// The addresses `host` resolves to, with `port`, once `policy` permits every
/// one of them. One refused address refuses the name, rather than probing the
/// others: a name that can lead to a refused address (by its order of answers,
/// or the next answer) is not one the cell probes.
async fn resolve(host: &str, port: u16, policy: &AddressPolicy) -> Result<Vec<SocketAddr>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // An IP literal is returned as is, without a lookup.
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .collect();
    judge(host, &addrs, policy)?;
    Ok(addrs)
}

/// Whether every address `host` resolved to is one `policy` permits.
fn judge(host: &str, addrs: &[SocketAddr], policy: &AddressPolicy) -> Result<(), String> {
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    for a in addrs {
        policy.permits(a.ip()).map_err(|why| {
            if host.parse::<IpAddr>().is_ok() {
                why
            } else {
                format!("{host} resolves to {}: {why}", a.ip())
            }
        })?;
    }
    Ok(())
}

async fn tcp(address: &str, policy: &AddressPolicy) -> Result<(), String> {
    let fail = |e: String| format!("TCP connect to {address}: {e}");
    let (host, port) = split_host_port(address).map_err(fail)?;
    let addrs = resolve(host, port, policy).await.map_err(fail)?;
    // Each address in turn, as a connect to the name would.
    TcpStream::connect(&addrs[..])
        .await
        .map(drop)
        .map_err(|e| fail(e.to_string()))
}

/// A GET with HTTP/1.1 over a fresh connection; a 2xx status is healthy. Only the
/// status line is read: a health endpoint's body does not matter.
async fn http_get(url: &str, policy: &AddressPolicy) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("URL {url} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    // The Host header keeps the name the URL gives.
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let addrs = resolve(host, port, policy)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut s = TcpStream::connect(&addrs[..])
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

async fn grpc(
    address: &str,
    service: &str,
    timeout: Duration,
    policy: &AddressPolicy,
) -> Result<(), String> {
    let fail = |e: String| format!("gRPC {address}: {e}");
    let (host, port) = split_host_port(address).map_err(fail)?;
    let addrs = resolve(host, port, policy).await.map_err(fail)?;
    let channel = grpc_connect(address, &addrs, timeout)
        .await
        .map_err(|e| fail(format!("connect: {e}")))?;
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

/// A channel to the first of `addrs` that accepts a connection. The calls keep
/// `address` (a name, perhaps) as their authority, as a proxy in front of the
/// instance may route by it.
async fn grpc_connect(
    address: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<Channel, String> {
    let origin: http::Uri = format!("http://{address}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut last = String::from("no address");
    for addr in addrs {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("{addr}: {e}"))?
            .origin(origin.clone())
            .connect_timeout(timeout)
            .timeout(timeout);
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_CHECK_ALLOW, Settings};
    use cellplane_proto::discovery::{GrpcCheck, HttpCheck, TcpCheck};
    use cellplane_proto::grpc_health::HealthCheckResponse;
    use cellplane_proto::grpc_health::health_server::{Health, HealthServer};
    use tokio::net::TcpListener;

    fn defaults() -> AddressPolicy {
        Settings::default().check_policy()
    }

    /// The default policy, with loopback refused too.
    fn no_loopback() -> AddressPolicy {
        let mut deny = Settings::default().check_deny;
        deny.extend(["127.0.0.0/8", "::1/128"].map(|n| n.parse::<ipnet::IpNet>().unwrap()));
        AddressPolicy::new(DEFAULT_CHECK_ALLOW, &deny)
    }

    /// A gRPC health service that is always SERVING.
    struct Serving;

    #[tonic::async_trait]
    impl Health for Serving {
        async fn check(
            &self,
            _: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            Ok(tonic::Response::new(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            }))
        }
    }

    /// Whether `l` has a connection waiting (a connect the kernel completed).
    async fn was_connected(l: &TcpListener) -> bool {
        tokio::time::timeout(Duration::from_millis(200), l.accept())
            .await
            .is_ok()
    }

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
        let p = defaults();
        assert_eq!(run(&check, t, &p).await, Ok(()));
        assert_eq!(run(&check, t, &p).await, Ok(()));
        assert_eq!(
            run(&check, t, &p).await,
            Err(format!("GET {url}: HTTP 500"))
        );
        assert!(run(&check, t, &p).await.unwrap_err().ends_with("HTTP 301"));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_closed_port_refuses() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let check = Active::Http(HttpCheck {
            url: format!("http://{addr}/"),
        });
        let p = defaults();
        let e = run(&check, Duration::from_millis(200), &p)
            .await
            .unwrap_err();
        assert!(e.contains("no answer within 200 ms"), "{e}");
        let tcp = Active::Tcp(TcpCheck {
            address: addr.to_string(),
        });
        assert_eq!(run(&tcp, Duration::from_secs(5), &p).await, Ok(()));
        drop(l);
        let e = run(&tcp, Duration::from_secs(5), &p).await.unwrap_err();
        assert!(e.starts_with("TCP connect"), "{e}");
    }

    #[tokio::test]
    async fn a_name_resolving_to_a_refused_address_is_not_connected_to() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let p = no_loopback();
        let t = Duration::from_secs(5);
        let checks = [
            Active::Tcp(TcpCheck {
                address: format!("localhost:{port}"),
            }),
            Active::Http(HttpCheck {
                url: format!("http://localhost:{port}/health"),
            }),
            Active::Grpc(GrpcCheck {
                address: format!("localhost:{port}"),
                service: String::new(),
            }),
        ];
        for check in &checks {
            let e = run(check, t, &p).await.unwrap_err();
            assert!(
                e.contains("localhost resolves to") && e.contains("is in discovery.check_deny"),
                "{e}"
            );
        }
        // An IP literal is judged the same way (registered before the policy).
        let literal = Active::Tcp(TcpCheck {
            address: format!("127.0.0.1:{port}"),
        });
        assert_eq!(
            run(&literal, t, &p).await,
            Err(format!(
                "TCP connect to 127.0.0.1:{port}: address 127.0.0.1 is in discovery.check_deny \
                 127.0.0.0/8: the cell does not probe it"
            ))
        );
        assert!(!was_connected(&l).await, "a refused check connected");
        // The same checks under the default policy do connect.
        run(&checks[0], t, &defaults()).await.unwrap();
        assert!(was_connected(&l).await);
    }

    #[tokio::test]
    async fn http_over_a_name_keeps_the_name_in_the_host_header() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let check = Active::Http(HttpCheck {
            url: format!("http://localhost:{port}/health"),
        });
        assert_eq!(
            run(&check, Duration::from_secs(5), &defaults()).await,
            Ok(())
        );
        let request = server.await.unwrap();
        assert!(
            request.contains(&format!("\r\nHost: localhost:{port}\r\n")),
            "{request}"
        );
    }

    #[test]
    fn one_refused_address_refuses_the_name() {
        let p = defaults();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        judge("web", &[a("10.0.0.1:80"), a("127.0.0.1:80")], &p).unwrap();
        let e = judge("web", &[a("10.0.0.1:80"), a("169.254.169.254:80")], &p).unwrap_err();
        assert_eq!(
            e,
            "web resolves to 169.254.169.254: address 169.254.169.254 is in discovery.check_deny \
             169.254.0.0/16: the cell does not probe it"
        );
        let e = judge("web", &[a("[::ffff:169.254.169.254]:80")], &p).unwrap_err();
        assert!(e.contains("(IPv4 169.254.169.254)"), "{e}");
        assert!(judge("web", &[], &p).unwrap_err().contains("no address"));
    }

    #[tokio::test]
    async fn grpc_health_is_checked_at_the_resolved_address() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(Serving))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let t = Duration::from_secs(5);
        for address in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let check = Active::Grpc(GrpcCheck {
                address,
                service: String::new(),
            });
            assert_eq!(run(&check, t, &defaults()).await, Ok(()));
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }
}
