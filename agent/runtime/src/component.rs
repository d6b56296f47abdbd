//! Turning stored bytes into something runnable: header checks, compile or deserialize from
//! the precompiled cache, linking against the host, and finding the trigger exports.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::Engine;
use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use perch_core::{ComponentSpec, Digest, Trigger};
use perch_store::{Store, StoreError};

use crate::host::Host;

/// Version of the `perch:device` package components export.
pub const PERCH_DEVICE_VERSION: &str = "0.1.0";

/// Why a component could not be loaded. Every message names the component.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// the file is not WebAssembly
    #[error(
        "component `{component}` is not a WebAssembly binary: it does not start with the `\\0asm` magic bytes"
    )]
    NotWasm { component: String },
    /// a core module, not a component
    #[error(
        "component `{component}` is a core WebAssembly module, not a component: build it for `wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { component: String },
    /// an unsupported binary version
    #[error("component `{component}` has an unsupported WebAssembly version/layer {version:02x?}")]
    UnknownVersion { component: String, version: [u8; 4] },
    /// wasmtime could not compile it
    #[error("component `{component}` is not a valid component: {message}")]
    Invalid { component: String, message: String },
    /// an import the host does not provide, or a type mismatch
    #[error("component `{component}` cannot be linked: {message}")]
    Link { component: String, message: String },
    /// a trigger whose export is missing
    #[error("component `{component}` has a `{trigger}` trigger but does not export `{export}`")]
    MissingExport {
        component: String,
        trigger: &'static str,
        export: String,
    },
    /// the blob is not in the cache
    #[error("component `{component}`: blob {digest} is not in the local cache; deploy it again")]
    BlobMissing { component: String, digest: Digest },
    /// the store failed
    #[error("component `{component}`: {source}")]
    Store {
        component: String,
        source: StoreError,
    },
    /// a background task failed
    #[error("component `{component}`: the compile task failed: {message}")]
    Task { component: String, message: String },
}

/// How a component's native code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// Compiled from the blob (first load, or cache miss).
    Compiled,
    /// Deserialized from the precompiled cache.
    Cached,
}

impl LoadSource {
    /// `compiled` or `cached`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compiled => "compiled",
            Self::Cached => "cached",
        }
    }
}

/// A linked component with its trigger exports resolved.
#[derive(Clone)]
pub struct Loaded {
    pub spec: ComponentSpec,
    pub pre: InstancePre<Host>,
    pub proxy: Option<ProxyPre<Host>>,
    pub on_tick: Option<ComponentExportIndex>,
    pub on_message: Option<ComponentExportIndex>,
    pub on_start: Option<ComponentExportIndex>,
    pub on_edge: Option<ComponentExportIndex>,
    pub source: LoadSource,
    pub load_us: u64,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.spec.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Checks the 8-byte header: magic, then core module vs component.
pub fn check_header(component: &str, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm {
            component: component.to_string(),
        });
    }
    let version = [bytes[4], bytes[5], bytes[6], bytes[7]];
    match version {
        [1, 0, 0, 0] => Err(LoadError::CoreModule {
            component: component.to_string(),
        }),
        [0x0d, 0, 1, 0] => Ok(()),
        _ => Err(LoadError::UnknownVersion {
            component: component.to_string(),
            version,
        }),
    }
}

fn export_func(component: &Component, iface: &str, func: &str) -> Option<ComponentExportIndex> {
    let name = format!("perch:device/{iface}@{PERCH_DEVICE_VERSION}");
    let (_, inst) = component.get_export(None, &name)?;
    let (_, idx) = component.get_export(Some(&inst), func)?;
    Some(idx)
}

/// Makes a link error readable: "imports `x`, which this agent does not provide".
fn describe_link_error(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    if let Some(rest) = text.split("component imports ").nth(1)
        && text.contains("matching implementation was not found")
    {
        let what = rest.split(", but").next().unwrap_or(rest);
        return format!("it imports {what}, which this agent does not provide");
    }
    text
}

/// Compiles (or deserializes from the precompiled cache) and links `spec`'s component.
pub fn load(
    engine: &Engine,
    fingerprint: &str,
    linker: &Linker<Host>,
    store: &Arc<dyn Store>,
    spec: &ComponentSpec,
) -> Result<Loaded, LoadError> {
    let started = Instant::now();
    let name = spec.name.as_str();
    let store_err = |source| LoadError::Store {
        component: name.to_string(),
        source,
    };

    let mut cached = None;
    match store.get_artifact(&spec.digest, fingerprint) {
        Ok(Some(bytes)) => {
            // SAFETY: the artifact was produced by `Component::serialize` with an engine of the
            // same fingerprint (wasmtime version and code-affecting settings), stored by this
            // agent, and its checksum was verified by the store on read.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(c) => cached = Some(c),
                Err(e) => {
                    tracing::warn!(component = name, error = %format!("{e:#}"), "precompiled artifact unusable; recompiling")
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(component = name, error = %e, "precompiled artifact corrupt; recompiling")
        }
    }
    let (component, source) = match cached {
        Some(c) if store.has_blob(&spec.digest).map_err(store_err)? => (c, LoadSource::Cached),
        Some(_) => {
            return Err(LoadError::BlobMissing {
                component: name.to_string(),
                digest: spec.digest,
            });
        }
        None => {
            let bytes = store
                .get_blob(&spec.digest)
                .map_err(store_err)?
                .ok_or_else(|| LoadError::BlobMissing {
                    component: name.to_string(),
                    digest: spec.digest,
                })?;
            let component = compile(engine, name, &bytes)?;
            match component.serialize() {
                Ok(art) => {
                    if let Err(e) = store.put_artifact(&spec.digest, fingerprint, &art) {
                        tracing::warn!(component = name, error = %e, "could not cache the precompiled artifact");
                    }
                }
                Err(e) => {
                    tracing::warn!(component = name, error = %format!("{e:#}"), "could not serialize the compiled component")
                }
            }
            (component, LoadSource::Compiled)
        }
    };
    link(linker, spec, component, source, started)
}

/// Checks the header and compiles `bytes`.
pub fn compile(engine: &Engine, name: &str, bytes: &[u8]) -> Result<Component, LoadError> {
    check_header(name, bytes)?;
    Component::new(engine, bytes).map_err(|e| LoadError::Invalid {
        component: name.to_string(),
        message: format!("{e:#}"),
    })
}

fn link(
    linker: &Linker<Host>,
    spec: &ComponentSpec,
    component: Component,
    source: LoadSource,
    started: Instant,
) -> Result<Loaded, LoadError> {
    let name = spec.name.as_str();
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Link {
            component: name.to_string(),
            message: describe_link_error(&e),
        })?;
    let missing = |trigger, export: &str| LoadError::MissingExport {
        component: name.to_string(),
        trigger,
        export: export.to_string(),
    };
    let on_tick = export_func(&component, "timer", "on-tick");
    let on_message = export_func(&component, "message-handler", "on-message");
    let on_start = export_func(&component, "lifecycle", "on-start");
    let on_edge = export_func(&component, "gpio-handler", "on-edge");
    let mut proxy = None;
    for t in &spec.triggers {
        match t {
            Trigger::Every(_) if on_tick.is_none() => {
                return Err(missing("every", "perch:device/timer.on-tick"));
            }
            Trigger::Message(_) if on_message.is_none() => {
                return Err(missing(
                    "message",
                    "perch:device/message-handler.on-message",
                ));
            }
            Trigger::Startup if on_start.is_none() => {
                return Err(missing("startup", "perch:device/lifecycle.on-start"));
            }
            Trigger::Gpio { .. } if on_edge.is_none() => {
                return Err(missing("gpio", "perch:device/gpio-handler.on-edge"));
            }
            Trigger::Http(_) if proxy.is_none() => {
                proxy = Some(
                    ProxyPre::new(pre.clone())
                        .map_err(|_| missing("http", "wasi:http/incoming-handler.handle"))?,
                );
            }
            _ => {}
        }
    }
    Ok(Loaded {
        spec: spec.clone(),
        pre,
        proxy,
        on_tick,
        on_message,
        on_start,
        on_edge,
        source,
        load_us: started.elapsed().as_micros() as u64,
    })
}
