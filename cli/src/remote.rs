//! Talking to an agent's local API: deploy, status, logs.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::Failure;
use crate::shell::{Progress, Shell, human_bytes, state, table};

/// An agent's API at `base` (`http://HOST:PORT`).
#[derive(Debug)]
pub struct Device {
    base: String,
    http: reqwest::blocking::Client,
}

impl Device {
    /// A client for the agent at `url`.
    pub fn new(url: &str) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Failure::msg(format!(
                "`{url}` is not an agent address: write http://HOST:PORT, e.g. http://127.0.0.1:7070"
            )));
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .build()
            .context("creating the HTTP client")?;
        Ok(Self { base, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Turns a response into its JSON body, or a [`Failure`] with the agent's error message.
    fn json(&self, resp: reqwest::Result<reqwest::blocking::Response>) -> Result<Value> {
        let resp = resp.map_err(|e| {
            Failure::msg(format!(
                "cannot reach the agent at {}: {}",
                self.base,
                root_cause(&e)
            ))
        })?;
        let status = resp.status();
        let text = resp.text().context("reading the agent's reply")?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the agent answered {status}"));
        let details = body["error"]["details"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Err(Failure { message, details }.into())
    }

    /// Uploads an artifact; the agent names it from its manifest.
    pub fn deploy(&self, shell: &Shell, bytes: Vec<u8>) -> Result<Value> {
        let total = bytes.len() as u64;
        let reader = ProgressReader {
            inner: std::io::Cursor::new(bytes),
            progress: Progress::new(shell, "Uploading", total),
        };
        let body = reqwest::blocking::Body::sized(reader, total);
        let resp = self
            .http
            .post(self.url("/v1/components"))
            .header("content-type", "application/wasm")
            .body(body)
            .send();
        self.json(resp)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Value> {
        self.json(self.http.get(self.url("/v1/status")).send())
    }

    /// `GET /v1/components/{name}/logs?limit=N`.
    pub fn logs(&self, name: &str, limit: usize) -> Result<Value> {
        self.json(
            self.http
                .get(self.url(&format!("/v1/components/{name}/logs?limit={limit}")))
                .send(),
        )
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Counts bytes as reqwest reads the body, drawing the progress bar.
struct ProgressReader {
    inner: std::io::Cursor<Vec<u8>>,
    progress: Progress,
}

impl Read for ProgressReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Small reads keep the bar moving on slow links.
        let cap = buf.len().min(64 << 10);
        let n = self.inner.read(&mut buf[..cap])?;
        if n == 0 {
            self.progress.finish();
        } else {
            self.progress.advance(n as u64);
        }
        Ok(n)
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `every 5s, http /x` from the status JSON's trigger list.
pub fn triggers(v: &Value) -> String {
    v.as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t.as_object())
                .flat_map(|o| o.iter().map(|(k, v)| format!("{k} {}", text(v))))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Prints one component status as a few readable lines.
pub fn print_component(c: &Value) {
    anstream::println!(
        "{} {} ({})",
        crate::shell::bold(&text(&c["name"])),
        state(&text(&c["state"])),
        text(&c["digest"])
    );
    anstream::println!("  triggers: {}", triggers(&c["triggers"]));
    if let Some(g) = c["grants"].as_object().filter(|g| !g.is_empty()) {
        anstream::println!("  grants:   {}", Value::Object(g.clone()));
    }
    anstream::println!("  signer:   {}", c["signer"].as_str().unwrap_or("unsigned"));
    if let Some(e) = c["last-error"]["message"].as_str() {
        anstream::println!("  last error: {e}");
    }
}

/// Prints the agent status as a header and a component table.
pub fn print_status(s: &Value) {
    anstream::println!(
        "perchd {} on board {}: revision {}, up {}s, {} resident, {} allocator",
        text(&s["version"]),
        text(&s["board"]),
        text(&s["revision"]),
        s["uptime-ms"].as_u64().unwrap_or(0) / 1000,
        human_bytes(s["rss-bytes"].as_u64().unwrap_or(0)),
        text(&s["allocator"]),
    );
    for missing in s["hardware-missing"].as_array().into_iter().flatten() {
        anstream::println!("  missing hardware: {}", text(missing));
    }
    let rows: Vec<Vec<String>> = s["components"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                text(&c["name"]),
                state(&text(&c["state"])),
                triggers(&c["triggers"]),
                text(&c["invocations"]),
                text(&c["failures"]),
                text(&c["denied"]),
                human_bytes(c["memory-peak-bytes"].as_u64().unwrap_or(0)),
                c["signer"]
                    .as_str()
                    .map_or_else(|| "unsigned".into(), short_key),
            ]
        })
        .collect();
    if rows.is_empty() {
        anstream::println!("no components deployed");
        return;
    }
    table(
        &[
            "NAME", "STATE", "TRIGGERS", "CALLS", "FAILED", "DENIED", "MEMORY", "SIGNER",
        ],
        &rows,
    );
}

fn short_key(k: &str) -> String {
    k.parse::<perch_artifact::PublicKey>()
        .map_or_else(|_| k.to_string(), |p| p.id())
}

/// Prints one log line as `time level source message`.
pub fn print_log_line(l: &Value) {
    let at = l["at-ms"].as_u64().unwrap_or(0);
    let secs = at / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    anstream::println!(
        "{h:02}:{m:02}:{s:02}.{:03} {:>5} {:>6}  {}",
        at % 1000,
        text(&l["level"]).to_uppercase(),
        text(&l["source"]),
        text(&l["message"])
    );
}
