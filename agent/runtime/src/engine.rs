//! The one wasmtime `Engine` of the agent, sized for small devices.
//!
//! The pooling allocator reserves address space for every slot up front. wasmtime's default
//! (1000 slots of 4 GiB plus guards) cannot be reserved on a 39-bit Raspberry Pi kernel or
//! under a tight `ulimit -v`, so slots are sized from the agent's memory limit and the
//! instance count is configurable. If the pool still cannot be reserved, `auto` falls back to
//! on-demand allocation with the same small reservation.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use perch_core::config::{AgentConfig, Allocator};

/// Core instances a component may contain (its modules, adapters and shims).
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 20;
/// Linear memories a component may contain.
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 2;
/// Tables a component may contain.
pub const MAX_TABLES_PER_COMPONENT: u32 = 8;
/// Guard region after each linear memory. Memories are small and bounds-checked, so a large
/// guard buys nothing but address space.
pub const MEMORY_GUARD: u64 = 64 << 10;
/// Native stack a guest may use.
pub const MAX_WASM_STACK: usize = 512 << 10;
/// Fiber stack per running instance: the guest stack plus room for host calls.
pub const ASYNC_STACK: usize = 1 << 20;

/// Which allocator the engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorKind {
    Pooling,
    OnDemand,
}

impl AllocatorKind {
    /// `pooling` or `on-demand`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pooling => "pooling",
            Self::OnDemand => "on-demand",
        }
    }
}

/// Failure to create the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// the pooling allocator could not reserve its address space: {0}
    #[error(
        "the pooling allocator could not reserve {slots} instance slots of {slot_bytes} bytes: {message}; lower `runtime.pool-instances` or `limits.memory`, or set `runtime.allocator = \"auto\"`"
    )]
    Pool {
        slots: u32,
        slot_bytes: u64,
        message: String,
    },
    /// wasmtime rejected the engine configuration
    #[error("cannot create the WebAssembly engine: {0}")]
    Config(String),
}

fn base_config(cfg: &AgentConfig) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    c.max_wasm_stack(MAX_WASM_STACK);
    c.async_stack_size(ASYNC_STACK);
    c.memory_reservation(cfg.limits.memory.bytes());
    c.memory_guard_size(MEMORY_GUARD);
    c.memory_reservation_for_growth(0);
    c
}

/// Builds the engine for `cfg`, returning it with the allocator it uses.
pub fn build_engine(cfg: &AgentConfig) -> Result<(Engine, AllocatorKind), EngineError> {
    let on_demand =
        || Engine::new(&base_config(cfg)).map_err(|e| EngineError::Config(format!("{e:#}")));
    if cfg.runtime.allocator == Allocator::OnDemand {
        return Ok((on_demand()?, AllocatorKind::OnDemand));
    }
    let slots = cfg.runtime.pool_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(MAX_CORE_INSTANCES_PER_COMPONENT / 2))
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .total_memories(slots)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .total_tables(slots.saturating_mul(2))
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .total_stacks(slots)
        .max_memory_size(cfg.limits.memory.bytes() as usize)
        // `runtime.keep-resident`: reset the start of a slot given back in place rather
        // than decommitting it (see the config's docs for the trade).
        .linear_memory_keep_resident(cfg.runtime.keep_resident.bytes() as usize)
        .table_keep_resident(cfg.runtime.keep_resident.bytes() as usize);
    let mut c = base_config(cfg);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&c) {
        Ok(engine) => Ok((engine, AllocatorKind::Pooling)),
        Err(e) => {
            let err = EngineError::Pool {
                slots,
                slot_bytes: cfg.limits.memory.bytes() + MEMORY_GUARD,
                message: format!("{e:#}"),
            };
            if cfg.runtime.allocator == Allocator::Pooling {
                return Err(err);
            }
            tracing::warn!(error = %err, "falling back to on-demand instance allocation");
            Ok((on_demand()?, AllocatorKind::OnDemand))
        }
    }
}

struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        // Only `write` is used: the full digest is read in `engine_fingerprint`.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// A stable name for "artifacts this engine can load": wasmtime's hash of its version, the
/// target and every setting that affects compiled code. Precompiled artifacts are keyed by it.
pub fn engine_fingerprint(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    let digest = h.0.finalize();
    format!("wasmtime-{}", hex_prefix(&digest[..8]))
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A thread advancing the engine's epoch; invocation deadlines count its ticks.
#[derive(Debug)]
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    /// Starts ticking `engine` every `tick`.
    pub fn start(engine: &Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("perch-epoch".into())
            .stack_size(64 << 10)
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    e.increment_epoch();
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
