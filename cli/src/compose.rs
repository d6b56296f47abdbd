//! Build-time composition: plug the exports of the components named in
//! `[package.metadata.perch.compose]` into the imports of the component being built, with
//! `wac-graph`, so no `.wac` file is needed for the common case.

use std::path::Path;

use anyhow::{Context as _, Result};
use wac_graph::types::Package;
use wac_graph::{CompositionGraph, EncodeOptions};

use perch_core::Manifest;

use crate::Failure;
use crate::builder;
use crate::shell::Shell;

/// `ns:pkg/iface` without its `@version`.
fn unversioned(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// Reads a plug: a `.wasm` file as is, a crate directory built with cargo first.
fn plug_bytes(shell: &Shell, crate_dir: &Path, path: &str) -> Result<Vec<u8>> {
    let full = crate_dir.join(path);
    let wasm = if full.extension().is_some_and(|e| e == "wasm") {
        full
    } else {
        let cargo_toml = builder::crate_manifest(&full).map_err(|e| {
            Failure::msg(format!(
                "[package.metadata.perch.compose] names `{path}`: {e}"
            ))
        })?;
        shell.status("Building", format!("{path} (to compose)"));
        builder::cargo_build(
            shell,
            &cargo_toml,
            perch_core::manifest::DEFAULT_STACK.bytes(),
        )?
    };
    std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))
}

/// Composes `socket` (the component just built) with every plug of `manifest.compose`.
/// Returns `socket` unchanged when there is nothing to compose.
pub fn compose(
    shell: &Shell,
    crate_dir: &Path,
    socket: Vec<u8>,
    manifest: &Manifest,
) -> Result<Vec<u8>> {
    if manifest.compose.is_empty() {
        return Ok(socket);
    }
    let (socket_imports, _) = perch_artifact::interface_names(&socket)?;
    let mut graph = CompositionGraph::new();
    let package = Package::from_bytes("perch:socket", None, socket, graph.types_mut())
        .context("reading the component to compose")?;
    let socket_id = graph.register_package(package)?;
    let mut plugs = Vec::new();
    for (i, (interface, path)) in manifest.compose.iter().enumerate() {
        if !socket_imports
            .iter()
            .any(|imp| unversioned(imp) == unversioned(interface))
        {
            return Err(Failure::msg(format!(
                "[package.metadata.perch.compose] plugs `{interface}`, but `{}` does not import it (it imports: {})",
                manifest.name,
                socket_imports.join(", ")
            )));
        }
        let bytes = plug_bytes(shell, crate_dir, path)?;
        let (_, exports) = perch_artifact::interface_names(&bytes)
            .with_context(|| format!("`{path}` is not a component"))?;
        if !exports
            .iter()
            .any(|e| unversioned(e) == unversioned(interface))
        {
            return Err(Failure::msg(format!(
                "`{path}` does not export `{interface}` (it exports: {})",
                if exports.is_empty() {
                    "nothing".to_string()
                } else {
                    exports.join(", ")
                }
            )));
        }
        let package =
            Package::from_bytes(&format!("perch:plug{i}"), None, bytes, graph.types_mut())
                .with_context(|| format!("reading `{path}`"))?;
        plugs.push(graph.register_package(package)?);
    }
    wac_graph::plug(&mut graph, plugs, socket_id).context("composing")?;
    let bytes = graph
        .encode(EncodeOptions::default())
        .context("encoding the composed component")?;
    let (imports, _) = perch_artifact::interface_names(&bytes)?;
    for interface in manifest.compose.keys() {
        if imports
            .iter()
            .any(|imp| unversioned(imp) == unversioned(interface))
        {
            return Err(Failure::msg(format!(
                "`{interface}` is still imported after composing: its plug's export does not match the import's type"
            )));
        }
    }
    shell.status(
        "Composed",
        format!(
            "{} with {}",
            manifest.name,
            manifest
                .compose
                .iter()
                .map(|(i, p)| format!("{p} ({i})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(bytes)
}
