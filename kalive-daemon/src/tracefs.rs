//! tracefs: mounting it when missing, and reading tracepoint record layouts from format files.

use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use kalive_common::{Field, TracepointLayout};

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at {TRACEFS} failed: {0}. Run as root, or mount it: \
         `mount -t tracefs tracefs {TRACEFS}`"
    )]
    Mount(#[source] std::io::Error),
    #[error(
        "cannot read the tracepoint format {path}: {source}. kalive needs the tracepoint \
         {event} (Linux 5.15 or newer) and read access to tracefs (run as root)"
    )]
    Format {
        path: String,
        event: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the tracepoint {event} has no field `{field}` on this kernel; please report the kernel version")]
    FieldMissing { event: String, field: &'static str },
}

/// The tracefs root, mounting tracefs first when no tracing directory exists.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    let (source, target, fstype) = (
        c"tracefs",
        CString::new(TRACEFS).map_err(io_other)?,
        c"tracefs",
    );
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(std::io::Error::last_os_error()));
    }
    log::info!("mounted tracefs at {TRACEFS}");
    Ok(PathBuf::from(TRACEFS))
}

fn io_other(err: std::ffi::NulError) -> TracefsError {
    TracefsError::Mount(std::io::Error::other(err))
}

/// Fields of one tracepoint record, by name, parsed from its `format` file.
pub fn parse_format(text: &str) -> BTreeMap<String, Field> {
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        let mut declaration = None;
        let mut offset = None;
        let mut size = None;
        for part in line.split(';') {
            let part = part.trim();
            if let Some(rest) = part.strip_prefix("field:") {
                declaration = Some(rest);
            } else if let Some(rest) = part.strip_prefix("offset:") {
                offset = rest.parse::<u32>().ok();
            } else if let Some(rest) = part.strip_prefix("size:") {
                size = rest.parse::<u32>().ok();
            }
        }
        let (Some(declaration), Some(offset), Some(size)) = (declaration, offset, size) else {
            continue;
        };
        // "__u8 saddr[28]" -> "saddr"; "void * timer" -> "timer".
        let without_array = declaration.split('[').next().unwrap_or(declaration);
        let name = without_array
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("");
        if !name.is_empty() {
            fields.insert(name.to_owned(), Field { offset, size });
        }
    }
    fields
}

struct Formats<'a> {
    root: &'a Path,
}

impl Formats<'_> {
    fn event(&self, event: &str) -> Result<BTreeMap<String, Field>, TracefsError> {
        let path = self.root.join("events").join(event).join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Format {
            path: path.display().to_string(),
            event: event.to_owned(),
            source,
        })?;
        Ok(parse_format(&text))
    }
}

fn take(
    fields: &BTreeMap<String, Field>,
    event: &str,
    field: &'static str,
) -> Result<Field, TracefsError> {
    fields
        .get(field)
        .copied()
        .ok_or_else(|| TracefsError::FieldMissing {
            event: event.to_owned(),
            field,
        })
}

/// The layout of every tracepoint record the programs read. `timer_*` fields are only needed in
/// the tracepoint hook mode; they are filled when the timer events exist.
pub fn tracepoint_layout(root: &Path) -> Result<TracepointLayout, TracefsError> {
    let formats = Formats { root };
    let mut layout = TracepointLayout::default();

    let event = "timer/timer_expire_entry";
    if let Ok(fields) = formats.event(event) {
        layout.timer_entry_timer = take(&fields, event, "timer")?;
        layout.timer_entry_function = take(&fields, event, "function")?;
    }
    let event = "timer/timer_expire_exit";
    if let Ok(fields) = formats.event(event) {
        layout.timer_exit_timer = take(&fields, event, "timer")?;
    }

    let event = "tcp/tcp_send_reset";
    let fields = formats.event(event)?;
    layout.send_reset_skaddr = take(&fields, event, "skaddr")?;
    layout.send_reset_reason = fields.get("reason").copied().unwrap_or(Field::ABSENT);

    let event = "tcp/tcp_receive_reset";
    let fields = formats.event(event)?;
    layout.receive_reset_skaddr = take(&fields, event, "skaddr")?;

    let event = "sock/inet_sk_error_report";
    let fields = formats.event(event)?;
    layout.error_report_error = take(&fields, event, "error")?;
    layout.error_report_protocol = take(&fields, event, "protocol")?;
    layout.error_report_family = take(&fields, event, "family")?;
    layout.error_report_sport = take(&fields, event, "sport")?;
    layout.error_report_dport = take(&fields, event, "dport")?;
    layout.error_report_saddr = take(&fields, event, "saddr")?;
    layout.error_report_daddr = take(&fields, event, "daddr")?;
    layout.error_report_saddr_v6 = take(&fields, event, "saddr_v6")?;
    layout.error_report_daddr_v6 = take(&fields, event, "daddr_v6")?;

    let event = "sock/inet_sock_set_state";
    let fields = formats.event(event)?;
    layout.set_state_skaddr = take(&fields, event, "skaddr")?;
    layout.set_state_newstate = take(&fields, event, "newstate")?;
    layout.set_state_protocol = take(&fields, event, "protocol")?;

    let event = "tcp/tcp_destroy_sock";
    let fields = formats.event(event)?;
    layout.destroy_sock_skaddr = take(&fields, event, "skaddr")?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of tcp:tcp_send_reset as Linux 6.18 prints it.
    const SEND_RESET_6_18: &str = "name: tcp_send_reset
ID: 1634
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;

print fmt: \"skbaddr=%p skaddr=%p\", REC->skbaddr, REC->skaddr
";

    #[test]
    fn parses_pointer_enum_and_array_fields() {
        let fields = parse_format(SEND_RESET_6_18);
        assert_eq!(
            fields["skaddr"],
            Field {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            fields["reason"],
            Field {
                offset: 28,
                size: 4
            }
        );
        assert_eq!(
            fields["saddr"],
            Field {
                offset: 32,
                size: 28
            }
        );
        assert_eq!(fields["common_type"], Field { offset: 0, size: 2 });
        assert!(!fields.contains_key("fmt"));
    }

    #[test]
    fn ignores_garbage_lines() {
        let fields = parse_format("field:int x;\toffset:abc;\tsize:4;\nrandom text\n;;;\n");
        assert!(fields.is_empty());
    }
}
