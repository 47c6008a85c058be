//! The vocabulary of a listening socket, shared by every stage: how it is handled
//! ([`Transport`]: classification, budgets and firewall probes treat UDP-Lite as UDP) and
//! what it is reported as ([`Protocol`]: `network.transport`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Transport protocol of a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A TCP socket in LISTEN state.
    Tcp,
    /// A bound UDP socket.
    Udp,
}

impl Transport {
    /// Lowercase name as used in `11211/udp` and in firewall commands.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }

    /// Index used by the classifier's per-transport port tables.
    pub fn index(self) -> usize {
        match self {
            Transport::Tcp => 0,
            Transport::Udp => 1,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a socket is reported as (`network.transport`): its [`Transport`], with UDP-Lite
/// (protocol 136, bound like UDP) named as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    UdpLite,
}

impl Protocol {
    pub fn new(transport: Transport, udplite: bool) -> Protocol {
        match (transport, udplite) {
            (Transport::Tcp, _) => Protocol::Tcp,
            (Transport::Udp, false) => Protocol::Udp,
            (Transport::Udp, true) => Protocol::UdpLite,
        }
    }

    /// How it is handled.
    pub fn transport(self) -> Transport {
        match self {
            Protocol::Tcp => Transport::Tcp,
            Protocol::Udp | Protocol::UdpLite => Transport::Udp,
        }
    }

    pub fn is_udplite(self) -> bool {
        self == Protocol::UdpLite
    }

    /// `network.transport`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::UdpLite => "udplite",
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
