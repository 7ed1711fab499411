//! `meshctl`: tools around mesh's xDS handling.
//!
//! ```text
//! meshctl check-config FILE [--json]
//! meshctl control-plane --config-dump FILE [--listen ADDR] [--trust-domain TD]
//!                       [--root-cert-out FILE] [--token-out FILE]
//! ```
//!
//! `check-config` translates every resource of an Envoy config dump (JSON, or YAML for
//! `.yaml`/`.yml`) as mesh's ADS client would and prints, per type, what was accepted, what was
//! rejected (with reasons) and which extensions were accepted without mesh acting on them; it
//! exits 1 if anything was rejected, 2 on a usage or load error.
//!
//! `control-plane` serves the dump's dynamic resources over ADS (delta and SotW) together with
//! an Istio CA on one plaintext gRPC port, so a real sidecar's configuration can be replayed to
//! mesh or to Envoy. It prints `listening on ADDR` and runs until interrupted.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use mesh_xds::check::check_file;
use mesh_xds::dump::ConfigDump;
use mesh_xds::testkit::ControlPlane;
use mesh_xds::testkit::ca::TestCa;

const USAGE: &str = "usage:
  meshctl check-config FILE [--json]
  meshctl control-plane --config-dump FILE [--listen ADDR] [--trust-domain TD] [--root-cert-out FILE] [--token-out FILE]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check-config") => check_config(&args[1..]),
        Some("control-plane") => control_plane(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--name VALUE` options and positional arguments.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

fn parse(args: &[String], flags: &[&str], valued: &[&str]) -> Result<Args, String> {
    let mut out = Args {
        positional: Vec::new(),
        options: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if flags.contains(&a.as_str()) {
            out.options.push((a.clone(), None));
        } else if valued.contains(&a.as_str()) {
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            out.options.push((a.clone(), Some(v.clone())));
        } else if a.starts_with("--") {
            return Err(format!("unknown option {a}\n{USAGE}"));
        } else {
            out.positional.push(a.clone());
        }
    }
    Ok(out)
}

impl Args {
    fn value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(k, _)| k == name)
    }
}

fn check_config(args: &[String]) -> Result<ExitCode, String> {
    let a = parse(args, &["--json"], &[])?;
    let [file] = a.positional.as_slice() else {
        return Err(format!("check-config takes one FILE\n{USAGE}"));
    };
    let report = check_file(&PathBuf::from(file)).map_err(|e| format!("{file}: {e}"))?;
    if a.flag("--json") {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(if report.rejected() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn control_plane(args: &[String]) -> Result<ExitCode, String> {
    let a = parse(
        args,
        &[],
        &[
            "--config-dump",
            "--listen",
            "--trust-domain",
            "--root-cert-out",
            "--token-out",
        ],
    )?;
    if !a.positional.is_empty() {
        return Err(format!(
            "unexpected argument {:?}\n{USAGE}",
            a.positional[0]
        ));
    }
    let file = a
        .value("--config-dump")
        .ok_or_else(|| format!("control-plane needs --config-dump FILE\n{USAGE}"))?;
    let listen: SocketAddr = a
        .value("--listen")
        .unwrap_or("127.0.0.1:15010")
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let dump = ConfigDump::load(&PathBuf::from(file)).map_err(|e| format!("{file}: {e}"))?;
    for r in &dump.rejected {
        eprintln!(
            "meshctl: not serving {:?} ({}): {}",
            r.name, r.location, r.reason
        );
    }
    let set = dump.xds_resources();
    let ca = TestCa::new(a.value("--trust-domain").unwrap_or("cluster.local"));
    if let Some(p) = a.value("--root-cert-out") {
        std::fs::write(p, ca.root_pem()).map_err(|e| format!("writing {p}: {e}"))?;
    }
    if let Some(p) = a.value("--token-out") {
        // A token the CA accepts, for the dump's own workload (namespace from its node id).
        let ns = dump
            .node_id
            .as_deref()
            .and_then(|id| id.split('~').nth(2))
            .and_then(|p| p.split('.').nth(1))
            .unwrap_or("default");
        std::fs::write(p, ca.token_for(ns, "default")).map_err(|e| format!("writing {p}: {e}"))?;
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let cp = ControlPlane::builder()
            .ca(ca)
            .resources(set.clone())
            .listen(listen)
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let counts: Vec<String> = set
            .iter()
            .map(|(t, m)| format!("{}={}", t.rsplit('.').next().unwrap_or(t), m.len()))
            .collect();
        // Whoever started us may stop reading after the first line: a closed stdout must not
        // take the control plane down.
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {}", cp.addr());
        let _ = writeln!(
            out,
            "serving {} (ADS delta + SotW, Istio CA)",
            counts.join(" ")
        );
        let _ = out.flush();
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| format!("waiting for ctrl-c: {e}"))?;
        Ok::<_, String>(ExitCode::SUCCESS)
    })
}
