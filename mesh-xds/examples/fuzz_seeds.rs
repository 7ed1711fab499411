//! Writes the seed corpus of the cargo-fuzz targets in `fuzz/`: every cluster, endpoint,
//! listener and route resource of the given config dumps (real istiod output) and the testkit's
//! rendered resources (the name table among them), one file per resource, into
//! `<corpus>/<target>/`, and each dump itself into `<corpus>/config_dump_json/`.
//!
//! ```sh
//! cargo run -p mesh-xds --example fuzz_seeds -- fuzz/corpus testdata/istio/*.json
//! ```
//! (scripts/fuzz.sh runs it before fuzzing.)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use mesh_xds::dump::ConfigDump;
use mesh_xds::fuzzing::{dump_seeds, target_name, testkit_seeds};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let Some(corpus) = args.next() else {
        eprintln!("usage: fuzz_seeds CORPUS_DIR [CONFIG_DUMP.json ...]");
        return ExitCode::from(2);
    };
    let mut seeds = testkit_seeds();
    let mut dumps = 0;
    for path in args {
        match ConfigDump::load(&path) {
            Ok(dump) => {
                seeds.extend(dump_seeds(&dump));
                if let Err(e) = copy_into(&corpus.join("config_dump_json"), &path) {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                dumps += 1;
            }
            // Legacy (v2) and partial dumps are fuzz inputs too, just not resource seeds.
            Err(e) => eprintln!("{}: not a dump mesh reads ({e}); skipped", path.display()),
        }
    }
    let mut written = 0;
    for (i, (type_url, bytes)) in seeds.iter().enumerate() {
        let Some(target) = target_name(type_url) else {
            continue;
        };
        let dir = corpus.join(target);
        let file = dir.join(format!("seed-{i:05}"));
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, bytes)) {
            eprintln!("{}: {e}", file.display());
            return ExitCode::FAILURE;
        }
        written += 1;
    }
    println!(
        "fuzz_seeds: {written} resource seeds from {dumps} dumps and the testkit into {}",
        corpus.display()
    );
    ExitCode::SUCCESS
}

fn copy_into(dir: &Path, file: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = file.file_name().unwrap_or(file.as_os_str());
    std::fs::copy(file, dir.join(name)).map(drop)
}
