//! Locates the protobuf descriptor set that the `envoy-types` crate ships
//! (`src/generated/types.bin`, the full Envoy API) so mesh-xds can read protobuf-JSON config
//! dumps by reflection. The crate does not export it, so its source directory is found through
//! `cargo metadata` (works for registry, git and vendored sources alike), falling back to the
//! Cargo registry under `$CARGO_HOME`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let path = from_metadata().or_else(from_registry).unwrap_or_else(|| {
        panic!(
            "mesh-xds build: cannot find envoy-types' src/generated/types.bin \
                 (cargo metadata and $CARGO_HOME/registry/src both failed)"
        )
    });
    println!("cargo:rerun-if-changed={}", path.display());
    println!(
        "cargo:rustc-env=MESH_XDS_ENVOY_DESCRIPTORS={}",
        path.display()
    );
}

fn descriptor_in(dir: &Path) -> Option<PathBuf> {
    let p = dir.join("src").join("generated").join("types.bin");
    p.is_file().then_some(p)
}

fn from_metadata() -> Option<PathBuf> {
    let cargo = std::env::var_os("CARGO")?;
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    // The envoy-types that mesh-xds itself resolves to (highest version if several).
    let mut found: Vec<(String, PathBuf)> = meta["packages"]
        .as_array()?
        .iter()
        .filter(|p| p["name"] == "envoy-types")
        .filter_map(|p| {
            let dir = Path::new(p["manifest_path"].as_str()?)
                .parent()?
                .to_path_buf();
            Some((p["version"].as_str()?.to_owned(), dir))
        })
        .collect();
    found.sort();
    found.iter().rev().find_map(|(_, d)| descriptor_in(d))
}

fn from_registry() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let mut found = Vec::new();
    for index in std::fs::read_dir(home.join("registry").join("src")).ok()? {
        let Ok(index) = index else { continue };
        let Ok(entries) = std::fs::read_dir(index.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("envoy-types-0.7.")
                && let Some(p) = descriptor_in(&e.path())
            {
                found.push((name, p));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, p)| p)
}
