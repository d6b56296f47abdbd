//! Real `nats-server` processes for the sync tests, on free loopback ports, with their
//! JetStream data in a directory of the test so that a server can be killed and started
//! again with what it had stored. Also a small blocking client for the JetStream JSON API
//! (stream create, info, message get) that works against the Debian 2.9 server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::Value;

use crate::free_port;

/// A nats-server process; killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Leaf node port (hubs only).
    pub leaf_port: Option<u16>,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// A hub: JetStream in domain `hub`, accepting leaf nodes.
    pub fn hub(dir: &Path) -> Result<Self> {
        let port = free_port();
        let leaf = free_port();
        let body = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: hub\njetstream {{ domain: hub, store_dir: \"{}\" }}\nleafnodes {{ listen: \"127.0.0.1:{leaf}\" }}\n",
            dir.join("hub-js").display()
        );
        Self::start(dir, "hub", port, Some(leaf), &body)
    }

    /// A leaf node of `hub` with its own JetStream domain `domain`, as on a device.
    pub fn leaf(dir: &Path, hub: &NatsServer, domain: &str) -> Result<Self> {
        let port = free_port();
        let hub_leaf = hub.leaf_port.context("the hub accepts no leaf nodes")?;
        let body = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: {domain}\njetstream {{ domain: {domain}, store_dir: \"{}\" }}\nleafnodes {{ reconnect: 1, remotes: [ {{ url: \"nats-leaf://127.0.0.1:{hub_leaf}\" }} ] }}\n",
            dir.join(format!("{domain}-js")).display()
        );
        Self::start(dir, domain, port, None, &body)
    }

    /// A standalone server with JetStream (the hub of a direct deployment).
    pub fn standalone(dir: &Path, name: &str) -> Result<Self> {
        let port = free_port();
        let body = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: {name}\njetstream {{ store_dir: \"{}\" }}\n",
            dir.join(format!("{name}-js")).display()
        );
        Self::start(dir, name, port, None, &body)
    }

    fn start(
        dir: &Path,
        name: &str,
        port: u16,
        leaf_port: Option<u16>,
        body: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, body)?;
        let mut s = Self {
            port,
            leaf_port,
            config,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        s.restart()?;
        Ok(s)
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) with its config and stored data, and waits until it
    /// accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("nats-server on port {} is already running", self.port);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn nats-server (Debian package nats-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not listen on {}; log:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL: the server is gone as if its machine lost power.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking client for JetStream's JSON API.
#[derive(Debug)]
pub struct JsApi {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    prefix: String,
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub seq: u64,
    pub subject: String,
    pub headers: String,
    pub data: Vec<u8>,
}

impl StoredMessage {
    /// The value of header `name` (NATS/1.0 header block), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl JsApi {
    /// Connects to `url`; `domain` selects another server's JetStream (`$JS.<domain>.API`).
    pub fn connect(url: &str, domain: Option<&str>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt
            .block_on(async_nats::connect(url))
            .with_context(|| format!("connect to {url}"))?;
        Ok(Self {
            rt,
            client,
            prefix: domain.map_or_else(|| "$JS.API".to_string(), |d| format!("$JS.{d}.API")),
        })
    }

    /// A request on `subject`, its answer parsed as JSON; 5 s to answer.
    fn ask(&self, subject: &str, payload: Vec<u8>) -> Result<Value> {
        let reply = self
            .rt
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    self.client.request(subject.to_string(), payload.into()),
                )
                .await
            })
            .with_context(|| format!("{subject}: no answer in 5 s"))?
            .with_context(|| format!("request {subject}"))?;
        Ok(serde_json::from_slice(&reply.payload)?)
    }

    /// Stores `bytes` as object `name` of object store `bucket` (created if missing) with
    /// the client library's own object store, as the fleet's tools would.
    pub fn put_object(&self, bucket: &str, name: &str, bytes: &[u8]) -> Result<()> {
        use async_nats::jetstream::object_store;
        self.rt.block_on(async {
            let js = async_nats::jetstream::new(self.client.clone());
            let store = match js.get_object_store(bucket).await {
                Ok(s) => s,
                Err(_) => js
                    .create_object_store(object_store::Config {
                        bucket: bucket.to_string(),
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("create object store {bucket}"))?,
            };
            store
                .put(name, &mut &bytes[..])
                .await
                .with_context(|| format!("put object {name} into {bucket}"))?;
            Ok(())
        })
    }

    /// A core NATS request (a device command), with header `Perch-Cmd-Id` when `id` is
    /// given; the answer parsed as JSON.
    pub fn command(&self, subject: &str, body: &[u8], id: Option<&str>) -> Result<Value> {
        let reply = self
            .rt
            .block_on(async {
                let mut headers = async_nats::HeaderMap::new();
                if let Some(id) = id {
                    headers.insert("Perch-Cmd-Id", id);
                }
                tokio::time::timeout(
                    Duration::from_secs(10),
                    self.client.request_with_headers(
                        subject.to_string(),
                        headers,
                        body.to_vec().into(),
                    ),
                )
                .await
            })
            .with_context(|| format!("{subject}: no answer in 10 s"))?
            .with_context(|| format!("request {subject}"))?;
        Ok(serde_json::from_slice(&reply.payload)?)
    }

    /// One API request; an `error` in the answer is an error.
    pub fn request(&self, api: &str, body: &Value) -> Result<Value> {
        let subject = format!("{}.{api}", self.prefix);
        let v = self.ask(&subject, body.to_string().into_bytes())?;
        if let Some(e) = v.get("error") {
            bail!("{subject}: {e}");
        }
        Ok(v)
    }

    /// A JetStream publish (a KV put when `subject` is `$KV.<bucket>.<key>`); waits for
    /// the stream's ack.
    pub fn put(&self, subject: &str, payload: &[u8]) -> Result<()> {
        let v = self.ask(subject, payload.to_vec())?;
        if v.get("error").is_some() || v.get("seq").is_none() {
            bail!("{subject}: not stored: {v}");
        }
        Ok(())
    }

    /// The last message on `subject` in stream `stream` (a KV key's value), if any.
    pub fn last(&self, stream: &str, subject: &str) -> Result<Option<Vec<u8>>> {
        match self.request(
            &format!("STREAM.MSG.GET.{stream}"),
            &serde_json::json!({ "last_by_subj": subject }),
        ) {
            Ok(v) => {
                let data = v["message"]["data"].as_str().unwrap_or_default();
                Ok(Some(
                    base64::engine::general_purpose::STANDARD.decode(data)?,
                ))
            }
            Err(e) if e.to_string().contains("no message found") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a KV bucket's stream (`KV_<bucket>`, subjects `$KV.<bucket>.>`, one value
    /// per key), as `nats kv add` would; with `source_domain`, it also sources the bucket of
    /// the same name from that leaf node's JetStream domain.
    pub fn create_kv(&self, bucket: &str, source_domain: Option<&str>) -> Result<()> {
        let mut config = serde_json::json!({
            "name": format!("KV_{bucket}"),
            "subjects": [format!("$KV.{bucket}.>")],
            "storage": "file",
            "num_replicas": 1,
            "max_msgs_per_subject": 1,
            // Not `new` (what `nats kv add` sets): on a 2.9 server a bucket that discards
            // new messages keeps only the first value sourced for a key.
            "discard": "old",
            "allow_rollup_hdrs": true,
            "deny_delete": true,
        });
        if let Some(domain) = source_domain {
            config["sources"] = serde_json::json!([{
                "name": format!("KV_{bucket}"),
                "external": { "api": format!("$JS.{domain}.API"), "deliver": "" }
            }]);
        }
        self.create_stream(&config)
    }

    /// Creates a stream from its JSON config.
    pub fn create_stream(&self, config: &Value) -> Result<()> {
        let name = config["name"]
            .as_str()
            .context("stream config without a name")?;
        self.request(&format!("STREAM.CREATE.{name}"), config)?;
        Ok(())
    }

    /// Messages in stream `name`.
    pub fn stream_messages(&self, name: &str) -> Result<u64> {
        let info = self.request(&format!("STREAM.INFO.{name}"), &Value::Null)?;
        info["state"]["messages"]
            .as_u64()
            .context("stream info without state.messages")
    }

    /// Every message of stream `name`, by sequence.
    pub fn all_messages(&self, name: &str) -> Result<Vec<StoredMessage>> {
        let info = self.request(&format!("STREAM.INFO.{name}"), &Value::Null)?;
        let first = info["state"]["first_seq"].as_u64().unwrap_or(1);
        let last = info["state"]["last_seq"].as_u64().unwrap_or(0);
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = Vec::new();
        for seq in first..=last {
            let v = match self.request(
                &format!("STREAM.MSG.GET.{name}"),
                &serde_json::json!({ "seq": seq }),
            ) {
                Ok(v) => v,
                // A sequence deleted by the stream's limits.
                Err(e) if e.to_string().contains("no message found") => continue,
                Err(e) => return Err(e),
            };
            let m = &v["message"];
            let decode = |field: &str| -> Result<Vec<u8>> {
                Ok(match m[field].as_str() {
                    Some(s) => b64.decode(s)?,
                    None => Vec::new(),
                })
            };
            out.push(StoredMessage {
                seq,
                subject: m["subject"].as_str().unwrap_or_default().to_string(),
                headers: String::from_utf8_lossy(&decode("hdrs")?).into_owned(),
                data: decode("data")?,
            });
        }
        Ok(out)
    }
}

/// Messages a [`Peer`] received, as (subject, payload).
type Inbox = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A core NATS client on its own runtime, as the fleet: keeps every message on its
/// subscription and publishes on request.
#[derive(Debug)]
pub struct Peer {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    received: Inbox,
}

impl Peer {
    /// Connects to `url` and subscribes to `filter`.
    pub fn connect(url: &str, filter: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = rt
            .block_on(async_nats::connect(url))
            .with_context(|| format!("connect to {url}"))?;
        let mut sub = rt
            .block_on(client.subscribe(filter.to_string()))
            .with_context(|| format!("subscribe to {filter}"))?;
        rt.block_on(client.flush())?;
        let received: Inbox = Default::default();
        let sink = received.clone();
        rt.spawn(async move {
            use futures::StreamExt;
            while let Some(m) = sub.next().await {
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((m.subject.to_string(), m.payload.to_vec()));
            }
        });
        Ok(Self {
            rt,
            client,
            received,
        })
    }

    /// Publishes (core NATS) and flushes.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> Result<()> {
        self.rt.block_on(async {
            self.client
                .publish(subject.to_string(), payload.to_vec().into())
                .await?;
            self.client.flush().await?;
            Ok(())
        })
    }

    /// Everything received so far, as (subject, payload).
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until `f` holds for what was received; returns it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&[(String, Vec<u8>)]) -> bool,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if f(&got) {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({} messages received)",
                    got.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
