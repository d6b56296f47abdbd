//! The agent: the store, the runtime and the desired state, driven by [`Command`]s.
//!
//! Order of a change: validate, store the blob, compile and link, journal the new desired
//! state durably, then activate. A failure before the journal write leaves everything as it
//! was; a crash after it is recovered at the next boot from the journal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use perch_api::{ApiError, HttpGateway};
use perch_artifact::{PublicKey, TrustPolicy};
use perch_core::command::{
    AgentStatus, BlobInfo, BoxFuture, ComponentStatus, Deployed, DesiredInput, Health, LinkState,
    LogLine, OutboxStatus, Published, RevisionInfo, TelemetryRecord,
};
use perch_core::spec::Limits;
use perch_core::{
    AgentConfig, Command, CommandError, CommandHandler, ComponentSpec, DesiredState, Digest,
    ErrorKind, Grants, Manifest, Reply, Trigger,
};
use perch_runtime::{HttpError, LoadError, Loaded, Runtime, RuntimeError};
use perch_store::{SledOptions, SledStore, Store, StoreError};

/// Failure to start the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot move the damaged store at {path} aside: {source}")]
    SetAside {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("[signing] in the agent's config: {0}")]
    Signing(String),
    #[error("[sync] in the agent's config: {0}")]
    Sync(String),
}

/// The trust policy the config describes.
pub fn trust_policy(config: &AgentConfig) -> Result<TrustPolicy, String> {
    let parse = |keys: &[String]| -> Result<Vec<PublicKey>, String> {
        keys.iter().map(|k| k.parse::<PublicKey>()).collect()
    };
    Ok(TrustPolicy {
        trusted: parse(&config.signing.trusted_keys)?,
        revoked: parse(&config.signing.revoked_keys)?,
        allow_unsigned: config.signing.allow_unsigned,
    })
}

/// Fills what `spec` leaves to the component's manifest (triggers, limits, grants, config)
/// and checks that explicit grants only narrow the manifest's.
fn apply_manifest(spec: &mut ComponentSpec, manifest: Option<&Manifest>) -> Result<(), String> {
    let Some(m) = manifest else {
        // Without a manifest nothing vouches for any grant.
        match &spec.grants {
            Some(g) if !g.is_empty() => {
                return Err(format!(
                    "component `{}` has no embedded manifest, so it cannot be granted anything: build it with `perch build`",
                    spec.name
                ));
            }
            _ => spec.grants = Some(Grants::default()),
        }
        return Ok(());
    };
    if spec.triggers.is_empty() {
        spec.triggers = m.triggers.clone();
    }
    spec.limits.memory = spec.limits.memory.or(m.limits.memory);
    spec.limits.timeout = spec.limits.timeout.or(m.limits.timeout);
    spec.limits.instances = spec.limits.instances.or(m.limits.instances);
    spec.limits.calls_per_instance = spec
        .limits
        .calls_per_instance
        .or(m.limits.calls_per_instance);
    match &spec.grants {
        None => spec.grants = Some(m.grants.clone()),
        Some(g) => {
            let extra = g.beyond(&m.grants);
            if !extra.is_empty() {
                return Err(format!(
                    "component `{}`: grants may only narrow what its manifest grants; not in the manifest: {}",
                    spec.name,
                    extra.join(", ")
                ));
            }
        }
    }
    let mut config = m.config.clone();
    config.extend(std::mem::take(&mut spec.config));
    spec.config = config;
    Ok(())
}

/// Renames a damaged store directory to `<dir>.damaged-<unix seconds>` and returns the new path.
fn set_aside(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = dir.as_os_str().to_owned();
    name.push(format!(".damaged-{secs}"));
    let aside = std::path::PathBuf::from(name);
    std::fs::rename(dir, &aside)?;
    Ok(aside)
}

/// The agent.
pub struct Agent {
    config: AgentConfig,
    trust: TrustPolicy,
    store: Arc<dyn Store>,
    runtime: Arc<Runtime>,
    desired: tokio::sync::Mutex<DesiredState>,
    revision: AtomicU64,
    started: Instant,
    /// The link to the fleet, when `[sync]` is configured.
    sync: std::sync::OnceLock<perch_sync::Link>,
    /// The A/B slots this device booted from, or why it has none.
    slots: Result<crate::boot::Slots, String>,
    /// Set while a system update is written, and after it until the reboot: one at a time.
    updating: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

fn rejected(e: impl ToString) -> CommandError {
    CommandError::new(ErrorKind::Rejected, e.to_string())
}

fn internal(e: impl ToString) -> CommandError {
    CommandError::new(ErrorKind::Internal, e.to_string())
}

fn not_found(name: &str) -> CommandError {
    CommandError::new(ErrorKind::NotFound, format!("no component named `{name}`"))
}

fn store_error(e: StoreError) -> CommandError {
    match e {
        StoreError::DigestMismatch { .. } => rejected(e),
        other => internal(other),
    }
}

/// Reads this process's resident and virtual memory from `/proc/self/status`.
pub fn process_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmSize:"))
}

impl Agent {
    /// Opens the store, creates the runtime and starts the last accepted desired state from
    /// the local cache. Needs no network.
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, StartError> {
        let opts = SledOptions {
            cache_capacity: config.store_cache.bytes(),
            outbox_max_bytes: config.outbox.max_bytes.bytes(),
            outbox_max_age: Some(config.outbox.max_age),
            ..SledOptions::default()
        };
        let dir = &config.data_dir;
        let store = match SledStore::open(dir, &opts) {
            // A store sled cannot recover would stop the agent at every boot. Keep the damaged
            // files for inspection and start empty: the device comes up, reports itself and
            // can be redeployed (or re-synced) instead of crash-looping forever.
            Err(StoreError::Unrecoverable { reason, .. }) => {
                let aside = set_aside(dir).map_err(|source| StartError::SetAside {
                    path: dir.display().to_string(),
                    source,
                })?;
                tracing::error!(
                    %reason,
                    moved_to = %aside.display(),
                    "the store is damaged beyond recovery; moved it aside and starting empty"
                );
                SledStore::open(dir, &opts)
            }
            other => other,
        }
        .map_err(|source| StartError::Store {
            path: dir.display().to_string(),
            source,
        })?;
        Self::start_with_store(config, Arc::new(store)).await
    }

    /// Like [`Self::start`] with an already opened store.
    pub async fn start_with_store(
        config: AgentConfig,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, StartError> {
        let trust = trust_policy(&config).map_err(StartError::Signing)?;
        if trust.allow_unsigned {
            tracing::warn!(
                "unsigned components are accepted (`allow-unsigned` in [signing]): for development only"
            );
        }
        let runtime = Runtime::new(config.clone(), store.clone())?;
        // Artifacts compiled by another engine (an agent upgrade) can never load again.
        match store.prune_artifacts(runtime.fingerprint()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "removed precompiled artifacts of another engine"
            ),
            Err(e) => tracing::warn!(error = %e, "could not prune old precompiled artifacts"),
        }
        let desired = restore_desired(store.as_ref());
        let disk = perch_runtime::board::load(&config)
            .ok()
            .and_then(|b| b.image.disk);
        let slots = crate::boot::Slots::from_system(disk.as_deref()).map_err(|e| e.to_string());
        match &slots {
            Ok(s) => tracing::info!(slot = %s.booted, trial = s.trial, "booted from an A/B slot"),
            Err(reason) => tracing::debug!(%reason, "no A/B system updates"),
        }
        let agent = Arc::new(Self {
            slots,
            updating: std::sync::atomic::AtomicBool::new(false),
            config,
            trust,
            store,
            runtime,
            revision: AtomicU64::new(desired.revision),
            desired: tokio::sync::Mutex::new(desired.clone()),
            started: Instant::now(),
            sync: std::sync::OnceLock::new(),
        });
        for spec in desired.components {
            match agent.runtime.prepare(spec.clone()).await {
                Ok(loaded) => {
                    agent.runtime.activate(loaded);
                }
                Err(e) => agent.runtime.mark_failed(spec, &e),
            }
        }
        tracing::info!(
            revision = desired.revision,
            "desired state restored from the local store"
        );
        if desired.revision == 0
            && let Some(dir) = agent.config.preload_dir.clone()
        {
            agent.preload(&dir).await;
        }
        if let Some(sync_config) = &agent.config.sync {
            // A weak handle: the sync loop must not keep the agent alive.
            let device = Arc::new(SyncDevice(Arc::downgrade(&agent)));
            let sync = perch_sync::Link::start(sync_config, agent.store.clone(), device)
                .map_err(|e| StartError::Sync(e.to_string()))?;
            let _ = agent.sync.set(sync);
        }
        Ok(agent)
    }

    /// The reported state sent upstream: what runs, how healthy it is, and the backlog.
    pub fn reported(&self) -> serde_json::Value {
        let outbox = self.outbox_status();
        let components: Vec<serde_json::Value> = self
            .runtime
            .status()
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "digest": c.digest,
                    "state": c.state,
                    "failures": c.failures,
                    "last-error": c.last_error.map(|e| e.message),
                })
            })
            .collect();
        serde_json::json!({
            "device": self.config.sync.as_ref().map(|s| s.device.clone()),
            "agent-version": perch_core::VERSION,
            "board": self.config.board,
            "applied-revision": self.revision.load(Ordering::Relaxed),
            "uptime-ms": self.started.elapsed().as_millis() as u64,
            "outbox": outbox,
            "desired": self.sync.get().and_then(|s| s.state().status().desired),
            "components": components,
        })
    }

    /// The outbox's backlog and drops.
    pub fn outbox_status(&self) -> OutboxStatus {
        match self.store.outbox_stats() {
            Ok(s) => OutboxStatus {
                backlog: s.len,
                bytes: s.bytes,
                last_seq: s.last_seq,
                dropped: s.dropped,
                oldest_ms: s.oldest_ms,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox stats");
                OutboxStatus::default()
            }
        }
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The link to the fleet now, when `[sync]` is configured.
    pub fn sync_status(&self) -> Option<perch_core::command::SyncStatus> {
        self.sync.get().map(|s| s.state().status())
    }

    /// First boot of an image: deploys the components it ships (`<dir>/*.wasm`, each named
    /// after its file), in name order. One that is refused is logged and skipped; the
    /// others still run.
    async fn preload(&self, dir: &std::path::Path) {
        let mut files: Vec<std::path::PathBuf> = match std::fs::read_dir(dir) {
            Ok(d) => d
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect(),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no preloaded components");
                return;
            }
        };
        files.sort();
        for path in files {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read a preloaded component");
                    continue;
                }
            };
            match self
                .deploy(
                    Some(name.clone()),
                    bytes,
                    None,
                    Vec::new(),
                    Limits::default(),
                )
                .await
            {
                Ok(_) => tracing::info!(component = %name, "preloaded component deployed"),
                Err(e) => {
                    tracing::error!(component = %name, error = %e, "preloaded component refused")
                }
            }
        }
    }

    /// The A/B slots this device booted from, if it has them.
    pub fn slots(&self) -> Option<&crate::boot::Slots> {
        self.slots.as_ref().ok()
    }

    /// Writes a system image into the inactive slot, marks its trial boot and reboots
    /// into it (after the reply has gone out).
    async fn install_update(
        &self,
        bytes: Vec<u8>,
        expected: Option<Digest>,
    ) -> Result<Reply, CommandError> {
        let slots = self
            .slots
            .as_ref()
            .map_err(|reason| CommandError::from(crate::boot::BootError::NoSlots(reason.clone())))?
            .clone();
        if self.updating.swap(true, Ordering::AcqRel) {
            return Err(CommandError::new(
                ErrorKind::Conflict,
                "a system update is already being installed, or installed and waiting for its reboot",
            ));
        }
        let len = bytes.len() as u64;
        let digest = Digest::of(&bytes);
        let installed =
            tokio::task::spawn_blocking(move || slots.install(&bytes, expected.as_ref())).await;
        let slot = match installed {
            Ok(Ok(slot)) => slot,
            // Nothing was marked for the next boot: another update may try.
            Ok(Err(e)) => {
                self.updating.store(false, Ordering::Release);
                return Err(e.into());
            }
            Err(e) => {
                self.updating.store(false, Ordering::Release);
                return Err(internal(e));
            }
        };
        let (runtime, store) = (self.runtime.clone(), self.store.clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            tracing::info!("rebooting into the updated slot");
            runtime.stop_all();
            if let Err(e) = store.sync() {
                tracing::error!(error = %e, "store sync before the reboot failed");
            }
            crate::boot::reboot();
        });
        Ok(Reply::Update(perch_core::UpdateStarted {
            slot,
            digest,
            bytes: len,
            rebooting: true,
        }))
    }

    /// Stops all components and makes the store durable.
    pub fn shutdown(&self) {
        if let Some(sync) = self.sync.get() {
            sync.stop();
        }
        self.runtime.stop_all();
        if let Err(e) = self.store.sync() {
            tracing::error!(error = %e, "store sync at shutdown failed");
        }
    }

    /// Journals `next` durably and makes it current. Blobs that only the state pushed out of
    /// the journal's "previous" slot referenced are removed.
    async fn commit(
        &self,
        current: &mut DesiredState,
        next: DesiredState,
    ) -> Result<(), CommandError> {
        let pushed_out: Vec<Digest> = self
            .previous_state()
            .map(|p| p.components.iter().map(|c| c.digest).collect())
            .unwrap_or_default();
        let doc = serde_json::to_vec(&next).map_err(internal)?;
        self.store.commit_desired(&doc).map_err(store_error)?;
        self.revision.store(next.revision, Ordering::Relaxed);
        *current = next;
        self.collect_garbage(pushed_out, current);
        Ok(())
    }

    fn previous_state(&self) -> Option<DesiredState> {
        let journal = self.store.journal().ok()?;
        let entry = journal.previous.ok().flatten()?;
        serde_json::from_slice(&entry.doc).ok()
    }

    fn check_spec(&self, desired: &DesiredState) -> Result<(), CommandError> {
        let mut problems: Vec<String> =
            desired.validate().iter().map(ToString::to_string).collect();
        for c in &desired.components {
            if let Err(p) = self.runtime.check_limits(c) {
                problems.push(p);
            }
            if let Err(p) = self.runtime.check_grants(c) {
                problems.extend(p);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(
                CommandError::new(ErrorKind::BadRequest, "the desired state is not valid")
                    .with_details(problems),
            )
        }
    }

    /// Removes those of `candidates` that neither the current nor the previous desired state
    /// references. Only candidates: blobs uploaded for a desired state not applied yet stay.
    fn collect_garbage(&self, candidates: Vec<Digest>, current: &DesiredState) {
        let previous = self.previous_state();
        let keep: std::collections::HashSet<Digest> = current
            .components
            .iter()
            .chain(previous.iter().flat_map(|p| p.components.iter()))
            .map(|c| c.digest)
            .collect();
        for digest in candidates {
            if !keep.contains(&digest)
                && let Err(e) = self.store.remove_blob(&digest)
            {
                tracing::warn!(%digest, error = %e, "could not remove an unused blob");
            }
        }
    }

    /// Checks an artifact's signature against the trust policy and reads its manifest.
    fn open_artifact(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<(Option<PublicKey>, Option<Manifest>), CommandError> {
        perch_runtime::component::check_header(name, bytes).map_err(rejected)?;
        let signer = perch_artifact::verify(bytes, &self.trust)
            .map_err(|e| rejected(format!("component `{name}` refused: {e}")))?;
        let manifest = perch_artifact::manifest(bytes)
            .map_err(|e| rejected(format!("component `{name}`: {e}")))?;
        Ok((signer, manifest))
    }

    #[tracing::instrument(name = "agent.deploy", skip_all, fields(component = tracing::field::Empty, bytes = bytes.len()))]
    async fn deploy(
        &self,
        name: Option<String>,
        bytes: Vec<u8>,
        expected: Option<Digest>,
        triggers: Vec<Trigger>,
        limits: Limits,
    ) -> Result<Reply, CommandError> {
        let mut current = self.desired.lock().await;
        let digest = Digest::of(&bytes);
        // For messages only: the name given, else the (not yet verified) manifest's.
        let shown = name
            .clone()
            .or_else(|| {
                perch_artifact::manifest(&bytes)
                    .ok()
                    .flatten()
                    .map(|m| m.name)
            })
            .unwrap_or_else(|| "(unnamed)".into());
        tracing::Span::current().record("component", shown.as_str());
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(rejected(format!(
                "digest mismatch for component `{shown}`: expected {expected}, but the uploaded bytes hash to {digest}"
            )));
        }
        let (signer, manifest) = self.open_artifact(&shown, &bytes)?;
        let name = match (name, &manifest) {
            (Some(n), _) => n,
            (None, Some(m)) => m.name.clone(),
            (None, None) => {
                return Err(CommandError::new(
                    ErrorKind::BadRequest,
                    "the component has no embedded manifest to take its name from: deploy it with PUT /v1/components/{name}",
                ));
            }
        };
        let mut spec = ComponentSpec {
            name: name.clone(),
            digest,
            source: None,
            triggers,
            limits,
            grants: None,
            config: Default::default(),
            signer: signer.map(|k| k.to_string()),
        };
        apply_manifest(&mut spec, manifest.as_ref()).map_err(rejected)?;
        let next = current.with_component(spec.clone());
        self.check_spec(&next)?;
        let existed = self.store.has_blob(&digest).map_err(store_error)?;
        self.store
            .put_blob(&bytes, Some(&digest))
            .map_err(store_error)?;
        drop(bytes);
        let loaded = match self.runtime.prepare(spec).await {
            Ok(l) => l,
            Err(e) => {
                if !existed {
                    self.collect_garbage(vec![digest], &current);
                }
                return Err(rejected(e));
            }
        };
        self.commit(&mut current, next).await?;
        let revision = current.revision;
        let running = self.runtime.activate(loaded);
        drop(current);
        let component = self
            .component_status(running.name())
            .ok_or_else(|| not_found(&name))?;
        crate::memory::trim();
        crate::memory::settle_later();
        tracing::info!(component = %name, revision, "component deployed");
        Ok(Reply::Deployed(Box::new(Deployed {
            revision,
            component,
        })))
    }

    #[tracing::instrument(name = "agent.apply", skip_all, fields(revision = ?input.revision))]
    async fn apply(&self, input: DesiredInput) -> Result<Reply, CommandError> {
        let mut current = self.desired.lock().await;
        let revision = match input.revision {
            Some(r) if r <= current.revision => {
                return Err(CommandError::new(
                    ErrorKind::Conflict,
                    format!(
                        "revision {r} is not newer than the current revision {}",
                        current.revision
                    ),
                ));
            }
            Some(r) => r,
            None => current.revision + 1,
        };
        let mut missing = Vec::new();
        let mut refused = Vec::new();
        let mut components = Vec::with_capacity(input.components.len());
        for mut c in input.components {
            let bytes = match self.store.get_blob(&c.digest) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    missing.push(format!(
                        "component `{}`: blob {} is not in the cache; upload it with PUT /v1/blobs",
                        c.name, c.digest
                    ));
                    continue;
                }
                Err(e) => {
                    refused.push(format!("component `{}`: {e}", c.name));
                    continue;
                }
            };
            match self.open_artifact(&c.name, &bytes) {
                Ok((signer, manifest)) => {
                    c.signer = signer.map(|k| k.to_string());
                    if let Err(e) = apply_manifest(&mut c, manifest.as_ref()) {
                        refused.push(e);
                    }
                }
                Err(e) => refused.push(e.message),
            }
            components.push(c);
        }
        if !refused.is_empty() {
            return Err(CommandError::new(
                ErrorKind::Rejected,
                "some components of the desired state are refused",
            )
            .with_details(refused));
        }
        let next = DesiredState {
            revision,
            components,
        };
        if missing.is_empty() {
            self.check_spec(&next)?;
        }
        if !missing.is_empty() {
            return Err(CommandError::new(
                ErrorKind::Rejected,
                "the desired state names blobs this agent does not have",
            )
            .with_details(missing));
        }
        // Compile and link everything that changed before committing, so a bad component
        // leaves the running set untouched.
        let running = self.runtime.specs();
        let mut prepared: Vec<Loaded> = Vec::new();
        let mut problems: Vec<LoadError> = Vec::new();
        for c in &next.components {
            if running.get(&c.name) == Some(c) && self.runtime.get(&c.name).is_some() {
                continue;
            }
            match self.runtime.prepare(c.clone()).await {
                Ok(l) => prepared.push(l),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(CommandError::new(
                ErrorKind::Rejected,
                "some components cannot run on this agent",
            )
            .with_details(problems));
        }
        self.commit(&mut current, next).await?;
        for name in running.keys() {
            if current.get(name).is_none() {
                self.runtime.remove(name);
            }
        }
        for l in prepared {
            self.runtime.activate(l);
        }
        tracing::info!(revision, "desired state applied");
        Ok(Reply::Revision(RevisionInfo { revision }))
    }

    #[tracing::instrument(name = "agent.remove", skip(self))]
    async fn remove(&self, name: &str) -> Result<Reply, CommandError> {
        let mut current = self.desired.lock().await;
        let next = current
            .without_component(name)
            .ok_or_else(|| not_found(name))?;
        self.commit(&mut current, next).await?;
        self.runtime.remove(name);
        Ok(Reply::Revision(RevisionInfo {
            revision: current.revision,
        }))
    }

    fn component_status(&self, name: &str) -> Option<ComponentStatus> {
        self.runtime.status().into_iter().find(|c| c.name == name)
    }

    /// Agent status.
    pub fn status(&self) -> AgentStatus {
        let (rss_bytes, vm_bytes) = process_memory();
        AgentStatus {
            version: perch_core::VERSION.to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            board: self.config.board.clone(),
            revision: self.revision.load(Ordering::Relaxed),
            allocator: self.runtime.allocator().as_str().to_string(),
            rss_bytes,
            vm_bytes,
            store_bytes: self.store.size_on_disk().unwrap_or(0),
            hardware_missing: self.runtime.board().missing(),
            outbox: self.outbox_status(),
            sync: self.sync_status(),
            boot: self.slots.as_ref().ok().map(|s| s.status()),
            components: self.runtime.status(),
        }
    }

    fn logs(&self, name: &str, limit: usize) -> Result<Vec<LogLine>, CommandError> {
        self.runtime
            .logs(name, limit)
            .ok_or_else(|| not_found(name))
    }

    /// Prometheus text exposition of the agent's metrics.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let s = self.status();
        let m = self.runtime.metrics();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        gauge(
            "perch_uptime_seconds",
            "Seconds since the agent started.",
            "gauge",
            vec![(String::new(), s.uptime_ms / 1000)],
        );
        gauge(
            "perch_desired_revision",
            "Revision of the desired state being run.",
            "gauge",
            vec![(String::new(), s.revision)],
        );
        gauge(
            "perch_process_resident_bytes",
            "Resident memory of the agent.",
            "gauge",
            vec![(String::new(), s.rss_bytes)],
        );
        gauge(
            "perch_process_virtual_bytes",
            "Address space of the agent.",
            "gauge",
            vec![(String::new(), s.vm_bytes)],
        );
        gauge(
            "perch_store_bytes",
            "Bytes the store occupies on disk.",
            "gauge",
            vec![(String::new(), s.store_bytes)],
        );
        gauge(
            "perch_outbox_records",
            "Telemetry records waiting in the outbox.",
            "gauge",
            vec![(String::new(), s.outbox.backlog)],
        );
        gauge(
            "perch_outbox_bytes",
            "Bytes of telemetry waiting in the outbox.",
            "gauge",
            vec![(String::new(), s.outbox.bytes)],
        );
        gauge(
            "perch_outbox_dropped_total",
            "Telemetry records dropped by the outbox bounds (oldest first).",
            "counter",
            vec![(String::new(), s.outbox.dropped)],
        );
        if let Some(sync) = &s.sync {
            let label = format!("{{transport=\"{}\"}}", sync.transport);
            gauge(
                "perch_sync_connected",
                "1 while the link to the fleet is up.",
                "gauge",
                vec![(label.clone(), u64::from(sync.link == LinkState::Connected))],
            );
            gauge(
                "perch_sync_sent_total",
                "Outbox records the broker acknowledged since the agent started.",
                "counter",
                vec![(label.clone(), sync.sent)],
            );
            gauge(
                "perch_sync_connects_total",
                "Connections to the broker since the agent started.",
                "counter",
                vec![(label.clone(), sync.connects)],
            );
            gauge(
                "perch_sync_last_ack_timestamp_ms",
                "When the broker last acknowledged outbox records (Unix ms, 0: never).",
                "gauge",
                vec![(label.clone(), sync.last_sync_ms.unwrap_or(0))],
            );
            gauge(
                "perch_sync_artifacts_fetched_total",
                "Component artifacts fetched from the fleet since the agent started.",
                "counter",
                vec![(label.clone(), sync.artifacts_fetched)],
            );
            gauge(
                "perch_sync_artifact_bytes_total",
                "Bytes of the component artifacts fetched from the fleet.",
                "counter",
                vec![(label.clone(), sync.artifact_bytes)],
            );
            gauge(
                "perch_sync_commands_total",
                "Commands from the fleet answered since the agent started.",
                "counter",
                vec![(label.clone(), sync.commands)],
            );
            gauge(
                "perch_sync_messages_in_total",
                "Messages from the fleet handed to the local bus.",
                "counter",
                vec![(label.clone(), sync.messages_in)],
            );
            gauge(
                "perch_sync_messages_out_total",
                "Local-bus messages sent to the fleet.",
                "counter",
                vec![(label.clone(), sync.messages_out)],
            );
            gauge(
                "perch_sync_messages_dropped_total",
                "Local-bus messages for the fleet dropped (link down or send failed).",
                "counter",
                vec![(label, sync.messages_dropped)],
            );
        }
        gauge(
            "perch_bus_published_total",
            "Messages published on the local bus.",
            "counter",
            vec![(String::new(), m.messages_published)],
        );
        gauge(
            "perch_bus_dropped_total",
            "Messages dropped because a subscriber queue was full.",
            "counter",
            vec![(String::new(), m.messages_dropped)],
        );
        let per = |f: &dyn Fn(&ComponentStatus) -> u64| {
            s.components
                .iter()
                .map(|c| (format!("{{component=\"{}\"}}", c.name), f(c)))
                .collect::<Vec<_>>()
        };
        gauge(
            "perch_component_invocations_total",
            "Completed invocations.",
            "counter",
            per(&|c| c.invocations),
        );
        gauge(
            "perch_component_failures_total",
            "Invocations that trapped, timed out, ran out of memory or returned an error.",
            "counter",
            per(&|c| c.failures),
        );
        gauge(
            "perch_component_skipped_total",
            "Invocations skipped while backing off or at the instance limit.",
            "counter",
            per(&|c| c.skipped),
        );
        gauge(
            "perch_component_denied_total",
            "Calls denied because the component has no grant for the resource.",
            "counter",
            per(&|c| c.denied),
        );
        gauge(
            "perch_component_memory_peak_bytes",
            "Largest linear memory of any instance.",
            "gauge",
            per(&|c| c.memory_peak_bytes),
        );
        gauge(
            "perch_component_live_instances",
            "Instances alive now.",
            "gauge",
            per(&|c| u64::from(c.live_instances)),
        );
        let states = s
            .components
            .iter()
            .map(|c| {
                (
                    format!(
                        "{{component=\"{}\",state=\"{}\"}}",
                        c.name,
                        c.state.as_str()
                    ),
                    1,
                )
            })
            .collect();
        gauge(
            "perch_component_state",
            "Component lifecycle state (1 for the current state).",
            "gauge",
            states,
        );
        out
    }
}

/// Loads the journaled desired state, falling back to the previous revision if the current
/// one is unreadable. Never fails: an empty state is a valid start.
/// The name the fleet publishes under on the local bus (no component can have it: names
/// start with a letter).
const FLEET: &str = "$fleet";
/// Local-bus messages waiting to be sent to the fleet; more are dropped and counted
/// (`perch_bus_dropped_total`).
const FORWARD_QUEUE: usize = 4096;

/// The agent as the sync link sees it.
struct SyncDevice(std::sync::Weak<Agent>);

impl SyncDevice {
    fn agent(&self) -> Result<Arc<Agent>, CommandError> {
        self.0
            .upgrade()
            .ok_or_else(|| CommandError::new(ErrorKind::Unavailable, "the agent is shutting down"))
    }
}

impl perch_sync::Device for SyncDevice {
    fn reported(&self) -> serde_json::Value {
        self.0
            .upgrade()
            .map_or(serde_json::Value::Null, |a| a.reported())
    }

    fn applied_revision(&self) -> u64 {
        self.0
            .upgrade()
            .map_or(0, |a| a.revision.load(Ordering::Relaxed))
    }

    fn apply(&self, input: DesiredInput) -> BoxFuture<'static, Result<(), CommandError>> {
        let agent = self.agent();
        Box::pin(async move { agent?.apply(input).await.map(drop) })
    }

    fn admit(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let agent = self.agent().map_err(|e| e.message)?;
        agent
            .open_artifact(name, bytes)
            .map(drop)
            .map_err(|e| e.message)
    }

    fn deliver(&self, message: perch_sync::BusMessage) -> BoxFuture<'static, ()> {
        let agent = self.0.upgrade();
        Box::pin(async move {
            if let Some(agent) = agent {
                agent
                    .runtime
                    .bus()
                    .publish_wait(&message.subject, message.payload, Some(FLEET))
                    .await;
            }
        })
    }

    fn outgoing(&self) -> Option<futures::stream::BoxStream<'static, perch_sync::BusMessage>> {
        let agent = self.0.upgrade()?;
        let patterns = &agent.config.sync.as_ref()?.forward;
        if patterns.is_empty() {
            return None;
        }
        // Subscribed as the fleet, so messages that came from the fleet do not go back up.
        let (_, rx) = agent
            .runtime
            .bus()
            .subscribe_any(FLEET, patterns, FORWARD_QUEUE);
        use futures::StreamExt as _;
        Some(
            perch_sync::receiver_stream(rx)
                .map(|m| perch_sync::BusMessage {
                    subject: m.subject,
                    payload: m.payload,
                })
                .boxed(),
        )
    }

    fn command(
        &self,
        op: String,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<serde_json::Value, CommandError>> {
        let agent = self.agent();
        Box::pin(async move {
            let agent = agent?;
            let command = Command::remote(&op, &body)?;
            let reply = agent.handle(command).await?;
            Ok(match reply {
                // Metrics are text; everything else is JSON already.
                Reply::Metrics(text) => serde_json::Value::String(text),
                other => serde_json::to_value(other).map_err(internal)?,
            })
        })
    }
}

fn restore_desired(store: &dyn Store) -> DesiredState {
    let journal = match store.journal() {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the desired-state journal; starting with no components");
            return DesiredState::default();
        }
    };
    let parse =
        |entry: &Result<Option<perch_store::JournalEntry>, StoreError>, which: &str| match entry {
            Ok(Some(e)) => match serde_json::from_slice::<DesiredState>(&e.doc) {
                Ok(d) => Some(d),
                Err(err) => {
                    tracing::error!(which, error = %err, "journaled desired state is unreadable");
                    None
                }
            },
            Ok(None) => None,
            Err(err) => {
                tracing::error!(which, error = %err, "journaled desired state is corrupt");
                None
            }
        };
    if let Some(d) = parse(&journal.current, "current") {
        return d;
    }
    if let Some(d) = parse(&journal.previous, "previous") {
        tracing::warn!(revision = d.revision, "running the previous desired state");
        return d;
    }
    DesiredState::default()
}

impl CommandHandler for Agent {
    fn handle(&self, command: Command) -> BoxFuture<'_, Result<Reply, CommandError>> {
        Box::pin(async move {
            match command {
                Command::Health => Ok(Reply::Health(Health {
                    status: "ok".into(),
                    version: perch_core::VERSION.into(),
                })),
                Command::Status => Ok(Reply::Status(Box::new(self.status()))),
                Command::ListComponents => Ok(Reply::Components(self.runtime.status())),
                Command::GetComponent { name } => self
                    .component_status(&name)
                    .map(|c| Reply::Component(Box::new(c)))
                    .ok_or_else(|| not_found(&name)),
                Command::DeployComponent {
                    name,
                    bytes,
                    expected_digest,
                    triggers,
                    limits,
                } => {
                    self.deploy(name, bytes, expected_digest, triggers, limits)
                        .await
                }
                Command::PutBlob {
                    bytes,
                    expected_digest,
                } => {
                    let digest = self
                        .store
                        .put_blob(&bytes, expected_digest.as_ref())
                        .map_err(store_error)?;
                    Ok(Reply::Blob(BlobInfo {
                        digest,
                        size: bytes.len() as u64,
                    }))
                }
                Command::ApplyDesired(input) => self.apply(input).await,
                Command::GetDesired => Ok(Reply::Desired(self.desired.lock().await.clone())),
                Command::RemoveComponent { name } => self.remove(&name).await,
                Command::Logs { name, limit } => self.logs(&name, limit).map(Reply::Logs),
                Command::Metrics => Ok(Reply::Metrics(self.metrics())),
                Command::SetGpioInput { line, high } => {
                    use perch_runtime::board::HwError;
                    match self.runtime.board().set_input(&line, high) {
                        Ok(()) => Ok(Reply::Gpio(perch_core::command::GpioLevel { line, high })),
                        Err(e @ HwError::Unknown { .. }) => {
                            Err(CommandError::new(ErrorKind::NotFound, e.to_string()))
                        }
                        Err(e) => Err(rejected(e)),
                    }
                }
                Command::Telemetry { limit } => {
                    let records = self
                        .store
                        .outbox_recent(limit)
                        .map_err(store_error)?
                        .into_iter()
                        .map(|(seq, r)| TelemetryRecord {
                            seq,
                            component: r.component,
                            stream: r.stream,
                            timestamp_ms: r.timestamp_ms,
                            payload: String::from_utf8_lossy(&r.payload).into_owned(),
                        })
                        .collect();
                    Ok(Reply::Telemetry(records))
                }
                Command::Publish { subject, payload } => {
                    let delivered = self.runtime.publish(&subject, Bytes::from(payload));
                    Ok(Reply::Published(Published { delivered }))
                }
                Command::InstallUpdate {
                    bytes,
                    expected_digest,
                } => self.install_update(bytes, expected_digest).await,
            }
        })
    }
}

impl HttpGateway for Agent {
    fn serve(&self, req: Request) -> BoxFuture<'_, Response> {
        Box::pin(async move {
            match self.runtime.serve_http(req).await {
                Ok(resp) => resp.map(Body::new),
                Err(e) => {
                    let kind = match &e {
                        HttpError::NoRoute(_) => ErrorKind::NotFound,
                        HttpError::Unavailable { .. } => ErrorKind::Unavailable,
                        HttpError::Failed { .. } => ErrorKind::Internal,
                    };
                    let mut resp = ApiError(CommandError::new(kind, e.to_string())).into_response();
                    if let HttpError::Unavailable {
                        retry_after: Some(d),
                        ..
                    } = &e
                        && let Ok(v) = HeaderValue::from_str(&d.as_secs().max(1).to_string())
                    {
                        resp.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    if resp.status() == StatusCode::OK {
                        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    resp
                }
            }
        })
    }
}
