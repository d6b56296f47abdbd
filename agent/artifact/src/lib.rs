//! Perch's component artifact: one `.wasm` file that carries the code, the manifest and the
//! signature.
//!
//! `perch build` appends two custom sections to the component the compiler produced:
//! `perch-manifest` (the [`Manifest`] as JSON) and, last, `perch-signature` (an ed25519
//! signature over the sha256 digest of every byte before it). Custom sections do not change
//! what the component does, so any WebAssembly tool still runs the file. The agent verifies
//! the signature against its trusted keys before it stores or runs anything.
//!
//! This crate owns the section walking, signing and verification; it must not depend on
//! wasmtime, tokio or sled, so the CLI and the agent share it cheaply.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use perch_core::manifest::MANIFEST_SECTION;
use perch_core::{Digest, Manifest};

/// Name of the custom section that carries the signature. It is always the last section.
pub const SIGNATURE_SECTION: &str = "perch-signature";
/// Domain separation: what is signed is this prefix followed by the digest text.
const SIGNING_CONTEXT: &str = "perch-component-signature-v1:";
/// Prefix of a public key's text form.
const KEY_PREFIX: &str = "ed25519:";
/// Prefix of a secret key file's content.
const SECRET_PREFIX: &str = "ed25519-secret:";
/// `\0asm`, version 0x0d, layer 1: a component (a core module has layer 0).
const COMPONENT_HEADER: &[u8] = b"\0asm\x0d\x00\x01\x00";

/// Why a file is not a well-formed Perch artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// The bytes are not a WebAssembly component.
    #[error(
        "not a WebAssembly component (a component starts with `\\0asm` 0d 00 01 00; a core module must first be turned into a component, e.g. by building for wasm32-wasip2)"
    )]
    NotComponent,
    /// The section structure is broken.
    #[error("malformed component at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    /// The embedded manifest cannot be read.
    #[error("{0}")]
    Manifest(String),
    /// The signature section cannot be read.
    #[error("the `perch-signature` section is malformed: {0}")]
    SignatureSection(String),
}

/// One top-level section of a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Section id (0 for custom sections).
    pub id: u8,
    /// A custom section's name.
    pub name: Option<String>,
    /// The whole section, header included.
    pub range: Range<usize>,
    /// The payload (after a custom section's name).
    pub payload: Range<usize>,
}

fn read_leb_u32(bytes: &[u8], pos: &mut usize) -> Result<u32, ArtifactError> {
    let start = *pos;
    let mut result: u64 = 0;
    for shift in (0..35).step_by(7) {
        let Some(&b) = bytes.get(*pos) else {
            return Err(ArtifactError::Malformed {
                offset: start,
                reason: "truncated length".into(),
            });
        };
        *pos += 1;
        result |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(result).map_err(|_| ArtifactError::Malformed {
                offset: start,
                reason: "length does not fit 32 bits".into(),
            });
        }
    }
    Err(ArtifactError::Malformed {
        offset: start,
        reason: "length is longer than 5 bytes".into(),
    })
}

fn write_leb_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The top-level sections of a component, in order. Nested modules and components are
/// single sections here.
pub fn sections(bytes: &[u8]) -> Result<Vec<Section>, ArtifactError> {
    if !bytes.starts_with(COMPONENT_HEADER) {
        return Err(ArtifactError::NotComponent);
    }
    let mut out = Vec::new();
    let mut pos = COMPONENT_HEADER.len();
    while pos < bytes.len() {
        let start = pos;
        let id = bytes[pos];
        pos += 1;
        let size = read_leb_u32(bytes, &mut pos)? as usize;
        let end = pos
            .checked_add(size)
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| ArtifactError::Malformed {
                offset: start,
                reason: format!(
                    "section {id} claims {size} bytes but only {} remain (truncated file?)",
                    bytes.len() - pos
                ),
            })?;
        let (name, payload) = if id == 0 {
            let mut p = pos;
            let len = read_leb_u32(bytes, &mut p)? as usize;
            let name_end = p.checked_add(len).filter(|e| *e <= end).ok_or_else(|| {
                ArtifactError::Malformed {
                    offset: start,
                    reason: "custom section name runs past the section".into(),
                }
            })?;
            let name =
                std::str::from_utf8(&bytes[p..name_end]).map_err(|_| ArtifactError::Malformed {
                    offset: start,
                    reason: "custom section name is not UTF-8".into(),
                })?;
            (Some(name.to_string()), name_end..end)
        } else {
            (None, pos..end)
        };
        out.push(Section {
            id,
            name,
            range: start..end,
            payload,
        });
        pos = end;
    }
    Ok(out)
}

/// `bytes` without the top-level custom sections whose name is in `names`.
fn strip(bytes: &[u8], names: &[&str]) -> Result<Vec<u8>, ArtifactError> {
    let mut out = bytes[..COMPONENT_HEADER.len()].to_vec();
    for s in sections(bytes)? {
        if s.name.as_deref().is_some_and(|n| names.contains(&n)) {
            continue;
        }
        out.extend_from_slice(&bytes[s.range]);
    }
    Ok(out)
}

fn append_custom(out: &mut Vec<u8>, name: &str, payload: &[u8]) {
    let mut content = Vec::with_capacity(name.len() + payload.len() + 5);
    write_leb_u32(&mut content, name.len() as u32);
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    out.push(0);
    write_leb_u32(out, content.len() as u32);
    out.extend_from_slice(&content);
}

/// Embeds `manifest`, replacing any earlier manifest. A signature is dropped too: it no
/// longer covers the bytes.
pub fn embed_manifest(bytes: &[u8], manifest: &Manifest) -> Result<Vec<u8>, ArtifactError> {
    let mut out = strip(bytes, &[MANIFEST_SECTION, SIGNATURE_SECTION])?;
    append_custom(&mut out, MANIFEST_SECTION, &manifest.to_section());
    Ok(out)
}

/// The digest a signature covers: every byte before the signature section.
fn signed_digest(bytes: &[u8], sections: &[Section]) -> Digest {
    let end = sections
        .iter()
        .find(|s| s.name.as_deref() == Some(SIGNATURE_SECTION))
        .map_or(bytes.len(), |s| s.range.start);
    Digest::of(&bytes[..end])
}

fn message(digest: &Digest) -> Vec<u8> {
    format!("{SIGNING_CONTEXT}{digest}").into_bytes()
}

/// Signs the component (replacing any earlier signature) and returns the signed artifact.
pub fn sign(bytes: &[u8], key: &SecretKey) -> Result<Vec<u8>, ArtifactError> {
    let mut out = strip(bytes, &[SIGNATURE_SECTION])?;
    let digest = Digest::of(&out);
    let signature = key.0.sign(&message(&digest));
    let section = SignatureSection {
        key: key.public().to_string(),
        signed_digest: digest.to_string(),
        signature: B64.encode(signature.to_bytes()),
    };
    let json = serde_json::to_vec(&section)
        .unwrap_or_else(|_| unreachable!("a signature section always serializes"));
    append_custom(&mut out, SIGNATURE_SECTION, &json);
    Ok(out)
}

/// The JSON payload of the signature section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SignatureSection {
    key: String,
    signed_digest: String,
    signature: String,
}

/// A signature as found in an artifact (not yet checked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SignatureInfo {
    /// The signer's public key.
    pub key: PublicKey,
    /// The digest the signer signed.
    pub signed_digest: Digest,
    /// The digest of the bytes the signature is attached to now.
    pub actual_digest: Digest,
    /// Whether the signature is the last section (nothing was appended after signing).
    pub last: bool,
    /// Whether the signature verifies for `signed_digest` under `key`.
    pub valid: bool,
}

/// What an artifact carries.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Artifact {
    /// sha256 of the whole file: the digest the agent stores it under.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// The embedded manifest, if any.
    pub manifest: Option<Manifest>,
    /// The signature, if any.
    pub signature: Option<SignatureInfo>,
    /// Interfaces and functions the component imports.
    pub imports: Vec<String>,
    /// Interfaces and functions the component exports.
    pub exports: Vec<String>,
}

/// Reads everything an artifact carries. A missing manifest or signature is `None`; a
/// present but unreadable one is an error.
pub fn inspect(bytes: &[u8]) -> Result<Artifact, ArtifactError> {
    let secs = sections(bytes)?;
    let manifest = embedded_manifest(bytes, &secs)?;
    let signature = signature(bytes, &secs)?;
    let (imports, exports) = interface_names(bytes)?;
    Ok(Artifact {
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        manifest,
        signature,
        imports,
        exports,
    })
}

/// The last embedded manifest among `secs`, if any.
fn embedded_manifest(bytes: &[u8], secs: &[Section]) -> Result<Option<Manifest>, ArtifactError> {
    match secs
        .iter()
        .rfind(|s| s.name.as_deref() == Some(MANIFEST_SECTION))
    {
        Some(s) => Manifest::from_section(&bytes[s.payload.clone()])
            .map(Some)
            .map_err(ArtifactError::Manifest),
        None => Ok(None),
    }
}

/// The signature section among `secs`, read and checked against its key, if any.
fn signature(bytes: &[u8], secs: &[Section]) -> Result<Option<SignatureInfo>, ArtifactError> {
    let Some(i) = secs
        .iter()
        .position(|s| s.name.as_deref() == Some(SIGNATURE_SECTION))
    else {
        return Ok(None);
    };
    let raw: SignatureSection = serde_json::from_slice(&bytes[secs[i].payload.clone()])
        .map_err(|e| ArtifactError::SignatureSection(e.to_string()))?;
    let key: PublicKey = raw.key.parse().map_err(ArtifactError::SignatureSection)?;
    let signed: Digest = raw
        .signed_digest
        .parse()
        .map_err(|e: perch_core::DigestError| ArtifactError::SignatureSection(e.to_string()))?;
    let sig_bytes: [u8; 64] = B64
        .decode(raw.signature.as_bytes())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| {
            ArtifactError::SignatureSection("the signature is not 64 base64 bytes".into())
        })?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig_bytes);
    let valid = key.verifies(&message(&signed), &sig);
    Ok(Some(SignatureInfo {
        key,
        signed_digest: signed,
        actual_digest: signed_digest(bytes, secs),
        last: i + 1 == secs.len(),
        valid,
    }))
}

/// The names of the component's top-level imports and exports.
pub fn interface_names(bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), ArtifactError> {
    use wasmparser::{Parser, Payload};
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| ArtifactError::Malformed {
            offset: e.offset(),
            reason: e.message().to_string(),
        })?;
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.map_err(|e| ArtifactError::Malformed {
                        offset: e.offset(),
                        reason: e.message().to_string(),
                    })?;
                    imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(|e| ArtifactError::Malformed {
                        offset: e.offset(),
                        reason: e.message().to_string(),
                    })?;
                    exports.push(export.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

/// An ed25519 public key, written `ed25519:<base64>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Whether `signature` is a valid (strict) ed25519 signature of `message` by this key.
    fn verifies(&self, message: &[u8], signature: &ed25519_dalek::Signature) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|k| k.verify_strict(message, signature).is_ok())
    }

    /// A short, stable id for display: the first 8 bytes of the key's sha256, in hex.
    pub fn id(&self) -> String {
        let digest = Digest::of(&self.0).to_string();
        digest
            .strip_prefix("sha256:")
            .unwrap_or(&digest)
            .chars()
            .take(16)
            .collect()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_PREFIX}{}", B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{s}` is not a public key: write `ed25519:` and the 32-byte key in base64, as printed by `perch key show`"
            )
        };
        let b64 = s.trim().strip_prefix(KEY_PREFIX).ok_or_else(bad)?;
        let raw: [u8; 32] = B64
            .decode(b64.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(bad)?;
        VerifyingKey::from_bytes(&raw)
            .map(|_| Self(raw))
            .map_err(|_| bad())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An ed25519 signing key. Its file form is `ed25519-secret:<base64 seed>`.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no randomness for a new key: {e}"))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The key file's content.
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", B64.encode(self.0.to_bytes()))
    }

    /// Reads a key file's content.
    pub fn from_file_text(text: &str) -> Result<Self, String> {
        let seed: [u8; 32] = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .and_then(|b| B64.decode(b.as_bytes()).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or("not a Perch signing key (expected `ed25519-secret:` and 32 bytes in base64)")?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }
}

/// Which signatures an agent accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Keys whose signatures are accepted.
    pub trusted: Vec<PublicKey>,
    /// Keys whose signatures are refused even if also trusted.
    pub revoked: Vec<PublicKey>,
    /// Accept components with no signature at all (development only).
    pub allow_unsigned: bool,
}

/// Why the agent refuses an artifact's signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature and unsigned components are not allowed.
    #[error(
        "the component is not signed: sign it with `perch build` (or set `allow-unsigned = true` under [signing] in the agent's config, for development only)"
    )]
    Unsigned,
    /// The bytes changed after signing.
    #[error(
        "the component was modified after it was signed: the signature covers {signed} but the bytes hash to {actual}"
    )]
    Tampered { signed: Digest, actual: Digest },
    /// Sections were appended after the signature.
    #[error("the component has sections after its signature, which the signature does not cover")]
    NotLast,
    /// The signature does not verify under its key.
    #[error("the signature by key {key} is invalid")]
    Invalid { key: PublicKey },
    /// The key is revoked.
    #[error("the component is signed by key {key}, which this agent's config revokes")]
    Revoked { key: PublicKey },
    /// The key is not trusted.
    #[error(
        "the component is signed by key {key}, which this agent does not trust: add it to `trusted-keys` under [signing] in the agent's config"
    )]
    Untrusted { key: PublicKey },
    /// The artifact itself is malformed.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

/// Checks an artifact's signature against `policy`. Returns the signer (`None` for an
/// accepted unsigned component).
pub fn verify(bytes: &[u8], policy: &TrustPolicy) -> Result<Option<PublicKey>, SignatureError> {
    // Only the sections are walked: verifying needs neither the manifest nor the imports.
    let secs = sections(bytes)?;
    let Some(info) = signature(bytes, &secs)? else {
        return if policy.allow_unsigned {
            Ok(None)
        } else {
            Err(SignatureError::Unsigned)
        };
    };
    if !info.last {
        return Err(SignatureError::NotLast);
    }
    if info.signed_digest != info.actual_digest {
        return Err(SignatureError::Tampered {
            signed: info.signed_digest,
            actual: info.actual_digest,
        });
    }
    if !info.valid {
        return Err(SignatureError::Invalid { key: info.key });
    }
    if policy.revoked.contains(&info.key) {
        return Err(SignatureError::Revoked { key: info.key });
    }
    if !policy.trusted.contains(&info.key) {
        return Err(SignatureError::Untrusted { key: info.key });
    }
    Ok(Some(info.key))
}

/// The embedded manifest of an artifact, if any.
pub fn manifest(bytes: &[u8]) -> Result<Option<Manifest>, ArtifactError> {
    embedded_manifest(bytes, &sections(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component() -> Vec<u8> {
        wat::parse_str(
            r#"(component
                (import "wasi:logging/logging@0.1.0-draft" (instance))
                (core module $m (func (export "f")))
                (core instance $i (instantiate $m))
            )"#,
        )
        .expect("valid component text")
    }

    fn manifest() -> Manifest {
        let text = "[package]\nname = \"demo\"\nversion = \"0.1.0\"\n[package.metadata.perch]\ntriggers = [{ every = \"1s\" }]\n";
        Manifest::from_cargo_toml(text, "Cargo.toml").expect("valid")
    }

    fn signed(key: &SecretKey) -> Vec<u8> {
        let with_manifest = embed_manifest(&component(), &manifest()).expect("embed");
        sign(&with_manifest, key).expect("sign")
    }

    fn trusting(key: &SecretKey) -> TrustPolicy {
        TrustPolicy {
            trusted: vec![key.public()],
            ..TrustPolicy::default()
        }
    }

    #[test]
    fn a_signed_artifact_carries_code_manifest_and_signature() {
        let key = SecretKey::generate().expect("key");
        let bytes = signed(&key);
        let a = inspect(&bytes).expect("inspect");
        assert_eq!(a.manifest, Some(manifest()));
        let sig = a.signature.expect("signed");
        assert!(sig.valid && sig.last);
        assert_eq!(sig.key, key.public());
        assert_eq!(a.imports, ["wasi:logging/logging@0.1.0-draft"]);
        assert_eq!(verify(&bytes, &trusting(&key)), Ok(Some(key.public())));
        // Still a component any tool can parse.
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&bytes)
            .expect("valid component");
        // Re-signing replaces the signature rather than stacking a second one.
        let again = sign(&bytes, &key).expect("re-sign");
        assert_eq!(again, bytes);
    }

    #[test]
    fn unsigned_is_refused_unless_allowed() {
        let bytes = embed_manifest(&component(), &manifest()).expect("embed");
        let key = SecretKey::generate().expect("key");
        let err = verify(&bytes, &trusting(&key)).expect_err("unsigned");
        assert_eq!(err, SignatureError::Unsigned);
        assert!(err.to_string().contains("not signed"), "{err}");
        let dev = TrustPolicy {
            allow_unsigned: true,
            ..TrustPolicy::default()
        };
        assert_eq!(verify(&bytes, &dev), Ok(None));
    }

    #[test]
    fn every_tampered_byte_before_the_signature_is_refused() {
        let key = SecretKey::generate().expect("key");
        let bytes = signed(&key);
        let secs = sections(&bytes).expect("sections");
        let sig_start = secs.last().expect("sections").range.start;
        for i in 0..sig_start {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                verify(&t, &trusting(&key)).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
        let mut t = bytes.clone();
        t[sig_start - 1] ^= 0x20;
        match verify(&t, &trusting(&key)) {
            Err(SignatureError::Tampered { .. }) | Err(SignatureError::Artifact(_)) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_forged_signature_or_appended_section_is_refused() {
        let key = SecretKey::generate().expect("key");
        let bytes = signed(&key);
        // Graft the signature of another artifact onto these bytes.
        let mut other_manifest = manifest();
        other_manifest.name = "other".into();
        let other = sign(
            &embed_manifest(&component(), &other_manifest).expect("embed"),
            &key,
        )
        .expect("sign");
        let graft = sections(&other)
            .expect("sections")
            .pop()
            .expect("signature");
        let mut forged = strip(&bytes, &[SIGNATURE_SECTION]).expect("strip");
        forged.extend_from_slice(&other[graft.range]);
        assert!(matches!(
            verify(&forged, &trusting(&key)),
            Err(SignatureError::Tampered { .. })
        ));
        let mut appended = bytes.clone();
        append_custom(&mut appended, "extra", b"x");
        assert_eq!(
            verify(&appended, &trusting(&key)),
            Err(SignatureError::NotLast)
        );
    }

    #[test]
    fn wrong_and_revoked_keys_are_refused() {
        let key = SecretKey::generate().expect("key");
        let stranger = SecretKey::generate().expect("key");
        let bytes = signed(&stranger);
        let err = verify(&bytes, &trusting(&key)).expect_err("untrusted");
        assert_eq!(
            err,
            SignatureError::Untrusted {
                key: stranger.public()
            }
        );
        let policy = TrustPolicy {
            trusted: vec![stranger.public()],
            revoked: vec![stranger.public()],
            allow_unsigned: true,
        };
        assert_eq!(
            verify(&bytes, &policy),
            Err(SignatureError::Revoked {
                key: stranger.public()
            })
        );
    }

    #[test]
    fn keys_round_trip_through_text() {
        let key = SecretKey::generate().expect("key");
        let back = SecretKey::from_file_text(&key.to_file_text()).expect("parse");
        assert_eq!(back.public(), key.public());
        let public: PublicKey = key.public().to_string().parse().expect("parse");
        assert_eq!(public, key.public());
        assert!("ed25519:nope".parse::<PublicKey>().is_err());
        assert_eq!(key.public().id().len(), 16);
    }

    #[test]
    fn core_modules_and_truncated_files_are_not_artifacts() {
        let module = wat::parse_str("(module)").expect("module");
        assert_eq!(sections(&module), Err(ArtifactError::NotComponent));
        let bytes = component();
        let cut = &bytes[..bytes.len() - 3];
        assert!(matches!(
            sections(cut),
            Err(ArtifactError::Malformed { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn the_section_walker_never_panics(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut bytes = COMPONENT_HEADER.to_vec();
            bytes.extend_from_slice(&tail);
            let _ = sections(&bytes);
            let _ = inspect(&bytes);
        }
    }
}
