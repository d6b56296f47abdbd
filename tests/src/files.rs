//! A small HTTP/1.1 file server on a free loopback port, for artifacts fetched by URL. It
//! honours `Range: bytes=<n>-` with a `206`, can break off its first answers half-way
//! (a link lost mid-download), and records every request it saw.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Result;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    files: HashMap<String, Vec<u8>>,
    seen: Vec<SeenRequest>,
}

/// The server; stops accepting when dropped.
#[derive(Debug)]
pub struct FileServer {
    port: u16,
    shared: Arc<Mutex<Shared>>,
    breaks_left: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FileServer {
    /// Serves nothing yet; add files with [`Self::put`].
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let breaks_left = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (shared, breaks_left, stop) = (shared.clone(), breaks_left.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (shared, breaks_left) = (shared.clone(), breaks_left.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, &shared, &breaks_left);
                    });
                }
            });
        }
        Ok(Self {
            port,
            shared,
            breaks_left,
            stop,
        })
    }

    /// Serves `bytes` at `path` (starting with `/`).
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.lock().files.insert(path.to_string(), bytes);
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The next `n` answers with a body send half of it and close the connection.
    pub fn break_next(&self, n: usize) {
        self.breaks_left.store(n, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.lock().seen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, shared: &Mutex<Shared>, breaks_left: &AtomicUsize) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    let file = {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.seen.push(SeenRequest {
            path: path.clone(),
            range: range.clone(),
        });
        s.files.get(&path).cloned()
    };
    let Some(file) = file else {
        conn.write_all(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let etag = format!("\"{}\"", file.len());
    let (status, body, extra) = match from {
        Some(n) if n < file.len() => (
            "206 Partial Content",
            &file[n..],
            format!(
                "content-range: bytes {n}-{}/{}\r\n",
                file.len() - 1,
                file.len()
            ),
        ),
        Some(_) => ("416 Range Not Satisfiable", &file[..0], String::new()),
        None => ("200 OK", &file[..], String::new()),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\netag: {etag}\r\n{extra}connection: close\r\n\r\n",
        body.len()
    )?;
    let broken = breaks_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if broken {
        conn.write_all(&body[..body.len() / 2])?;
        conn.flush()?;
        // Gone mid-answer: the client sees the body end early.
        return Ok(());
    }
    conn.write_all(body)?;
    Ok(())
}
