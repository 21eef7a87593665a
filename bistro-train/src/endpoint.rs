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
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)
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
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
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
}
