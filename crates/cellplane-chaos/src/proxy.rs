//! A fault-injecting TCP proxy, controlled at run time.
//!
//! A member listens on a private port and advertises the proxy's; everything
//! that reaches it goes through the proxy, which treats each connection by the
//! [`Link`] its [`Rules`] give the connecting process:
//!
//! - [`Link::Pass`]: bytes flow both ways;
//! - [`Link::Delay`]: every chunk is held back for a while (order is kept);
//! - [`Link::Blackhole`]: bytes are read and dropped, nothing is answered: the
//!   sender's requests time out, as across a network partition that drops
//!   packets. A blackholed connection is cut when the blackhole ends (bytes were
//!   lost, so the stream is broken; the client reconnects);
//! - [`Link::Refuse`]: new connections are closed at once and existing ones are
//!   cut: the sender sees errors at once.
//!
//! Rules change at any time ([`Proxy::set_rules`]) and apply to connections
//! already open. A [`Resolver`] names the process behind a connection (see
//! [`crate::procnet`]), so one proxy can cut member A off and let member B
//! through. Everything stops when the shutdown token is cancelled.
//!
//! Bounds: at most `max_connections` connections (more are closed at once), and
//! per direction at most `queue_chunks` chunks of 16 KiB waiting out a delay;
//! when that queue is full the proxy stops reading, so a slow link pushes back
//! on the sender as a slow network would.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Who opened a connection, as the test names it (e.g. a member id).
pub type SourceId = u64;

/// Names the process behind a connection from its addresses (the remote address
/// the proxy sees, the proxy's own address); `None` when unknown. Called once per
/// connection, on a blocking thread.
pub type Resolver = Arc<dyn Fn(SocketAddr, SocketAddr) -> Option<SourceId> + Send + Sync>;

/// What happens to a connection's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Link {
    #[default]
    Pass,
    Delay(Duration),
    Blackhole,
    Refuse,
}

/// The link of each source, and of every connection whose source is unknown or
/// not listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub default: Link,
    pub by_source: BTreeMap<SourceId, Link>,
}

impl Rules {
    /// The same link for everyone.
    pub fn all(link: Link) -> Rules {
        Rules {
            default: link,
            by_source: BTreeMap::new(),
        }
    }

    pub fn link_for(&self, source: Option<SourceId>) -> Link {
        source
            .and_then(|s| self.by_source.get(&s).copied())
            .unwrap_or(self.default)
    }
}

/// Bounds and timeouts of a proxy.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Deadline to connect to the upstream; past it the client is disconnected,
    /// as it would be by a dead upstream.
    pub connect_timeout: Duration,
    /// Chunks queued per direction while a delay holds them.
    pub queue_chunks: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            max_connections: 1024,
            connect_timeout: Duration::from_secs(2),
            queue_chunks: 256,
        }
    }
}

/// Counters, for test reports.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    /// Connections closed on accept (refused, over the limit, upstream down).
    pub refused: AtomicU64,
    /// Open connections cut or swallowed because the rules changed.
    pub cut: AtomicU64,
    /// Connections the resolver could not name.
    pub unattributed: AtomicU64,
}

struct Inner {
    addr: SocketAddr,
    upstream: SocketAddr,
    rules: watch::Sender<Rules>,
    stats: ProxyStats,
    settings: ProxySettings,
    tasks: TaskTracker,
}

/// A running proxy; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl Proxy {
    /// Proxies connections on `listener` to `upstream` until `shutdown`.
    pub fn start(
        listener: TcpListener,
        upstream: SocketAddr,
        resolver: Option<Resolver>,
        settings: ProxySettings,
        shutdown: CancellationToken,
    ) -> io::Result<Proxy> {
        let inner = Arc::new(Inner {
            addr: listener.local_addr()?,
            upstream,
            rules: watch::Sender::new(Rules::default()),
            stats: ProxyStats::default(),
            settings,
            tasks: TaskTracker::new(),
        });
        let task = accept_loop(listener, inner.clone(), resolver, shutdown);
        inner.tasks.spawn(task);
        Ok(Proxy { inner })
    }

    /// A proxy on a free port of 127.0.0.1, with default settings.
    pub async fn bind(
        upstream: SocketAddr,
        resolver: Option<Resolver>,
        shutdown: CancellationToken,
    ) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Proxy::start(
            listener,
            upstream,
            resolver,
            ProxySettings::default(),
            shutdown,
        )
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.inner.upstream
    }

    /// Replaces the rules; open connections follow at once.
    pub fn set_rules(&self, rules: Rules) {
        self.inner.rules.send_replace(rules);
    }

    /// One link for every connection.
    pub fn set_link(&self, link: Link) {
        self.set_rules(Rules::all(link));
    }

    pub fn rules(&self) -> Rules {
        self.inner.rules.borrow().clone()
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.inner.stats
    }

    /// Waits until every task of the proxy has ended (after shutdown).
    pub async fn closed(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    inner: Arc<Inner>,
    resolver: Option<Resolver>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(inner.settings.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (conn, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(proxy = %inner.addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        inner.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let task = serve(
            conn,
            peer,
            inner.clone(),
            resolver.clone(),
            shutdown.clone(),
        );
        inner.tasks.spawn(async move {
            task.await;
            drop(permit);
        });
    }
}

async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    inner: Arc<Inner>,
    resolver: Option<Resolver>,
    shutdown: CancellationToken,
) {
    let source = match resolver {
        Some(resolve) => {
            let local = inner.addr;
            let s = tokio::task::spawn_blocking(move || resolve(peer, local))
                .await
                .ok()
                .flatten();
            if s.is_none() {
                inner.stats.unattributed.fetch_add(1, Ordering::Relaxed);
            }
            s
        }
        None => None,
    };
    let mut rules = inner.rules.subscribe();
    let link = rules.borrow_and_update().link_for(source);
    let delay = match link {
        Link::Refuse => {
            inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Link::Blackhole => {
            inner.stats.cut.fetch_add(1, Ordering::Relaxed);
            swallow(client, &mut rules, source, &shutdown).await;
            return;
        }
        Link::Pass => Duration::ZERO,
        Link::Delay(d) => d,
    };
    let connect = TcpStream::connect(inner.upstream);
    let upstream = match tokio::time::timeout(inner.settings.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        _ => {
            inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let state = Arc::new(LinkState {
        delay_ns: AtomicU64::new(delay.as_nanos() as u64),
        blackholed: AtomicBool::new(false),
    });
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let queue = inner.settings.queue_chunks;
    let both = async {
        let _ = tokio::try_join!(
            direction(cr, uw, state.clone(), queue),
            direction(ur, cw, state.clone(), queue)
        );
    };
    tokio::select! {
        _ = both => {}
        _ = shutdown.cancelled() => {}
        _ = control(&mut rules, source, &state) => {
            inner.stats.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the two directions of a connection share with its controller.
struct LinkState {
    delay_ns: AtomicU64,
    blackholed: AtomicBool,
}

impl LinkState {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }
    fn blackholed(&self) -> bool {
        self.blackholed.load(Ordering::Relaxed)
    }
}

/// Follows rule changes for one open connection; returns when it must be cut.
async fn control(rules: &mut watch::Receiver<Rules>, source: Option<SourceId>, state: &LinkState) {
    loop {
        if rules.changed().await.is_err() {
            // The proxy handle is gone: nobody can change anything any more.
            return std::future::pending().await;
        }
        match rules.borrow_and_update().link_for(source) {
            Link::Refuse => return,
            Link::Blackhole => state.blackholed.store(true, Ordering::Relaxed),
            Link::Pass | Link::Delay(_) if state.blackholed() => return,
            Link::Pass => state.delay_ns.store(0, Ordering::Relaxed),
            Link::Delay(d) => state.delay_ns.store(d.as_nanos() as u64, Ordering::Relaxed),
        }
    }
}

/// Copies one direction, holding each chunk back by the current delay and
/// dropping it while blackholed. Ends at EOF (passed on as a shutdown of the
/// write side) or on the first error.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: Arc<LinkState>,
    queue: usize,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(queue.max(1));
    let read_state = state.clone();
    let reader = async move {
        let tx = tx;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            if read_state.blackholed() {
                continue;
            }
            let due = Instant::now() + read_state.delay();
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if state.blackholed() {
                continue;
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// A blackholed connection: read and drop everything, answer nothing, until the
/// peer gives up, the blackhole ends (then the connection is cut) or shutdown.
async fn swallow(
    conn: TcpStream,
    rules: &mut watch::Receiver<Rules>,
    source: Option<SourceId>,
    shutdown: &CancellationToken,
) {
    let (mut r, _w) = conn.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rules.changed() => {
                if changed.is_err() || rules.borrow_and_update().link_for(source) != Link::Blackhole {
                    return;
                }
            }
            n = r.read(&mut buf) => {
                if !matches!(n, Ok(k) if k > 0) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo(shutdown: CancellationToken) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = l.accept() => r.unwrap(),
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `msg` and waits up to `wait` for it to come back: Ok(true) echoed,
    /// Ok(false) silence, Err the connection failed.
    async fn round_trip(c: &mut TcpStream, msg: &[u8], wait: Duration) -> io::Result<bool> {
        c.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        match tokio::time::timeout(wait, c.read_exact(&mut got)).await {
            Ok(Ok(_)) => Ok(got == msg),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }

    const WAIT: Duration = Duration::from_secs(10);
    const QUIET: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn passes_refuses_and_cuts() {
        let stop = CancellationToken::new();
        let up = echo(stop.clone()).await;
        let p = Proxy::bind(up, None, stop.clone()).await.unwrap();
        let mut c = TcpStream::connect(p.addr()).await.unwrap();
        assert!(round_trip(&mut c, b"hello", WAIT).await.unwrap());

        p.set_link(Link::Refuse);
        // The open connection is cut…
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(WAIT, c.read(&mut buf)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // …and new ones are closed at once.
        let mut c2 = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(WAIT, c2.read(&mut buf)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

        p.set_link(Link::Pass);
        let mut c3 = TcpStream::connect(p.addr()).await.unwrap();
        assert!(round_trip(&mut c3, b"again", WAIT).await.unwrap());
        assert!(p.stats().cut.load(Ordering::Relaxed) >= 1);
        assert!(p.stats().refused.load(Ordering::Relaxed) >= 1);
        stop.cancel();
        tokio::time::timeout(WAIT, p.closed()).await.unwrap();
    }

    #[tokio::test]
    async fn blackhole_swallows_then_cuts_when_healed() {
        let stop = CancellationToken::new();
        let up = echo(stop.clone()).await;
        let p = Proxy::bind(up, None, stop.clone()).await.unwrap();
        let mut open = TcpStream::connect(p.addr()).await.unwrap();
        assert!(round_trip(&mut open, b"x", WAIT).await.unwrap());

        p.set_link(Link::Blackhole);
        // Neither the open connection nor a new one hears anything back.
        assert!(!round_trip(&mut open, b"lost", QUIET).await.unwrap());
        let mut fresh = TcpStream::connect(p.addr()).await.unwrap();
        assert!(!round_trip(&mut fresh, b"lost", QUIET).await.unwrap());

        p.set_link(Link::Pass);
        // Both broken streams are cut; a new connection works.
        for c in [&mut open, &mut fresh] {
            let mut buf = [0u8; 16];
            let r = tokio::time::timeout(WAIT, c.read(&mut buf)).await.unwrap();
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
        let mut c = TcpStream::connect(p.addr()).await.unwrap();
        assert!(round_trip(&mut c, b"back", WAIT).await.unwrap());
        stop.cancel();
    }

    #[tokio::test]
    async fn delay_holds_bytes_back_in_order() {
        let stop = CancellationToken::new();
        let up = echo(stop.clone()).await;
        let p = Proxy::bind(up, None, stop.clone()).await.unwrap();
        p.set_link(Link::Delay(Duration::from_millis(100)));
        let mut c = TcpStream::connect(p.addr()).await.unwrap();
        let started = std::time::Instant::now();
        for msg in [&b"one"[..], b"two", b"three"] {
            assert!(round_trip(&mut c, msg, WAIT).await.unwrap());
        }
        // Each round trip crosses the delay twice (a lower bound, not a speed test).
        assert!(started.elapsed() >= Duration::from_millis(600));
        // Back to no delay on the same connection.
        p.set_link(Link::Pass);
        assert!(round_trip(&mut c, b"four", WAIT).await.unwrap());
        stop.cancel();
    }

    #[tokio::test]
    async fn rules_apply_per_source() {
        let stop = CancellationToken::new();
        let up = echo(stop.clone()).await;
        // Name each connection's source by its port, chosen before it connects.
        let names: Arc<std::sync::Mutex<BTreeMap<u16, SourceId>>> = Arc::default();
        let table = names.clone();
        let resolver: Resolver =
            Arc::new(move |peer, _| table.lock().unwrap().get(&peer.port()).copied());
        let p = Proxy::bind(up, Some(resolver), stop.clone()).await.unwrap();
        let mut conns = Vec::new();
        for i in 0..4u64 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let port = s.local_addr().unwrap().port();
            names.lock().unwrap().insert(port, i % 2);
            conns.push((i % 2 == 1, s.connect(p.addr()).await.unwrap()));
        }
        for (_, c) in &mut conns {
            assert!(round_trip(c, b"hi", WAIT).await.unwrap());
        }
        let mut rules = Rules::default();
        rules.by_source.insert(1, Link::Refuse);
        p.set_rules(rules);
        for (odd, c) in &mut conns {
            if *odd {
                let mut buf = [0u8; 1];
                let r = tokio::time::timeout(WAIT, c.read(&mut buf)).await.unwrap();
                assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
            } else {
                assert!(round_trip(c, b"still", WAIT).await.unwrap());
            }
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_dead_upstream_closes_the_client() {
        let stop = CancellationToken::new();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = Proxy::bind(dead, None, stop.clone()).await.unwrap();
        let mut c = TcpStream::connect(p.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(WAIT, c.read(&mut buf)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        stop.cancel();
    }
}
