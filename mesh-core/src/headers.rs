//! Request and response header mutations of routes, virtual hosts and route configurations
//! (`*_headers_to_add` with `append_action`, `*_headers_to_remove`), and the `%…%` value
//! formatters they may use.
//!
//! Levels are applied from the most specific (route) to the least (route configuration), each
//! level removing before it adds, so with overwrite actions the route configuration wins, as
//! in Envoy without `most_specific_header_mutations_wins`.

use std::net::SocketAddr;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};

/// `HeaderValueOption.append_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AppendAction {
    /// `APPEND_IF_EXISTS_OR_ADD` (the default).
    #[default]
    AppendIfExistsOrAdd,
    /// `ADD_IF_ABSENT`.
    AddIfAbsent,
    /// `OVERWRITE_IF_EXISTS_OR_ADD`.
    OverwriteIfExistsOrAdd,
    /// `OVERWRITE_IF_EXISTS`.
    OverwriteIfExists,
}

/// Which part of a socket address a command prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressPart {
    /// `ip:port`.
    Full,
    /// `…_WITHOUT_PORT`: the IP.
    WithoutPort,
    /// `…_PORT`: the port.
    Port,
}

impl AddressPart {
    fn render(self, a: SocketAddr, out: &mut String) {
        use std::fmt::Write;
        let _ = match self {
            AddressPart::Full => write!(out, "{a}"),
            AddressPart::WithoutPort => write!(out, "{}", a.ip()),
            AddressPart::Port => write!(out, "{}", a.port()),
        };
    }
}

/// One piece of a header value template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatPart {
    /// Literal text (`%%` already unescaped; `%ENVIRONMENT(VAR)%` resolved when parsed, as
    /// Envoy does at configuration load, `-` when unset).
    Literal(String),
    /// `%REQ(name?alternative):max%`: the request header's first value (the alternative's
    /// when the first is missing), cut to `max` bytes.
    Req(HeaderName, Option<HeaderName>, Option<usize>),
    /// `%RESP(name?alternative):max%`: the upstream response's header (empty in request
    /// headers).
    Resp(HeaderName, Option<HeaderName>, Option<usize>),
    /// `%PROTOCOL%`: `HTTP/1.1` or `HTTP/2`.
    Protocol,
    /// `%UPSTREAM_CLUSTER%` (and `%UPSTREAM_CLUSTER_RAW%`).
    UpstreamCluster,
    /// `%ROUTE_NAME%`.
    RouteName,
    /// `%DOWNSTREAM_REMOTE_ADDRESS…%` (and the `DIRECT` forms).
    DownstreamRemote(AddressPart),
    /// `%DOWNSTREAM_LOCAL_ADDRESS…%` (and the `DIRECT` forms).
    DownstreamLocal(AddressPart),
    /// `%UPSTREAM_HOST%`, `%UPSTREAM_REMOTE_ADDRESS…%`: known once a host answered, so empty
    /// in request headers (Envoy 1.40, observed).
    UpstreamRemote(AddressPart),
    /// `%START_TIME%` / `%START_TIME(format)%`.
    StartTime(Option<String>),
    /// `%HOSTNAME%`: the machine's host name.
    Hostname,
    /// `%STREAM_ID%`: the request id (`x-request-id`).
    StreamId,
    /// `%RESPONSE_CODE%`: `0` in request headers.
    ResponseCode,
    /// A command Envoy knows but mesh has no value for: evaluates to nothing (Envoy leaves an
    /// unavailable value empty in headers).
    Unavailable(String),
}

/// A header value Envoy refuses: the configuration is rejected (NACKed) with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// A `%COMMAND%` Envoy does not have (Envoy 1.40's message).
    #[error("Not supported field in StreamInfo: {0}")]
    UnknownCommand(String),
    /// A command that needs an argument got none, or a malformed one.
    #[error("{0} requires parameters")]
    MissingParameters(String),
    /// A command that takes no argument nor length got one (Envoy 1.40's message).
    #[error("{0} does not take any parameters or length")]
    NoParameters(String),
    /// A `:max` length that is not a number.
    #[error("Invalid header configuration. Format string contains a non-numeric max length: {0}")]
    BadMaxLength(String),
}

/// The commands of Envoy 1.40's substitution formatter that take no argument and that mesh
/// leaves empty (every name here is accepted by the real Envoy, checked by
/// tests/routing_oracle.rs); any other name is refused as Envoy refuses it.
const ENVOY_COMMANDS: &[&str] = &[
    "ACCESS_LOG_TYPE",
    "BYTES_RECEIVED",
    "BYTES_RETRANSMITTED",
    "BYTES_SENT",
    "CONNECTION_ID",
    "CONNECTION_TERMINATION_DETAILS",
    "CUSTOM_FLAGS",
    "DOWNSTREAM_CX_RTT",
    "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
    "DOWNSTREAM_DETECTED_CLOSE_TYPE",
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_ENDPOINT_ID",
    "DOWNSTREAM_HANDSHAKE_DURATION",
    "DOWNSTREAM_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_HEADER_BYTES_SENT",
    "DOWNSTREAM_LOCAL_ADDRESS_ENDPOINT_ID",
    "DOWNSTREAM_LOCAL_CLOSE_REASON",
    "DOWNSTREAM_LOCAL_DNS_SAN",
    "DOWNSTREAM_LOCAL_EMAIL_SAN",
    "DOWNSTREAM_LOCAL_IP_SAN",
    "DOWNSTREAM_LOCAL_OTHERNAME_SAN",
    "DOWNSTREAM_LOCAL_SUBJECT",
    "DOWNSTREAM_LOCAL_URI_SAN",
    "DOWNSTREAM_PEER_CERT",
    "DOWNSTREAM_PEER_CERT_V_END",
    "DOWNSTREAM_PEER_CERT_V_START",
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_1",
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_256",
    "DOWNSTREAM_PEER_CHAIN_SERIALS",
    "DOWNSTREAM_PEER_DNS_SAN",
    "DOWNSTREAM_PEER_EMAIL_SAN",
    "DOWNSTREAM_PEER_FINGERPRINT_1",
    "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_IP_SAN",
    "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_PEER_ISSUER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_ISSUER_SERIAL",
    "DOWNSTREAM_PEER_OTHERNAME_SAN",
    "DOWNSTREAM_PEER_SERIAL",
    "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_GROUP",
    "DOWNSTREAM_TLS_SESSION_ID",
    "DOWNSTREAM_TLS_VERSION",
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON",
    "DOWNSTREAM_WIRE_BYTES_RECEIVED",
    "DOWNSTREAM_WIRE_BYTES_SENT",
    "DURATION",
    "EMIT_TIME",
    "EMIT_TIME_LOCAL",
    "FILTER_CHAIN_NAME",
    "PACKETS_RETRANSMITTED",
    "PATH",
    "QUERY_PARAMS",
    "REQUESTED_SERVER_NAME",
    "REQUEST_DURATION",
    "REQUEST_HEADERS_BYTES",
    "REQUEST_TX_DURATION",
    "RESPONSE_CODE_DETAILS",
    "RESPONSE_DURATION",
    "RESPONSE_FLAGS",
    "RESPONSE_FLAGS_LONG",
    "RESPONSE_HEADERS_BYTES",
    "RESPONSE_TRAILERS_BYTES",
    "RESPONSE_TX_DURATION",
    "ROUTE_RESOLUTION_COUNT",
    "ROUTE_RESOLUTION_TIME_US",
    "START_TIME_LOCAL",
    "TLS_JA3_FINGERPRINT",
    "TLS_JA4_FINGERPRINT",
    "TRACE_ID",
    "UNIQUE_ID",
    "UPSTREAM_CONNECTION_ID",
    "UPSTREAM_CONNECTION_IDS_ATTEMPTED",
    "UPSTREAM_CONNECTION_POOL_READY_DURATION",
    "UPSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED",
    "UPSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
    "UPSTREAM_DETECTED_CLOSE_TYPE",
    "UPSTREAM_HEADER_BYTES_RECEIVED",
    "UPSTREAM_HEADER_BYTES_SENT",
    "UPSTREAM_HOSTS_ATTEMPTED",
    "UPSTREAM_HOSTS_ATTEMPTED_WITHOUT_PORT",
    "UPSTREAM_HOST_NAME",
    "UPSTREAM_HOST_NAMES_ATTEMPTED",
    "UPSTREAM_HOST_NAMES_ATTEMPTED_WITHOUT_PORT",
    "UPSTREAM_HOST_NAME_WITHOUT_PORT",
    "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "UPSTREAM_LOCAL_CLOSE_REASON",
    "UPSTREAM_LOCAL_DNS_SAN",
    "UPSTREAM_LOCAL_IP_SAN",
    "UPSTREAM_LOCAL_PORT",
    "UPSTREAM_LOCAL_URI_SAN",
    "UPSTREAM_PEER_CERT",
    "UPSTREAM_PEER_CERT_V_END",
    "UPSTREAM_PEER_CERT_V_START",
    "UPSTREAM_PEER_DNS_SAN",
    "UPSTREAM_PEER_IP_SAN",
    "UPSTREAM_PEER_ISSUER",
    "UPSTREAM_PEER_SUBJECT",
    "UPSTREAM_PEER_URI_SAN",
    "UPSTREAM_PROTOCOL",
    "UPSTREAM_REMOTE_ADDRESS_ENDPOINT_ID",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "UPSTREAM_SERVER_NAME",
    "UPSTREAM_TLS_CIPHER",
    "UPSTREAM_TLS_GROUP",
    "UPSTREAM_TLS_SESSION_ID",
    "UPSTREAM_TLS_VERSION",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "UPSTREAM_WIRE_BYTES_RECEIVED",
    "UPSTREAM_WIRE_BYTES_SENT",
    "VIRTUAL_CLUSTER_NAME",
];

/// Envoy 1.40's commands that take an argument and that mesh leaves empty.
const ENVOY_COMMANDS_WITH_ARGUMENT: &[&str] = &[
    "TRAILER",
    "METADATA",
    "UPSTREAM_METADATA",
    "CLUSTER_METADATA",
    "DYNAMIC_METADATA",
    "FILTER_STATE",
    "UPSTREAM_FILTER_STATE",
    "QUERY_PARAM",
    "COMMON_DURATION",
    "CEL",
];

/// Every command name mesh accepts, for tests that hold them against the real Envoy: (name,
/// needs an argument).
pub fn known_commands() -> impl Iterator<Item = (&'static str, bool)> {
    const EVALUATED: &[&str] = &[
        "PROTOCOL",
        "UPSTREAM_CLUSTER",
        "UPSTREAM_CLUSTER_RAW",
        "ROUTE_NAME",
        "DOWNSTREAM_REMOTE_ADDRESS",
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_REMOTE_PORT",
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_DIRECT_REMOTE_PORT",
        "DOWNSTREAM_LOCAL_ADDRESS",
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_LOCAL_PORT",
        "DOWNSTREAM_DIRECT_LOCAL_ADDRESS",
        "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_DIRECT_LOCAL_PORT",
        "UPSTREAM_HOST",
        "UPSTREAM_REMOTE_ADDRESS",
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
        "UPSTREAM_REMOTE_PORT",
        "START_TIME",
        "HOSTNAME",
        "STREAM_ID",
        "RESPONSE_CODE",
    ];
    EVALUATED
        .iter()
        .chain(ENVOY_COMMANDS)
        .map(|c| (*c, false))
        .chain(
            ["REQ", "RESP", "ENVIRONMENT"]
                .iter()
                .chain(ENVOY_COMMANDS_WITH_ARGUMENT)
                .map(|c| (*c, true)),
        )
}

/// A header value with `%…%` commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderFormat {
    /// The pieces, in order.
    pub parts: Vec<FormatPart>,
}

/// `name?alternative` of `REQ`/`RESP`.
fn header_pair(cmd: &str, arg: &str) -> Result<(HeaderName, Option<HeaderName>), FormatError> {
    let bad = || FormatError::MissingParameters(cmd.to_owned());
    let parse =
        |n: &str| HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).map_err(|_| bad());
    let (main, alt) = match arg.split_once('?') {
        Some((m, a)) => (m, Some(a)),
        None => (arg, None),
    };
    Ok((parse(main)?, alt.map(parse).transpose()?))
}

/// One `%…%` command: `NAME`, `NAME(arg)`, either followed by `:max`.
fn command(cmd: &str) -> Result<FormatPart, FormatError> {
    let (name, arg, rest) = match cmd.find('(') {
        Some(open) => {
            let close = cmd
                .rfind(')')
                .filter(|c| *c > open)
                .ok_or_else(|| FormatError::MissingParameters(cmd[..open].to_owned()))?;
            (&cmd[..open], Some(&cmd[open + 1..close]), &cmd[close + 1..])
        }
        None => match cmd.split_once(':') {
            Some((n, _)) => (n, None, &cmd[n.len()..]),
            None => (cmd, None, ""),
        },
    };
    let max = match rest.strip_prefix(':') {
        Some(n) => Some(
            n.parse::<usize>()
                .map_err(|_| FormatError::BadMaxLength(cmd.to_owned()))?,
        ),
        None if rest.is_empty() => None,
        None => return Err(FormatError::UnknownCommand(cmd.to_owned())),
    };
    fn needs<'s>(name: &str, a: Option<&'s str>) -> Result<&'s str, FormatError> {
        a.filter(|a| !a.is_empty())
            .ok_or_else(|| FormatError::MissingParameters(name.to_owned()))
    }
    use AddressPart::{Full, Port, WithoutPort};
    Ok(match (name, arg) {
        ("REQ", a) => {
            let (m, alt) = header_pair(name, needs(name, a)?)?;
            FormatPart::Req(m, alt, max)
        }
        ("RESP", a) => {
            let (m, alt) = header_pair(name, needs(name, a)?)?;
            FormatPart::Resp(m, alt, max)
        }
        ("ENVIRONMENT", a) => {
            // Unset: Envoy's unspecified value `-` (observed).
            let v = std::env::var(needs(name, a)?).unwrap_or_else(|_| "-".to_owned());
            FormatPart::Literal(match max {
                Some(n) => truncate(&v, n).to_owned(),
                None => v,
            })
        }
        ("START_TIME", a) if max.is_none() => FormatPart::StartTime(a.map(str::to_owned)),
        // `PATH` takes optional options; mesh leaves it empty either way.
        ("PATH", _) => FormatPart::Unavailable(cmd.to_owned()),
        (_, Some(_)) if ENVOY_COMMANDS_WITH_ARGUMENT.contains(&name) => {
            FormatPart::Unavailable(cmd.to_owned())
        }
        (n, None) if ENVOY_COMMANDS_WITH_ARGUMENT.contains(&n) => {
            return Err(FormatError::MissingParameters(n.to_owned()));
        }
        (n, _)
            if (arg.is_some() || max.is_some())
                && known_commands().any(|(c, with_arg)| c == n && !with_arg) =>
        {
            return Err(FormatError::NoParameters(n.to_owned()));
        }
        ("PROTOCOL", None) => FormatPart::Protocol,
        ("UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW", None) => FormatPart::UpstreamCluster,
        ("ROUTE_NAME", None) => FormatPart::RouteName,
        ("HOSTNAME", None) => FormatPart::Hostname,
        ("STREAM_ID", None) => FormatPart::StreamId,
        ("RESPONSE_CODE", None) => FormatPart::ResponseCode,
        ("DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS", None) => {
            FormatPart::DownstreamRemote(Full)
        }
        (
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
            | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
            None,
        ) => FormatPart::DownstreamRemote(WithoutPort),
        ("DOWNSTREAM_REMOTE_PORT" | "DOWNSTREAM_DIRECT_REMOTE_PORT", None) => {
            FormatPart::DownstreamRemote(Port)
        }
        ("DOWNSTREAM_LOCAL_ADDRESS" | "DOWNSTREAM_DIRECT_LOCAL_ADDRESS", None) => {
            FormatPart::DownstreamLocal(Full)
        }
        (
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT"
            | "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT",
            None,
        ) => FormatPart::DownstreamLocal(WithoutPort),
        ("DOWNSTREAM_LOCAL_PORT" | "DOWNSTREAM_DIRECT_LOCAL_PORT", None) => {
            FormatPart::DownstreamLocal(Port)
        }
        ("UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS", None) => FormatPart::UpstreamRemote(Full),
        ("UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => FormatPart::UpstreamRemote(WithoutPort),
        ("UPSTREAM_REMOTE_PORT", None) => FormatPart::UpstreamRemote(Port),
        (n, None) if ENVOY_COMMANDS.contains(&n) => FormatPart::Unavailable(cmd.to_owned()),
        (n, _) => return Err(FormatError::UnknownCommand(n.to_owned())),
    })
}

/// Where the command starting `s` (after its opening `%`) ends: the next `%`, except that
/// an argument in parentheses may itself hold `%` (`%START_TIME(%s)%`), so it ends at `)%`
/// or `):max%`.
fn command_end(s: &str) -> Option<usize> {
    let open = s.find(['(', '%'])?;
    if s.as_bytes()[open] == b'%' {
        return Some(open);
    }
    let mut from = open;
    while let Some(i) = s[from..].find(')') {
        let close = from + i;
        let tail = &s[close + 1..];
        let digits = tail
            .strip_prefix(':')
            .map_or(0, |t| 1 + t.bytes().take_while(u8::is_ascii_digit).count());
        if tail[digits..].starts_with('%') {
            return Some(close + 1 + digits);
        }
        from = close + 1;
    }
    s.find('%')
}

/// `s` cut to at most `max` bytes (on a character boundary).
fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl HeaderFormat {
    /// Parses Envoy's header value syntax: `%%` is a literal `%`, `%COMMAND%`,
    /// `%COMMAND(arg)%` and either with `:max` a command. A lone `%` is kept literally. A
    /// command Envoy does not know is refused as Envoy refuses it.
    pub fn parse(s: &str) -> Result<HeaderFormat, FormatError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(stripped) = after.strip_prefix('%') {
                lit.push('%');
                rest = stripped;
                continue;
            }
            let Some(end) = command_end(after) else {
                lit.push('%');
                rest = after;
                continue;
            };
            let part = command(&after[..end])?;
            if let FormatPart::Literal(l) = part {
                lit.push_str(&l);
            } else {
                if !lit.is_empty() {
                    parts.push(FormatPart::Literal(std::mem::take(&mut lit)));
                }
                parts.push(part);
            }
            rest = &after[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(FormatPart::Literal(lit));
        }
        Ok(HeaderFormat { parts })
    }

    /// The value for a request (or, with [`FormatContext::response`], its response).
    pub fn evaluate(&self, ctx: &FormatContext<'_>) -> String {
        let mut out = String::new();
        fn header<'h>(
            map: Option<&'h HeaderMap>,
            n: &HeaderName,
            alt: &Option<HeaderName>,
        ) -> Option<&'h str> {
            let map = map?;
            map.get(n)
                .or_else(|| alt.as_ref().and_then(|a| map.get(a)))
                .and_then(|v| v.to_str().ok())
        }
        let push_cut = |out: &mut String, v: Option<&str>, max: &Option<usize>| {
            if let Some(v) = v {
                out.push_str(max.map_or(v, |m| truncate(v, m)));
            }
        };
        for p in &self.parts {
            match p {
                FormatPart::Literal(l) => out.push_str(l),
                FormatPart::Req(n, alt, max) => {
                    push_cut(&mut out, header(Some(ctx.request), n, alt), max);
                }
                FormatPart::Resp(n, alt, max) => {
                    push_cut(&mut out, header(ctx.response.map(|r| r.0), n, alt), max);
                }
                FormatPart::Protocol => out.push_str(ctx.protocol),
                FormatPart::UpstreamCluster => out.push_str(ctx.cluster),
                FormatPart::RouteName => out.push_str(ctx.route_name),
                FormatPart::DownstreamRemote(part) => {
                    if let Some(a) = ctx.downstream_remote {
                        part.render(a, &mut out);
                    }
                }
                FormatPart::DownstreamLocal(part) => {
                    if let Some(a) = ctx.downstream_local {
                        part.render(a, &mut out);
                    }
                }
                FormatPart::UpstreamRemote(part) => {
                    if let (Some(a), Some(_)) = (ctx.upstream_host, ctx.response) {
                        part.render(a, &mut out);
                    }
                }
                FormatPart::StartTime(format) => {
                    let f = format.as_deref().unwrap_or(DEFAULT_TIME_FORMAT);
                    crate::time::format_utc(ctx.start_time, f, &mut out);
                }
                FormatPart::Hostname => out.push_str(ctx.hostname),
                FormatPart::StreamId => {
                    if let Some(v) = ctx
                        .request
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                    {
                        out.push_str(v);
                    }
                }
                FormatPart::ResponseCode => {
                    use std::fmt::Write;
                    let _ = write!(out, "{}", ctx.response.map_or(0, |r| r.1));
                }
                FormatPart::Unavailable(_) => {}
            }
        }
        out
    }
}

/// Envoy's `%START_TIME%` format.
const DEFAULT_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%E3SZ";

/// What formatters read.
#[derive(Debug, Clone, Copy)]
pub struct FormatContext<'a> {
    /// The request headers.
    pub request: &'a HeaderMap,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// The upstream cluster's name.
    pub cluster: &'a str,
    /// The route's name.
    pub route_name: &'a str,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    pub downstream_remote: Option<SocketAddr>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    pub downstream_local: Option<SocketAddr>,
    /// The host that answered (read only with a response).
    pub upstream_host: Option<SocketAddr>,
    /// The response headers and status, when formatting response headers.
    pub response: Option<(&'a HeaderMap, u16)>,
    /// When the request started (`%START_TIME%`).
    pub start_time: SystemTime,
    /// `%HOSTNAME%`.
    pub hostname: &'a str,
}

impl<'a> FormatContext<'a> {
    /// A context with the request, protocol and cluster; nothing else known, started now.
    pub fn new(request: &'a HeaderMap, protocol: &'a str, cluster: &'a str) -> Self {
        FormatContext {
            request,
            protocol,
            cluster,
            route_name: "",
            downstream_remote: None,
            downstream_local: None,
            upstream_host: None,
            response: None,
            start_time: SystemTime::now(),
            hostname: "",
        }
    }
}

/// One header to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderToAdd {
    /// Name.
    pub name: HeaderName,
    /// Value template.
    pub value: HeaderFormat,
    /// `append_action` (or the deprecated `append`).
    pub action: AppendAction,
    /// `keep_empty_value`: add the header even when the value evaluates empty.
    pub keep_empty_value: bool,
}

/// One level's mutations.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HeaderMutationLevel {
    /// `*_headers_to_remove`.
    pub remove: Vec<HeaderName>,
    /// `*_headers_to_add`.
    pub add: Vec<HeaderToAdd>,
}

/// Mutations of every level, most specific first.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HeaderMutations {
    /// Route, virtual host, route configuration (empty levels left out).
    pub levels: Vec<HeaderMutationLevel>,
}

impl HeaderMutations {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// Applies every level to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap, ctx: &FormatContext<'_>) {
        for level in &self.levels {
            for n in &level.remove {
                headers.remove(n);
            }
            for h in &level.add {
                let v = h.value.evaluate(ctx);
                if v.is_empty() && !h.keep_empty_value {
                    continue;
                }
                let Ok(v) = HeaderValue::from_str(&v) else {
                    continue;
                };
                let exists = headers.contains_key(&h.name);
                match h.action {
                    AppendAction::AppendIfExistsOrAdd => {
                        headers.append(h.name.clone(), v);
                    }
                    AppendAction::AddIfAbsent if !exists => {
                        headers.insert(h.name.clone(), v);
                    }
                    AppendAction::OverwriteIfExistsOrAdd => {
                        headers.insert(h.name.clone(), v);
                    }
                    AppendAction::OverwriteIfExists if exists => {
                        headers.insert(h.name.clone(), v);
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(name: &'static str, v: &str, action: AppendAction) -> HeaderToAdd {
        HeaderToAdd {
            name: HeaderName::from_static(name),
            value: HeaderFormat::parse(v).unwrap(),
            action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn formatters_parse_and_evaluate() {
        let mut req = HeaderMap::new();
        req.insert("x-user", HeaderValue::from_static("alice"));
        req.insert("x-request-id", HeaderValue::from_static("rid"));
        let mut ctx = FormatContext::new(&req, "HTTP/1.1", "outbound|80||a");
        ctx.start_time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(86_400_123);
        ctx.downstream_remote = Some("10.0.0.1:0".parse().unwrap());
        ctx.downstream_local = Some("0.0.0.0:80".parse().unwrap());
        ctx.upstream_host = Some("10.0.0.9:8080".parse().unwrap());
        ctx.route_name = "r1";
        ctx.hostname = "pod-a";
        let eval = |s: &str, ctx: &FormatContext<'_>| HeaderFormat::parse(s).unwrap().evaluate(ctx);
        assert_eq!(
            eval(
                "u=%REQ(X-User)% 100%% %PROTOCOL% %UPSTREAM_CLUSTER%%START_TIME% 5%",
                &ctx
            ),
            "u=alice 100% HTTP/1.1 outbound|80||a1970-01-02T00:00:00.123Z 5%"
        );
        assert_eq!(eval("%REQ(x-missing)%", &ctx), "");
        assert_eq!(eval("%REQ(x-missing?x-user):3%", &ctx), "ali");
        assert_eq!(
            eval(
                "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT%",
                &ctx
            ),
            "10.0.0.1:0 10.0.0.1 80"
        );
        assert_eq!(
            eval("%ROUTE_NAME% %HOSTNAME% %STREAM_ID% %START_TIME(%s)%", &ctx),
            "r1 pod-a rid 86400"
        );
        // Request headers: no upstream host, no response yet.
        assert_eq!(
            eval(
                "[%UPSTREAM_HOST%][%RESP(x-up)%] %RESPONSE_CODE% [%BYTES_SENT%]",
                &ctx
            ),
            "[][] 0 []"
        );
        let mut resp = HeaderMap::new();
        resp.insert("x-up", HeaderValue::from_static("yes"));
        ctx.response = Some((&resp, 201));
        assert_eq!(
            eval(
                "%UPSTREAM_REMOTE_ADDRESS% %UPSTREAM_REMOTE_PORT% %RESP(x-up)% %RESPONSE_CODE%",
                &ctx
            ),
            "10.0.0.9:8080 8080 yes 201"
        );
    }

    #[test]
    fn commands_envoy_refuses_are_refused() {
        assert_eq!(
            HeaderFormat::parse("%REQUEST_ID%").unwrap_err().to_string(),
            "Not supported field in StreamInfo: REQUEST_ID"
        );
        assert!(matches!(
            HeaderFormat::parse("%REQ%"),
            Err(FormatError::MissingParameters(_))
        ));
        assert!(matches!(
            HeaderFormat::parse("%DYNAMIC_METADATA%"),
            Err(FormatError::MissingParameters(_))
        ));
        assert!(matches!(
            HeaderFormat::parse("%REQ(x):a%"),
            Err(FormatError::BadMaxLength(_))
        ));
        assert_eq!(
            HeaderFormat::parse("%UPSTREAM_HOST:3%")
                .unwrap_err()
                .to_string(),
            "UPSTREAM_HOST does not take any parameters or length"
        );
        assert!(matches!(
            HeaderFormat::parse("%HOSTNAME(x)%"),
            Err(FormatError::NoParameters(_))
        ));
        // Known to Envoy, no value in mesh: accepted, empty.
        let f = HeaderFormat::parse("a%UPSTREAM_TLS_VERSION%b%UPSTREAM_METADATA([\"istio\"])%")
            .unwrap();
        assert_eq!(
            f.evaluate(&FormatContext::new(&HeaderMap::new(), "HTTP/1.1", "c")),
            "ab"
        );
        // A lone or unterminated % stays literal.
        let f = HeaderFormat::parse("50% off").unwrap();
        assert_eq!(f.parts, vec![FormatPart::Literal("50% off".into())]);
    }

    #[test]
    fn append_actions_and_level_order() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("orig"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let req = HeaderMap::new();
        let ctx = FormatContext::new(&req, "HTTP/1.1", "c");
        let m = HeaderMutations {
            levels: vec![
                HeaderMutationLevel {
                    remove: vec![HeaderName::from_static("x-gone")],
                    add: vec![
                        add("x-a", "route", AppendAction::AppendIfExistsOrAdd),
                        add("x-b", "route", AppendAction::AddIfAbsent),
                        add("x-c", "route", AppendAction::OverwriteIfExists),
                        add("x-e", "", AppendAction::OverwriteIfExistsOrAdd),
                    ],
                },
                HeaderMutationLevel {
                    remove: vec![],
                    add: vec![
                        add("x-b", "vh", AppendAction::AddIfAbsent),
                        add("x-d", "global", AppendAction::OverwriteIfExistsOrAdd),
                    ],
                },
                HeaderMutationLevel {
                    remove: vec![],
                    add: vec![add("x-d", "rc", AppendAction::OverwriteIfExistsOrAdd)],
                },
            ],
        };
        m.apply(&mut h, &ctx);
        let all = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-a"), vec!["orig", "route"]);
        assert_eq!(all("x-b"), vec!["route"]);
        assert!(all("x-c").is_empty());
        assert_eq!(all("x-d"), vec!["rc"]);
        assert!(all("x-e").is_empty());
        assert!(all("x-gone").is_empty());
    }
}
