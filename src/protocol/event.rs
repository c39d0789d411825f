//! The names of the events a connection is split into.
//!
//! They come from QEMU's nbd-fault-injector.py (neg-classic, neg1, export,
//! export-name, neg2, request, reply, data) and keep its meaning and byte
//! counts, extended to everything the modern protocol sends.

use std::fmt;

/// Which way bytes travel through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server (QEMU's injector calls this "read": it reads it).
    ToServer,
    /// Server to client (the injector's "write").
    ToClient,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::ToServer => "to-server",
            Direction::ToClient => "to-client",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One event name. A message may answer to several (see [`EventSet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// A client connection was accepted; nothing sent yet.
    Connect,
    /// Oldstyle greeting (152 bytes).
    NegClassic,
    /// Newstyle greeting (18 bytes).
    Neg1,
    /// An option header (16 bytes; 20 on the first option, whose 4 bytes of
    /// client flags come first). Also named `option`.
    Export,
    /// An option's data. Also named `option-data`.
    ExportName,
    /// An option reply, header and data.
    OptionReply,
    /// The export's size and flags: the NBD_OPT_EXPORT_NAME reply, or an
    /// NBD_REP_INFO reply carrying NBD_INFO_EXPORT.
    Neg2,
    /// A request header.
    Request,
    /// A simple reply, or a structured or extended chunk header.
    Reply,
    /// A write payload, read data after a simple reply, or a chunk payload.
    Data,
}

impl EventKind {
    pub const ALL: [EventKind; 10] = [
        EventKind::Connect,
        EventKind::NegClassic,
        EventKind::Neg1,
        EventKind::Export,
        EventKind::ExportName,
        EventKind::OptionReply,
        EventKind::Neg2,
        EventKind::Request,
        EventKind::Reply,
        EventKind::Data,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::NegClassic => "neg-classic",
            EventKind::Neg1 => "neg1",
            EventKind::Export => "export",
            EventKind::ExportName => "export-name",
            EventKind::OptionReply => "option-reply",
            EventKind::Neg2 => "neg2",
            EventKind::Request => "request",
            EventKind::Reply => "reply",
            EventKind::Data => "data",
        }
    }

    /// Whether this event can travel in direction `d` (`connect` travels
    /// none): what rule checks and the metrics' series both follow.
    pub fn travels(self, d: Direction) -> bool {
        match self {
            EventKind::Connect => false,
            EventKind::Data => true,
            EventKind::NegClassic
            | EventKind::Neg1
            | EventKind::OptionReply
            | EventKind::Neg2
            | EventKind::Reply => d == Direction::ToClient,
            EventKind::Export | EventKind::ExportName | EventKind::Request => {
                d == Direction::ToServer
            }
        }
    }

    /// Looks a name up, aliases included.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "option" => Some(EventKind::Export),
            "option-data" => Some(EventKind::ExportName),
            _ => Self::ALL.into_iter().find(|k| k.name() == s),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The names one message answers to, as a bit set (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct EventSet(u16);

impl EventSet {
    pub const EMPTY: EventSet = EventSet(0);

    pub const fn of(k: EventKind) -> Self {
        EventSet(1 << k as u8)
    }

    pub const fn with(self, k: EventKind) -> Self {
        EventSet(self.0 | 1 << k as u8)
    }

    pub fn contains(self, k: EventKind) -> bool {
        self.0 & (1 << k as u8) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = EventKind> {
        EventKind::ALL
            .into_iter()
            .filter(move |&k| self.contains(k))
    }
}

impl fmt::Display for EventSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            f.write_str(k.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.name()), Some(k));
        }
        assert_eq!(EventKind::from_name("option"), Some(EventKind::Export));
        assert_eq!(
            EventKind::from_name("option-data"),
            Some(EventKind::ExportName)
        );
        assert_eq!(EventKind::from_name("requset"), None);
    }

    #[test]
    fn sets() {
        let s = EventSet::of(EventKind::OptionReply).with(EventKind::Neg2);
        assert!(s.contains(EventKind::Neg2));
        assert!(!s.contains(EventKind::Data));
        assert_eq!(s.to_string(), "option-reply+neg2");
        assert!(EventSet::EMPTY.is_empty());
    }
}
