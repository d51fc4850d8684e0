//! Peer addresses: `mem://name`, `tcp://host:port`, `quic://host:port`, each optionally followed by
//! `/p/<peer-id>` so that a dialer can require whom it reaches.

use std::fmt;
use std::str::FromStr;

use crate::identity::PeerId;

/// Longest address text accepted, so that a hostile string cannot make parsing expensive.
const MAX_ADDRESS_LEN: usize = 1024;

/// The transport an address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// The in-process hub ([`crate::mem`]).
    Mem,
    /// TCP with Colony's signed handshake and stream multiplexing ([`crate::tcp`]).
    Tcp,
    /// QUIC over UDP with TLS 1.3 ([`crate::quic`]).
    Quic,
}

impl Scheme {
    /// The scheme as written in an address.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Mem => "mem",
            Scheme::Tcp => "tcp",
            Scheme::Quic => "quic",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dialable or listenable address.
///
/// ```
/// use colony_transports::{Address, Scheme};
/// let addr: Address = "tcp://127.0.0.1:4000".parse().unwrap();
/// assert_eq!(addr.scheme(), Scheme::Tcp);
/// assert_eq!(addr.location(), "127.0.0.1:4000");
/// assert!(addr.peer().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    scheme: Scheme,
    location: String,
    peer: Option<PeerId>,
}

impl Address {
    /// Builds an address from its parts. `location` is a hub name for `mem`, `host:port` otherwise.
    pub fn new(scheme: Scheme, location: impl Into<String>, peer: Option<PeerId>) -> Result<Self, AddressError> {
        let location = location.into();
        let text = format!("{scheme}://{location}");
        validate_location(scheme, &location).map_err(|reason| AddressError { text, reason })?;
        Ok(Self { scheme, location, peer })
    }

    /// The transport this address is for.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The hub name (`mem`) or `host:port` (`tcp`, `quic`).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The peer that must answer at this address, if the address names one.
    pub fn peer(&self) -> Option<PeerId> {
        self.peer
    }

    /// The same address, requiring `peer`.
    pub fn with_peer(mut self, peer: PeerId) -> Self {
        self.peer = Some(peer);
        self
    }

    /// The socket addresses the location resolves to (at least one), for `tcp` and `quic` addresses.
    pub async fn resolve(&self) -> Result<Vec<std::net::SocketAddr>, crate::error::TransportError> {
        let io = |source| crate::error::TransportError::Io {
            context: format!("resolving {}", self.location),
            source,
        };
        let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(self.location.as_str())
            .await
            .map_err(io)?
            .collect();
        if resolved.is_empty() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name resolves to no address",
            )));
        }
        Ok(resolved)
    }

    /// The same address without a required peer.
    pub fn without_peer(mut self) -> Self {
        self.peer = None;
        self
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.location)?;
        if let Some(peer) = &self.peer {
            write!(f, "/p/{peer}")?;
        }
        Ok(())
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason: &str| AddressError {
            text: text.chars().take(120).collect(),
            reason: reason.to_owned(),
        };
        if text.len() > MAX_ADDRESS_LEN {
            return Err(error(&format!("longer than {MAX_ADDRESS_LEN} characters")));
        }
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| error("expected SCHEME://LOCATION, e.g. tcp://127.0.0.1:4000"))?;
        let scheme = match scheme {
            "mem" => Scheme::Mem,
            "tcp" => Scheme::Tcp,
            "quic" => Scheme::Quic,
            other => return Err(error(&format!("unknown scheme '{other}' (expected mem, tcp or quic)"))),
        };
        let (location, peer) = match rest.split_once("/p/") {
            Some((location, peer)) => {
                let peer = peer.parse::<PeerId>().map_err(|e| error(&e.to_string()))?;
                (location, Some(peer))
            }
            None => (rest, None),
        };
        validate_location(scheme, location).map_err(|reason| error(&reason))?;
        Ok(Self {
            scheme,
            location: location.to_owned(),
            peer,
        })
    }
}

fn validate_location(scheme: Scheme, location: &str) -> Result<(), String> {
    if location.is_empty() {
        return Err("the location is empty".into());
    }
    if location.contains('/') || location.chars().any(char::is_whitespace) {
        return Err(format!("location '{location}' may not contain '/' or spaces"));
    }
    match scheme {
        Scheme::Mem => Ok(()),
        Scheme::Tcp | Scheme::Quic => {
            let (host, port) = location
                .rsplit_once(':')
                .ok_or_else(|| format!("location '{location}' must be HOST:PORT"))?;
            if host.is_empty() {
                return Err(format!("location '{location}' has no host"));
            }
            if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
                return Err(format!(
                    "IPv6 host in '{location}' must be written in brackets, e.g. [::1]:4000"
                ));
            }
            port.parse::<u16>()
                .map_err(|_| format!("port '{port}' is not a number from 0 to 65535"))?;
            Ok(())
        }
    }
}

/// An address that could not be parsed or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address '{text}': {reason}")]
pub struct AddressError {
    /// The address text (cut to 120 characters).
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;

    #[test]
    fn parse_and_print_round_trip() {
        let peer = Keypair::from_seed([1; 32]).peer_id();
        for text in [
            "mem://alpha".to_string(),
            "tcp://127.0.0.1:4000".to_string(),
            "quic://[::1]:9".to_string(),
            format!("tcp://example.org:80/p/{peer}"),
            format!("mem://n-1/p/{peer}"),
        ] {
            let addr: Address = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        let addr: Address = format!("quic://10.0.0.1:5/p/{peer}").parse().unwrap();
        assert_eq!(addr.peer(), Some(peer));
        assert_eq!(addr.scheme(), Scheme::Quic);
        assert_eq!(addr.clone().without_peer().to_string(), "quic://10.0.0.1:5");
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for (text, needle) in [
            ("127.0.0.1:4000", "SCHEME://"),
            ("udp://1.2.3.4:5", "unknown scheme 'udp'"),
            ("tcp://1.2.3.4", "HOST:PORT"),
            ("tcp://:4", "no host"),
            ("tcp://host:70000", "port '70000'"),
            ("tcp://::1:4", "brackets"),
            ("mem://", "empty"),
            ("mem://a/p/xyz", "invalid peer id"),
            ("mem://a b", "spaces"),
        ] {
            let err = text.parse::<Address>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let long = format!("mem://{}", "a".repeat(5000));
        assert!(long.parse::<Address>().unwrap_err().to_string().contains("longer than"));
    }
}
