//! Real Prometheus tooling as the judge of mesh's metrics: `promtool check metrics` and the
//! `prometheus` server from Debian's `prometheus` package, and Python `prometheus_client`'s
//! text parser, all installed by `scripts/install-prometheus.sh`.
//!
//! Tests call [`tools`]: it returns the tools, or `None` after printing why the test is
//! skipped (outside CI, when they are missing and cannot be installed). With `CI` set a failed
//! install fails the test.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Paths of the installed tools.
#[derive(Debug, Clone)]
pub struct PromTools {
    /// `promtool`.
    pub promtool: PathBuf,
    /// `prometheus` (the server).
    pub prometheus: PathBuf,
    /// A Python that imports `prometheus_client`.
    pub python: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The installed tools, installing them when missing (see the module docs).
pub fn tools() -> Option<PromTools> {
    static TOOLS: OnceLock<Result<PromTools, String>> = OnceLock::new();
    let result = TOOLS.get_or_init(install).clone();
    match result {
        Ok(t) => Some(t),
        Err(why) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
            panic!("CI: Prometheus tooling could not be installed:\n{why}")
        }
        Err(why) => {
            eprintln!("skipping: Prometheus tooling not available: {why}");
            None
        }
    }
}

fn install() -> Result<PromTools, String> {
    let script = repo_root().join("scripts/install-prometheus.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let get = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(PathBuf::from)
            .ok_or_else(|| format!("{} printed no {key}=: {stdout}", script.display()))
    };
    Ok(PromTools {
        promtool: get("promtool")?,
        prometheus: get("prometheus")?,
        python: get("python")?,
    })
}

/// Lint remarks promtool also makes about Envoy's and Istio's own names (counters without
/// `_total`, `_milliseconds`/`_bytes` units Prometheus prefers as base units, histogram
/// buckets as Envoy spells them). Anything else is a finding.
pub fn accepted_lint(problem: &str) -> bool {
    [
        "counter metrics should have \"_total\" suffix",
        "use base unit",
        "metric names should be written in 'snake_case' not 'camelCase'",
        "non-histogram and non-summary metrics should not have",
        "non-counter metrics should not have \"_total\" suffix",
        "no help text",
    ]
    .iter()
    .any(|a| problem.contains(a))
}

/// What `promtool check metrics` said about an exposition.
#[derive(Debug)]
pub struct PromtoolReport {
    /// Exit status was success.
    pub ok: bool,
    /// Lint problems, `(metric, problem)`.
    pub problems: Vec<(String, String)>,
    /// A parse failure (`error while linting: ...`), if any.
    pub parse_error: Option<String>,
    /// Everything promtool printed.
    pub output: String,
}

impl PromTools {
    /// `promtool check metrics` on `text` (`what` names it in failures): no parse error and
    /// no lint finding beyond those promtool also makes about Envoy's and Istio's own names
    /// ([`accepted_lint`]).
    pub fn check_clean(&self, what: &str, text: &str) {
        let report = self.check_metrics(text);
        assert!(
            report.parse_error.is_none(),
            "promtool could not parse {what}: {}\n{text}",
            report.output
        );
        let findings: Vec<_> = report
            .problems
            .iter()
            .filter(|(_, p)| !accepted_lint(p))
            .collect();
        assert!(
            findings.is_empty(),
            "promtool findings on {what}: {findings:?}"
        );
    }

    /// Runs `promtool check metrics` on `text`.
    pub fn check_metrics(&self, text: &str) -> PromtoolReport {
        let mut child = Command::new(&self.promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn promtool");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let out = child.wait_with_output().expect("promtool runs");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let parse_error = output
            .lines()
            .find(|l| l.contains("error while linting"))
            .map(str::to_owned);
        let problems = output
            .lines()
            .filter(|l| !l.contains("error while linting"))
            .filter_map(|l| l.split_once(": "))
            .map(|(m, p)| (m.trim().to_owned(), p.trim().to_owned()))
            .collect();
        PromtoolReport {
            ok: out.status.success(),
            problems,
            parse_error,
            output,
        }
    }

    /// Parses `text` with `prometheus_client.parser.text_string_to_metric_families`: every
    /// sample as `(family, family type, sample name, labels in exposition order, value)`.
    /// Panics with the parser's error when it rejects the text.
    pub fn python_parse(&self, text: &str) -> Vec<Sample> {
        const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([fam.name, fam.type, s.name, list(s.labels.items()), s.value])
json.dump(out, sys.stdout)
"#;
        let mut child = Command::new(&self.python)
            .args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = text.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = child.wait_with_output().expect("python runs");
        let _ = writer.join();
        assert!(
            out.status.success(),
            "prometheus_client rejected the exposition: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser output is JSON");
        v.into_iter()
            .map(|s| Sample {
                family: s[0].as_str().unwrap_or_default().to_owned(),
                kind: s[1].as_str().unwrap_or_default().to_owned(),
                name: s[2].as_str().unwrap_or_default().to_owned(),
                labels: s[3]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|kv| {
                                (
                                    kv[0].as_str().unwrap_or_default().to_owned(),
                                    kv[1].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                value: s[4].as_f64().unwrap_or(f64::NAN),
            })
            .collect()
    }
}

/// One parsed sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Family name as the parser reports it (counters lose `_total`).
    pub family: String,
    /// `counter`, `gauge`, `histogram`, `untyped`, ...
    pub kind: String,
    /// Sample name (`..._bucket`, `..._total`, ...).
    pub name: String,
    /// Labels in exposition order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The label value of `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One label of an Istio expectation template: name and value (`None` when the template
/// computes it).
pub type TemplateLabel = (String, Option<String>);

/// The label list of Istio's metric expectation template `file` (testdata/istio), in order;
/// `vars` substitutes `{{ .Vars.X }}` values and decides `{{- if .Vars.X }}` /
/// `{{- else if .Vars.Y }}` / `{{- else }}` branches (a non-empty var is true; other
/// conditions are false).
pub fn istio_template(file: &str, vars: &BTreeMap<&str, &str>) -> Vec<TemplateLabel> {
    let path = repo_root().join("testdata/istio").join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let truthy = |cond: &str| {
        cond.trim()
            .strip_prefix(".Vars.")
            .and_then(|k| vars.get(k.trim()))
            .is_some_and(|v| !v.is_empty())
    };
    // (this branch is taken, some branch of the block was taken)
    let mut blocks: Vec<(bool, bool)> = Vec::new();
    let active = |blocks: &[(bool, bool)]| blocks.iter().all(|(taking, _)| *taking);
    let mut labels: Vec<TemplateLabel> = Vec::new();
    let mut pending: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(directive) = t.strip_prefix("{{-").and_then(|d| d.strip_suffix("}}")) {
            let d = directive.trim();
            if let Some(cond) = d.strip_prefix("if ") {
                let on = truthy(cond);
                blocks.push((on, on));
            } else if let Some(cond) = d.strip_prefix("else if ") {
                if let Some(b) = blocks.last_mut() {
                    let on = !b.1 && truthy(cond);
                    *b = (on, b.1 || on);
                }
            } else if d == "else" {
                if let Some(b) = blocks.last_mut() {
                    *b = (!b.1, true);
                }
            } else if d == "end" {
                blocks.pop();
            }
            continue;
        }
        if !active(&blocks) {
            continue;
        }
        if let Some(name) = t.strip_prefix("- name: ") {
            pending = Some(name.to_owned());
            labels.push((name.to_owned(), None));
            continue;
        }
        if let (Some(name), Some(v)) = (&pending, t.strip_prefix("value: ")) {
            let mut v = v.trim_matches('"').to_owned();
            for (k, val) in vars {
                v = v.replace(&format!("{{{{ .Vars.{k} }}}}"), val);
            }
            if let Some(slot) = labels.iter_mut().rev().find(|(n, _)| n == name)
                && !v.contains("{{")
            {
                slot.1 = Some(v);
            }
            pending = None;
        }
    }
    labels
}

/// A Prometheus server on 127.0.0.1 with its own temp dir, killed on drop.
pub struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` (`/stats/prometheus`, every second, job `mesh`)
    /// and waits (bounded) until it answers.
    pub fn start(bin: &Path, targets: &[SocketAddr], dir: PathBuf) -> PrometheusServer {
        let port = super::envoy::free_port();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mesh\n    metrics_path: /stats/prometheus\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let server = PrometheusServer {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = server.get("/-/ready") {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                server.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prometheus's own log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` on the server: status and body.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, dechunk(&body)))
    }

    /// An instant query through `/api/v1/query`: the `data.result` array.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = self
            .get(&format!("/api/v1/query?query={q}"))
            .expect("query prometheus");
        assert_eq!(status, 200, "query {promql}: {body}");
        let v: Value = serde_json::from_str(&body).expect("query answer is JSON");
        assert_eq!(v["status"], "success", "{body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Undoes `Transfer-Encoding: chunked` when the body looks chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_owned();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}
