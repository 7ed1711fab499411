//! Istio's TCP metadata exchange (FACTS.md f.2; the sidecar's `istio.metadata_exchange`
//! network filter, `protocol: istio-peer-exchange`): the frame both ends of an Istio mTLS TCP
//! connection write first when the negotiated ALPN is [`ALPN_PEER_EXCHANGE`].
//!
//! A frame is `u32 magic` [`MAGIC`] (big-endian), `u32 length` (big-endian), then `length`
//! bytes of a serialized `google.protobuf.Any` whose `type_url` is [`STRUCT_TYPE_URL`] and whose
//! value is a `Struct` with `x-envoy-peer-metadata` (the sender's workload metadata, the Struct
//! of [`PeerMetadata`]) and `x-envoy-peer-metadata-id` (the sender's `node.id`). Like the
//! HTTP headers' Struct, the two protobuf messages are written and read by hand (protobuf
//! types stay out of mesh-core).
//!
//! [`decode_frame`] reads the start of what the peer sent and says how many bytes the frame
//! took, as Envoy's filter consumes them: a wrong magic consumes nothing (the bytes are the
//! application's), a body that is not a protobuf `Any` consumes only the 8-byte header (the
//! body passes through), a complete frame is consumed whole. In every failure the peer is
//! unknown and the connection carries on.

use std::collections::BTreeMap;

use crate::identity::NodeIdentity;
use crate::peer_metadata::{
    PEER_METADATA_HEADER, PEER_METADATA_ID_HEADER, PeerMetadata, PeerMetadataError, Reader,
    StructValue, decode_struct, encode_struct, write_len_delimited,
};

/// The ALPN value that turns the exchange on (Istio's `istio-peer-exchange`).
pub const ALPN_PEER_EXCHANGE: &str = "istio-peer-exchange";

/// What an Istio sidecar's TCP clusters offer to meshed endpoints (`ALPNInMeshWithMxc`), as
/// the TLS client's ALPN list.
pub const ALPN_IN_MESH_WITH_MXC: &[&[u8]] = &[ALPN_PEER_EXCHANGE.as_bytes(), b"istio"];

/// The frame's first four bytes (big-endian), `MetadataExchangeInitialHeader::magic_number`.
pub const MAGIC: u32 = 0x3D23_0467;

/// Bytes before the frame's body: magic and length.
pub const HEADER_LEN: usize = 8;

/// The `Any.type_url` of the frame's body.
pub const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// Largest frame body read (Envoy sets no limit; a sidecar's frame is a few hundred bytes,
/// an old proxy's whole node metadata a few kilobytes). A longer announced body makes the
/// peer unknown instead of buffering it.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// What a peer's frame said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerExchange {
    /// `x-envoy-peer-metadata-id`: the peer's `node.id`, when sent.
    pub id: Option<String>,
    /// `x-envoy-peer-metadata`: the peer's workload metadata, when sent as a Struct.
    pub metadata: Option<PeerMetadata>,
}

/// Why the peer's frame gave no metadata (the peer is then unknown, as in Envoy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`]: the peer runs no exchange (Envoy's
    /// `initial_header_not_found`).
    #[error("no istio-peer-exchange magic (got {0:#010x})")]
    NotMagic(u32),
    /// The announced body is longer than [`MAX_FRAME_LEN`].
    #[error("istio-peer-exchange frame of {0} bytes, more than the {MAX_FRAME_LEN} accepted")]
    TooLarge(u32),
    /// The body is not a protobuf `Any` (Envoy's `header_not_found`).
    #[error("istio-peer-exchange frame is not a protobuf Any: {0}")]
    NotAny(PeerMetadataError),
    /// The `Any` does not hold a readable `google.protobuf.Struct`.
    #[error("istio-peer-exchange frame holds {type_url:?}, not a readable Struct")]
    NotStruct {
        /// The `Any.type_url` received.
        type_url: String,
    },
}

/// Where reading the peer's frame stands, given the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameDecode {
    /// Not enough bytes yet: wait until at least this many have arrived.
    Incomplete(usize),
    /// Reading is over: the first `consumed` bytes were the exchange's; the rest are the
    /// application's.
    Done {
        /// Bytes the exchange took from the start of the input.
        consumed: usize,
        /// The peer's metadata, or why there is none.
        result: Result<Box<PeerExchange>, FrameError>,
    },
}

/// Encodes the frame a workload sends: `metadata` (the Struct of f.1) and the node `id`.
pub fn encode_frame(id: &str, metadata: &PeerMetadata) -> Vec<u8> {
    let mut fields = BTreeMap::new();
    fields.insert(
        PEER_METADATA_HEADER.to_owned(),
        StructValue::Struct(metadata.to_fields()),
    );
    if !id.is_empty() {
        fields.insert(
            PEER_METADATA_ID_HEADER.to_owned(),
            StructValue::String(id.to_owned()),
        );
    }
    let value = encode_struct(&fields);
    let mut any = Vec::with_capacity(STRUCT_TYPE_URL.len() + value.len() + 8);
    write_len_delimited(&mut any, 0x0a, STRUCT_TYPE_URL.as_bytes());
    write_len_delimited(&mut any, 0x12, &value);
    let mut frame = Vec::with_capacity(HEADER_LEN + any.len());
    frame.extend_from_slice(&MAGIC.to_be_bytes());
    // The body is a few hundred bytes; a node whose metadata exceeded 4 GiB is not a node.
    frame.extend_from_slice(&u32::try_from(any.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&any);
    frame
}

/// The frame a sidecar for `node` sends.
pub fn frame_for_node(node: &NodeIdentity) -> Vec<u8> {
    encode_frame(&node.node_id(), &PeerMetadata::from_node(node))
}

/// Reads the peer's frame from the start of `received` (see the [module](self) docs for what
/// each outcome consumes). Never panics, whatever the input.
pub fn decode_frame(received: &[u8]) -> FrameDecode {
    let Some(header) = received.get(..HEADER_LEN) else {
        return FrameDecode::Incomplete(HEADER_LEN);
    };
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let magic = word(0);
    if magic != MAGIC {
        return FrameDecode::Done {
            consumed: 0,
            result: Err(FrameError::NotMagic(magic)),
        };
    }
    let length = word(4);
    let len = length as usize;
    if len > MAX_FRAME_LEN {
        return FrameDecode::Done {
            consumed: HEADER_LEN,
            result: Err(FrameError::TooLarge(length)),
        };
    }
    let Some(body) = received.get(HEADER_LEN..HEADER_LEN + len) else {
        return FrameDecode::Incomplete(HEADER_LEN + len);
    };
    match decode_any(body) {
        // Envoy drains the body only once it parsed as an Any.
        Err(e) => FrameDecode::Done {
            consumed: HEADER_LEN,
            result: Err(FrameError::NotAny(e)),
        },
        Ok((type_url, value)) => FrameDecode::Done {
            consumed: HEADER_LEN + len,
            result: decode_exchange(&type_url, value),
        },
    }
}

/// `google.protobuf.Any`: field 1 `type_url`, field 2 `value`.
fn decode_any(bytes: &[u8]) -> Result<(String, &[u8]), PeerMetadataError> {
    let mut r = Reader { buf: bytes };
    let mut type_url = String::new();
    let mut value: &[u8] = &[];
    while !r.done() {
        match r.tag()? {
            (1, 2) => {
                type_url = std::str::from_utf8(r.len_delimited()?)
                    .map_err(|_| PeerMetadataError::Protobuf("type_url is not UTF-8"))?
                    .to_owned();
            }
            (2, 2) => value = r.len_delimited()?,
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok((type_url, value))
}

fn decode_exchange(type_url: &str, value: &[u8]) -> Result<Box<PeerExchange>, FrameError> {
    let not_struct = || FrameError::NotStruct {
        type_url: type_url.to_owned(),
    };
    if type_url != STRUCT_TYPE_URL {
        return Err(not_struct());
    }
    let fields = decode_struct(value, 0).map_err(|_| not_struct())?;
    let metadata = match fields.get(PEER_METADATA_HEADER) {
        Some(StructValue::Struct(m)) => Some(PeerMetadata::from_fields(m)),
        _ => None,
    };
    let id = match fields.get(PEER_METADATA_ID_HEADER) {
        Some(StructValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Box::new(PeerExchange { id, metadata }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeIdentity {
        let mut n = NodeIdentity::new("ledger-v1-0", "prod", "10.1.2.3".parse().unwrap(), "ledger");
        n.workload_name = "ledger-v1".into();
        n.labels.insert("app".into(), "ledger".into());
        n.labels.insert("version".into(), "v1".into());
        n
    }

    /// Protobuf helpers written independently of the encoder under test.
    fn ld(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let mut n = body.len();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(body);
        out
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = MAGIC.to_be_bytes().to_vec();
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frame_layout_is_magic_length_any_of_struct() {
        let n = node();
        let f = frame_for_node(&n);
        assert_eq!(&f[..4], &[0x3D, 0x23, 0x04, 0x67]);
        let len = u32::from_be_bytes([f[4], f[5], f[6], f[7]]) as usize;
        assert_eq!(f.len(), HEADER_LEN + len);
        // Any { type_url, value: Struct { "x-envoy-peer-metadata": {struct_value},
        //                                  "x-envoy-peer-metadata-id": {string_value} } },
        // map entries in key order (deterministic serialization).
        let meta = PeerMetadata::from_node(&n).to_struct_bytes();
        let entry_meta = ld(
            0x0a,
            &[
                ld(0x0a, b"x-envoy-peer-metadata"),
                ld(0x12, &ld(0x2a, &meta)),
            ]
            .concat(),
        );
        let id = n.node_id();
        let entry_id = ld(
            0x0a,
            &[
                ld(0x0a, b"x-envoy-peer-metadata-id"),
                ld(0x12, &ld(0x1a, id.as_bytes())),
            ]
            .concat(),
        );
        let value = [entry_meta, entry_id].concat();
        let any = [ld(0x0a, STRUCT_TYPE_URL.as_bytes()), ld(0x12, &value)].concat();
        assert_eq!(&f[HEADER_LEN..], &any[..]);
    }

    #[test]
    fn round_trip_and_trailing_application_bytes() {
        let n = node();
        let mut input = frame_for_node(&n);
        let frame_len = input.len();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let FrameDecode::Done { consumed, result } = decode_frame(&input) else {
            panic!("complete frame");
        };
        assert_eq!(consumed, frame_len);
        let peer = result.unwrap();
        assert_eq!(peer.id.as_deref(), Some(n.node_id().as_str()));
        let m = peer.metadata.unwrap();
        assert_eq!(m, PeerMetadata::from_node(&n));
        let l = m.workload_labels();
        assert_eq!(
            (l.workload.as_str(), l.app.as_str(), l.version.as_str()),
            ("ledger-v1", "ledger", "v1")
        );
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more() {
        let f = frame_for_node(&node());
        for n in 0..f.len() {
            match decode_frame(&f[..n]) {
                FrameDecode::Incomplete(need) => assert!(need > n && need <= f.len(), "{n}"),
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_magic_consumes_nothing() {
        assert_eq!(
            decode_frame(b"GET / HTTP/1.1\r\n"),
            FrameDecode::Done {
                consumed: 0,
                result: Err(FrameError::NotMagic(u32::from_be_bytes(*b"GET ")))
            }
        );
    }

    #[test]
    fn oversized_length_is_refused_without_waiting_for_the_body() {
        for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let mut f = MAGIC.to_be_bytes().to_vec();
            f.extend_from_slice(&len.to_be_bytes());
            assert_eq!(
                decode_frame(&f),
                FrameDecode::Done {
                    consumed: HEADER_LEN,
                    result: Err(FrameError::TooLarge(len))
                }
            );
        }
        // Exactly the limit is read (and asks for the body).
        let mut f = MAGIC.to_be_bytes().to_vec();
        f.extend_from_slice(&(MAX_FRAME_LEN as u32).to_be_bytes());
        assert_eq!(
            decode_frame(&f),
            FrameDecode::Incomplete(HEADER_LEN + MAX_FRAME_LEN)
        );
    }

    #[test]
    fn a_body_that_is_not_an_any_leaves_the_body_to_the_application() {
        // A field claiming 100 bytes in a 3-byte body.
        let f = frame(&[0x0a, 100, 1]);
        let FrameDecode::Done { consumed, result } = decode_frame(&f) else {
            panic!("done");
        };
        assert_eq!(consumed, HEADER_LEN);
        assert!(matches!(result, Err(FrameError::NotAny(_))), "{result:?}");
    }

    #[test]
    fn other_any_contents_make_the_peer_unknown() {
        // Another type.
        let any = [
            ld(0x0a, b"type.googleapis.com/google.protobuf.Duration"),
            ld(0x12, &[0x08, 1]),
        ]
        .concat();
        let f = frame(&any);
        assert_eq!(
            decode_frame(&f),
            FrameDecode::Done {
                consumed: f.len(),
                result: Err(FrameError::NotStruct {
                    type_url: "type.googleapis.com/google.protobuf.Duration".into()
                })
            }
        );
        // A Struct type with bytes that are not a Struct.
        let any = [ld(0x0a, STRUCT_TYPE_URL.as_bytes()), ld(0x12, &[0x0a, 50])].concat();
        let f = frame(&any);
        assert!(matches!(
            decode_frame(&f),
            FrameDecode::Done { consumed, result: Err(FrameError::NotStruct { .. }) } if consumed == f.len()
        ));
        // An empty Struct: read, nothing known.
        let any = ld(0x0a, STRUCT_TYPE_URL.as_bytes());
        assert_eq!(
            decode_frame(&frame(&any)),
            FrameDecode::Done {
                consumed: HEADER_LEN + any.len(),
                result: Ok(Box::default())
            }
        );
        // Zero-length body: an empty Any, no type.
        assert!(matches!(
            decode_frame(&frame(&[])),
            FrameDecode::Done {
                consumed: HEADER_LEN,
                result: Err(FrameError::NotStruct { .. })
            }
        ));
    }

    /// Deterministic pseudo-random inputs (xorshift): malformed frames of every shape decode
    /// to some outcome without panicking, and the outcome's `consumed` stays within the input.
    #[test]
    fn malformed_frames_never_panic() {
        let good = frame_for_node(&node());
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut input = good.clone();
            match next() % 4 {
                // Flip a few bytes anywhere after the magic.
                0 => {
                    for _ in 0..(next() % 4 + 1) {
                        let i = HEADER_LEN - 4 + (next() as usize) % (input.len() - 4);
                        input[i] = next() as u8;
                    }
                }
                // Truncate.
                1 => input.truncate((next() as usize) % input.len()),
                // Random length field.
                2 => input[4..8].copy_from_slice(&(next() as u32).to_be_bytes()),
                // Random body of random size behind a valid header.
                _ => {
                    let n = (next() as usize) % 64;
                    let body: Vec<u8> = (0..n).map(|_| next() as u8).collect();
                    input = frame(&body);
                }
            }
            match decode_frame(&input) {
                FrameDecode::Incomplete(need) => assert!(need > input.len()),
                FrameDecode::Done { consumed, .. } => assert!(consumed <= input.len()),
            }
        }
    }
}
