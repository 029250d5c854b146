//! Event streams written straight to the socket, past hyper.
//!
//! hyper keeps about 14 KB of buffers for every connection, for as long as
//! it is open. An SSE stream is one request, then hours of small writes: at
//! 10,000 subscribers those buffers are most of spoold's memory. So the
//! first request of a connection is read here, into a buffer freed right
//! after. When it is a plain `GET /events/{id}/stream` over HTTP/1.1 (the
//! whole head in that first read, no body, nothing after it), it goes
//! through the same routing as any request (`routes::route_head`: guards,
//! token, CORS), and its answer is written here: the head, then each frame
//! as it comes (chunked), then the connection closes (`Connection: close`; a stream
//! ends with its event, and EventSource reconnects on its own). Anything
//! else goes to hyper, with the bytes already read put back in front.
//!
//! While a stream is open the socket is also watched for reading, so a
//! client that hangs up is noticed at once, not at the next heartbeat.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{routes, Body};
use crate::app::Shared;

/// The most a first read takes in: heads with big cookies go to hyper.
const FIRST_READ: usize = 4096;

/// What the first read of a connection found.
pub enum First {
    /// A stream request, to be answered here.
    Stream(Request<()>),
    /// Anything else: hyper's, with what was read so far.
    Hyper(Bytes),
    /// The client closed, or sent nothing within `header_timeout`.
    Gone,
}

/// Reads the first request head of a connection (up to [`FIRST_READ`]
/// bytes, all within `timeout`, as hyper would give it) and sorts it.
pub async fn first_request(stream: &mut TcpStream, timeout: Duration) -> First {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let read = async {
        loop {
            stream.readable().await?;
            match stream.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(0) => return Ok(None),
                // A head cut into several reads is read whole here, so that
                // header_timeout bounds it once; one longer than FIRST_READ
                // goes to hyper, whose own timer then starts.
                Ok(_) => match sort(&buf) {
                    Sorted::Partial if buf.len() < FIRST_READ => {}
                    Sorted::Stream(req) => return Ok(Some(Some(*req))),
                    _ => return Ok(Some(None)),
                },
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(Some(Some(req)))) => First::Stream(req),
        Ok(Ok(Some(None))) => First::Hyper(buf.freeze()),
        _ => First::Gone,
    }
}

/// What the bytes read so far hold.
enum Sorted {
    /// Not a whole head yet.
    Partial,
    /// Exactly one complete `GET /events/{id}/stream` head over HTTP/1.1,
    /// without a body.
    Stream(Box<Request<()>>),
    /// Anything else, for hyper (including what is not HTTP at all).
    Other,
}

fn sort(head: &[u8]) -> Sorted {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Sorted::Partial,
        Err(_) => return Sorted::Other,
    };
    let Some(path) = parsed.path else {
        return Sorted::Other;
    };
    let is_stream = path
        .split('?')
        .next()
        .and_then(|p| p.strip_prefix("/events/"))
        .and_then(|p| p.strip_suffix("/stream"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'));
    if len != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) || !is_stream
    {
        return Sorted::Other;
    }
    let mut req = Request::builder().uri(path);
    for h in parsed.headers.iter() {
        // A body, or an upgrade, is hyper's business.
        if ["content-length", "transfer-encoding", "upgrade", "expect"]
            .iter()
            .any(|n| h.name.eq_ignore_ascii_case(n))
        {
            return Sorted::Other;
        }
        req = req.header(h.name, h.value);
    }
    req.body(())
        .map_or(Sorted::Other, |req| Sorted::Stream(Box::new(req)))
}

/// Answers a stream request on `stream`, then closes it.
pub async fn serve_stream(
    sh: Arc<Shared>,
    mut stream: TcpStream,
    req: Request<()>,
    shutdown: CancellationToken,
) {
    let resp = routes::route_head(sh, &req, shutdown).await;
    // The headers (cookies and all) are not kept for the stream's life.
    drop(req);
    let _ = write_answer(&mut stream, resp).await;
    let _ = stream.shutdown().await;
}

async fn write_answer(stream: &mut TcpStream, resp: Response<Body>) -> io::Result<()> {
    let (parts, mut body) = resp.into_parts();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n");
    if !parts.headers.contains_key(hyper::header::CONNECTION) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    if let Some(n) = body.size_hint().exact() {
        // A whole answer (an error, a 204): sized, in one write.
        if parts.status.as_u16() != 204 && parts.status.as_u16() != 304 {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        head.extend_from_slice(&bytes);
        return stream.write_all(&head).await;
    }
    // Chunked, as hyper would: the last chunk tells a clean end (the event
    // ended, or spoold is shutting down) from a cut connection.
    head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    stream.write_all(&head).await?;
    drop(head);
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                        let mut size = ChunkSize::default();
                        let mut chunk = size.of(data.len()).chain(data.clone()).chain(&b"\r\n"[..]);
                        stream.write_all_buf(&mut chunk).await?;
                    }
                }
                _ => return stream.write_all(b"0\r\n\r\n").await,
            },
            ready = stream.readable() => {
                ready?;
                // Whatever the client sends now is ignored; EOF ends the stream.
                let mut scratch = [0u8; 64];
                match stream.try_read(&mut scratch) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// The size line of a chunk, on the stack. With the frame's shared bytes
/// and the closing CRLF chained behind it, a chunk goes out in one
/// vectored write and nothing is copied or allocated per subscriber.
#[derive(Default)]
struct ChunkSize([u8; 18]);

impl ChunkSize {
    fn of(&mut self, len: usize) -> &[u8] {
        let mut at = self.0.len() - 2;
        self.0[at..].copy_from_slice(b"\r\n");
        let mut n = len;
        loop {
            at -= 1;
            self.0[at] = b"0123456789abcdef"[n % 16];
            n /= 16;
            if n == 0 {
                return &self.0[at..];
            }
        }
    }
}

/// A connection for hyper with the bytes already read in front.
pub struct Rewind {
    pre: Bytes,
    stream: TcpStream,
}

impl Rewind {
    pub fn new(pre: Bytes, stream: TcpStream) -> Rewind {
        Rewind { pre, stream }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pre.has_remaining() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            if !self.pre.has_remaining() {
                // Let the first read's buffer go.
                self.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{sort, ChunkSize, Sorted};

    #[test]
    fn chunk_sizes_are_hex_lines() {
        for (len, line) in [
            (0, "0\r\n"),
            (9, "9\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
        ] {
            assert_eq!(ChunkSize::default().of(len), line.as_bytes());
        }
        let max = format!("{:x}\r\n", usize::MAX);
        assert_eq!(ChunkSize::default().of(usize::MAX), max.as_bytes());
    }

    #[test]
    fn only_a_whole_plain_stream_request_is_taken() {
        let ok = b"GET /events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream?last_event_id=3 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 2\r\n\r\n";
        let Sorted::Stream(req) = sort(ok) else {
            panic!("not taken as a stream request");
        };
        assert_eq!(req.uri().query(), Some("last_event_id=3"));
        assert_eq!(req.headers()["last-event-id"], "2");
        assert!(matches!(sort(&ok[..30]), Sorted::Partial));
        assert!(matches!(sort(b"\x00\x01 garbage\r\n\r\n"), Sorted::Other));
        for other in [
            &b"GET /events/01ARZ3NDEKTSV4RRFFQ69G5FAV HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream HTTP/1.0\r\n\r\n",
            b"HEAD /events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream HTTP/1.1\r\nHost: x\r\n",
            b"GET /events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
            b"GET /events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET /events/a/b/stream HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(
                !matches!(sort(other), Sorted::Stream(_)),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
