//! Request and response header mutations of routes, virtual hosts and route configurations
//! (`*_headers_to_add` with `append_action`, `*_headers_to_remove`), and the `%…%` value
//! formatters they may use.
//!
//! Levels are applied from the most specific (route) to the least (route configuration), each
//! level removing before it adds, so with overwrite actions the route configuration wins, as
//! in Envoy without `most_specific_header_mutations_wins`.

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

/// One piece of a header value template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatPart {
    /// Literal text (`%%` already unescaped).
    Literal(String),
    /// `%REQ(name)%`: the request header's first value.
    Req(HeaderName),
    /// `%PROTOCOL%`: `HTTP/1.1` or `HTTP/2`.
    Protocol,
    /// `%UPSTREAM_CLUSTER%`.
    UpstreamCluster,
    /// A command mesh has no value for: evaluates to nothing (Envoy leaves an unavailable
    /// value empty in headers).
    Unavailable(String),
}

/// A header value with `%…%` commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderFormat {
    /// The pieces, in order.
    pub parts: Vec<FormatPart>,
}

impl HeaderFormat {
    /// Parses Envoy's header value syntax: `%%` is a literal `%`, `%COMMAND%` or
    /// `%COMMAND(arg)%` a command. A lone `%` is kept literally.
    pub fn parse(s: &str) -> HeaderFormat {
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
            let Some(end) = after.find('%') else {
                lit.push('%');
                rest = after;
                continue;
            };
            let cmd = &after[..end];
            let part = if let Some(arg) = cmd.strip_prefix("REQ(").and_then(|a| a.strip_suffix(')'))
            {
                let name = arg.split(['?', ')']).next().unwrap_or("");
                match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    Ok(n) => FormatPart::Req(n),
                    Err(_) => FormatPart::Unavailable(cmd.to_owned()),
                }
            } else {
                match cmd {
                    "PROTOCOL" => FormatPart::Protocol,
                    "UPSTREAM_CLUSTER" => FormatPart::UpstreamCluster,
                    _ => FormatPart::Unavailable(cmd.to_owned()),
                }
            };
            if !lit.is_empty() {
                parts.push(FormatPart::Literal(std::mem::take(&mut lit)));
            }
            parts.push(part);
            rest = &after[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(FormatPart::Literal(lit));
        }
        HeaderFormat { parts }
    }

    /// The value for a request.
    pub fn evaluate(&self, ctx: &FormatContext<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                FormatPart::Literal(l) => out.push_str(l),
                FormatPart::Req(n) => {
                    if let Some(v) = ctx.request.get(n).and_then(|v| v.to_str().ok()) {
                        out.push_str(v);
                    }
                }
                FormatPart::Protocol => out.push_str(ctx.protocol),
                FormatPart::UpstreamCluster => out.push_str(ctx.cluster),
                FormatPart::Unavailable(_) => {}
            }
        }
        out
    }
}

/// What formatters read.
#[derive(Debug, Clone, Copy)]
pub struct FormatContext<'a> {
    /// The request headers.
    pub request: &'a HeaderMap,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// The upstream cluster's name.
    pub cluster: &'a str,
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
            value: HeaderFormat::parse(v),
            action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn formatters_parse_and_evaluate() {
        let mut req = HeaderMap::new();
        req.insert("x-user", HeaderValue::from_static("alice"));
        let ctx = FormatContext {
            request: &req,
            protocol: "HTTP/1.1",
            cluster: "outbound|80||a",
        };
        let f = HeaderFormat::parse(
            "u=%REQ(X-User)% 100%% %PROTOCOL% %UPSTREAM_CLUSTER%%START_TIME% 5%",
        );
        assert_eq!(f.evaluate(&ctx), "u=alice 100% HTTP/1.1 outbound|80||a 5%");
        assert_eq!(HeaderFormat::parse("%REQ(x-missing)%").evaluate(&ctx), "");
    }

    #[test]
    fn append_actions_and_level_order() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("orig"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let req = HeaderMap::new();
        let ctx = FormatContext {
            request: &req,
            protocol: "HTTP/1.1",
            cluster: "c",
        };
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
