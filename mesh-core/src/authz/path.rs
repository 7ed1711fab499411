//! Request path normalization as Istio configures Envoy's HTTP connection manager
//! (`meshConfig.pathNormalization`), applied before authorization so policies see the path
//! the application will see:
//!
//! * `NONE`: nothing.
//! * `BASE` (default): `normalize_path` — RFC 3986 normalization: `%`-encoded unreserved
//!   characters decoded, remaining escapes kept as sent (an escaped NUL refused), `.` and `..` segments resolved,
//!   `\` treated as `/`.
//! * `MERGE_SLASHES`: `BASE` + `merge_slashes` (`//` → `/`).
//! * `DECODE_AND_MERGE_SLASHES`: `MERGE_SLASHES` + `%2F`/`%5C` (any case) decoded, with
//!   Envoy's `UNESCAPE_AND_REDIRECT` action (the client is redirected to the decoded path).
//!
//! The query string is never touched. A path that is not origin-form (`/…`) or carries an
//! invalid escape is rejected with 400, as Envoy does.

/// `meshConfig.pathNormalization.normalization`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathNormalization {
    /// `NONE`.
    None,
    /// `BASE` (Istio's default).
    #[default]
    Base,
    /// `MERGE_SLASHES`.
    MergeSlashes,
    /// `DECODE_AND_MERGE_SLASHES`.
    DecodeAndMergeSlashes,
}

/// The outcome of normalizing a request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NormalizedPath {
    /// Forward with this `:path` (query included).
    Forward(String),
    /// Answer 307 with `Location` = this path (escaped slashes were decoded).
    Redirect(String),
    /// Answer 400 (Envoy's `path_normalization_failed`).
    Reject,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalizes `path` (a `:path` value, query included) as `mode` says.
pub fn normalize_path(path: &str, mode: PathNormalization) -> NormalizedPath {
    if mode == PathNormalization::None {
        return NormalizedPath::Forward(path.to_owned());
    }
    let (p, query) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    if !p.starts_with('/') && !p.starts_with('\\') || p.contains('#') {
        return NormalizedPath::Reject;
    }
    // 1. Escapes: decode unreserved characters and keep the rest as sent (Envoy 1.40 keeps
    //    `%2f` and `%3b` lower-case); with DECODE_AND_MERGE_SLASHES also decode %2F and %5C.
    //    An escaped NUL is refused (Envoy answers 400).
    let bytes = p.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut decoded_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return NormalizedPath::Reject;
            };
            let c = h * 16 + l;
            if c == 0 {
                return NormalizedPath::Reject;
            }
            if is_unreserved(c) {
                out.push(c);
            } else if mode == PathNormalization::DecodeAndMergeSlashes && (c == b'/' || c == b'\\')
            {
                out.push(b'/');
                decoded_slash = true;
            } else {
                out.extend_from_slice(&bytes[i..i + 3]);
            }
            i += 3;
        } else {
            out.push(if b == b'\\' { b'/' } else { b });
            i += 1;
        }
    }
    let Ok(decoded) = String::from_utf8(out) else {
        return NormalizedPath::Reject;
    };
    // 2. Dot segments (RFC 3986 5.2.4); `..` above the root stays at the root.
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded[1..].split('/').collect();
    let last = parts.len() - 1;
    for (n, seg) in parts.iter().enumerate() {
        match *seg {
            "." => {
                if n == last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if n == last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    let mut normalized = format!("/{}", segments.join("/"));
    // 3. merge_slashes.
    if matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    ) {
        let mut merged = String::with_capacity(normalized.len());
        for c in normalized.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        normalized = merged;
    }
    normalized.push_str(query);
    if decoded_slash {
        NormalizedPath::Redirect(normalized)
    } else {
        NormalizedPath::Forward(normalized)
    }
}

/// Whether `path` is already what [`normalize_path`] would forward unchanged: origin-form,
/// no escapes, no `\\`, no fragment, no `.`/`..` segments (and, when slashes are merged, no
/// `//`). A cheap scan without allocation, so requests with ordinary paths skip
/// normalization; `false` only means "run [`normalize_path`]".
pub fn is_normalized(path: &str, mode: PathNormalization) -> bool {
    if mode == PathNormalization::None {
        return true;
    }
    let p = match path.find('?') {
        Some(i) => &path[..i],
        None => path,
    };
    let bytes = p.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let merge = mode != PathNormalization::Base;
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match b {
            b'%' | b'\\' | b'#' => return false,
            b'/' => {
                let seg = &bytes[segment_start..i];
                if seg == b"." || seg == b".." || (merge && seg.is_empty()) {
                    return false;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    let last = &bytes[segment_start..];
    last != b"." && last != b".."
}

/// The path without query string and fragment, as the RBAC `url_path` matcher sees it.
pub fn path_without_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use NormalizedPath::*;
    use PathNormalization::*;

    #[test]
    fn base_resolves_dot_segments_and_unreserved_escapes() {
        assert_eq!(normalize_path("/admin/../x", Base), Forward("/x".into()));
        assert_eq!(
            normalize_path("/a/./b/../../c?q=/../", Base),
            Forward("/c?q=/../".into())
        );
        assert_eq!(normalize_path("/../../etc", Base), Forward("/etc".into()));
        assert_eq!(normalize_path("/%61dmin", Base), Forward("/admin".into()));
        assert_eq!(normalize_path("/a/%2e%2E/b", Base), Forward("/b".into()));
        assert_eq!(normalize_path("/a/..", Base), Forward("/".into()));
        assert_eq!(normalize_path("/a\\..\\b", Base), Forward("/b".into()));
        // Escaped slashes are kept as sent in BASE (as Envoy 1.40 does): `/admin%2fx` is not `/admin/x`.
        assert_eq!(
            normalize_path("/admin%2fx", Base),
            Forward("/admin%2fx".into())
        );
        // Slashes are not merged in BASE.
        assert_eq!(normalize_path("//admin", Base), Forward("//admin".into()));
    }

    #[test]
    fn merge_and_decode_slashes() {
        assert_eq!(
            normalize_path("//admin///x", MergeSlashes),
            Forward("/admin/x".into())
        );
        assert_eq!(
            normalize_path("/admin%2Fx", DecodeAndMergeSlashes),
            Redirect("/admin/x".into())
        );
        assert_eq!(
            normalize_path("/a%5c%5Cb", DecodeAndMergeSlashes),
            Redirect("/a/b".into())
        );
    }

    #[test]
    fn invalid_paths_are_rejected() {
        assert_eq!(normalize_path("/a%zz", Base), Reject);
        assert_eq!(normalize_path("/a%2", Base), Reject);
        assert_eq!(normalize_path("/ad%00min", Base), Reject);
        // Other escapes stay as sent, in their case.
        assert_eq!(
            normalize_path("/p%3bx/%e2%82%ac", Base),
            Forward("/p%3bx/%e2%82%ac".into())
        );
        assert_eq!(normalize_path("*", Base), Reject);
        assert_eq!(normalize_path("http://x/a", Base), Reject);
        assert_eq!(
            normalize_path("http://x/a", None),
            Forward("http://x/a".into())
        );
    }

    #[test]
    fn fast_check_agrees_with_normalization() {
        for path in [
            "/",
            "/a",
            "/a/b.txt?x=/../",
            "/a/..",
            "/a/./b",
            "/.",
            "/..",
            "/a%2Fb",
            "/a\\b",
            "//a",
            "/a//b",
            "/a/",
            "*",
            "/a#f",
            "/.well-known/x",
            "/a..b/c.",
        ] {
            for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                if is_normalized(path, mode) {
                    assert_eq!(
                        normalize_path(path, mode),
                        Forward(path.to_owned()),
                        "{path} {mode:?}"
                    );
                }
            }
        }
        assert!(is_normalized("/api/v1/items?id=3", Base));
        assert!(is_normalized("//a", Base));
        assert!(!is_normalized("//a", MergeSlashes));
        assert!(!is_normalized("/admin/../x", Base));
        assert!(!is_normalized("/admin%2Fx", Base));
    }

    #[test]
    fn url_path_strips_query_and_fragment() {
        assert_eq!(path_without_query("/a?b#c"), "/a");
        assert_eq!(path_without_query("/a#c"), "/a");
    }
}
