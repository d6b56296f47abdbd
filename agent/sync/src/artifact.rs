//! Fetching the component artifacts a desired state names and the device's cache lacks.
//!
//! An artifact comes from the component's `source` URL (`http://` or `https://`) when the
//! desired state gives one, else from the transport: over NATS, the fleet's JetStream
//! object store `perch-components`, object name = the digest (`sha256:<hex>`). Either way
//! a broken download is resumed where it stopped on the next attempt ([`Partial`]: a
//! stream sequence for the object store, an HTTP `Range` for URLs), and the bytes are
//! checked against the digest, then by the agent (signature, manifest) before they are
//! cached. What the cache has is never fetched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use perch_core::Digest;
use rumqttc::tokio_rustls::{TlsConnector, rustls};

/// How long connecting to an artifact server, or a silence in its answer, may last.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Redirects followed per fetch.
const MAX_REDIRECTS: usize = 5;
/// Progress is logged at most this often during a long download.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// A download in progress, kept between attempts so a broken link resumes it.
#[derive(Debug, Default)]
pub struct Partial {
    /// The bytes received so far, in order.
    pub bytes: Vec<u8>,
    /// The artifact's size, once the source said.
    pub total: Option<u64>,
    /// Where to go on from.
    pub resume: Resume,
}

/// A transport's resume point.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Nothing received yet.
    #[default]
    Start,
    /// An object of the object store: the object's id and the stream sequence to read the
    /// next chunk from (a re-uploaded object has another id and starts again).
    Object { nuid: String, next_seq: u64 },
    /// An HTTP download: the URL answered (after redirects) and its validator (`ETag` or
    /// `Last-Modified`) for `If-Range`.
    Http {
        url: String,
        validator: Option<String>,
    },
}

impl Partial {
    /// Starts over.
    pub fn reset(&mut self) {
        self.bytes.clear();
        self.total = None;
        self.resume = Resume::Start;
    }

    /// Appends a piece; refuses to grow past [`perch_core::MAX_COMPONENT_BYTES`].
    pub fn push(&mut self, piece: &[u8]) -> Result<(), FetchError> {
        if self.bytes.len() + piece.len() > perch_core::MAX_COMPONENT_BYTES {
            self.reset();
            return Err(FetchError::permanent(format!(
                "it is larger than the {} MiB an artifact may have",
                perch_core::MAX_COMPONENT_BYTES >> 20
            )));
        }
        self.bytes.extend_from_slice(piece);
        Ok(())
    }
}

/// Why an artifact could not be had. Transient failures (no link, not uploaded yet, a
/// server error) are retried with the desired state at the next poll; permanent ones (the
/// bytes do not match the digest, the agent refuses them) are not retried for the same
/// document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct FetchError {
    pub permanent: bool,
    pub reason: String,
}

impl FetchError {
    /// A failure worth retrying.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self {
            permanent: false,
            reason: reason.into(),
        }
    }

    /// A failure that a retry of the same document would repeat.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            permanent: true,
            reason: reason.into(),
        }
    }
}

/// Logs a long download's progress now and then.
#[derive(Debug)]
pub struct Progress {
    digest: String,
    started: Instant,
    last: Instant,
}

impl Progress {
    pub fn new(digest: &Digest) -> Self {
        let now = Instant::now();
        Self {
            digest: digest.short(),
            started: now,
            last: now,
        }
    }

    /// Called after each piece.
    pub fn update(&mut self, partial: &Partial) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            tracing::info!(
                digest = %self.digest,
                bytes = partial.bytes.len(),
                total = ?partial.total,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "fetching artifact"
            );
        }
    }
}

/// Fetches `url` into `partial` (resuming it when it holds the start of the same URL's
/// answer), following redirects. `tls` is needed for `https://` only (its error is
/// reported when it is).
pub async fn fetch_http(
    url: &str,
    tls: Result<Arc<rustls::ClientConfig>, String>,
    partial: &mut Partial,
    progress: &mut Progress,
) -> Result<(), FetchError> {
    let mut target = url.to_string();
    // Resume only what the same source started.
    let validator = match &partial.resume {
        Resume::Http {
            url: from,
            validator,
        } if from == url && !partial.bytes.is_empty() => validator.clone(),
        _ => {
            partial.reset();
            None
        }
    };
    for _ in 0..=MAX_REDIRECTS {
        let uri: http::Uri = target
            .parse()
            .map_err(|e| FetchError::permanent(format!("`{target}` is not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(FetchError::permanent(format!(
                    "`{target}` is not an http:// or https:// URL"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| FetchError::permanent(format!("`{target}` has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone());
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string());

        let transient = |what: &str, e: &dyn std::fmt::Display| {
            FetchError::transient(format!("{what} {authority}: {e}"))
        };
        let tcp = tokio::time::timeout(
            HTTP_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| transient("connecting to", &format!("no answer in {HTTP_TIMEOUT:?}")))?
        .map_err(|e| transient("connecting to", &e))?;
        let mut request = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .header(
                http::header::USER_AGENT,
                concat!("perchd/", env!("CARGO_PKG_VERSION")),
            );
        let from = partial.bytes.len();
        if from > 0 {
            request = request.header(http::header::RANGE, format!("bytes={from}-"));
            if let Some(v) = &validator {
                request = request.header(http::header::IF_RANGE, v.as_str());
            }
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::permanent(format!("`{target}`: {e}")))?;
        let response = if https {
            let config = tls.clone().map_err(FetchError::transient)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| FetchError::permanent(format!("`{target}`: {e}")))?;
            let stream =
                tokio::time::timeout(HTTP_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
                    .await
                    .map_err(|_| transient("TLS with", &format!("no answer in {HTTP_TIMEOUT:?}")))?
                    .map_err(|e| transient("TLS with", &e))?;
            send(TokioIo::new(stream), request, &authority).await?
        } else {
            send(TokioIo::new(tcp), request, &authority).await?
        };

        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    FetchError::transient(format!(
                        "`{target}` answered {status} without a Location"
                    ))
                })?;
            target = if location.starts_with('/') {
                format!(
                    "{}://{authority}{location}",
                    if https { "https" } else { "http" }
                )
            } else {
                location.to_string()
            };
            continue;
        }
        match status.as_u16() {
            200 => {
                // A full answer (the server ignored the range, or the file changed).
                partial.reset();
                partial.total = content_length(response.headers());
            }
            206 => {
                let (start, total) = content_range(response.headers()).ok_or_else(|| {
                    FetchError::transient(format!("`{target}`: 206 without a usable Content-Range"))
                })?;
                if start != from as u64 {
                    partial.reset();
                    return Err(FetchError::transient(format!(
                        "`{target}` resumed at byte {start}, not {from}; starting over"
                    )));
                }
                partial.total = total;
            }
            416 => {
                partial.reset();
                return Err(FetchError::transient(format!(
                    "`{target}` refused to resume at byte {from}; starting over"
                )));
            }
            _ => {
                return Err(FetchError::transient(format!(
                    "`{target}` answered {status}"
                )));
            }
        }
        if let Some(total) = partial.total
            && total > perch_core::MAX_COMPONENT_BYTES as u64
        {
            partial.reset();
            return Err(FetchError::permanent(format!(
                "`{target}` is {total} bytes, more than the {} MiB an artifact may have",
                perch_core::MAX_COMPONENT_BYTES >> 20
            )));
        }
        let validator = ["etag", "last-modified"].iter().find_map(|h| {
            response
                .headers()
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        partial.resume = Resume::Http {
            url: url.to_string(),
            validator,
        };
        let mut body = response.into_body();
        loop {
            let frame = tokio::time::timeout(HTTP_TIMEOUT, body.frame())
                .await
                .map_err(|_| {
                    FetchError::transient(format!(
                        "`{target}` sent nothing for {HTTP_TIMEOUT:?} after {} bytes",
                        partial.bytes.len()
                    ))
                })?;
            match frame {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        partial.push(data)?;
                        progress.update(partial);
                    }
                }
                Some(Err(e)) => {
                    return Err(FetchError::transient(format!(
                        "`{target}` broke off after {} bytes: {e}",
                        partial.bytes.len()
                    )));
                }
            }
        }
        if let Some(total) = partial.total
            && partial.bytes.len() as u64 != total
        {
            return Err(FetchError::transient(format!(
                "`{target}` ended after {} of {total} bytes",
                partial.bytes.len()
            )));
        }
        return Ok(());
    }
    Err(FetchError::transient(format!(
        "`{url}`: more than {MAX_REDIRECTS} redirects"
    )))
}

/// One HTTP/1.1 exchange on a fresh connection.
async fn send<S>(
    io: TokioIo<S>,
    request: http::Request<Empty<Bytes>>,
    authority: &str,
) -> Result<http::Response<hyper::body::Incoming>, FetchError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let failed = |e: hyper::Error| FetchError::transient(format!("HTTP with {authority}: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(failed)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "artifact connection");
        }
    });
    tokio::time::timeout(HTTP_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| FetchError::transient(format!("{authority}: no answer in {HTTP_TIMEOUT:?}")))?
        .map_err(failed)
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `bytes <start>-<end>/<total or *>` → (start, total).
fn content_range(headers: &http::HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let range = v.trim().strip_prefix("bytes ")?;
    let (span, total) = range.split_once('/')?;
    let start = span.split_once('-')?.0.trim().parse().ok()?;
    let total = total.trim().parse().ok();
    Some((start, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_gives_start_and_total() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_RANGE,
            "bytes 100-199/200".parse().expect("header"),
        );
        assert_eq!(content_range(&h), Some((100, Some(200))));
        h.insert(
            http::header::CONTENT_RANGE,
            "bytes 5-9/*".parse().expect("header"),
        );
        assert_eq!(content_range(&h), Some((5, None)));
        h.insert(
            http::header::CONTENT_RANGE,
            "items 1-2/3".parse().expect("header"),
        );
        assert_eq!(content_range(&h), None);
    }

    #[test]
    fn a_partial_refuses_to_grow_past_the_artifact_limit() {
        let mut p = Partial::default();
        p.push(&[1, 2, 3]).expect("small");
        let big = vec![0u8; perch_core::MAX_COMPONENT_BYTES];
        let e = p.push(&big).expect_err("too big");
        assert!(e.permanent && e.reason.contains("MiB"), "{e}");
        assert!(p.bytes.is_empty(), "a refused download is dropped");
    }
}
