//! A response body that streams part of a file in large chunks.
//!
//! Each chunk is read by a `spawn_blocking` task straight into the buffer that is
//! handed to hyper (one copy, no tokio `File` intermediate buffer), and the next
//! read is started as soon as a chunk is returned, so disk reads overlap socket
//! writes. At most two chunks are in memory per response, whatever the file size.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

/// Read size: large enough that per-chunk overhead (a blocking-pool hop and a
/// syscall) is negligible on multi-GiB transfers, small enough to keep memory flat.
const CHUNK: usize = 256 * 1024;

type PendingRead = JoinHandle<(File, io::Result<Bytes>)>;

/// Streams `len` bytes of a file from its current position.
#[derive(Debug)]
pub struct FileBody {
    pending: Option<PendingRead>,
    /// Size of the read in flight; a shorter result means the file shrank.
    expected: usize,
    /// Bytes not yet requested from the file.
    unread: u64,
    /// Bytes not yet yielded to hyper; drives the exact size hint.
    unsent: u64,
}

impl FileBody {
    /// Starts reading immediately, so must be called inside a Tokio runtime.
    pub fn new(file: File, len: u64) -> Self {
        let mut body = Self {
            pending: None,
            expected: 0,
            unread: len,
            unsent: len,
        };
        body.read_next(file);
        body
    }

    /// Type-erases the body for use in a response.
    pub fn boxed(self) -> BoxBody<Bytes, io::Error> {
        BoxBody::new(self)
    }

    fn read_next(&mut self, mut file: File) {
        if self.unread == 0 {
            return;
        }
        let n = usize::try_from(self.unread).map_or(CHUNK, |unread| unread.min(CHUNK));
        self.unread -= n as u64;
        self.expected = n;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let result = read_chunk(&mut file, n);
            (file, result)
        }));
    }
}

/// Fills a fresh `n`-byte buffer, stopping early only at end of file.
fn read_chunk(file: &mut File, n: usize) -> io::Result<Bytes> {
    // Zeroed rather than uninitialised because filling spare capacity needs
    // `unsafe` or `read_to_end`, which starts with small reads; a fresh large
    // allocation is usually already-zeroed pages anyway.
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let Some(pending) = this.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let joined = ready!(Pin::new(pending).poll(cx));
        this.pending = None;
        let (file, chunk) = match joined {
            Ok((file, Ok(chunk))) => (file, chunk),
            Ok((_, Err(e))) => return Poll::Ready(Some(Err(e))),
            Err(e) => return Poll::Ready(Some(Err(io::Error::other(e)))),
        };
        if chunk.len() != this.expected {
            // The Content-Length is already on the wire; failing the body makes
            // hyper close the connection instead of sending a short response.
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being served",
            ))));
        }
        this.unsent -= chunk.len() as u64;
        this.read_next(file);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.unsent == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.unsent)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;
    use std::io::{Seek, SeekFrom, Write};

    fn temp_file(name: &str, data: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("rd-dummy-fb-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(data).unwrap();
        path
    }

    #[tokio::test]
    async fn streams_exact_slice_across_chunks() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let path = temp_file("slice", &data);
        let mut file = File::open(&path).unwrap();
        file.seek(SeekFrom::Start(10)).unwrap();
        let len = (CHUNK * 2) as u64;
        let body = FileBody::new(file, len);
        assert_eq!(body.size_hint().exact(), Some(len));
        let got = body.collect().await.unwrap().to_bytes();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&got[..], &data[10..10 + CHUNK * 2]);
    }

    #[tokio::test]
    async fn empty_body_ends_immediately() {
        let path = temp_file("empty", b"");
        let body = FileBody::new(File::open(&path).unwrap(), 0);
        std::fs::remove_file(&path).unwrap();
        assert!(body.is_end_stream());
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
    }

    #[tokio::test]
    async fn short_file_is_an_error() {
        let path = temp_file("short", b"abc");
        let body = FileBody::new(File::open(&path).unwrap(), 10);
        std::fs::remove_file(&path).unwrap();
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
