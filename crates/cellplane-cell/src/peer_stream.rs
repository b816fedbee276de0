//! Request and answer in lockstep over one long-lived gRPC stream between two
//! members (`AppendEntriesStream`, `ProposeStream`).
//!
//! A unary call opens an HTTP/2 stream per request: HEADERS, DATA and an empty
//! end-of-stream DATA frame out, HEADERS, DATA and trailers back, each in its own
//! write, and a task spawned at the server. On an open stream an exchange is one
//! DATA frame each way. Answers match requests by order because a request is sent
//! only after the previous answer is in; the callers (openraft's replication of
//! one follower, a follower's one forwarded batch) never have two out anyway.
//!
//! A stream whose exchange did not finish (an error, a timeout, or the caller's
//! future dropped mid-way) is dropped with it, never reused: its late answer would
//! be taken for the next request's. The next exchange opens a new one.

use std::pin::Pin;
use std::time::Duration;

use cellplane_proto::raft::RaftPayload;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status, Streaming};

/// The server's side of a lockstep stream, as tonic wants it.
pub(crate) type Answers = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send>>;

/// The client's side of one open stream.
pub(crate) struct Lockstep {
    requests: mpsc::Sender<RaftPayload>,
    answers: Streaming<RaftPayload>,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// The stream could not be opened: the request was not sent.
    Open(Status),
    /// The request may have reached the peer: its outcome is unknown.
    Sent(Status),
}

impl Lockstep {
    /// Opens a stream with `open` (the generated client's streaming method), which
    /// resolves when the peer has answered the stream's headers.
    pub(crate) async fn open<F, Fut>(open: F, timeout: Duration) -> Result<Lockstep, Status>
    where
        F: FnOnce(ReceiverStream<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<Response<Streaming<RaftPayload>>, Status>>,
    {
        // One request at a time: room for exactly the one being sent.
        let (requests, rx) = mpsc::channel(1);
        let answers = tokio::time::timeout(timeout, open(ReceiverStream::new(rx)))
            .await
            .map_err(|_| Status::deadline_exceeded("opening the peer stream timed out"))??
            .into_inner();
        Ok(Lockstep { requests, answers })
    }

    /// Sends `request` and waits up to `timeout` for its answer. On an error the
    /// stream must be dropped (see the module's note).
    pub(crate) async fn exchange(
        &mut self,
        request: RaftPayload,
        timeout: Duration,
    ) -> Result<RaftPayload, Status> {
        let exchange = async {
            self.requests
                .send(request)
                .await
                .map_err(|_| Status::unavailable("the peer stream is closed"))?;
            match self.answers.message().await? {
                Some(answer) => Ok(answer),
                None => Err(Status::unavailable("the peer ended the stream")),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Status::deadline_exceeded("no answer on the peer stream in time"))?
    }
}

/// A stream slot that survives only complete exchanges: the stream is taken out
/// for the exchange and put back when its answer is in.
#[derive(Default)]
pub(crate) struct Slot {
    open: Option<Lockstep>,
    /// The peer answered Unimplemented (it predates the streams): use unary calls.
    unsupported: bool,
}

impl ExchangeError {
    /// The status, whether or not the request went out.
    pub(crate) fn into_status(self) -> Status {
        match self {
            ExchangeError::Open(s) | ExchangeError::Sent(s) => s,
        }
    }
}

impl Slot {
    /// One exchange on the slot's stream, opening one with `open` if needed.
    pub(crate) async fn exchange<F, Fut>(
        &mut self,
        open: F,
        request: RaftPayload,
        timeout: Duration,
    ) -> Result<RaftPayload, ExchangeError>
    where
        F: FnOnce(ReceiverStream<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<Response<Streaming<RaftPayload>>, Status>>,
    {
        let mut stream = match self.open.take() {
            Some(s) => s,
            None => match Lockstep::open(open, timeout).await {
                Ok(s) => s,
                Err(s) => {
                    if s.code() == tonic::Code::Unimplemented {
                        self.unsupported = true;
                    }
                    return Err(ExchangeError::Open(s));
                }
            },
        };
        let answer = stream
            .exchange(request, timeout)
            .await
            .map_err(ExchangeError::Sent)?;
        self.open = Some(stream);
        Ok(answer)
    }
}

impl Slot {
    /// One exchange with the peer: on the slot's stream, or with `unary` for a
    /// peer that predates the streams (from the first Unimplemented on). A unary
    /// call's failure counts as `Sent`: its request may have reached the peer.
    pub(crate) async fn call<F, Fut, U, UFut>(
        &mut self,
        open: F,
        unary: U,
        request: RaftPayload,
        timeout: Duration,
    ) -> Result<RaftPayload, ExchangeError>
    where
        F: FnOnce(ReceiverStream<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<Response<Streaming<RaftPayload>>, Status>>,
        U: FnOnce(RaftPayload) -> UFut,
        UFut: Future<Output = Result<RaftPayload, Status>>,
    {
        if !self.unsupported {
            // The payload is reference-counted bytes: the copy kept for the
            // fallback is a pointer.
            match self.exchange(open, request.clone(), timeout).await {
                Err(ExchangeError::Open(_)) if self.unsupported => {}
                done => return done,
            }
        }
        unary(request).await.map_err(ExchangeError::Sent)
    }
}

/// Serves a lockstep stream: each request is answered by `handle` before the next
/// is read, so answers leave in request order. Ends when the peer ends its side,
/// on the first undecodable request (with that status), or at `shutdown` (so a
/// member stopping does not wait for its peers to hang up).
pub(crate) fn serve<H, Fut>(
    requests: Streaming<RaftPayload>,
    shutdown: CancellationToken,
    handle: H,
) -> Answers
where
    H: Fn(RaftPayload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<RaftPayload, Status>> + Send + 'static,
{
    let answers = futures::stream::unfold(
        (requests, handle, false),
        |(mut requests, handle, failed)| async move {
            if failed {
                return None;
            }
            let answer = match requests.message().await {
                Ok(Some(request)) => handle(request).await,
                Ok(None) => return None,
                Err(status) => Err(status),
            };
            let failed = answer.is_err();
            Some((answer, (requests, handle, failed)))
        },
    );
    Box::pin(answers.take_until(shutdown.cancelled_owned()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cellplane_proto::raft::RaftPayload;
    use cellplane_proto::raft::raft_client::RaftClient;
    use cellplane_proto::raft::raft_server::{Raft, RaftServer};
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Status, Streaming};

    use super::{Answers, ExchangeError, Slot, serve};

    /// Echoes each request on its stream, but never answers one that says "hold";
    /// `streams` false answers the streaming call Unimplemented, as a member built
    /// before it would.
    struct Echo {
        streams: bool,
    }

    fn unary() -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl Raft for Echo {
        async fn append_entries(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            unary()
        }
        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            unary()
        }
        async fn install_snapshot(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            unary()
        }
        async fn read_index(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            unary()
        }
        async fn propose(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            unary()
        }

        type AppendEntriesStreamStream = Answers;

        async fn append_entries_stream(
            &self,
            req: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Answers>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("unknown method"));
            }
            Ok(Response::new(serve(
                req.into_inner(),
                CancellationToken::new(),
                |p| async move {
                    if p.data.as_ref() == b"hold" {
                        std::future::pending::<()>().await;
                    }
                    Ok(p)
                },
            )))
        }

        type ProposeStreamStream = Answers;

        async fn propose_stream(
            &self,
            _: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Answers>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    async fn start(streams: bool) -> (RaftClient<tonic::transport::Channel>, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(Echo { streams }))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    until,
                ),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        (RaftClient::new(channel), stop)
    }

    fn payload(s: &'static str) -> RaftPayload {
        RaftPayload {
            data: s.as_bytes().to_vec().into(),
        }
    }

    async fn exchange(
        slot: &mut Slot,
        client: &RaftClient<tonic::transport::Channel>,
        p: &'static str,
        timeout: Duration,
    ) -> Result<RaftPayload, ExchangeError> {
        let c = client.clone();
        slot.exchange(
            |s| async move { c.clone().append_entries_stream(s).await },
            payload(p),
            timeout,
        )
        .await
    }

    #[tokio::test]
    async fn answers_match_requests_even_after_an_exchange_was_abandoned() {
        let (client, stop) = start(true).await;
        let mut slot = Slot::default();
        let long = Duration::from_secs(30);
        assert_eq!(
            exchange(&mut slot, &client, "one", long)
                .await
                .unwrap()
                .data
                .as_ref(),
            b"one"
        );
        assert_eq!(
            exchange(&mut slot, &client, "two", long)
                .await
                .unwrap()
                .data
                .as_ref(),
            b"two"
        );
        // The peer never answers "hold": the exchange times out and the stream,
        // whose answer may still come, is dropped.
        let held = exchange(&mut slot, &client, "hold", Duration::from_millis(100)).await;
        assert!(
            matches!(held, Err(ExchangeError::Sent(s)) if s.code() == tonic::Code::DeadlineExceeded)
        );
        // A caller that gives up mid-exchange (its future dropped) leaves no stream.
        let dropped = tokio::time::timeout(
            Duration::from_millis(100),
            exchange(&mut slot, &client, "hold", long),
        )
        .await;
        assert!(dropped.is_err());
        // The next request gets its own answer on a new stream.
        assert_eq!(
            exchange(&mut slot, &client, "three", long)
                .await
                .unwrap()
                .data
                .as_ref(),
            b"three"
        );
        assert!(!slot.unsupported);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_is_remembered_as_unary_only() {
        let (client, stop) = start(false).await;
        let mut slot = Slot::default();
        let r = exchange(&mut slot, &client, "one", Duration::from_secs(30)).await;
        assert!(matches!(r, Err(ExchangeError::Open(s)) if s.code() == tonic::Code::Unimplemented));
        assert!(slot.unsupported);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_peer_that_is_not_listening_fails_the_open_not_the_request() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let client = RaftClient::new(channel);
        let mut slot = Slot::default();
        let r = exchange(&mut slot, &client, "one", Duration::from_secs(30)).await;
        assert!(matches!(r, Err(ExchangeError::Open(_))));
        assert!(!slot.unsupported);
    }
}
