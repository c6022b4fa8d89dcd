//! The Origin allow-list of the WebSocket handshake.
//!
//! Browsers send `Origin` on every WebSocket handshake and let any page
//! open a socket to any host, so without a check a page on another site
//! could use a visitor's token (from a query string it learned, say) or
//! cookies of a proxy in front. Requests without `Origin` come from
//! non-browser clients (servers, mobile apps, tests), which could forge the
//! header anyway; they pass.

/// One allowed origin: exact (`https://app.example.com`, port included when
/// not the default), a subdomain pattern (`https://*.example.com`, any
/// scheme when written without one: `*.example.com`), or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// (scheme or None for any, suffix starting with '.')
    Subdomain(Option<String>, String),
}

/// The allow-list; empty means every origin is accepted.
#[derive(Clone, Debug, Default)]
pub struct Origins(Vec<Pattern>);

impl Origins {
    /// Parses `--allowed-origin` values; the error names the bad one.
    pub fn parse(list: &[String]) -> Result<Origins, String> {
        let mut out = Vec::with_capacity(list.len());
        for raw in list {
            let p = raw.trim().trim_end_matches('/').to_ascii_lowercase();
            let bad = || {
                format!("--allowed-origin {raw:?}: write https://host[:port], https://*.example.com, *.example.com or *")
            };
            if p == "*" {
                out.push(Pattern::Any);
                continue;
            }
            let (scheme, host) = match p.split_once("://") {
                Some((s, h)) if !s.is_empty() => (Some(s.to_string()), h),
                Some(_) => return Err(bad()),
                None => (None, p.as_str()),
            };
            if host.is_empty() || host.contains(['/', '?', '#', ' ']) {
                return Err(bad());
            }
            if let Some(suffix) = host.strip_prefix('*') {
                if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                    return Err(bad());
                }
                out.push(Pattern::Subdomain(scheme, suffix.to_string()));
            } else if host.contains('*') {
                return Err(bad());
            } else {
                match scheme {
                    Some(_) => out.push(Pattern::Exact(p.clone())),
                    None => return Err(bad()),
                }
            }
        }
        Ok(Origins(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a handshake with this `Origin` header may proceed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        if self.0.is_empty() {
            return true;
        }
        let origin = origin.trim().to_ascii_lowercase();
        let (scheme, host) = match origin.split_once("://") {
            Some(x) => x,
            None => ("", origin.as_str()),
        };
        self.0.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(e) => *e == origin,
            Pattern::Subdomain(s, suffix) => {
                s.as_deref().is_none_or(|s| s == scheme)
                    && !scheme.is_empty()
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(list: &[&str]) -> Origins {
        Origins::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_and_subdomain_patterns() {
        let allow = o(&[
            "https://app.example.com",
            "https://*.example.org",
            "*.test.net",
        ]);
        assert!(allow.allows(None));
        assert!(allow.allows(Some("https://app.example.com")));
        assert!(allow.allows(Some("HTTPS://APP.EXAMPLE.COM")));
        assert!(!allow.allows(Some("http://app.example.com")));
        assert!(!allow.allows(Some("https://app.example.com:8443")));
        assert!(!allow.allows(Some("https://evil-app.example.com")));
        assert!(allow.allows(Some("https://a.b.example.org")));
        assert!(!allow.allows(Some("https://example.org")));
        assert!(!allow.allows(Some("https://evilexample.org")));
        assert!(!allow.allows(Some("http://x.example.org")));
        assert!(allow.allows(Some("http://x.test.net")));
        assert!(!allow.allows(Some("null")));
        assert!(o(&[]).allows(Some("https://anything")));
        assert!(o(&["*"]).allows(Some("null")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://a.*.com",
            "https://*example.com",
            "https://x/y",
            "://x",
        ] {
            assert!(Origins::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
