//! The immutable configuration snapshot and the cell it is published through.
//!
//! mesh-xds builds a whole [`Snapshot`] from accepted xDS resources and swaps it into the
//! [`SnapshotCell`]. Requests load the current snapshot once (an atomic load, no lock) and
//! finish on it even if a newer one arrives meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::endpoint::EndpointSet;
use crate::flags::ResponseFlag;
use crate::listener::{InboundPolicy, Listener, ListenerKind, OutboundProtocol};
use crate::name_table::NameTable;
use crate::retry::{DEFAULT_RETRY_BUFFER_LIMIT, RetryPolicy};
use crate::route::{
    PathMatch, Redirect, RedirectPath, RequestView, Route, RouteAction, RouteConfig, RouteMatch,
    RouteMatchResult,
};

/// What istiod's `outboundTrafficPolicy` says about destinations it does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutboundTrafficPolicy {
    /// `ALLOW_ANY`: pass through to the original destination (`PassthroughCluster`).
    #[default]
    AllowAny,
    /// `REGISTRY_ONLY`: refuse (`BlackHoleCluster`).
    RegistryOnly,
}

/// The name istiod gives the original-destination cluster.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// The name istiod gives the cluster that drops traffic.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// A map keyed by resource name (cluster, route configuration, listener, EDS service name).
/// The request path looks clusters and route configurations up by name on every request, so
/// these maps hash with foldhash rather than SipHash (names come from istiod's configuration;
/// the hasher is still randomly seeded per map).
pub type NameMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Everything the request path needs, compiled and immutable.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every published snapshot.
    pub version: u64,
    /// Listeners by name.
    pub listeners: NameMap<Arc<Listener>>,
    /// Route configurations by name.
    pub route_configs: NameMap<Arc<RouteConfig>>,
    /// Clusters by name.
    pub clusters: NameMap<Arc<Cluster>>,
    /// Endpoints by EDS service name.
    pub endpoints: NameMap<Arc<EndpointSet>>,
    /// The NDS name table.
    pub name_table: Arc<NameTable>,
    /// Unknown destinations policy.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Inbound PeerAuthentication modes (from `virtualInbound`), if any.
    pub inbound: Option<InboundPolicy>,
    /// Last accepted xDS version per type URL (for debugging and metrics).
    pub xds_versions: BTreeMap<String, String>,
    outbound_ports: HashMap<u16, OutboundProtocol, foldhash::fast::RandomState>,
}

/// Where the outbound side should send a request, or the local answer Envoy would give.
#[derive(Debug, Clone)]
pub enum RouteDecision {
    /// Forward to this cluster.
    Forward {
        /// The matched virtual host's name.
        virtual_host: Arc<str>,
        /// The matched route's name.
        route: Arc<str>,
        /// The cluster.
        cluster: Arc<Cluster>,
        /// Its endpoints (absent for original-destination clusters).
        endpoints: Option<Arc<EndpointSet>>,
        /// Route timeout (`None`: none).
        timeout: Option<std::time::Duration>,
        /// The route's stream idle timeout (`None`: none).
        idle_timeout: Option<std::time::Duration>,
        /// Retry policy, if the route (or its virtual host) has one.
        retry: Option<Arc<RetryPolicy>>,
        /// How much request body may be buffered for retries.
        retry_buffer_limit: u32,
        /// `x-envoy-attempt-count` upstream (`include_request_attempt_count`).
        attempt_count_upstream: bool,
        /// `x-envoy-attempt-count` downstream (`include_attempt_count_in_response`).
        attempt_count_downstream: bool,
        /// The route's `hash_policy` result (ring hash / Maglev key).
        hash: Option<u64>,
        /// The route's rewrites and header mutations.
        forwarding: Option<Arc<crate::route::Forwarding>>,
        /// The rewritten `path?query`, when the route rewrites the path.
        rewritten_path: Option<String>,
        /// The route's fault injection.
        fault: Option<Arc<crate::fault::Fault>>,
        /// `Set-Cookie` values for the response: the hash-policy cookies generated for this
        /// request (added to the upstream's response, as Envoy's router does).
        set_cookies: Vec<String>,
    },
    /// Answer locally.
    Respond {
        /// Status code.
        status: u16,
        /// Body.
        body: Option<String>,
        /// Response flag for telemetry.
        flag: ResponseFlag,
        /// Extra headers (e.g. `location` for redirects).
        location: Option<String>,
    },
}

/// A routing decision together with what led to it (see [`Snapshot::route_in_config`]).
#[derive(Debug)]
pub struct RouteExplanation<'a> {
    /// The route configuration consulted.
    pub route_config: &'a RouteConfig,
    /// The virtual host and route that matched (`None`: no route, a 404 `NR`).
    pub matched: Option<RouteMatchResult<'a>>,
    /// What the request path does with the request.
    pub decision: RouteDecision,
}

impl Snapshot {
    /// Builds a snapshot and its port index from the compiled parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        version: u64,
        listeners: impl IntoIterator<Item = (String, Arc<Listener>)>,
        route_configs: impl IntoIterator<Item = (String, Arc<RouteConfig>)>,
        clusters: impl IntoIterator<Item = (String, Arc<Cluster>)>,
        endpoints: impl IntoIterator<Item = (String, Arc<EndpointSet>)>,
        name_table: Arc<NameTable>,
        outbound_traffic_policy: OutboundTrafficPolicy,
        xds_versions: BTreeMap<String, String>,
    ) -> Self {
        let listeners: NameMap<Arc<Listener>> = listeners.into_iter().collect();
        let route_configs: NameMap<Arc<RouteConfig>> = route_configs.into_iter().collect();
        let clusters: NameMap<Arc<Cluster>> = clusters.into_iter().collect();
        let endpoints: NameMap<Arc<EndpointSet>> = endpoints.into_iter().collect();
        let mut outbound_ports = HashMap::default();
        let mut inbound = None;
        // Prefer 0.0.0.0 HTTP listeners over per-VIP ones for the same port: the request path
        // routes by port and Host, as Envoy's 0.0.0.0_<port> listener does.
        let mut names: Vec<&String> = listeners.keys().collect();
        names.sort();
        for name in names {
            let l = &listeners[name];
            match &l.kind {
                ListenerKind::Outbound(p) => {
                    let port = l.address.port();
                    let wildcard = l.address.ip().is_unspecified();
                    let http = matches!(p, OutboundProtocol::Http { .. });
                    match outbound_ports.get(&port) {
                        Some(OutboundProtocol::Http { .. }) if !(wildcard && http) => {}
                        _ => {
                            outbound_ports.insert(port, p.clone());
                        }
                    }
                }
                ListenerKind::Inbound(policy) => inbound = Some(policy.clone()),
                ListenerKind::Other => {}
            }
        }
        Snapshot {
            version,
            listeners,
            route_configs,
            clusters,
            endpoints,
            name_table,
            outbound_traffic_policy,
            inbound,
            xds_versions,
            outbound_ports,
        }
    }

    /// The outbound listener behaviour for a destination port.
    pub fn outbound_port(&self, port: u16) -> Option<&OutboundProtocol> {
        self.outbound_ports.get(&port)
    }

    /// A cluster and its endpoints.
    pub fn cluster(&self, name: &str) -> Option<(Arc<Cluster>, Option<Arc<EndpointSet>>)> {
        let c = self.clusters.get(name)?;
        let eps = self.endpoints_of(c).cloned();
        Some((c.clone(), eps))
    }

    /// A cluster's endpoints: its EDS `ClusterLoadAssignment`, or the `load_assignment` listed
    /// inline in it (STATIC). A DNS cluster's hosts are not configuration: the outbound path
    /// resolves them (`None` here).
    pub fn endpoints_of<'a>(&'a self, cluster: &'a Cluster) -> Option<&'a Arc<EndpointSet>> {
        match cluster.eds_service_name() {
            Some(s) => self.endpoints.get(s),
            None => cluster.inline_endpoints(),
        }
    }

    /// Decides where an outbound HTTP request goes, as Envoy's outbound listener on `port`
    /// would: listener → route configuration → virtual host → route → cluster. A `GET` over
    /// `http`; see [`route_outbound_request`](Self::route_outbound_request).
    pub fn route_outbound(
        &self,
        authority: &str,
        port: u16,
        path: &str,
        headers: &HeaderMap,
    ) -> RouteDecision {
        self.route_outbound_request(port, &RequestView::new(authority, path, headers))
    }

    /// [`route_outbound`](Self::route_outbound) for any method and scheme.
    pub fn route_outbound_request(&self, port: u16, req: &RequestView<'_>) -> RouteDecision {
        let rc_name = match self.outbound_port(port) {
            Some(OutboundProtocol::Http { route_config }) => route_config,
            Some(OutboundProtocol::Tcp { cluster }) => {
                return self.forward_to(cluster, &no_name(), None);
            }
            None => return self.unknown_destination(),
        };
        let Some(rc) = self.route_configs.get(rc_name) else {
            return not_found();
        };
        self.decide(rc.route_request(req), req)
    }

    /// Decides where an outbound TCP connection to `destination` (the service VIP or IP the
    /// application connects to) goes, as Envoy's outbound listeners would take it: the
    /// `<vip>_<port>` listener of a TCP service port, else a `0.0.0.0_<port>` TCP listener,
    /// each forwarding to its `tcp_proxy` cluster; anything else is a destination the
    /// sidecar's `virtualOutbound` listener handles (`PassthroughCluster` under `ALLOW_ANY`,
    /// `BlackHoleCluster`, i.e. [`RouteDecision::Respond`] with `NC`, under `REGISTRY_ONLY`).
    /// HTTP listeners are not used: raw TCP bytes do not go through an HTTP connection manager.
    pub fn route_outbound_tcp(&self, destination: std::net::SocketAddr) -> RouteDecision {
        let port = destination.port();
        let by_name = |ip: std::net::IpAddr| {
            let l = self.listeners.get(&format!("{ip}_{port}"))?;
            match &l.kind {
                ListenerKind::Outbound(OutboundProtocol::Tcp { cluster }) => Some(cluster),
                _ => None,
            }
        };
        let wildcard = std::net::IpAddr::from([0, 0, 0, 0]);
        match by_name(destination.ip()).or_else(|| by_name(wildcard)) {
            Some(cluster) => self.forward_to(cluster, &no_name(), None),
            None => self.unknown_destination(),
        }
    }

    /// The decision of [`route_outbound_request`](Self::route_outbound_request) for a request
    /// looked up in the route configuration named `route_config` (rather than the one the
    /// listener on a port names), with the virtual host and route that matched: what
    /// `meshctl route` explains. `None` if the snapshot has no such route configuration.
    pub fn route_in_config<'a>(
        &'a self,
        route_config: &str,
        req: &RequestView<'_>,
    ) -> Option<RouteExplanation<'a>> {
        let rc = self.route_configs.get(route_config)?;
        let matched = rc.route_request(req);
        let decision = self.decide(matched, req);
        Some(RouteExplanation {
            route_config: rc,
            matched,
            decision,
        })
    }

    /// What the request path does once the route configuration has (or has not) matched a route.
    fn decide(
        &self,
        matched: Option<RouteMatchResult<'_>>,
        req: &RequestView<'_>,
    ) -> RouteDecision {
        let Some(m) = matched else {
            return not_found();
        };
        let (vh, r) = (&m.virtual_host.name, Some(m.route));
        match &m.route.action {
            RouteAction::Cluster(c) => self.forward_to(c, vh, r).with_hash(m.route, req),
            RouteAction::Weighted(w) => match w.pick(req.random) {
                Some(c) => self.forward_to(c, vh, r).with_hash(m.route, req),
                None => respond(503, None, ResponseFlag::NoClusterFound),
            },
            RouteAction::ClusterHeader(name) => {
                match req.headers.get(name).and_then(|v| v.to_str().ok()) {
                    Some(c) if !c.is_empty() => self.forward_to(c, vh, r).with_hash(m.route, req),
                    _ => respond(503, None, ResponseFlag::NoClusterFound),
                }
            }
            RouteAction::DirectResponse { status, body } => RouteDecision::Respond {
                status: *status,
                body: body.clone(),
                flag: ResponseFlag::None,
                location: None,
            },
            RouteAction::Redirect(redirect) => RouteDecision::Respond {
                status: redirect.status,
                body: None,
                flag: ResponseFlag::None,
                location: Some(redirect_location(redirect, &m.route.matcher, req)),
            },
        }
    }

    fn forward_to(&self, cluster: &str, vh: &Arc<str>, route: Option<&Route>) -> RouteDecision {
        let (cluster, endpoints) = match self.cluster(cluster) {
            Some(found) => found,
            None if cluster == PASSTHROUGH_CLUSTER => (Arc::new(passthrough_cluster()), None),
            None => return respond(503, None, ResponseFlag::NoClusterFound),
        };
        RouteDecision::Forward {
            virtual_host: vh.clone(),
            route: route.map_or_else(no_name, |r| r.name.clone()),
            cluster,
            endpoints,
            timeout: route.and_then(|r| r.timeout).filter(|t| !t.is_zero()),
            idle_timeout: route.and_then(|r| r.idle_timeout).filter(|t| !t.is_zero()),
            retry: route.and_then(|r| r.retry.clone()),
            retry_buffer_limit: route
                .and_then(|r| r.per_request_buffer_limit_bytes)
                .unwrap_or(DEFAULT_RETRY_BUFFER_LIMIT),
            attempt_count_upstream: route.is_some_and(|r| r.include_request_attempt_count),
            attempt_count_downstream: route.is_some_and(|r| r.include_attempt_count_in_response),
            hash: None,
            forwarding: None,
            rewritten_path: None,
            fault: None,
            set_cookies: Vec::new(),
        }
    }

    fn unknown_destination(&self) -> RouteDecision {
        match self.outbound_traffic_policy {
            OutboundTrafficPolicy::AllowAny => {
                self.forward_to(PASSTHROUGH_CLUSTER, &no_name(), None)
            }
            // Envoy's virtualOutbound sends it to BlackHoleCluster: the connection is reset;
            // an HTTP client sees 502.
            OutboundTrafficPolicy::RegistryOnly => respond(502, None, ResponseFlag::NoClusterFound),
        }
    }
}

/// The empty virtual-host or route name (a forward without a matched route), shared so that
/// building a decision never allocates.
fn no_name() -> Arc<str> {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    Arc::clone(&EMPTY)
}

impl RouteDecision {
    /// Fills the request hash from the route's `hash_policy` (only when it has one).
    fn with_hash(mut self, route: &Route, req: &RequestView<'_>) -> Self {
        if let RouteDecision::Forward {
            hash,
            forwarding,
            rewritten_path,
            fault,
            set_cookies,
            ..
        } = &mut self
        {
            fault.clone_from(&route.fault);
            if !route.hash_policy.is_empty() {
                // Envoy derives a generated value from the downstream connection's addresses;
                // mesh has no connection, so each request without the cookie draws one. The
                // same value serves every generated cookie of the request, as in Envoy.
                let mut value: Option<String> = None;
                *hash = crate::route::request_hash_with(&route.hash_policy, req, None, &mut |c| {
                    let v = value
                        .get_or_insert_with(|| {
                            crate::route::GeneratedCookie::value(rand::random::<u64>())
                        })
                        .clone();
                    set_cookies.push(c.set_cookie(&v));
                    Some(v)
                });
            }
            if let Some(f) = &route.forwarding {
                *rewritten_path = f.rewrite_path(&route.matcher, req);
                *forwarding = Some(f.clone());
            }
        }
        self
    }
}

/// The `location` Envoy's redirect action sends for `req`.
pub fn redirect_location(
    redirect: &Redirect,
    matcher: &RouteMatch,
    req: &RequestView<'_>,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(req.scheme);
    let mut host = redirect.host.as_deref().unwrap_or(req.authority).to_owned();
    if let Some(port) = redirect.port {
        // Envoy replaces the request's port but appends to a `host_redirect` verbatim.
        let base = match &redirect.host {
            Some(h) => h.as_str(),
            None => crate::route::strip_port(req.authority),
        };
        host = format!("{base}:{port}");
    } else if redirect.scheme.is_some() && redirect.scheme.as_deref() != Some(req.scheme) {
        // A scheme change drops the port that was the old scheme's default.
        let bare = crate::route::strip_port(&host);
        if bare.len() != host.len() {
            let port = &host[bare.len() + 1..];
            if (req.scheme == "http" && port == "80") || (req.scheme == "https" && port == "443") {
                host = bare.to_owned();
            }
        }
    }
    let path = req.path_only();
    let query = req.query();
    let (new_path, new_query) = match &redirect.path {
        RedirectPath::Keep => (path.to_owned(), query),
        RedirectPath::Path(p) => match p.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q)),
            None => (p.clone(), query),
        },
        RedirectPath::Prefix(prefix) => {
            let matched = match &matcher.path {
                PathMatch::Prefix(m) | PathMatch::SeparatedPrefix(m) => m.len().min(path.len()),
                _ => 0,
            };
            (format!("{prefix}{}", &path[matched..]), query)
        }
        RedirectPath::Regex(re, sub) => (re.replace_all(path, sub.as_str()).into_owned(), query),
    };
    let mut location = format!("{scheme}://{host}{new_path}");
    if let Some(q) = new_query.filter(|_| !redirect.strip_query) {
        location.push('?');
        location.push_str(q);
    }
    location
}

fn not_found() -> RouteDecision {
    respond(404, None, ResponseFlag::NoRouteFound)
}

fn respond(status: u16, body: Option<String>, flag: ResponseFlag) -> RouteDecision {
    RouteDecision::Respond {
        status,
        body,
        flag,
        location: None,
    }
}

/// The `PassthroughCluster` istiod defines: original destination, plaintext.
pub fn passthrough_cluster() -> Cluster {
    Cluster {
        discovery: crate::cluster::ClusterDiscovery::OriginalDestination,
        lb_policy: crate::cluster::LbPolicy::ClusterProvided,
        ..Cluster::eds(PASSTHROUGH_CLUSTER)
    }
}

/// Holds the current [`Snapshot`]; readers never lock.
#[derive(Debug, Clone)]
pub struct SnapshotCell {
    inner: Arc<CellInner>,
}

#[derive(Debug)]
struct CellInner {
    current: ArcSwap<Snapshot>,
    /// Version of the last published snapshot; `synced` once the first full config arrived.
    changed: watch::Sender<CellState>,
}

/// What watchers of a [`SnapshotCell`] see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CellState {
    /// Version of the current snapshot.
    pub version: u64,
    /// Whether every subscribed xDS type has been received and accepted at least once.
    pub synced: bool,
}

impl Default for SnapshotCell {
    fn default() -> Self {
        SnapshotCell::new()
    }
}

impl SnapshotCell {
    /// A cell holding an empty snapshot, not yet synced.
    pub fn new() -> Self {
        let (changed, _) = watch::channel(CellState::default());
        SnapshotCell {
            inner: Arc::new(CellInner {
                current: ArcSwap::from_pointee(Snapshot::default()),
                changed,
            }),
        }
    }

    /// The current snapshot (one atomic load).
    pub fn load(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// A cheap guard over the current snapshot for the request path (no refcount traffic).
    pub fn load_guard(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.current.load()
    }

    /// Publishes a whole new snapshot; `synced` marks the first complete configuration.
    pub fn publish(&self, snapshot: Snapshot, synced: bool) {
        let version = snapshot.version;
        self.inner.current.store(Arc::new(snapshot));
        self.inner.changed.send_modify(|s| {
            s.version = version;
            s.synced |= synced;
        });
    }

    /// Whether the first full configuration has arrived.
    pub fn is_synced(&self) -> bool {
        self.inner.changed.borrow().synced
    }

    /// Watch publications.
    pub fn subscribe(&self) -> watch::Receiver<CellState> {
        self.inner.changed.subscribe()
    }

    /// Waits until the first full configuration has arrived.
    pub async fn synced(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|s| s.synced).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::route::{Route, RouteMatch, VirtualHost};

    fn snapshot(policy: OutboundTrafficPolicy) -> Snapshot {
        let l = Listener {
            name: "0.0.0.0_9080".into(),
            address: "0.0.0.0:9080".parse().unwrap(),
            kind: ListenerKind::Outbound(OutboundProtocol::Http {
                route_config: "9080".into(),
            }),
        };
        let vh = |name: &str, domains: &[&str], action: RouteAction| VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
            routes: vec![Route::new("default", RouteMatch::any(), action)],
        };
        let fallback = match policy {
            OutboundTrafficPolicy::AllowAny => vh(
                "allow_any",
                &["*"],
                RouteAction::Cluster(PASSTHROUGH_CLUSTER.into()),
            ),
            OutboundTrafficPolicy::RegistryOnly => vh(
                "block_all",
                &["*"],
                RouteAction::DirectResponse {
                    status: 502,
                    body: None,
                },
            ),
        };
        let c = "outbound|9080||reviews.default.svc.cluster.local";
        let rc = RouteConfig::new(
            "9080",
            vec![
                vh(
                    "reviews.default.svc.cluster.local:9080",
                    &["reviews", "reviews:9080"],
                    RouteAction::Cluster(c.into()),
                ),
                vh(
                    "ghost:9080",
                    &["ghost"],
                    RouteAction::Cluster("outbound|9080||ghost".into()),
                ),
                fallback,
            ],
        )
        .unwrap();
        Snapshot::new(
            1,
            HashMap::from([(l.name.clone(), Arc::new(l))]),
            HashMap::from([("9080".to_string(), Arc::new(rc))]),
            HashMap::from([(c.to_string(), Arc::new(Cluster::eds(c)))]),
            HashMap::from([(
                c.to_string(),
                Arc::new(EndpointSet::new(
                    c,
                    vec![Endpoint::new("127.0.0.1:1".parse().unwrap())],
                )),
            )]),
            Arc::default(),
            policy,
            BTreeMap::new(),
        )
    }

    #[test]
    fn known_host_goes_to_its_cluster() {
        let s = snapshot(OutboundTrafficPolicy::AllowAny);
        match s.route_outbound("reviews:9080", 9080, "/", &HeaderMap::new()) {
            RouteDecision::Forward {
                cluster, endpoints, ..
            } => {
                assert_eq!(
                    cluster.name,
                    "outbound|9080||reviews.default.svc.cluster.local"
                );
                assert_eq!(endpoints.unwrap().routable_len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_hosts_follow_the_outbound_policy() {
        let s = snapshot(OutboundTrafficPolicy::AllowAny);
        match s.route_outbound("example.com", 9080, "/", &HeaderMap::new()) {
            RouteDecision::Forward { cluster, .. } => assert_eq!(cluster.name, PASSTHROUGH_CLUSTER),
            other => panic!("{other:?}"),
        }
        match s.route_outbound("example.com", 1234, "/", &HeaderMap::new()) {
            RouteDecision::Forward { cluster, .. } => assert_eq!(cluster.name, PASSTHROUGH_CLUSTER),
            other => panic!("{other:?}"),
        }
        let s = snapshot(OutboundTrafficPolicy::RegistryOnly);
        assert!(matches!(
            s.route_outbound("example.com", 9080, "/", &HeaderMap::new()),
            RouteDecision::Respond { status: 502, .. }
        ));
        assert!(matches!(
            s.route_outbound("ghost", 9080, "/", &HeaderMap::new()),
            RouteDecision::Respond {
                status: 503,
                flag: ResponseFlag::NoClusterFound,
                ..
            }
        ));
    }

    #[test]
    fn tcp_connections_take_the_vip_listener_else_the_outbound_policy() {
        let with_tcp = |policy| {
            let s = snapshot(policy);
            let c = "outbound|9080||reviews.default.svc.cluster.local";
            let tcp = Listener {
                name: "10.96.0.9_5432".into(),
                address: "10.96.0.9:5432".parse().unwrap(),
                kind: ListenerKind::Outbound(OutboundProtocol::Tcp { cluster: c.into() }),
            };
            let mut listeners = s.listeners.clone();
            listeners.insert(tcp.name.clone(), Arc::new(tcp));
            Snapshot::new(
                2,
                listeners,
                s.route_configs.clone(),
                s.clusters.clone(),
                s.endpoints.clone(),
                Arc::default(),
                policy,
                BTreeMap::new(),
            )
        };
        let s = with_tcp(OutboundTrafficPolicy::AllowAny);
        let cluster = |d: RouteDecision| match d {
            RouteDecision::Forward { cluster, .. } => cluster.name.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            cluster(s.route_outbound_tcp("10.96.0.9:5432".parse().unwrap())),
            "outbound|9080||reviews.default.svc.cluster.local"
        );
        // Another VIP on the same port, and the HTTP port: the original destination.
        for d in ["10.96.0.10:5432", "10.96.0.9:9080"] {
            assert_eq!(
                cluster(s.route_outbound_tcp(d.parse().unwrap())),
                PASSTHROUGH_CLUSTER
            );
        }
        let s = with_tcp(OutboundTrafficPolicy::RegistryOnly);
        assert!(matches!(
            s.route_outbound_tcp("10.96.0.10:5432".parse().unwrap()),
            RouteDecision::Respond { .. }
        ));
    }

    #[tokio::test]
    async fn publish_is_seen_by_readers_and_watchers() {
        let cell = SnapshotCell::new();
        assert!(!cell.is_synced());
        let mut rx = cell.subscribe();
        cell.publish(snapshot(OutboundTrafficPolicy::AllowAny), true);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().version, 1);
        assert!(cell.is_synced());
        assert_eq!(cell.load().version, 1);
        cell.synced().await;
    }
}
