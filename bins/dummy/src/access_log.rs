//! The per-request log line, in the spirit of the Go example's
//! `log.Println("request", next, time.Since(start))`.
//!
//! The line is written when hyper drops the response body, i.e. once the last
//! byte has been handed to the socket (or the client went away), so the duration
//! covers the whole transfer, as it does in Go where `ServeHTTP` writes the body
//! before returning.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, SizeHint};

/// What is known about a request before its response body is sent.
#[derive(Debug)]
pub struct RequestInfo {
    /// Sequence number of the request since startup (1-based).
    pub id: u64,
    /// The request method.
    pub method: Method,
    /// Path and query as sent by the client.
    pub target: String,
    /// When the request arrived.
    pub start: Instant,
}

/// Wraps a response body, counting what is sent and logging on drop.
#[derive(Debug)]
pub struct Logged<B> {
    inner: B,
    info: RequestInfo,
    status: StatusCode,
    sent: u64,
    finished: bool,
}

impl<B: Body> Logged<B> {
    /// Attaches the request's log record to its response body.
    pub fn new(inner: B, info: RequestInfo, status: StatusCode) -> Self {
        let finished = inner.is_end_stream();
        Self {
            inner,
            info,
            status,
            sent: 0,
            finished,
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                this.finished = this.inner.is_end_stream();
            }
            Poll::Ready(None) => this.finished = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        let RequestInfo {
            id,
            method,
            target,
            start,
        } = &self.info;
        let elapsed = start.elapsed();
        let (status, sent) = (self.status.as_u16(), self.sent);
        if self.finished {
            tracing::info!("request {id}: {method} {target} {status} {sent} bytes in {elapsed:?}");
        } else {
            tracing::info!(
                "request {id}: {method} {target} {status} {sent} bytes in {elapsed:?} (aborted)"
            );
        }
    }
}
