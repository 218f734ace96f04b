//! Kernel symbol addresses from /proc/kallsyms (the tracepoint hook mode filters timer expiries
//! on tcp_keepalive_timer's address).

const KALLSYMS: &str = "/proc/kallsyms";

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read {KALLSYMS}: {0}. Run kalive as root")]
    Read(#[source] std::io::Error),
    #[error("{symbol} is not in {KALLSYMS}: this kernel has no TCP keepalive timer kalive knows")]
    Missing { symbol: String },
    #[error(
        "{KALLSYMS} hides addresses from this process (all zero): run kalive as root or give it \
         CAP_SYSLOG; with `kernel.kptr_restrict=2` nobody sees them (set it to 1)"
    )]
    Hidden,
}

/// The address of a function symbol (type t or T) in kallsyms-formatted text.
pub fn find_function(text: &str, symbol: &str) -> Result<u64, KallsymsError> {
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(address), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if name != symbol || !matches!(kind, "t" | "T") {
            continue;
        }
        let address = u64::from_str_radix(address, 16).map_err(|_| KallsymsError::Missing {
            symbol: symbol.to_owned(),
        })?;
        if address == 0 {
            return Err(KallsymsError::Hidden);
        }
        return Ok(address);
    }
    Err(KallsymsError::Missing {
        symbol: symbol.to_owned(),
    })
}

pub fn function_address(symbol: &str) -> Result<u64, KallsymsError> {
    let text = std::fs::read_to_string(KALLSYMS).map_err(KallsymsError::Read)?;
    find_function(&text, symbol)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ffffffff812445c3 t tcp_keepalive_timer.cold
ffffffff8208b050 T tcp_write_wakeup
ffffffff8208b950 t tcp_keepalive_timer
ffffffff8208c000 d tcp_keepalive_timer_data [some_module]
";

    #[test]
    fn finds_the_function_not_its_cold_part() {
        assert_eq!(
            find_function(SAMPLE, "tcp_keepalive_timer").unwrap(),
            0xffffffff8208b950
        );
    }

    #[test]
    fn hidden_addresses_are_an_error_that_says_so() {
        let err = find_function(
            "0000000000000000 t tcp_keepalive_timer\n",
            "tcp_keepalive_timer",
        )
        .unwrap_err();
        assert!(matches!(err, KallsymsError::Hidden));
    }

    #[test]
    fn missing_symbol() {
        assert!(matches!(
            find_function(SAMPLE, "tcp_nothing"),
            Err(KallsymsError::Missing { .. })
        ));
    }
}
