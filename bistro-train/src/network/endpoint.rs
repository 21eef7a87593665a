//! How a node reaches a peer's bucket: peers choose their endpoint URLs, so every request to
//! one is made under a policy that a hostile peer cannot steer.
//!
//! * **Addresses**: an endpoint that is, or resolves to, a loopback, private, link-local
//!   (cloud metadata), shared (CGNAT), unspecified or multicast address is refused unless the
//!   operator allows private endpoints (the local devnet does). Names are checked by the
//!   HTTP client's own resolver at connection time ([`GuardedResolver`]), so a name that
//!   later re-resolves to a private address is refused too.
//! * **Redirects** are never followed: an S3 read needs none, and a redirect is how a peer
//!   would point a node at an internal address.
//! * **Credentials**: a peer's bucket is read with exactly what the peer published in its
//!   committed URL (`read_key` and `read_secret` query parameters: a read-only key, public
//!   by design, as templar does on R2) or, when it published none, with unsigned requests.
//!   A node never signs a request to a peer with its own keys.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use object_store::ClientOptions;
use object_store::client::{HttpClient, HttpConnector};

/// Whether `ip` is an address a peer must not make a node connect to: loopback, private,
/// link-local (including the cloud metadata address 169.254.169.254), shared address space
/// (100.64.0.0/10), unspecified, broadcast, multicast, documentation, or the IPv6
/// equivalents (unique local fc00::/7, link-local fe80::/10, IPv4-mapped forms of the above).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let seg = v6.segments();
            // IPv4 carried inside IPv6: IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96)
            // and 6to4 (2002::/16) reach the embedded address.
            let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            if seg[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_internal_v4(embedded(seg[6], seg[7]));
            }
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_internal_v4(embedded(seg[6], seg[7]));
            }
            if seg[0] == 0x2002 {
                return is_internal_v4(embedded(seg[1], seg[2]));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)
                // Teredo (2001::/32) tunnels to arbitrary IPv4; 100::/64 is discard-only;
                // 64:ff9b:1::/48 is local-use NAT64.
                || (seg[0] == 0x2001 && seg[1] == 0)
                || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0])
                || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1)
        }
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        // IETF protocol assignments 192.0.0.0/24, 6to4 relay anycast 192.88.99.0/24,
        // benchmarking 198.18.0.0/15, reserved 240.0.0.0/4.
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 192 && o[1] == 88 && o[2] == 99)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240
}

/// The query parameters a peer's `s3://` URL may carry.
pub const PEER_URL_KEYS: [&str; 5] = ["endpoint", "region", "path_style", "read_key", "read_secret"];

/// Check every component of a peer's committed `s3://bucket/prefix?...` URL before any client
/// is built from it: the bucket name (3–63 of `a-z 0-9 . -`, not an IP address), the prefix
/// (`A-Z a-z 0-9 . _ - /`, no `..`), no user, password, port or fragment, only
/// [`PEER_URL_KEYS`] each at most once, a region of 1–32 `a-z 0-9 -` (object_store builds
/// the host name from it), `path_style` `true`/`false`, read keys of printable ASCII, and an
/// `endpoint` that is a plain `http(s)://host[:port]` without user, path, query or fragment.
/// Whether the endpoint's host is internal is [`check_literal`]'s and the resolver's job.
pub fn check_peer_url(u: &url::Url) -> Result<(), EndpointError> {
    let bad = |component: &str, reason: String| Err(EndpointError::Component { component: component.into(), reason });
    if !u.username().is_empty() || u.password().is_some() {
        return bad("userinfo", "a bucket URL carries no user or password".into());
    }
    if u.port().is_some() || u.fragment().is_some() {
        return bad("authority", "a bucket URL carries no port or fragment".into());
    }
    let bucket = u.host_str().unwrap_or_default();
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.parse::<std::net::Ipv4Addr>().is_err();
    if !bucket_ok {
        return bad("bucket", format!("`{bucket}` is not 3-63 characters of a-z, 0-9, '.' and '-'"));
    }
    let path = u.path();
    if !path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)) || path.split('/').any(|s| s == "..") {
        return bad("prefix", format!("`{path}` has characters outside A-Z, a-z, 0-9, '.', '_', '-', '/'"));
    }
    let mut seen = std::collections::HashSet::new();
    for (k, v) in u.query_pairs() {
        if !PEER_URL_KEYS.contains(&k.as_ref()) {
            return bad("query", format!("unknown parameter `{k}` (allowed: {})", PEER_URL_KEYS.join(", ")));
        }
        if !seen.insert(k.to_string()) {
            return bad("query", format!("parameter `{k}` given twice"));
        }
        match k.as_ref() {
            "region"
                if v.is_empty()
                    || v.len() > 32
                    || !v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                return bad("region", format!("`{v}` is not 1-32 characters of a-z, 0-9 and '-'"));
            }
            "path_style" if v != "true" && v != "false" => {
                return bad("path_style", format!("`{v}` is not true or false"));
            }
            "read_key" | "read_secret" if v.is_empty() || v.len() > 256 || !v.bytes().all(|b| b.is_ascii_graphic()) => {
                return bad(&k, "not 1-256 printable ASCII characters".into());
            }
            "endpoint" => {
                let e = url::Url::parse(&v).map_err(|err| EndpointError::Component {
                    component: "endpoint".into(),
                    reason: format!("`{v}`: {err}"),
                })?;
                if !matches!(e.scheme(), "http" | "https") {
                    return bad("endpoint", format!("`{v}`: only http:// and https:// endpoints"));
                }
                if !e.username().is_empty() || e.password().is_some() {
                    return bad("endpoint", format!("`{v}` carries a user or password"));
                }
                if e.host_str().is_none_or(str::is_empty)
                    || e.query().is_some()
                    || e.fragment().is_some()
                    || !matches!(e.path(), "" | "/")
                {
                    return bad("endpoint", format!("`{v}` is not a plain scheme://host[:port]"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Why an endpoint was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The endpoint is (or resolves to) an internal address.
    #[error("endpoint `{host}` is {addr}, an internal address; refused (allow it with --allow-private-endpoints)")]
    Internal {
        /// The host as written.
        host: String,
        /// The address.
        addr: IpAddr,
    },
    /// A component of a peer's bucket URL is malformed or not allowed.
    #[error("bucket URL component `{component}` refused: {reason}")]
    Component {
        /// Which component.
        component: String,
        /// Why.
        reason: String,
    },
    /// The name did not resolve.
    #[error("endpoint `{host}` does not resolve: {reason}")]
    Unresolved {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
}

/// Check an endpoint URL's host when it is an IP literal or `localhost` (names are checked
/// again by [`GuardedResolver`] when the client connects).
pub fn check_literal(endpoint: &str) -> Result<(), EndpointError> {
    let Ok(u) = url::Url::parse(endpoint) else { return Ok(()) };
    let host = match u.host() {
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        Some(url::Host::Domain(d))
            if d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost") =>
        {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        }
        _ => return Ok(()),
    };
    if is_internal(host) {
        return Err(EndpointError::Internal { host: u.host_str().unwrap_or_default().to_string(), addr: host });
    }
    Ok(())
}

/// A DNS resolver that refuses names resolving to internal addresses.
#[derive(Debug, Default)]
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| Box::new(EndpointError::Unresolved { host: host.clone(), reason: e.to_string() }))?
                .collect();
            if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
                return Err(Box::new(EndpointError::Internal { host, addr: bad.ip() }) as Box<_>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client factory for peers' buckets: no redirects, bounded timeouts, and (unless
/// internal endpoints are allowed) the [`GuardedResolver`].
#[derive(Debug, Clone)]
pub struct PeerConnector {
    /// Limit for one request.
    pub timeout: Duration,
    /// Whether internal addresses are allowed (the local devnet).
    pub allow_internal: bool,
}

impl HttpConnector for PeerConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A peer is read directly: a system proxy (HTTP_PROXY, ...) would take the
            // address check out of this node's hands.
            .no_proxy()
            .timeout(self.timeout)
            .connect_timeout(crate::protocol::CONNECT_TIMEOUT.min(self.timeout));
        if !self.allow_internal {
            b = b.dns_resolver(Arc::new(GuardedResolver));
        }
        let client = b.build().map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?;
        Ok(HttpClient::new(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        // Ranges the red team found missing (F12), and IPv4 inside IPv6.
        for a in [
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "192.88.99.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
            "100::1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in
            ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1", "198.20.0.1", "64:ff9b::808:808", "2002:808:808::"]
        {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn literal_endpoints_are_checked() {
        assert!(check_literal("http://127.0.0.1:9000").is_err());
        assert!(check_literal("http://LOCALHOST:9000").is_err());
        assert!(check_literal("http://[::1]:9000").is_err());
        assert!(check_literal("http://169.254.169.254/latest").is_err());
        assert!(check_literal("https://s3.example.com").is_ok());
        assert!(check_literal("https://8.8.8.8").is_ok());
    }

    #[test]
    fn f12_every_component_of_a_peer_url_is_checked() {
        let check = |s: &str| check_peer_url(&url::Url::parse(s).unwrap());
        for ok in [
            "s3://bkt",
            "s3://my-bucket.v2/prefix/a_b-1?region=auto",
            "s3://bkt?endpoint=https://abc.r2.cloudflarestorage.com&region=auto&read_key=AK&read_secret=s%2Fx",
            "s3://bkt?endpoint=http://s3.example.com:9000/&path_style=true",
        ] {
            assert!(check(ok).is_ok(), "{ok}: {:?}", check(ok));
        }
        for (bad, component) in [
            // The red team's bypass: an IP literal carried through the region into the host.
            ("s3://bkt?region=x%40127.0.0.1%3A8443%2F", "region"),
            ("s3://bkt?region=US-EAST-1", "region"),
            ("s3://bkt?endpoint=http://user:pw@s3.example.com", "endpoint"),
            ("s3://bkt?endpoint=http://s3.example.com/x?y=1", "endpoint"),
            ("s3://bkt?endpoint=ftp://s3.example.com", "endpoint"),
            ("s3://bkt?endpoint=http://a.com&endpoint=http://b.com", "query"),
            ("s3://bkt?proxy=http://10.0.0.1", "query"),
            ("s3://bkt?path_style=maybe", "path_style"),
            ("s3://bkt?read_key=a%20b", "read_key"),
            ("s3://u:p@bkt", "userinfo"),
            ("s3://bkt:9000", "authority"),
            ("s3://127.0.0.1", "bucket"),
            ("s3://Bucket", "bucket"),
            ("s3://bkt/a/../b%00", "prefix"),
        ] {
            match check(bad) {
                Err(EndpointError::Component { component: c, .. }) => assert_eq!(c, component, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
