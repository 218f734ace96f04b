//! Names of the errno values a TCP socket reports.

/// The errno's symbolic name, for logs and the API ("ETIMEDOUT"), or its number.
pub fn errno_name(error: i32) -> String {
    let name = match error {
        0 => "none",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETDOWN => "ENETDOWN",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EPIPE => "EPIPE",
        libc::EPROTO => "EPROTO",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EMSGSIZE => "EMSGSIZE",
        other => return other.to_string(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_errors_and_numbers_the_rest() {
        assert_eq!(errno_name(libc::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(errno_name(0), "none");
        assert_eq!(errno_name(4242), "4242");
    }
}
