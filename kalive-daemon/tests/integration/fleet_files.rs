//! The fleet files under deploy/, checked by the tools that read them:
//!
//! - promtool checks the alert rules, runs their unit tests (kalive-alerts.test.yaml) and checks
//!   a prometheus.yml made of the scrape config's jobs (its commented Kubernetes job too, with a
//!   static target in place of the discovery Debian's promtool is built without);
//! - promtool parses every PromQL expression of the Grafana dashboard, given as recording rules;
//! - every metric and label name of the rules, their tests and the dashboard is one the daemon
//!   really exports: its exposition is served in-process on a table with every outcome;
//! - the Kubernetes manifests are validated against the Kubernetes schemas by kubernetes-validate
//!   (PyPI), the ServiceMonitor against prometheus-operator's CRD schema by the models of
//!   @kubernetes-models/prometheus-operator (npm), and both are read here for what the schemas
//!   cannot say (capabilities, mounts, selectors matching across files).
//!
//! The two validators live in the fleet tools directory, `$KALIVE_FLEET_TOOLS`, by default
//! `target/fleet-tools` in the workspace. From the workspace root (Debian 12: python3-venv,
//! and Node.js with npm):
//!
//! ```text
//! python3 -m venv target/fleet-tools/venv
//! target/fleet-tools/venv/bin/pip install kubernetes-validate==1.37.0
//! npm install --prefix target/fleet-tools/node --save-exact \
//!     @kubernetes-models/prometheus-operator@4.4.4
//! ```
//!
//! As with promtool, a missing tool skips the test with the reason, or fails it with CI=true.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use kalive_daemon::{
    export::{http::Limits, web_config::WebConfig},
    kernel::privileges::CAPABILITIES,
};
use kalive_testkit::{fixtures, privilege::tool, server::Server};
use serde::Deserialize as _;
use serde_json::{json, Value};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const ALERTS: &str = "prometheus/kalive-alerts.yaml";
const ALERT_TESTS: &str = "prometheus/kalive-alerts.test.yaml";
const SCRAPE_CONFIG: &str = "prometheus/scrape-config.yaml";
const DASHBOARD: &str = "grafana/kalive-dashboard.json";
const DAEMONSET: &str = "kubernetes/daemonset.yaml";
const SERVICE: &str = "kubernetes/service.yaml";
const SERVICE_MONITOR: &str = "kubernetes/servicemonitor.yaml";

/// The job name the alert rules and the dashboard select on.
const JOB: &str = "kalive";
/// Labels Prometheus adds to every target's series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];
/// What the dashboard's Grafana variables are replaced with before promtool reads them.
const GRAFANA_VARIABLES: [(&str, &str); 4] = [
    ("$__rate_interval", "5m"),
    ("$__interval", "1m"),
    ("$__range", "1h"),
    ("$instance", ".+"),
];
/// PromQL keywords followed by a parenthesized list of label names.
const LABEL_LIST_KEYWORDS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// The Kubernetes versions the manifests are validated against: the oldest and the newest
/// schemas kubernetes-validate 1.37.0 bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];
/// The line of scrape-config.yaml that starts its commented Kubernetes job.
const COMMENTED_KUBERNETES_JOB: &str = "# - job_name: kalive";

// ---------------------------------------------------------------------------------------------
// The files

fn deploy_path(relative: &str) -> PathBuf {
    Path::new(WORKSPACE).join("deploy").join(relative)
}

fn read_deploy_file(relative: &str) -> String {
    let path = deploy_path(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Every non-empty document of a YAML text, as JSON values.
fn yaml_documents(text: &str, name: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{name} is not valid YAML: {error}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The documents of a YAML file under deploy/.
fn deploy_yaml(relative: &str) -> Vec<Value> {
    yaml_documents(&read_deploy_file(relative), relative)
}

/// The one document of `relative` of this kind.
fn document_of_kind(relative: &str, kind: &str) -> Value {
    let mut found: Vec<Value> = deploy_yaml(relative)
        .into_iter()
        .filter(|document| document["kind"] == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{relative}: expected one {kind}, found {}",
        found.len()
    );
    found.remove(0)
}

/// The value at a JSON pointer (`/spec/selector`), which must be there.
fn at<'a>(document: &'a Value, pointer: &str, name: &str) -> &'a Value {
    document
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{name}: nothing at {pointer} in\n{document:#}"))
}

fn string_at<'a>(document: &'a Value, pointer: &str, name: &str) -> &'a str {
    at(document, pointer, name)
        .as_str()
        .unwrap_or_else(|| panic!("{name}: {pointer} is not a string in\n{document:#}"))
}

fn array_at<'a>(document: &'a Value, pointer: &str, name: &str) -> &'a Vec<Value> {
    at(document, pointer, name)
        .as_array()
        .unwrap_or_else(|| panic!("{name}: {pointer} is not a list in\n{document:#}"))
}

fn strings_of(values: &[Value], name: &str) -> Vec<String> {
    values
        .iter()
        .map(|value| {
            value
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {value} is not a string"))
                .to_owned()
        })
        .collect()
}

/// A directory of its own for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("kalive-fleet-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        TempDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text)
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `command`; its exit status and what it printed (stdout, then stderr).
fn run(command: &mut Command, what: &str) -> (bool, String) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {what}: {error}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

/// Runs `command`, which must succeed; what it printed.
fn run_successfully(command: &mut Command, what: &str) -> String {
    let (succeeded, said) = run(command, what);
    assert!(succeeded, "{what} failed:\n{said}");
    said
}

fn promtool(args: &[&str]) -> Command {
    let mut command = Command::new("promtool");
    command.args(args);
    command
}

// ---------------------------------------------------------------------------------------------
// The fleet tools directory

fn fleet_tools_dir() -> PathBuf {
    match std::env::var_os("KALIVE_FLEET_TOOLS").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(WORKSPACE).join("target/fleet-tools"),
    }
}

fn kubernetes_validate_program() -> PathBuf {
    fleet_tools_dir().join("venv/bin/kubernetes-validate")
}

fn node_packages_dir() -> PathBuf {
    fleet_tools_dir().join("node")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// True when `path` exists. When it does not: a failure with CI=true, else a skip with the
/// reason, as `privilege::tool` does for programs.
fn installed(test: &str, what: &str, path: &Path) -> bool {
    if path.exists() {
        return true;
    }
    let reason = format!(
        "needs {what} at {} (set KALIVE_FLEET_TOOLS to its directory; see the top of \
         kalive-daemon/tests/integration/fleet_files.rs for how to install it)",
        path.display()
    );
    assert!(!in_ci(), "{test} {reason}, and CI=true");
    eprintln!("skipping {test}: {reason}");
    false
}

// ---------------------------------------------------------------------------------------------
// What the daemon exports

/// The metric and label names of the daemon's exposition.
struct Exported {
    metric_names: BTreeSet<String>,
    label_names: BTreeSet<String>,
}

/// The exposition of the daemon's HTTP server, in-process, on a table with every outcome.
fn exposition() -> String {
    let server = Server::start(
        fixtures::table_with_every_outcome(),
        WebConfig::default(),
        Limits::default(),
    );
    let (status, answer) = server.get("/metrics");
    assert_eq!(status, 200, "GET /metrics answered {status}:\n{answer}");
    let Some((_, body)) = answer.split_once("\r\n\r\n") else {
        panic!("no body in the answer to GET /metrics:\n{answer}");
    };
    body.to_owned()
}

fn exported() -> Exported {
    let body = exposition();
    Exported {
        metric_names: metric_names_of_exposition(&body),
        label_names: label_names_of_exposition(&body),
    }
}

/// The names a query can select, from the `# TYPE name kind` lines: a histogram's are its
/// `_bucket`, `_sum` and `_count` series, a summary's also its own name.
fn metric_names_of_exposition(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(declaration) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = declaration.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// The label names of every sample line (`name{a="x",b="y"} 1`).
fn label_names_of_exposition(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('{').map(|(_, labels)| labels))
        .flat_map(label_names_of_sample)
        .collect()
}

/// The label names of a sample's label set, given from just after its `{`.
fn label_names_of_sample(labels: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = labels;
    while let Some((name, after_equals)) = rest.split_once('=') {
        names.push(name.trim_start_matches(',').trim().to_owned());
        let value_and_after = after_equals.strip_prefix('"').unwrap_or(after_equals);
        let value_end = end_of_quoted(value_and_after);
        rest = &value_and_after[value_end..];
        if rest.starts_with('}') {
            break;
        }
    }
    names
}

/// The byte index just after the closing quote of a quoted text, given from after its opening
/// quote (backslash escapes skipped); its length if it is not closed.
fn end_of_quoted(text: &str) -> usize {
    let mut escaped = false;
    for (index, character) in text.char_indices() {
        match character {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return index + 1,
            _ => {}
        }
    }
    text.len()
}

// ---------------------------------------------------------------------------------------------
// PromQL, as far as names go

#[derive(Debug, PartialEq)]
enum Token {
    /// A metric, label, function or keyword name.
    Word(String),
    /// A string literal (its content is never a name).
    Quoted,
    /// A number or a duration (`5m`).
    Number,
    Symbol(char),
}

fn promql_tokens(expression: &str) -> Vec<Token> {
    let characters: Vec<char> = expression.chars().collect();
    let mut tokens = Vec::new();
    let mut index = 0;
    while index < characters.len() {
        let character = characters[index];
        if character.is_whitespace() {
            index += 1;
        } else if character == '#' {
            index = end_of_line(&characters, index);
        } else if matches!(character, '"' | '\'' | '`') {
            index = end_of_string_literal(&characters, index);
            tokens.push(Token::Quoted);
        } else if character.is_ascii_alphabetic() || character == '_' {
            let end = end_of_run(&characters, index, |c| {
                c.is_ascii_alphanumeric() || c == '_' || c == ':'
            });
            tokens.push(Token::Word(characters[index..end].iter().collect()));
            index = end;
        } else if character.is_ascii_digit() || character == '.' {
            index = end_of_run(&characters, index, |c| {
                c.is_ascii_alphanumeric() || c == '.'
            });
            tokens.push(Token::Number);
        } else {
            tokens.push(Token::Symbol(character));
            index += 1;
        }
    }
    tokens
}

fn end_of_run(characters: &[char], start: usize, belongs: impl Fn(char) -> bool) -> usize {
    characters[start..]
        .iter()
        .position(|&character| !belongs(character))
        .map_or(characters.len(), |offset| start + offset)
}

fn end_of_line(characters: &[char], start: usize) -> usize {
    end_of_run(characters, start, |c| c != '\n')
}

/// The index just after the string literal opening at `start` (backslash escapes skipped).
fn end_of_string_literal(characters: &[char], start: usize) -> usize {
    let quote = characters[start];
    let mut index = start + 1;
    while index < characters.len() {
        match characters[index] {
            '\\' => index += 2,
            character if character == quote => return index + 1,
            _ => index += 1,
        }
    }
    characters.len()
}

/// kalive's metric names in an expression.
fn kalive_metric_names(expression: &str) -> BTreeSet<String> {
    promql_tokens(expression)
        .into_iter()
        .filter_map(|token| match token {
            Token::Word(word) if word.starts_with("kalive_") => Some(word),
            _ => None,
        })
        .collect()
}

/// The label names an expression uses: in selectors (`{port="443"}`) and in label lists
/// (`by (port)`, `on (instance)`).
fn label_names(expression: &str) -> BTreeSet<String> {
    let tokens = promql_tokens(expression);
    let mut names = BTreeSet::new();
    let mut index = 0;
    while index < tokens.len() {
        let closing = match &tokens[index] {
            Token::Symbol('{') => Some('}'),
            Token::Word(word)
                if LABEL_LIST_KEYWORDS.contains(&word.as_str())
                    && tokens.get(index + 1) == Some(&Token::Symbol('(')) =>
            {
                index += 1;
                Some(')')
            }
            _ => None,
        };
        if let Some(closing) = closing {
            index += 1;
            while index < tokens.len() && tokens[index] != Token::Symbol(closing) {
                if let Token::Word(name) = &tokens[index] {
                    names.insert(name.clone());
                }
                index += 1;
            }
        }
        index += 1;
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The expressions of the rules, their tests and the dashboard

/// One PromQL expression and where it is.
struct Expression {
    place: String,
    text: String,
}

fn alert_rules() -> Vec<Value> {
    let rules_file = deploy_yaml(ALERTS).remove(0);
    array_at(&rules_file, "/groups", ALERTS)
        .iter()
        .flat_map(|group| array_at(group, "/rules", ALERTS).clone())
        .collect()
}

fn alert_names() -> Vec<String> {
    alert_rules()
        .iter()
        .map(|rule| string_at(rule, "/alert", ALERTS).to_owned())
        .collect()
}

fn alert_expressions() -> Vec<Expression> {
    alert_rules()
        .iter()
        .map(|rule| Expression {
            place: format!("{ALERTS} alert {}", string_at(rule, "/alert", ALERTS)),
            text: string_at(rule, "/expr", ALERTS).to_owned(),
        })
        .collect()
}

fn alert_test_cases() -> Vec<Value> {
    let tests_file = deploy_yaml(ALERT_TESTS).remove(0);
    array_at(&tests_file, "/tests", ALERT_TESTS).clone()
}

/// The series selectors of the unit tests' input series.
fn alert_test_series() -> Vec<Expression> {
    alert_test_cases()
        .iter()
        .flat_map(|case| array_at(case, "/input_series", ALERT_TESTS).clone())
        .map(|input| Expression {
            place: format!("{ALERT_TESTS} input series"),
            text: string_at(&input, "/series", ALERT_TESTS).to_owned(),
        })
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read_deploy_file(DASHBOARD))
        .unwrap_or_else(|error| panic!("{DASHBOARD} is not JSON: {error}"))
}

/// Every panel, those inside collapsed rows too.
fn dashboard_panels(dashboard: &Value) -> Vec<Value> {
    let mut panels = Vec::new();
    for panel in array_at(dashboard, "/panels", DASHBOARD) {
        panels.push(panel.clone());
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner.iter().cloned());
        }
    }
    panels
}

/// The targets' expressions as written, Grafana variables and all.
fn dashboard_expressions() -> Vec<Expression> {
    let mut expressions = Vec::new();
    for panel in dashboard_panels(&dashboard()) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            expressions.push(Expression {
                place: format!("{DASHBOARD} panel {title:?} target {}", target["refId"]),
                text: string_at(target, "/expr", DASHBOARD).to_owned(),
            });
        }
    }
    expressions
}

/// The queries of the dashboard's query variables (`label_values(...)`, not PromQL).
fn dashboard_variable_queries() -> Vec<Expression> {
    let dashboard = dashboard();
    array_at(&dashboard, "/templating/list", DASHBOARD)
        .iter()
        .filter(|variable| variable["type"] == "query")
        .map(|variable| Expression {
            place: format!("{DASHBOARD} variable {}", variable["name"]),
            text: string_at(variable, "/definition", DASHBOARD).to_owned(),
        })
        .collect()
}

fn with_grafana_variables_replaced(expression: &str) -> String {
    GRAFANA_VARIABLES
        .iter()
        .fold(expression.to_owned(), |text, (variable, value)| {
            text.replace(variable, value)
        })
}

/// A rules file with one recording rule per expression: `promtool check rules` parses each.
fn recording_rules_of(expressions: &[Expression]) -> String {
    let rules: Vec<Value> = expressions
        .iter()
        .enumerate()
        .map(|(index, expression)| {
            json!({"record": format!("dashboard:expression_{index}"), "expr": expression.text})
        })
        .collect();
    // JSON is YAML: promtool reads it as it is.
    json!({"groups": [{"name": "kalive-dashboard", "rules": rules}]}).to_string()
}

// ---------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !tool(
        "alert_rules_pass_promtool_check_and_their_unit_tests",
        "promtool",
    ) {
        return;
    }
    let alerts = deploy_path(ALERTS);
    let said = run_successfully(
        promtool(&["check", "rules"]).arg(&alerts),
        "promtool check rules",
    );
    assert!(
        said.contains("SUCCESS"),
        "promtool check rules said:\n{said}"
    );
    // Run from elsewhere: the test file names the rules relative to itself.
    let said = run_successfully(
        promtool(&["test", "rules"])
            .arg(deploy_path(ALERT_TESTS))
            .current_dir(std::env::temp_dir()),
        "promtool test rules",
    );
    assert!(
        said.contains("SUCCESS"),
        "promtool test rules said:\n{said}"
    );
}

/// For each alert of the rules, the unit tests expect it to fire at least once and not to fire
/// at least once.
#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let mut firing = BTreeSet::new();
    let mut not_firing = BTreeSet::new();
    for case in alert_test_cases() {
        for check in array_at(&case, "/alert_rule_test", ALERT_TESTS) {
            let alert = string_at(check, "/alertname", ALERT_TESTS).to_owned();
            let expected = array_at(check, "/exp_alerts", ALERT_TESTS);
            if expected.is_empty() {
                not_firing.insert(alert);
            } else {
                firing.insert(alert);
            }
        }
    }
    for alert in alert_names() {
        assert!(
            firing.contains(&alert),
            "{ALERT_TESTS} never expects {alert} to fire (tested firing: {firing:?})"
        );
        assert!(
            not_firing.contains(&alert),
            "{ALERT_TESTS} never expects {alert} not to fire (tested not firing: {not_firing:?})"
        );
    }
}

/// The jobs of scrape-config.yaml.
fn scrape_jobs() -> Vec<Value> {
    let config = deploy_yaml(SCRAPE_CONFIG).remove(0);
    array_at(&config, "/scrape_configs", SCRAPE_CONFIG).clone()
}

/// The commented Kubernetes job of scrape-config.yaml, uncommented: the lines from
/// COMMENTED_KUBERNETES_JOB on while they are comments, without their "# ".
fn commented_kubernetes_jobs() -> Vec<Value> {
    let text = read_deploy_file(SCRAPE_CONFIG);
    let uncommented: Vec<&str> = text
        .lines()
        .skip_while(|line| *line != COMMENTED_KUBERNETES_JOB)
        .take_while(|line| line.starts_with('#'))
        .map(|line| line.strip_prefix("# ").unwrap_or(""))
        .collect();
    assert!(
        !uncommented.is_empty(),
        "{SCRAPE_CONFIG} has no line {COMMENTED_KUBERNETES_JOB:?} starting the commented job"
    );
    let jobs = yaml_documents(&uncommented.join("\n"), "the commented Kubernetes job");
    let list = jobs.first().and_then(Value::as_array).unwrap_or_else(|| {
        panic!("the commented job of {SCRAPE_CONFIG} is not a list of scrape configs: {jobs:?}")
    });
    list.clone()
}

/// A prometheus.yml with these jobs and the alert rules, checked by `promtool check config`.
fn assert_promtool_accepts_config(jobs: &[Value], dir: &TempDir, name: &str) {
    let config = json!({
        "global": {"scrape_interval": "30s", "evaluation_interval": "30s"},
        "rule_files": [deploy_path(ALERTS)],
        "scrape_configs": jobs,
    });
    let path = dir.write(name, &config.to_string());
    let said = run_successfully(
        promtool(&["check", "config"]).arg(&path),
        &format!("promtool check config on {name} ({config:#})"),
    );
    assert!(
        said.contains("rules found"),
        "promtool check config did not check the alert rules of {name}:\n{said}"
    );
}

#[test]
fn scrape_config_passes_promtool_check_config() {
    let test = "scrape_config_passes_promtool_check_config";
    if !tool(test, "promtool") {
        return;
    }
    let jobs = scrape_jobs();
    let job = jobs
        .iter()
        .find(|job| job["job_name"] == JOB)
        .unwrap_or_else(|| panic!("{SCRAPE_CONFIG} has no job {JOB}: {jobs:?}"));
    assert_eq!(
        at(job, "/static_configs/0/targets", SCRAPE_CONFIG),
        &json!(["localhost:9977"]),
        "{SCRAPE_CONFIG}: the {JOB} job should scrape the daemon's default address"
    );
    let dir = TempDir::new(test);
    assert_promtool_accepts_config(&jobs, &dir, "prometheus.yml");
}

/// The commented Kubernetes job. Debian's promtool is built without Kubernetes service
/// discovery (it refuses kubernetes_sd_configs as an unknown field), so promtool checks the job
/// with a static target in place of its discovery, and the discovery is compared here with
/// what it must find: the endpoints of service.yaml's Service and port.
#[test]
fn commented_kubernetes_scrape_job_finds_the_service_and_passes_promtool() {
    let test = "commented_kubernetes_scrape_job_finds_the_service_and_passes_promtool";
    if !tool(test, "promtool") {
        return;
    }
    let jobs = commented_kubernetes_jobs();
    assert_eq!(
        jobs.len(),
        1,
        "the commented part of {SCRAPE_CONFIG}: {jobs:?}"
    );
    let job = &jobs[0];
    assert_eq!(job["job_name"], JOB, "the commented job of {SCRAPE_CONFIG}");
    let service = document_of_kind(SERVICE, "Service");
    let namespace = string_at(&service, "/metadata/namespace", SERVICE);
    assert_eq!(
        job["kubernetes_sd_configs"],
        json!([{"role": "endpoints", "namespaces": {"names": [namespace]}}]),
        "the commented job of {SCRAPE_CONFIG}: discovery of the endpoints in {SERVICE}'s namespace"
    );
    let service_name = string_at(&service, "/metadata/name", SERVICE);
    let port_name = string_at(&service, "/spec/ports/0/name", SERVICE);
    let keep = json!({
        "source_labels": ["__meta_kubernetes_service_name", "__meta_kubernetes_endpoint_port_name"],
        "regex": format!("{service_name};{port_name}"),
        "action": "keep",
    });
    assert!(
        array_at(job, "/relabel_configs", SCRAPE_CONFIG).contains(&keep),
        "the commented job of {SCRAPE_CONFIG} should keep only {SERVICE}'s port: no {keep} in \
         {job:#}"
    );
    let mut checkable = job.clone();
    let fields = checkable
        .as_object_mut()
        .unwrap_or_else(|| panic!("the commented job of {SCRAPE_CONFIG} is not a map: {job}"));
    fields.remove("kubernetes_sd_configs");
    fields.insert(
        "static_configs".to_owned(),
        json!([{"targets": ["localhost:9977"]}]),
    );
    let dir = TempDir::new(test);
    assert_promtool_accepts_config(&[checkable], &dir, "prometheus-kubernetes.yml");
}

// ---------------------------------------------------------------------------------------------
// Grafana

#[test]
fn dashboard_expressions_parse_as_promql() {
    let test = "dashboard_expressions_parse_as_promql";
    if !tool(test, "promtool") {
        return;
    }
    let expressions: Vec<Expression> = dashboard_expressions()
        .into_iter()
        .map(|expression| Expression {
            text: with_grafana_variables_replaced(&expression.text),
            place: expression.place,
        })
        .collect();
    assert!(
        !expressions.is_empty(),
        "{DASHBOARD} has no target expression"
    );
    for expression in &expressions {
        assert!(
            !expression.text.contains('$'),
            "{}: a Grafana variable this test does not replace ({GRAFANA_VARIABLES:?}) is left \
             in {}",
            expression.place,
            expression.text
        );
    }
    let dir = TempDir::new(test);
    let rules = dir.write("dashboard-rules.yml", &recording_rules_of(&expressions));
    let (succeeded, said) = run(
        promtool(&["check", "rules"]).arg(&rules),
        "promtool check rules",
    );
    let listed: Vec<String> = expressions
        .iter()
        .enumerate()
        .map(|(index, expression)| {
            format!(
                "dashboard:expression_{index} = {}: {}",
                expression.place, expression.text
            )
        })
        .collect();
    assert!(
        succeeded,
        "promtool cannot parse a dashboard expression:\n{said}\nthe expressions:\n{}",
        listed.join("\n")
    );
    // The check is real: promtool refuses an expression that does not parse.
    let broken = [Expression {
        place: "a broken expression".to_owned(),
        text: "sum(rate(kalive_keepalive_probes_sent_total[5m])".to_owned(),
    }];
    let broken_rules = dir.write("broken-rules.yml", &recording_rules_of(&broken));
    let (succeeded, said) = run(
        promtool(&["check", "rules"]).arg(&broken_rules),
        "promtool check rules",
    );
    assert!(
        !succeeded,
        "promtool check rules accepted an unbalanced expression, so it parses nothing:\n{said}"
    );
}

#[test]
fn dashboard_uses_the_datasource_variable_and_shows_what_it_should() {
    let dashboard = dashboard();
    assert_eq!(
        dashboard["schemaVersion"],
        json!(39),
        "{DASHBOARD}: schemaVersion"
    );
    let variables = array_at(&dashboard, "/templating/list", DASHBOARD);
    assert!(
        variables
            .iter()
            .any(|variable| variable["name"] == "datasource"
                && variable["type"] == "datasource"
                && variable["query"] == "prometheus"),
        "{DASHBOARD} has no Prometheus datasource variable named datasource: {variables:#?}"
    );
    let datasource = json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    for panel in dashboard_panels(&dashboard) {
        let title = &panel["title"];
        assert!(
            ids.insert(panel["id"].to_string()),
            "{DASHBOARD}: panel {title} reuses id {}",
            panel["id"]
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"], datasource,
            "{DASHBOARD}: panel {title}"
        );
        for target in array_at(&panel, "/targets", DASHBOARD) {
            assert_eq!(
                target["datasource"], datasource,
                "{DASHBOARD}: panel {title} target {}",
                target["refId"]
            );
        }
    }
    let used: BTreeSet<String> = dashboard_expressions()
        .iter()
        .flat_map(|expression| kalive_metric_names(&expression.text))
        .collect();
    for shown in [
        "kalive_keepalive_probes_sent_total",
        "kalive_keepalive_probes_answered_total",
        "kalive_peer_outcomes_total",
        "kalive_dead_peer_detection_seconds_bucket",
        "kalive_connections",
        "kalive_events_lost_total",
        "kalive_scrape_duration_seconds",
        "kalive_map_entries",
        "kalive_map_capacity",
        "kalive_collector_up",
    ] {
        assert!(
            used.contains(shown),
            "{DASHBOARD} shows no {shown} (it shows {used:?})"
        );
    }
    let shows_up = dashboard_expressions()
        .iter()
        .any(|expression| expression.text.contains(&format!("up{{job=\"{JOB}\"")));
    assert!(shows_up, "{DASHBOARD} shows no up{{job=\"{JOB}\"}}");
}

// ---------------------------------------------------------------------------------------------
// Names

/// What is wrong with the names of one expression: kalive metrics the daemon does not export,
/// label names it does not use.
fn unknown_names(expression: &Expression, exported: &Exported) -> Vec<String> {
    let mut problems = Vec::new();
    for metric in kalive_metric_names(&expression.text) {
        if !exported.metric_names.contains(&metric) {
            problems.push(format!(
                "{}: metric {metric} is not exported",
                expression.place
            ));
        }
    }
    for label in label_names(&expression.text) {
        let known = exported.label_names.contains(&label) || TARGET_LABELS.contains(&&*label);
        if !known {
            problems.push(format!(
                "{}: label {label} is neither exported nor a target label",
                expression.place
            ));
        }
    }
    problems
}

#[test]
fn every_metric_and_label_used_is_exported() {
    let exported = exported();
    let mut expressions = alert_expressions();
    expressions.extend(alert_test_series());
    expressions.extend(dashboard_expressions());
    expressions.extend(dashboard_variable_queries());
    let used: BTreeSet<String> = expressions
        .iter()
        .flat_map(|expression| kalive_metric_names(&expression.text))
        .collect();
    assert!(
        used.len() >= 10,
        "only {used:?} found in the expressions: the name scan is broken"
    );
    let problems: Vec<String> = expressions
        .iter()
        .flat_map(|expression| unknown_names(expression, &exported))
        .collect();
    assert!(
        problems.is_empty(),
        "{}\nexported metrics: {:?}\nexported labels: {:?}",
        problems.join("\n"),
        exported.metric_names,
        exported.label_names
    );
}

#[test]
fn the_name_scan_finds_metrics_and_labels_but_not_strings() {
    let expression = r#"sum by (direction, port) (rate(kalive_peer_outcomes_total{job="kalive_x", outcome=~"dead|unreachable"}[5m])) / on (instance) group_left (version) kalive_build_info"#;
    assert_eq!(
        kalive_metric_names(expression),
        BTreeSet::from([
            "kalive_build_info".to_owned(),
            "kalive_peer_outcomes_total".to_owned()
        ]),
        "metric names of {expression}"
    );
    let expected: BTreeSet<String> = ["direction", "port", "job", "outcome", "instance", "version"]
        .map(str::to_owned)
        .into();
    assert_eq!(
        label_names(expression),
        expected,
        "label names of {expression}"
    );
    let sample = r#"direction="outbound",outcome="a \"quoted\", value",port="5004"} 1"#;
    assert_eq!(
        label_names_of_sample(sample),
        ["direction", "outcome", "port"],
        "label names of the sample {sample}"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// What kubernetes-validate says passed: `KIND/NAME against version MAJOR.MINOR` each.
fn passed_resources(said: &str) -> BTreeSet<String> {
    said.lines()
        .filter(|line| line.starts_with("INFO ") && line.contains(" passed for resource "))
        .filter_map(|line| line.split_once(" passed for resource "))
        .map(|(_, resource_and_version)| resource_and_version.to_owned())
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_kubernetes_schemas() {
    let test = "kubernetes_manifests_match_the_kubernetes_schemas";
    let validator = kubernetes_validate_program();
    if !installed(test, "kubernetes-validate", &validator)
        || !tool(test, &validator.to_string_lossy())
    {
        return;
    }
    let mut command = Command::new(&validator);
    // --strict: unknown fields are errors (a misspelt field would otherwise be ignored).
    command.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        command.args(["--kubernetes-version", version]);
    }
    // Not the ServiceMonitor: kubernetes-validate has no schema for custom resources (it only
    // warns), service_monitor_matches_the_prometheus_operator_crd checks it.
    command
        .arg(deploy_path(DAEMONSET))
        .arg(deploy_path(SERVICE));
    let said = run_successfully(&mut command, "kubernetes-validate");
    let problems: Vec<&str> = said
        .lines()
        .filter(|line| !line.starts_with("INFO "))
        .collect();
    assert!(
        problems.is_empty(),
        "kubernetes-validate warned or failed:\n{said}"
    );
    let mut expected = BTreeSet::new();
    for version in KUBERNETES_VERSIONS {
        let minor = version.rsplit_once('.').map_or(version, |(minor, _)| minor);
        for resource in ["namespace/kalive", "daemonset/kalive", "service/kalive"] {
            expected.insert(format!("{resource} against version {minor}"));
        }
    }
    assert_eq!(
        passed_resources(&said),
        expected,
        "resources kubernetes-validate passed; it said:\n{said}"
    );
}

/// Validates each document of a JSON list read from stdin with prometheus-operator's
/// ServiceMonitor model and prints `valid NAME` or `invalid NAME: ERRORS`.
const SERVICE_MONITOR_CHECK: &str = r#"
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
let input = "";
for await (const chunk of process.stdin) input += chunk;
for (const document of JSON.parse(input)) {
  try {
    new ServiceMonitor(document).validate();
    console.log(`valid ${document.metadata.name}`);
  } catch (error) {
    console.log(`invalid ${document.metadata.name}: ${error.message}`);
  }
}
"#;

fn node_validate_service_monitors(documents: &Value) -> String {
    let mut node = Command::new("node")
        .args(["--input-type=module", "--eval", SERVICE_MONITOR_CHECK])
        .current_dir(node_packages_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run node: {error}"));
    node.stdin
        .take()
        .expect("node's stdin is piped")
        .write_all(documents.to_string().as_bytes())
        .unwrap_or_else(|error| panic!("cannot feed node: {error}"));
    let output = node
        .wait_with_output()
        .unwrap_or_else(|error| panic!("node did not finish: {error}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "node failed:\n{said}");
    said
}

#[test]
fn service_monitor_matches_the_prometheus_operator_crd() {
    let test = "service_monitor_matches_the_prometheus_operator_crd";
    let package = node_packages_dir().join("node_modules/@kubernetes-models/prometheus-operator");
    if !tool(test, "node") || !installed(test, "@kubernetes-models/prometheus-operator", &package) {
        return;
    }
    let service_monitor = document_of_kind(SERVICE_MONITOR, "ServiceMonitor");
    // A control that the CRD schema refuses (a port name must be a string).
    let mut control = service_monitor.clone();
    control["metadata"]["name"] = json!("control");
    control["spec"]["endpoints"][0]["port"] = json!(9977);
    let said = node_validate_service_monitors(&json!([service_monitor, control]));
    assert!(
        said.lines().any(|line| line == "valid kalive"),
        "{SERVICE_MONITOR} does not match the ServiceMonitor CRD schema:\n{said}"
    );
    assert!(
        said.lines()
            .any(|line| line.starts_with("invalid control:") && line.contains("port")),
        "the CRD schema accepted a numeric endpoint port name, so it checks nothing:\n{said}"
    );
}

/// The DaemonSet's only container.
fn daemonset_container(daemonset: &Value) -> &Value {
    let containers = array_at(daemonset, "/spec/template/spec/containers", DAEMONSET);
    assert_eq!(containers.len(), 1, "{DAEMONSET}: containers");
    &containers[0]
}

#[test]
fn daemonset_is_unprivileged_with_only_kalives_capabilities() {
    let daemonset = document_of_kind(DAEMONSET, "DaemonSet");
    let namespace = document_of_kind(DAEMONSET, "Namespace");
    assert_eq!(
        namespace["metadata"]["name"], "kalive",
        "{DAEMONSET}: Namespace"
    );
    assert_eq!(
        daemonset["metadata"]["namespace"], "kalive",
        "{DAEMONSET}: DaemonSet namespace"
    );
    let pod = at(&daemonset, "/spec/template/spec", DAEMONSET);
    assert_eq!(pod["hostNetwork"], true, "{DAEMONSET}: hostNetwork");
    assert_eq!(pod["hostPID"], true, "{DAEMONSET}: hostPID");
    assert!(
        pod["initContainers"].is_null(),
        "{DAEMONSET}: no init container expected"
    );
    assert!(
        array_at(pod, "/tolerations", DAEMONSET)
            .iter()
            .any(|toleration| toleration == &json!({"operator": "Exists"})),
        "{DAEMONSET}: a toleration of every taint ({{operator: Exists}}) lets it run on every node"
    );

    let container = daemonset_container(&daemonset);
    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true, "{DAEMONSET}: privileged");
    assert_eq!(
        security["allowPrivilegeEscalation"], false,
        "{DAEMONSET}: allowPrivilegeEscalation"
    );
    assert_eq!(
        security["readOnlyRootFilesystem"], true,
        "{DAEMONSET}: readOnlyRootFilesystem"
    );
    assert_eq!(
        security["runAsUser"], 0,
        "{DAEMONSET}: runAsUser (the comment says why 0)"
    );
    let added = strings_of(
        array_at(security, "/capabilities/add", DAEMONSET),
        DAEMONSET,
    );
    let kalives: Vec<String> = CAPABILITIES
        .iter()
        .map(|capability| capability.name.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        added, kalives,
        "{DAEMONSET}: capabilities added, against privileges::CAPABILITIES"
    );
    let dropped = strings_of(
        array_at(security, "/capabilities/drop", DAEMONSET),
        DAEMONSET,
    );
    assert_eq!(dropped, ["ALL"], "{DAEMONSET}: capabilities dropped");

    assert_eq!(
        strings_of(array_at(container, "/args", DAEMONSET), DAEMONSET),
        [
            "run",
            "--web.listen-address",
            "0.0.0.0:9977",
            "--quiet-probes"
        ],
        "{DAEMONSET}: args"
    );
    assert_eq!(
        container["ports"],
        json!([{"name": "metrics", "containerPort": 9977, "protocol": "TCP"}]),
        "{DAEMONSET}: ports"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": "/healthz", "port": "metrics"}),
            "{DAEMONSET}: {probe}"
        );
    }
    for resource in [
        "/resources/requests/cpu",
        "/resources/requests/memory",
        "/resources/limits/memory",
    ] {
        string_at(container, resource, DAEMONSET);
    }
}

#[test]
fn daemonset_mounts_only_what_kalive_reads_from_the_host() {
    let daemonset = document_of_kind(DAEMONSET, "DaemonSet");
    let container = daemonset_container(&daemonset);
    let volumes = array_at(&daemonset, "/spec/template/spec/volumes", DAEMONSET);
    let mut mounted = Vec::new();
    for mount in array_at(container, "/volumeMounts", DAEMONSET) {
        let name = string_at(mount, "/name", DAEMONSET);
        let mount_path = string_at(mount, "/mountPath", DAEMONSET);
        assert_eq!(
            mount["readOnly"], true,
            "{DAEMONSET}: mount {mount_path} read-only"
        );
        let volume = volumes
            .iter()
            .find(|volume| volume["name"] == name)
            .unwrap_or_else(|| panic!("{DAEMONSET}: no volume {name} for mount {mount_path}"));
        assert_eq!(
            volume["hostPath"]["path"], mount_path,
            "{DAEMONSET}: volume {name} should be the host's own {mount_path}"
        );
        mounted.push(mount_path.to_owned());
    }
    assert_eq!(
        mounted,
        ["/sys/kernel/btf", "/boot", "/run/netns"],
        "{DAEMONSET}: host paths mounted (BTF, kernel config, named network namespaces; \
         no /sys/fs/bpf: kalive pins nothing)"
    );
    assert_eq!(
        volumes.len(),
        mounted.len(),
        "{DAEMONSET}: volumes {volumes:?}"
    );
}

#[test]
fn service_and_service_monitor_select_the_daemonset_pods() {
    let daemonset = document_of_kind(DAEMONSET, "DaemonSet");
    let service = document_of_kind(SERVICE, "Service");
    let service_monitor = document_of_kind(SERVICE_MONITOR, "ServiceMonitor");

    // The Service's name is the job label of the ServiceMonitor's targets.
    assert_eq!(
        service["metadata"]["name"], JOB,
        "{SERVICE}: name (the alerts' job)"
    );
    assert_eq!(
        service["metadata"]["namespace"], "kalive",
        "{SERVICE}: namespace"
    );
    assert_eq!(service["spec"]["clusterIP"], "None", "{SERVICE}: headless");
    let pod_labels = at(&daemonset, "/spec/template/metadata/labels", DAEMONSET);
    assert_selects(
        at(&service, "/spec/selector", SERVICE),
        pod_labels,
        "Service selector",
    );
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "metrics", "port": 9977, "targetPort": "metrics", "protocol": "TCP"}]),
        "{SERVICE}: ports (targetPort names the container's port)"
    );

    assert_eq!(
        service_monitor["metadata"]["namespace"], "kalive",
        "{SERVICE_MONITOR}: namespace"
    );
    assert!(
        service_monitor["spec"]["jobLabel"].is_null(),
        "{SERVICE_MONITOR}: no jobLabel, so the job is the Service's name, {JOB}"
    );
    assert_selects(
        at(
            &service_monitor,
            "/spec/selector/matchLabels",
            SERVICE_MONITOR,
        ),
        at(&service, "/metadata/labels", SERVICE),
        "ServiceMonitor selector",
    );
    assert_eq!(
        service_monitor["spec"]["namespaceSelector"],
        json!({"matchNames": ["kalive"]}),
        "{SERVICE_MONITOR}: namespaceSelector"
    );
    let endpoint = at(&service_monitor, "/spec/endpoints/0", SERVICE_MONITOR);
    for (field, expected) in [
        ("port", "metrics"),
        ("path", "/metrics"),
        ("interval", "30s"),
    ] {
        assert_eq!(
            endpoint[field], expected,
            "{SERVICE_MONITOR}: endpoint {field}"
        );
    }
}

/// Every label of `selector` is among `labels` with the same value.
fn assert_selects(selector: &Value, labels: &Value, what: &str) {
    let selector = selector
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not a map: {selector}"));
    assert!(
        !selector.is_empty(),
        "{what} is empty: it would select everything"
    );
    for (name, value) in selector {
        assert_eq!(
            &labels[name], value,
            "{what}: label {name} does not match the labels {labels}"
        );
    }
}
