//! A real DNS server for tests: UDP on 127.0.0.1, answering `A` / `AAAA` queries from records
//! the test sets and changes while it runs, or failing every query with SERVFAIL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::net::UdpSocket;

/// An authoritative DNS server on 127.0.0.1: answers `A` / `AAAA` for the names it has
/// records for (in the order they were set), NODATA for a known name without the family
/// asked, NXDOMAIN for other names, or SERVFAIL to everything while
/// [`failing`](Self::set_failing). Stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    records: Mutex<HashMap<String, Vec<IpAddr>>>,
    failing: AtomicBool,
    ttl: AtomicU32,
    queries: AtomicUsize,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Binds 127.0.0.1 on a free port and serves `records` (name, address), with a TTL of 30 s.
    /// Must be called inside a Tokio runtime.
    pub async fn start(records: &[(&str, &str)]) -> std::io::Result<DnsServer> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let state = Arc::new(State::default());
        state.ttl.store(30, Ordering::Relaxed);
        for (name, ip) in records {
            let ip: IpAddr = ip
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            lock(&state.records).entry(key(name)).or_default().push(ip);
        }
        let serving = state.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                serving.queries.fetch_add(1, Ordering::SeqCst);
                if let Ok(bytes) = serving.answer(&request).to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        Ok(DnsServer { addr, state, task })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.state.queries.load(Ordering::SeqCst)
    }

    /// Replaces `name`'s addresses (none: the name no longer exists, NXDOMAIN).
    pub fn set(&self, name: &str, addrs: &[&str]) {
        let addrs: Vec<IpAddr> = addrs
            .iter()
            .map(|a| a.parse().expect("an IP address"))
            .collect();
        let mut records = lock(&self.state.records);
        if addrs.is_empty() {
            records.remove(&key(name));
        } else {
            records.insert(key(name), addrs);
        }
    }

    /// While `failing`, every query is answered SERVFAIL.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// The TTL (seconds) of the records in answers from now on.
    pub fn set_ttl(&self, secs: u32) {
        self.state.ttl.store(secs, Ordering::SeqCst);
    }

    /// A hickory resolver asking only this server: one attempt, a 2 s timeout, no cache (so
    /// every lookup reaches the server and sees its current records).
    pub fn resolver(&self) -> TokioResolver {
        let mut ns = NameServerConfig::udp(self.addr.ip());
        for c in &mut ns.connections {
            c.port = self.addr.port();
        }
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        opts.cache_size = 0;
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .expect("a resolver for the test DNS server")
    }
}

impl State {
    fn answer(&self, request: &Message) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.message_type = MessageType::Response;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        for q in &request.queries {
            response.add_query(q.clone());
        }
        if self.failing.load(Ordering::SeqCst) {
            response.metadata.response_code = ResponseCode::ServFail;
            return response;
        }
        let ttl = self.ttl.load(Ordering::SeqCst);
        let records = lock(&self.records);
        let mut known = false;
        for q in &request.queries {
            let Some(addrs) = records.get(&key(&q.name().to_ascii())) else {
                continue;
            };
            known = true;
            for ip in addrs {
                let data = match (ip, q.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(q.name().clone(), ttl, data));
            }
        }
        if !known {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        response
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
