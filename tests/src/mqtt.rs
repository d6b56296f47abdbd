//! Real `mosquitto` brokers for the MQTT sync tests, on free loopback ports, each with its
//! config, log and persistence file in a directory of the test, so that a broker can be
//! killed with SIGKILL and started again with what it had saved. Also [`Receiver`], an
//! MQTT v5 client with a persistent session (the fleet side of a test), collecting what
//! arrives on its subscriptions and publishing the fleet's messages.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use crate::free_port;

/// The broker binary: `$MOSQUITTO_BIN`, Debian's `/usr/sbin/mosquitto`, or `mosquitto` on
/// the PATH.
pub fn mosquitto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOSQUITTO_BIN") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/sbin/mosquitto");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("mosquitto")
    }
}

/// A mosquitto process; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    /// Listener port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// A broker with persistence in `dir`, saved after every change (subscription, retained
    /// or queued message) so that a SIGKILL loses as little as mosquitto allows, and no
    /// bound on the messages queued for a disconnected persistent session (the default is
    /// 1000). `extra` is appended to the config (an `acl_file` line, say).
    pub fn start(dir: &Path, extra: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let config = dir.join("mosquitto.conf");
        let body = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             # stay root when started as root, so the test's temp dir stays writable\n\
             user root\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_on_changes true\n\
             autosave_interval 1\n\
             max_queued_messages 0\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             {extra}\n",
            dir.display()
        );
        std::fs::write(&config, body)?;
        let mut m = Self {
            port,
            dir: dir.to_path_buf(),
            config,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        m.restart()?;
        Ok(m)
    }

    /// `mqtt://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The directory holding the config, log and persistence file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the broker (again) with its config and saved state, and waits until it
    /// accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("mosquitto on port {} is already running", self.port);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let bin = mosquitto_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} (Debian package mosquitto)", bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("mosquitto exited with {status}; log:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "mosquitto did not listen on {}; log:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGHUP: mosquitto reloads its ACL and password files.
    pub fn reload(&self) -> Result<()> {
        self.signal("HUP")
    }

    /// SIGSTOP: the broker stops answering but its connections stay open, like a broker
    /// behind a dead network path.
    pub fn freeze(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT after [`Mosquitto::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> Result<()> {
        let child = self.child.as_ref().context("mosquitto is not running")?;
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{name} {} failed", child.id());
        }
        Ok(())
    }

    /// SIGKILL: the broker is gone as if its machine lost power.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The broker's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // A frozen process dies of SIGKILL too.
        self.kill();
    }
}

/// One message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub dup: bool,
    pub user_properties: Vec<(String, String)>,
    pub correlation: Option<Vec<u8>>,
}

impl Received {
    /// The value of user property `name`, if present.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Debug, Default)]
struct Shared {
    messages: Vec<Received>,
    pubacks: u64,
    connacks: u64,
    last_error: Option<String>,
}

/// An MQTT v5 client on its own runtime: a persistent session (clean start off, a day of
/// session expiry), QoS 1 subscriptions made again on every connect, every message kept.
/// rumqttc reconnects it on its own when the broker comes back.
#[derive(Debug)]
pub struct Receiver {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
}

impl Receiver {
    /// Connects to the broker on `port` as `client_id` (with `user` as its user name, if
    /// given), subscribes to `filters` and waits for the first CONNACK.
    pub fn connect(
        port: u16,
        client_id: &str,
        user: Option<&str>,
        filters: &[&str],
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(24 * 3600))
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(Some(4 << 20));
        if let Some(u) = user {
            options.set_credentials(u, "");
        }
        let (client, mut events) = AsyncClient::new(options, 64);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        {
            let shared = shared.clone();
            let client = client.clone();
            rt.spawn(async move {
                loop {
                    let event = events.poll().await;
                    if let Err(e) = &event {
                        shared
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .last_error = Some(e.to_string());
                        // The next poll reconnects.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            s.connacks += 1;
                            for f in &filters {
                                let _ = client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            s.messages.push(Received {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                dup: p.dup,
                                correlation: p
                                    .properties
                                    .as_ref()
                                    .and_then(|p| p.correlation_data.as_ref())
                                    .map(|c| c.to_vec()),
                                user_properties: p
                                    .properties
                                    .map(|p| p.user_properties)
                                    .unwrap_or_default(),
                            });
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => s.pubacks += 1,
                        Ok(_) | Err(_) => {}
                    }
                }
            });
        }
        let r = Self { rt, client, shared };
        r.wait(Duration::from_secs(10), "the receiver's CONNACK", |s| {
            s.connacks > 0
        })?;
        // The SUBACKs follow; nothing waits for them but a short pause.
        std::thread::sleep(Duration::from_millis(200));
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait(&self, timeout: Duration, what: &str, f: impl Fn(&Shared) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let s = self.lock();
                if f(&s) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "timed out after {timeout:?} waiting for {what} (last error: {:?})",
                        s.last_error
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Publishes with QoS 1 and waits for the broker's PUBACK.
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> Result<()> {
        let before = self.lock().pubacks;
        self.rt
            .block_on(
                self.client
                    .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()),
            )
            .with_context(|| format!("publish to {topic}"))?;
        self.wait(Duration::from_secs(10), "a PUBACK", |s| s.pubacks > before)
    }

    /// Publishes a command the MQTT 5 way: QoS 1, with a response topic, correlation
    /// data and a `perch-cmd-id` user property; waits for the broker's PUBACK.
    pub fn request(
        &self,
        topic: &str,
        payload: &[u8],
        response_topic: &str,
        correlation: &[u8],
        id: &str,
    ) -> Result<()> {
        let before = self.lock().pubacks;
        let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: Some(response_topic.to_string()),
            correlation_data: Some(correlation.to_vec().into()),
            user_properties: vec![("perch-cmd-id".to_string(), id.to_string())],
            ..Default::default()
        };
        self.rt
            .block_on(self.client.publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
                properties,
            ))
            .with_context(|| format!("publish to {topic}"))?;
        self.wait(Duration::from_secs(10), "a PUBACK", |s| s.pubacks > before)
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.lock().messages.clone()
    }

    /// The last message received on `topic`.
    pub fn last_on(&self, topic: &str) -> Option<Received> {
        self.lock()
            .messages
            .iter()
            .rev()
            .find(|m| m.topic == topic)
            .cloned()
    }

    /// Waits until `f` holds for the messages received so far; returns them. `f` sees a
    /// copy, so it may call the receiver's methods.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&[Received]) -> bool,
    ) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if f(&messages) {
                return Ok(messages);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({} messages received; last error: {:?})",
                    messages.len(),
                    self.lock().last_error
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// CONNACKs so far (1 + reconnections).
    pub fn connects(&self) -> u64 {
        self.lock().connacks
    }
}
