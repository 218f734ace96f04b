//! Decoding records from the EVENTS ring buffer. Input from the kernel is checked, never trusted:
//! a record of the wrong size is an error, not a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kalive_common::{ConnIdentity, KernelEvent, AF_INET6};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a ring buffer record of {got} bytes where {expected} were expected: the kernel programs and \
     the daemon come from different builds; rebuild and restart kalive-daemon"
)]
pub struct DecodeError {
    pub got: usize,
    pub expected: usize,
}

/// Copies one ring buffer record into an `KernelEvent`.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let expected = size_of::<KernelEvent>();
    if bytes.len() < expected {
        return Err(DecodeError {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the slice holds at least size_of::<KernelEvent>() bytes, KernelEvent is plain integers (any bit
    // pattern is valid), and read_unaligned does not require alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<KernelEvent>()) })
}

/// The connection's local and remote endpoints.
pub fn endpoints(conn: &ConnIdentity) -> (SocketAddr, SocketAddr) {
    let ip = |bytes: &[u8; 16]| -> IpAddr {
        if conn.family == AF_INET6 {
            IpAddr::V6(Ipv6Addr::from(*bytes))
        } else {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        }
    };
    (
        SocketAddr::new(ip(&conn.local_addr), conn.local_port),
        SocketAddr::new(ip(&conn.remote_addr), conn.remote_port),
    )
}

#[cfg(test)]
mod tests {
    use kalive_common::{event_kind, AF_INET};

    use super::*;

    fn as_bytes(event: &KernelEvent) -> Vec<u8> {
        // SAFETY: KernelEvent is plain integers without padding (asserted in kalive-common).
        unsafe {
            std::slice::from_raw_parts(
                (event as *const KernelEvent).cast::<u8>(),
                size_of::<KernelEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn round_trips_a_record_at_any_alignment() {
        let mut event = KernelEvent {
            kind: event_kind::TIMER_RUN,
            flags: 0b101,
            error: 110,
            ..KernelEvent::default()
        };
        event.after.probes_out = 3;
        event.id.local_port = 40000;
        let mut bytes = vec![0u8];
        bytes.extend(as_bytes(&event));
        assert_eq!(decode(&bytes[1..]).unwrap(), event);
    }

    #[test]
    fn short_records_are_an_error() {
        let err = decode(&[0u8; 10]).unwrap_err();
        assert_eq!(
            err,
            DecodeError {
                got: 10,
                expected: size_of::<KernelEvent>()
            }
        );
        assert!(err.to_string().contains("rebuild"));
    }

    #[test]
    fn endpoints_of_both_families() {
        let mut conn = ConnIdentity {
            family: AF_INET,
            local_port: 5000,
            remote_port: 80,
            ..ConnIdentity::default()
        };
        conn.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        conn.remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let (local, remote) = endpoints(&conn);
        assert_eq!(local.to_string(), "127.0.0.1:5000");
        assert_eq!(remote.to_string(), "10.1.2.3:80");

        conn.family = AF_INET6;
        conn.local_addr = Ipv6Addr::LOCALHOST.octets();
        conn.remote_addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let (local, remote) = endpoints(&conn);
        assert_eq!(local.to_string(), "[::1]:5000");
        assert_eq!(remote.to_string(), "[2001:db8::1]:80");
    }
}
