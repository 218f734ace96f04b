//! Just enough JSON reading for bpftool's program list and churn's result line (xtask has no
//! JSON dependency).

/// The objects of a JSON array, as text (bpftool's flat program list; strings may hold braces).
pub(super) fn json_objects(text: &str) -> Vec<&str> {
    let mut objects = Vec::new();
    let (mut depth, mut start, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for (at, byte) in text.bytes().enumerate() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' => {
                if depth == 0 {
                    start = at;
                }
                depth += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    objects.push(&text[start..=at]);
                }
            }
            _ => {}
        }
    }
    objects
}

/// The text just after `"key":` in `object` (the first occurrence: bpftool's keys are unique
/// at the top level and the nested ones have other names).
fn json_value<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let at = object.find(&pattern)? + pattern.len();
    Some(object[at..].trim_start())
}

pub(super) fn json_number(object: &str, key: &str) -> Option<f64> {
    let value = json_value(object, key)?;
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(value.len());
    value[..end].parse().ok()
}

pub(super) fn json_string<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let value = json_value(object, key)?.strip_prefix('"')?;
    Some(&value[..value.find('"')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bpftool_programs() {
        let text = r#"[{"id":429,"type":"raw_tracepoint","name":"tcp_receive_reset","tag":"2d{}","gpl_compatible":true,"run_time_ns":1234,"run_cnt":56,"map_ids":[1,2],"btf_id":138,"pids":[{"pid":7,"comm":"kalive-daemon"}]},{"id":3,"type":"cgroup_skb","name":"","tag":"x"}]"#;
        let objects = json_objects(text);
        assert_eq!(objects.len(), 2);
        assert_eq!(json_number(objects[0], "id"), Some(429.0));
        assert_eq!(json_string(objects[0], "name"), Some("tcp_receive_reset"));
        assert_eq!(json_number(objects[0], "run_time_ns"), Some(1234.0));
        assert_eq!(json_number(objects[0], "run_cnt"), Some(56.0));
        assert_eq!(json_number(objects[1], "run_cnt"), None);
        assert_eq!(json_string(objects[1], "name"), Some(""));
    }
}
