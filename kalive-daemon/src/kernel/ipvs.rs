//! The IPVS TCP timeout of the calling thread's network namespace: how long IPVS (kube-proxy's
//! IPVS mode, `ipvsadm --set`) keeps an idle established TCP connection. Not a sysctl: only the
//! IPVS generic netlink family says it (IPVS_CMD_GET_CONFIG), which is what `ipvsadm -L
//! --timeout` asks. Messages are built with netlink-packet-generic; the family id is resolved
//! through the generic netlink controller.

use std::io;

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    ParseableParametrized, NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlHeader, GenlMessage,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// include/uapi/linux/ip_vs.h.
const IPVS_FAMILY: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;
const IPVS_CMD_GET_CONFIG: u8 = 13;
const IPVS_CMD_SET_CONFIG: u8 = 12;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;

/// An IPVS configuration message: a request without attributes, or the answer's TCP timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IpvsConfig {
    tcp_timeout_seconds: Option<u32>,
}

impl GenlFamily for IpvsConfig {
    fn family_name() -> &'static str {
        IPVS_FAMILY
    }

    fn command(&self) -> u8 {
        IPVS_CMD_GET_CONFIG
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsConfig {
    fn buffer_len(&self) -> usize {
        0
    }

    fn emit(&self, _buffer: &mut [u8]) {}
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsConfig {
    fn parse_with_param(buffer: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        // The kernel answers GET_CONFIG with a SET_CONFIG message.
        if header.cmd != IPVS_CMD_SET_CONFIG && header.cmd != IPVS_CMD_GET_CONFIG {
            return Err(DecodeError::from(format!(
                "unexpected IPVS command {} in the answer",
                header.cmd
            )));
        }
        let mut config = IpvsConfig::default();
        for nla in NlasIterator::new(buffer) {
            let nla = nla?;
            if nla.kind() == IPVS_CMD_ATTR_TIMEOUT_TCP {
                if let Ok(bytes) = <[u8; 4]>::try_from(nla.value()) {
                    config.tcp_timeout_seconds = Some(u32::from_ne_bytes(bytes));
                }
            }
        }
        Ok(config)
    }
}

/// The IPVS TCP timeout in this thread's namespace, in seconds; None when IPVS is not loaded
/// (no IPVS family) or reports none.
pub fn tcp_timeout_seconds() -> io::Result<Option<u32>> {
    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let Some(family_id) = family_id(&socket)? else {
        return Ok(None);
    };
    let mut message = GenlMessage::from_payload(IpvsConfig::default());
    message.set_resolved_family_id(family_id);
    let answer: Option<IpvsConfig> = exchange(&socket, message)?;
    Ok(answer.and_then(|config| config.tcp_timeout_seconds))
}

/// The IPVS family's id, None when the kernel has no such family (ip_vs not loaded).
fn family_id(socket: &Socket) -> io::Result<Option<u16>> {
    let request = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_FAMILY.to_owned())],
    });
    match exchange::<GenlCtrl>(socket, request) {
        Ok(answer) => Ok(answer.and_then(|ctrl| {
            ctrl.nlas.into_iter().find_map(|nla| match nla {
                GenlCtrlAttrs::FamilyId(id) => Some(id),
                _ => None,
            })
        })),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Sends one request and returns the payload of its answer (None for an acknowledgement).
fn exchange<F>(socket: &Socket, request: GenlMessage<F>) -> io::Result<Option<F>>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut request = request;
    request.finalize();
    let mut message = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    message.header.flags = NLM_F_REQUEST;
    message.header.sequence_number = 1;
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut answer = vec![0u8; 16 * 1024];
    let received = socket.recv(&mut &mut answer[..], 0)?;
    let parsed = NetlinkMessage::<GenlMessage<F>>::deserialize(&answer[..received])
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    match parsed.payload {
        NetlinkPayload::InnerMessage(message) => Ok(Some(message.payload)),
        NetlinkPayload::Error(error) => match error.code {
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_timeout_is_read_from_a_config_answer() {
        // Three u32 attributes as the kernel sends them: TCP 900, TCP_FIN 120, UDP 300.
        let mut attributes = Vec::new();
        for (kind, value) in [(4u16, 900u32), (5, 120), (6, 300)] {
            attributes.extend_from_slice(&8u16.to_ne_bytes());
            attributes.extend_from_slice(&kind.to_ne_bytes());
            attributes.extend_from_slice(&value.to_ne_bytes());
        }
        let header = GenlHeader {
            cmd: IPVS_CMD_SET_CONFIG,
            version: 1,
        };
        let config = IpvsConfig::parse_with_param(&attributes, header).expect("parses");
        assert_eq!(config.tcp_timeout_seconds, Some(900));
        let wrong = GenlHeader { cmd: 1, version: 1 };
        assert!(IpvsConfig::parse_with_param(&attributes, wrong).is_err());
    }

    #[test]
    fn the_timeout_is_there_exactly_when_ipvs_is() {
        // Without IPVS the family is not found, which is no error; with it the kernel always
        // reports its timeouts.
        let loaded = std::path::Path::new("/proc/net/ip_vs").exists();
        let timeout = tcp_timeout_seconds().expect("generic netlink works");
        assert_eq!(timeout.is_some(), loaded, "{timeout:?}");
    }
}
