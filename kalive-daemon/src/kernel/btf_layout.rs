//! Kernel struct member offsets and enum values, read from the running kernel's BTF
//! (/sys/kernel/btf/vmlinux) at start and handed to the kernel programs as globals.

use std::collections::BTreeMap;

use btfparse::{ErrorKind, Offset, Readable, TypeInformation, TypeVariant};
use kalive_common::{Field, SockLayout};

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF at {path}: {source}. kalive needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux 5.5 or newer; most distribution kernels have it)"
    )]
    Missing {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF could not be parsed: {0}. The file may be truncated or from another kernel")]
    Parse(String),
    #[error(
        "the kernel's BTF has no `{type_name}.{path}`: this kernel's TCP internals differ from \
         what kalive supports (Linux 5.15 or newer); please report the kernel version"
    )]
    MemberMissing {
        type_name: &'static str,
        path: &'static str,
    },
    #[error("`{type_name}.{path}` is a bit field or has an unexpected size ({size} bytes); kalive cannot read it")]
    Unreadable {
        type_name: &'static str,
        path: &'static str,
        size: usize,
    },
    #[error("the kernel's BTF has no value `{name}` in enum {enum_name}")]
    EnumValueMissing {
        enum_name: &'static str,
        name: &'static str,
    },
}

/// A BTF blob in memory, for btfparse (which reads through the `Readable` trait).
struct BtfBytes<'a>(&'a [u8]);

impl Readable for BtfBytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let source = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buffer.len())?))
            .and_then(|range| self.0.get(range))
            .ok_or_else(|| {
                btfparse::Error::new(ErrorKind::EOF, "read past the end of the BTF blob")
            })?;
        buffer.copy_from_slice(source);
        Ok(())
    }
}

/// Parsed kernel BTF.
pub struct KernelTypes {
    types: TypeInformation,
}

impl KernelTypes {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        let types = TypeInformation::new(&BtfBytes(bytes))
            .map_err(|err| BtfError::Parse(format!("{err:?}")))?;
        Ok(Self { types })
    }

    pub fn from_running_kernel() -> Result<Self, BtfError> {
        let bytes = std::fs::read(VMLINUX_BTF).map_err(|source| BtfError::Missing {
            path: VMLINUX_BTF.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Offset and size of `type_name.path` (dots walk into members, anonymous unions included).
    pub fn field(&self, type_name: &'static str, path: &'static str) -> Result<Field, BtfError> {
        let missing = || BtfError::MemberMissing { type_name, path };
        let type_id = self.types.id_of(type_name).ok_or_else(missing)?;
        let (member_type, offset) = self.types.offset_of(type_id, path).map_err(|_| missing())?;
        let size = self.types.size_of(member_type).map_err(|_| missing())?;
        let offset = match offset {
            Offset::ByteOffset(offset) => offset,
            Offset::BitOffsetAndSize(..) => {
                return Err(BtfError::Unreadable {
                    type_name,
                    path,
                    size,
                });
            }
        };
        let size =
            u32::try_from(size)
                .ok()
                .filter(|size| *size > 0)
                .ok_or(BtfError::Unreadable {
                    type_name,
                    path,
                    size,
                })?;
        Ok(Field { offset, size })
    }

    /// Like `field`, for a member that must be an integer of 1, 2, 4 or 8 bytes.
    fn int_field(&self, type_name: &'static str, path: &'static str) -> Result<Field, BtfError> {
        let field = self.field(type_name, path)?;
        match field.size {
            1 | 2 | 4 | 8 => Ok(field),
            size => Err(BtfError::Unreadable {
                type_name,
                path,
                size: size as usize,
            }),
        }
    }

    /// The first of `paths` this kernel has: members move between releases (sk_flags moved into
    /// sock_common as skc_flags in Linux 6.16).
    fn int_field_any(
        &self,
        type_name: &'static str,
        paths: &[&'static str],
    ) -> Result<Field, BtfError> {
        let mut last = None;
        for path in paths {
            match self.int_field(type_name, path) {
                Ok(field) => return Ok(field),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or(BtfError::MemberMissing {
            type_name,
            path: "",
        }))
    }

    /// The timer that tcp_keepalive_timer receives. Kernels with a dedicated
    /// `inet_connection_sock.icsk_keepalive_timer` (a union with MPTCP's timeout timer; measured
    /// on Debian's 6.1.0-56, 6.12.117 and 7.2.13 kernels) arm that one, and `sock.sk_timer` is
    /// not the keepalive timer there; older kernels (and 6.18.44 here) use `sock.sk_timer`.
    fn keepalive_timer(&self) -> Result<Field, BtfError> {
        match self.field("inet_connection_sock", "icsk_keepalive_timer") {
            Ok(field) => Ok(field),
            Err(BtfError::MemberMissing { .. }) => self.field("sock", "sk_timer"),
            Err(err) => Err(err),
        }
    }

    /// How many arguments the tracepoint `name` passes to a raw tracepoint program (its TP_PROTO
    /// parameters), from the `btf_trace_<name>` typedef: a pointer to a function prototype whose
    /// first parameter is the probe's own data pointer. None when the kernel has no such
    /// tracepoint.
    pub fn tracepoint_arguments(&self, name: &str) -> Option<usize> {
        let typedef = self.types.id_of(&format!("btf_trace_{name}"))?;
        let TypeVariant::Typedef(typedef) = self.types.from_id(typedef)? else {
            return None;
        };
        let TypeVariant::Ptr(pointer) = self.types.from_id(*typedef.tid())? else {
            return None;
        };
        let TypeVariant::FuncProto(prototype) = self.types.from_id(*pointer.tid())? else {
            return None;
        };
        prototype.parameter_list().len().checked_sub(1)
    }

    /// All values of a C enum, by value.
    pub fn enum_values(&self, enum_name: &str) -> BTreeMap<u32, String> {
        let mut values = BTreeMap::new();
        for variant in self.types.get().values() {
            if let TypeVariant::Enum(found) = variant {
                if found.name().as_deref() != Some(enum_name) {
                    continue;
                }
                for named in found.named_value_list() {
                    let value = match named.value {
                        btfparse::Integer32Value::Signed(value) => value as u32,
                        btfparse::Integer32Value::Unsigned(value) => value,
                    };
                    values.insert(value, named.name.clone());
                }
            }
        }
        values
    }

    fn enum_value(&self, enum_name: &'static str, name: &'static str) -> Result<u32, BtfError> {
        self.enum_values(enum_name)
            .into_iter()
            .find_map(|(value, found)| (found == name).then_some(value))
            .ok_or(BtfError::EnumValueMissing { enum_name, name })
    }

    /// Every member the kernel programs read, relative to `struct sock` (or `struct net`).
    /// A `tcp_sock` begins with an `inet_connection_sock`, which begins with a `sock`, so offsets
    /// within those are offsets from the socket's address.
    pub fn sock_layout(&self) -> Result<SockLayout, BtfError> {
        Ok(SockLayout {
            keepalive_timer: self.keepalive_timer()?,
            family: self.int_field("sock", "__sk_common.skc_family")?,
            state: self.int_field("sock", "__sk_common.skc_state")?,
            // inet_sport, not skc_num: the close releases the port and zeroes skc_num before
            // inet_sock_set_state fires; inet_sport (network order) keeps it.
            local_port: self.int_field("inet_sock", "inet_sport")?,
            remote_port: self.int_field("sock", "__sk_common.skc_dport")?,
            local_addr4: self.int_field("sock", "__sk_common.skc_rcv_saddr")?,
            remote_addr4: self.int_field("sock", "__sk_common.skc_daddr")?,
            local_addr6: self.field("sock", "__sk_common.skc_v6_rcv_saddr")?,
            remote_addr6: self.field("sock", "__sk_common.skc_v6_daddr")?,
            net: self.field("sock", "__sk_common.skc_net")?,
            sk_flags: self.int_field_any("sock", &["sk_flags", "__sk_common.skc_flags"])?,
            sk_err: self.int_field("sock", "sk_err")?,
            sk_err_soft: self.int_field("sock", "sk_err_soft")?,
            sk_protocol: self.int_field("sock", "sk_protocol")?,
            max_ack_backlog: self.int_field("sock", "sk_max_ack_backlog")?,
            lock_owned: self.int_field("sock", "sk_lock.owned")?,
            probes_out: self.int_field("inet_connection_sock", "icsk_probes_out")?,
            user_timeout: self.int_field("inet_connection_sock", "icsk_user_timeout")?,
            ack_lrcvtime: self.int_field("inet_connection_sock", "icsk_ack.lrcvtime")?,
            keepalive_time: self.int_field("tcp_sock", "keepalive_time")?,
            keepalive_intvl: self.int_field("tcp_sock", "keepalive_intvl")?,
            keepalive_probes: self.int_field("tcp_sock", "keepalive_probes")?,
            rcv_tstamp: self.int_field("tcp_sock", "rcv_tstamp")?,
            packets_out: self.int_field("tcp_sock", "packets_out")?,
            segs_out: self.int_field("tcp_sock", "segs_out")?,
            snd_wnd: self.int_field("tcp_sock", "snd_wnd")?,
            write_seq: self.int_field("tcp_sock", "write_seq")?,
            snd_nxt: self.int_field("tcp_sock", "snd_nxt")?,
            srtt_us: self.int_field("tcp_sock", "srtt_us")?,
            net_inum: self.int_field("net", "ns.inum")?,
            net_keepalive_time: self.int_field("net", "ipv4.sysctl_tcp_keepalive_time")?,
            net_keepalive_intvl: self.int_field("net", "ipv4.sysctl_tcp_keepalive_intvl")?,
            net_keepalive_probes: self.int_field("net", "ipv4.sysctl_tcp_keepalive_probes")?,
            timer_function: self.int_field("timer_list", "function")?,
            timer_expires: self.int_field("timer_list", "expires")?,
            keepopen_bit: self.enum_value("sock_flags", "SOCK_KEEPOPEN")?,
            dead_bit: self.enum_value("sock_flags", "SOCK_DEAD")?,
        })
    }

    /// Names of `enum sk_rst_reason` values without their prefix (empty before Linux 6.10).
    pub fn reset_reasons(&self) -> BTreeMap<u32, String> {
        self.enum_values("sk_rst_reason")
            .into_iter()
            .map(|(value, name)| {
                let short = name
                    .strip_prefix("SK_RST_REASON_")
                    .unwrap_or(&name)
                    .to_owned();
                (value, short)
            })
            .collect()
    }
}
