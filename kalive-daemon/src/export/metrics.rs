//! The Prometheus metrics: counters fed by the table's counts (`Tally`), gauges set from the
//! table at each scrape, and the daemon's self-observation. Names are part of kalive's interface
//! and documented in the README ("Metrics").

use std::{collections::HashSet, fmt, str::FromStr, time::Instant};

use kalive_common::loss_stage;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::{
    tracking::{
        peer_state::TimeoutTimer,
        table::ConnectionTable,
        totals::{Count, Origin, Tally},
    },
    wire::PeerStateKind,
};

/// Labels `--labels` can add to the counters, beyond `direction` and `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExtraLabel {
    /// The peer's IP address.
    RemoteAddr,
    /// The network namespace's inode number.
    Netns,
    /// kalive's connection id: one series per connection.
    Connection,
}

impl ExtraLabel {
    pub const ALL: [ExtraLabel; 3] = [
        ExtraLabel::RemoteAddr,
        ExtraLabel::Netns,
        ExtraLabel::Connection,
    ];

    /// The label's name, as it appears in the exposition and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExtraLabel::RemoteAddr => "remote_addr",
            ExtraLabel::Netns => "netns",
            ExtraLabel::Connection => "connection",
        }
    }

    /// One line on what the label holds, for help texts.
    pub fn describe(self) -> &'static str {
        match self {
            ExtraLabel::RemoteAddr => "the peer's IP address",
            ExtraLabel::Netns => "the network namespace's inode number",
            ExtraLabel::Connection => "kalive's connection id: one series per connection",
        }
    }
}

impl fmt::Display for ExtraLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a label `--labels` can add; the message lists them.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a label kalive can add; use remote_addr, netns or connection")]
pub struct UnknownLabel(pub String);

impl FromStr for ExtraLabel {
    type Err = UnknownLabel;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ExtraLabel::ALL
            .into_iter()
            .find(|label| label.name() == text)
            .ok_or_else(|| UnknownLabel(text.to_owned()))
    }
}

/// Which labels the per-connection counters carry, and how many label sets they may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesOptions {
    pub extra_labels: Vec<ExtraLabel>,
    /// Label sets beyond this are folded into `port="other"` (and `other` for extra labels).
    pub max_series: usize,
}

impl Default for SeriesOptions {
    fn default() -> Self {
        Self {
            extra_labels: Vec::new(),
            max_series: DEFAULT_MAX_SERIES,
        }
    }
}

pub const DEFAULT_MAX_SERIES: usize = 1_000;

/// The value for labels of folded series.
pub const FOLDED: &str = "other";

/// Bucket bounds of the keepalive settings gauge, per setting.
const IDLE_BOUNDS: [f64; 9] = [
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];
const INTERVAL_BOUNDS: [f64; 8] = [1.0, 5.0, 10.0, 15.0, 30.0, 60.0, 75.0, 120.0];
const PROBE_BOUNDS: [f64; 7] = [1.0, 2.0, 3.0, 5.0, 6.0, 9.0, 10.0];
/// Worst-case dead-peer detection (idle + probes x interval): Linux's defaults give 7,875 s.
const DETECTION_BOUNDS: [f64; 9] = [
    30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 7875.0, 14400.0,
];

/// Gives each origin its label values, admitting new label sets up to the cap.
struct SeriesLabels {
    options: SeriesOptions,
    admitted: HashSet<Vec<String>>,
}

impl SeriesLabels {
    fn names(&self) -> Vec<&'static str> {
        let mut names = vec!["direction", "port"];
        names.extend(self.options.extra_labels.iter().map(|label| label.name()));
        names
    }

    /// The label values for `origin`, and whether they were folded because of the cap.
    fn values(&mut self, origin: &Origin) -> (Vec<String>, bool) {
        let mut values = vec![
            origin.direction.name().to_owned(),
            origin
                .service_port
                .map_or_else(|| "none".to_owned(), |port| port.to_string()),
        ];
        for label in &self.options.extra_labels {
            values.push(match label {
                ExtraLabel::RemoteAddr => origin
                    .remote_addr
                    .map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
                ExtraLabel::Netns => origin.netns.to_string(),
                ExtraLabel::Connection => origin
                    .connection
                    .map_or_else(|| "none".to_owned(), |id| id.to_string()),
            });
        }
        if self.admitted.contains(&values) {
            return (values, false);
        }
        if self.admitted.len() < self.options.max_series {
            self.admitted.insert(values.clone());
            return (values, false);
        }
        for value in values.iter_mut().skip(1) {
            FOLDED.clone_into(value);
        }
        (values, true)
    }
}

/// Every metric kalive exports, registered once in its own registry.
pub struct Metrics {
    registry: Registry,
    series: SeriesLabels,
    probes_sent: IntCounterVec,
    probes_answered: IntCounterVec,
    probe_send_failures: IntCounterVec,
    keepalive_timeouts: IntCounterVec,
    peer_outcomes: IntCounterVec,
    idle_killed: IntCounterVec,
    connections_at_risk: IntGaugeVec,
    resets_received: IntCounterVec,
    resets_sent: IntCounterVec,
    dead_peer_detection: HistogramVec,
    probes_before_outcome: HistogramVec,
    connections: IntGaugeVec,
    settings: IntGaugeVec,
    events_lost: IntCounterVec,
    probes_unreported: IntCounter,
    /// By `netns` when `--labels` has it, else one series.
    probes_unseen: IntCounterVec,
    timeouts: IntCounterVec,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    hook_info: IntGaugeVec,
    build_info: IntGaugeVec,
    collector_up: IntGauge,
    scrape_duration: Gauge,
    series_in_use: IntGauge,
    series_limit: IntGauge,
    series_folded: IntCounter,
}

impl Metrics {
    pub fn new(options: SeriesOptions) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("kalive".to_owned()), None)?;
        let series = SeriesLabels {
            options,
            admitted: HashSet::new(),
        };
        let series_names = series.names();
        let with = |extra: &'static str| {
            let mut names = series_names.clone();
            names.push(extra);
            names
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)?,
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            registered(&registry, HistogramVec::new(opts, labels)?)
        };

        // Unseen probes are found per namespace, so they carry the netns label when the
        // per-connection counters do.
        let by_netns = series.options.extra_labels.contains(&ExtraLabel::Netns);
        let unseen_labels: &[&str] = if by_netns { &["netns"] } else { &[] };

        let metrics = Metrics {
            probes_sent: counter(
                "keepalive_probes_sent_total",
                "Keepalive probes the kernel sent (TcpExt TCPKeepAlive counts the same).",
                &series_names,
            )?,
            probes_answered: counter(
                "keepalive_probes_answered_total",
                "Keepalive probes the peer answered.",
                &series_names,
            )?,
            probe_send_failures: counter(
                "keepalive_probe_send_failures_total",
                "Keepalive probes due that the host could not send (local resource failure).",
                &series_names,
            )?,
            keepalive_timeouts: counter(
                "keepalive_timeouts_total",
                "Connections the keepalive timer aborted because probes went unanswered \
                 (kalive_tcp_timeouts_total{timer=\"keepalive\"}).",
                &series_names,
            )?,
            peer_outcomes: counter(
                "peer_outcomes_total",
                "Tracked keepalive connections that ended, by what kalive concluded about the peer.",
                &with("outcome"),
            )?,
            idle_killed: counter(
                "idle_killed_total",
                "Tracked connections that ended by a timeout or an RST after sitting idle at least \
                 the middlebox idle limit (--middlebox-idle-timeout): the path most likely forgot \
                 them.",
                &series_names,
            )?,
            connections_at_risk: gauge(
                "connections_at_risk",
                "Connections a middlebox idle limit (--middlebox-idle-timeout) will kill; \
                 keepalive_idle_above_limit: the first probe comes after the limit; \
                 idle_without_keepalive: no keepalive, idle past the limit at the last inventory.",
                &["reason"],
            )?,
            resets_received: counter(
                "tcp_resets_received_total",
                "TCP RSTs received; during_probe=true when a keepalive probe was outstanding.",
                &with("during_probe"),
            )?,
            resets_sent: counter(
                "tcp_resets_sent_total",
                "TCP RSTs this host sent, by the kernel's reason (enum sk_rst_reason, lower case).",
                &with("reason"),
            )?,
            dead_peer_detection: histogram(
                "dead_peer_detection_seconds",
                "For keepalive timeouts: time from the last data received to the timeout.",
                vec![
                    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                    7200.0, 9000.0, 14400.0,
                ],
                &series_names,
            )?,
            probes_before_outcome: histogram(
                "probes_before_outcome",
                "Keepalive probes sent over a tracked connection's life, observed when it ends.",
                vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0, 10.0, 20.0, 50.0, 100.0],
                &with("outcome"),
            )?,
            connections: gauge(
                "connections",
                "Tracked connections now, by whether keepalive is on and the peer's state.",
                &["keepalive", "peer_state"],
            )?,
            settings: gauge(
                "connections_by_keepalive_setting",
                "Tracked connections whose effective keepalive setting (idle_seconds, \
                 interval_seconds or probes), or the worst-case dead-peer detection they give \
                 (dead_peer_detection_seconds: idle + probes x interval, or the first probe run \
                 past TCP_USER_TIMEOUT), is at most upper_bound (cumulative).",
                &["setting", "upper_bound"],
            )?,
            events_lost: counter(
                "events_lost_total",
                "Events lost before they reached the connection table, by stage.",
                &["stage"],
            )?,
            probes_unreported: registered(
                &registry,
                IntCounter::new(
                    "keepalive_probes_unreported_total",
                    "Keepalive probes the kernel sent in timer runs whose record was lost \
                     (ring buffer full); they are part of keepalive_probes_unseen_total too.",
                )?,
            )?,
            probes_unseen: counter(
                "keepalive_probes_unseen_total",
                "Keepalive probes the kernel counted (TcpExt TCPKeepAlive of each network \
                 namespace, compared every few seconds) that kalive has no record of: runs the \
                 kernel did not hand to kalive's programs, or records lost. probes_sent + this = \
                 TCPKeepAlive.",
                unseen_labels,
            )?,
            timeouts: counter(
                "tcp_timeouts_total",
                "Connections a kernel timer gave up on (TcpExt TCPAbortOnTimeout counts the \
                 same), by timer: keepalive, retransmit, zero_window, connect.",
                &with("timer"),
            )?,
            map_entries: gauge(
                "map_entries",
                "Entries in kalive's bounded tables: the kernel's connections map and the \
                 daemon's history of ended connections and peer-state changes.",
                &["map"],
            )?,
            map_capacity: gauge("map_capacity", "Capacity of kalive's tables.", &["map"])?,
            hook_info: gauge(
                "hook_info",
                "Kernel programs attached (value 1), with the hook mode in use.",
                &["mode", "program"],
            )?,
            build_info: gauge(
                "build_info",
                "kalive's version and the running kernel (value 1).",
                &["version", "kernel"],
            )?,
            collector_up: registered(
                &registry,
                IntGauge::new(
                    "collector_up",
                    "1 while the programs are attached and the ring buffer is being drained.",
                )?,
            )?,
            scrape_duration: registered(
                &registry,
                Gauge::new(
                    "scrape_duration_seconds",
                    "Time this scrape took to collect the metrics.",
                )?,
            )?,
            series_in_use: registered(
                &registry,
                IntGauge::new(
                    "series",
                    "Label sets in use by the per-connection counters (at most kalive_series_limit).",
                )?,
            )?,
            series_limit: registered(
                &registry,
                IntGauge::new("series_limit", "The --max-series cap.")?,
            )?,
            series_folded: registered(
                &registry,
                IntCounter::new(
                    "series_folded_total",
                    "Counts recorded under port=\"other\" because --max-series was reached.",
                )?,
            )?,
            registry,
            series,
        };
        metrics
            .series_limit
            .set(i64::try_from(metrics.series.options.max_series).unwrap_or(i64::MAX));
        for stage in loss_stage::ALL {
            metrics.events_lost.with_label_values(&[stage]);
        }
        if !by_netns {
            metrics.probes_unseen.with_label_values::<&str>(&[]);
        }
        Ok(metrics)
    }

    /// Adds one count from the table.
    pub fn record(&mut self, tally: &Tally) {
        let (values, folded) = self.series.values(&tally.origin);
        if folded {
            self.series_folded.inc();
        } else {
            self.series_in_use
                .set(i64::try_from(self.series.admitted.len()).unwrap_or(i64::MAX));
        }
        let labels: Vec<&str> = values.iter().map(String::as_str).collect();
        let with = |extra: &'static str| {
            let mut all = labels.clone();
            all.push(extra);
            all
        };
        match &tally.count {
            Count::ProbesSent(n) => self.probes_sent.with_label_values(&labels).inc_by(*n),
            Count::ProbesAnswered(n) => self.probes_answered.with_label_values(&labels).inc_by(*n),
            Count::ProbeSendFailures(n) => {
                self.probe_send_failures
                    .with_label_values(&labels)
                    .inc_by(*n);
            }
            Count::ResetReceived {
                during_probe,
                count,
            } => self
                .resets_received
                .with_label_values(&with(if *during_probe { "true" } else { "false" }))
                .inc_by(*count),
            Count::ResetSent { reason, count } => {
                let mut all = labels.clone();
                all.push(reason);
                self.resets_sent.with_label_values(&all).inc_by(*count);
            }
            Count::Timeout { timer } => {
                if *timer == TimeoutTimer::Keepalive {
                    self.keepalive_timeouts.with_label_values(&labels).inc();
                }
                self.timeouts.with_label_values(&with(timer.name())).inc();
            }
            Count::Ended {
                outcome,
                probes_sent,
                detection,
            } => {
                let outcome_labels = with(outcome.name());
                self.peer_outcomes.with_label_values(&outcome_labels).inc();
                self.probes_before_outcome
                    .with_label_values(&outcome_labels)
                    .observe(*probes_sent as f64);
                if let Some(detection) = detection {
                    self.dead_peer_detection
                        .with_label_values(&labels)
                        .observe(detection.as_secs_f64());
                }
            }
            Count::IdleKilled => self.idle_killed.with_label_values(&labels).inc(),
        }
    }

    /// Adds events lost at `stage` (one of `kalive_common::loss_stage::ALL`).
    pub fn add_lost(&self, stage: &str, lost: u64) {
        self.events_lost.with_label_values(&[stage]).inc_by(lost);
    }

    /// Adds probes sent in timer runs whose record was lost.
    pub fn add_unreported_probes(&self, probes: u64) {
        self.probes_unreported.inc_by(probes);
    }

    /// Adds probes the kernel counted in namespace `netns` that kalive has no record of.
    pub fn add_unseen_probes(&self, netns: u32, probes: u64) {
        self.unseen_series(netns).inc_by(probes);
    }

    fn unseen_series(&self, netns: u32) -> IntCounter {
        if self
            .series
            .options
            .extra_labels
            .contains(&ExtraLabel::Netns)
        {
            self.probes_unseen
                .with_label_values(&[netns.to_string().as_str()])
        } else {
            self.probes_unseen.with_label_values::<&str>(&[])
        }
    }

    /// Events lost at every stage: the sum of `kalive_events_lost_total` over `stage`.
    pub fn events_lost(&self) -> u64 {
        loss_stage::ALL
            .iter()
            .map(|stage| self.events_lost.with_label_values(&[stage]).get())
            .sum()
    }

    pub fn set_map(&self, map: &str, entries: usize, capacity: usize) {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.map_entries
            .with_label_values(&[map])
            .set(as_i64(entries));
        self.map_capacity
            .with_label_values(&[map])
            .set(as_i64(capacity));
    }

    pub fn set_hook(&self, mode: &str, programs: &[&str]) {
        self.hook_info.reset();
        for program in programs {
            self.hook_info.with_label_values(&[mode, program]).set(1);
        }
    }

    pub fn set_build(&self, version: &str, kernel: &str) {
        self.build_info.with_label_values(&[version, kernel]).set(1);
    }

    /// Sets the gauges that describe the table now and gathers every metric family, for
    /// encoding after the table's lock is released.
    pub fn collect(
        &self,
        table: &ConnectionTable,
        collector_up: bool,
        started: Instant,
    ) -> Vec<prometheus::proto::MetricFamily> {
        self.set_connection_gauges(table);
        let history = table.history();
        let (ended, changes) = history.lens();
        self.set_map("history_ended", ended, history.limit());
        self.set_map("history_peer_state", changes, history.limit());
        self.collector_up.set(i64::from(collector_up));
        self.scrape_duration.set(started.elapsed().as_secs_f64());
        self.registry.gather()
    }

    fn set_connection_gauges(&self, table: &ConnectionTable) {
        self.connections.reset();
        self.settings.reset();
        for on in ["on", "off"] {
            // The states a live connection can be in: always present, so dashboards see zeros.
            for state in PeerStateKind::LIVE {
                self.connections
                    .with_label_values(&[on, state.name()])
                    .set(0);
            }
        }
        self.connections_at_risk.reset();
        for reason in ["keepalive_idle_above_limit", "idle_without_keepalive"] {
            self.connections_at_risk.with_label_values(&[reason]).set(0);
        }
        for conn in table.connections() {
            if let Some(reason) = table.risk_reason(conn) {
                self.connections_at_risk.with_label_values(&[reason]).inc();
            }
        }
        let mut idle = [0i64; IDLE_BOUNDS.len() + 1];
        let mut interval = [0i64; INTERVAL_BOUNDS.len() + 1];
        let mut probes = [0i64; PROBE_BOUNDS.len() + 1];
        let mut detection = [0i64; DETECTION_BOUNDS.len() + 1];
        for conn in table.connections() {
            let on = if conn.keepalive_on { "on" } else { "off" };
            self.connections
                .with_label_values(&[on, conn.peer_state.name()])
                .inc();
            add_to_buckets(&mut idle, &IDLE_BOUNDS, conn.settings.idle.as_secs_f64());
            add_to_buckets(
                &mut interval,
                &INTERVAL_BOUNDS,
                conn.settings.interval.as_secs_f64(),
            );
            add_to_buckets(
                &mut probes,
                &PROBE_BOUNDS,
                f64::from(conn.settings.probe_limit),
            );
            if let Some(worst) = conn.dead_peer_detection() {
                add_to_buckets(&mut detection, &DETECTION_BOUNDS, worst.as_secs_f64());
            }
        }
        for (setting, bounds, counts) in [
            ("idle_seconds", &IDLE_BOUNDS[..], &idle[..]),
            ("interval_seconds", &INTERVAL_BOUNDS[..], &interval[..]),
            ("probes", &PROBE_BOUNDS[..], &probes[..]),
            (
                "dead_peer_detection_seconds",
                &DETECTION_BOUNDS[..],
                &detection[..],
            ),
        ] {
            let mut cumulative = 0;
            for (index, count) in counts.iter().enumerate() {
                cumulative += count;
                let bound = bounds
                    .get(index)
                    .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
                self.settings
                    .with_label_values(&[setting, &bound])
                    .set(cumulative);
            }
        }
    }
}

/// Registers `metric` in `registry` and hands it back.
fn registered<M>(registry: &Registry, metric: M) -> Result<M, prometheus::Error>
where
    M: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Counts `value` in the first bucket whose bound it does not exceed, or the last (+Inf) one.
/// `counts` has one more entry than `bounds`.
fn add_to_buckets(counts: &mut [i64], bounds: &[f64], value: f64) {
    let index = bounds
        .iter()
        .position(|bound| value <= *bound)
        .unwrap_or(bounds.len());
    if let Some(count) = counts.get_mut(index) {
        *count += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use prometheus::TextEncoder;

    use super::*;
    use crate::{
        kernel::{procfs::DEFAULT_EPHEMERAL_PORTS, units::KernelUnits},
        tracking::peer_state::PeerState,
        wire::Direction,
    };

    fn table() -> ConnectionTable {
        let units = KernelUnits {
            hz: 250,
            reset_reasons: Default::default(),
            ephemeral_ports: DEFAULT_EPHEMERAL_PORTS,
        };
        ConnectionTable::new(units, 2)
    }

    fn origin(direction: Direction, port: u16, connection: u64) -> Origin {
        Origin {
            netns: 7,
            direction,
            service_port: Some(port),
            remote_addr: Some(IpAddr::from([10, 0, 0, 1])),
            connection: Some(connection),
        }
    }

    fn tally(origin: Origin, count: Count) -> Tally {
        Tally { origin, count }
    }

    fn render(metrics: &Metrics) -> String {
        let families = metrics.collect(&table(), true, Instant::now());
        TextEncoder::new()
            .encode_to_string(&families)
            .expect("encode")
    }

    #[test]
    fn counters_carry_direction_and_service_port() {
        let mut metrics = Metrics::new(SeriesOptions::default()).unwrap();
        metrics.record(&tally(
            origin(Direction::Outbound, 443, 1),
            Count::ProbesSent(3),
        ));
        metrics.record(&tally(
            origin(Direction::Inbound, 5432, 2),
            Count::ResetReceived {
                during_probe: true,
                count: 1,
            },
        ));
        metrics.record(&tally(
            origin(Direction::Outbound, 443, 1),
            Count::Timeout {
                timer: TimeoutTimer::Keepalive,
            },
        ));
        metrics.record(&tally(
            origin(Direction::Outbound, 443, 1),
            Count::Ended {
                outcome: PeerState::Dead,
                probes_sent: 3,
                detection: Some(Duration::from_secs(4)),
            },
        ));
        let text = render(&metrics);
        for line in [
            "kalive_keepalive_probes_sent_total{direction=\"outbound\",port=\"443\"} 3",
            "kalive_tcp_resets_received_total{direction=\"inbound\",during_probe=\"true\",port=\"5432\"} 1",
            "kalive_keepalive_timeouts_total{direction=\"outbound\",port=\"443\"} 1",
            "kalive_tcp_timeouts_total{direction=\"outbound\",port=\"443\",timer=\"keepalive\"} 1",
            "kalive_peer_outcomes_total{direction=\"outbound\",outcome=\"dead\",port=\"443\"} 1",
            "kalive_dead_peer_detection_seconds_sum{direction=\"outbound\",port=\"443\"} 4",
            "kalive_probes_before_outcome_bucket{direction=\"outbound\",outcome=\"dead\",port=\"443\",le=\"3\"} 1",
            "kalive_events_lost_total{stage=\"ringbuf_full\"} 0",
            "kalive_events_lost_total{stage=\"program_skipped\"} 0",
            "kalive_series 2",
            "kalive_series_limit 1000",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        metrics.add_lost(loss_stage::PROGRAM_SKIPPED, 2);
        metrics.add_lost(loss_stage::KERNEL[0], 3);
        assert_eq!(metrics.events_lost(), 5);
        assert!(
            !text.contains("remote_addr"),
            "no per-peer labels by default"
        );
    }

    #[test]
    fn series_over_the_cap_fold_into_other_and_are_counted() {
        let mut metrics = Metrics::new(SeriesOptions {
            extra_labels: vec![ExtraLabel::Connection, ExtraLabel::RemoteAddr],
            max_series: 2,
        })
        .unwrap();
        for id in 1..=5 {
            metrics.record(&tally(
                origin(Direction::Outbound, 6000 + id as u16, id),
                Count::ProbesSent(1),
            ));
        }
        let text = render(&metrics);
        let probe_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kalive_keepalive_probes_sent_total{"))
            .collect();
        assert_eq!(probe_lines.len(), 3, "{probe_lines:?}");
        assert!(text.contains(
            "kalive_keepalive_probes_sent_total{connection=\"other\",direction=\"outbound\",port=\"other\",remote_addr=\"other\"} 3"
        ));
        assert!(text.contains(
            "kalive_keepalive_probes_sent_total{connection=\"1\",direction=\"outbound\",port=\"6001\",remote_addr=\"10.0.0.1\"} 1"
        ));
        assert!(text.contains("kalive_series_folded_total 3"));
        assert!(text.contains("kalive_series 2"));
    }

    #[test]
    fn unseen_probes_carry_the_netns_label_only_when_asked() {
        let plain = Metrics::new(SeriesOptions::default()).unwrap();
        assert!(render(&plain)
            .lines()
            .any(|l| l == "kalive_keepalive_probes_unseen_total 0"));
        plain.add_unseen_probes(4026531840, 2);
        plain.add_unseen_probes(4026532000, 1);
        assert!(render(&plain)
            .lines()
            .any(|l| l == "kalive_keepalive_probes_unseen_total 3"));

        let by_netns = Metrics::new(SeriesOptions {
            extra_labels: vec![ExtraLabel::Netns],
            ..SeriesOptions::default()
        })
        .unwrap();
        by_netns.add_unseen_probes(4026531840, 2);
        by_netns.add_unseen_probes(4026532000, 1);
        by_netns.add_unseen_probes(4026531840, 1);
        let text = render(&by_netns);
        for line in [
            "kalive_keepalive_probes_unseen_total{netns=\"4026531840\"} 3",
            "kalive_keepalive_probes_unseen_total{netns=\"4026532000\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn resets_without_a_socket_have_no_port() {
        let mut metrics = Metrics::new(SeriesOptions::default()).unwrap();
        let origin = Origin {
            service_port: None,
            remote_addr: None,
            connection: None,
            ..origin(Direction::Inbound, 0, 0)
        };
        metrics.record(&tally(
            origin,
            Count::ResetSent {
                reason: "no_socket".to_owned(),
                count: 1,
            },
        ));
        assert!(render(&metrics).contains(
            "kalive_tcp_resets_sent_total{direction=\"inbound\",port=\"none\",reason=\"no_socket\"} 1"
        ));
    }

    #[test]
    fn settings_gauge_is_cumulative() {
        let mut counts = [0i64; IDLE_BOUNDS.len() + 1];
        for idle in [5.0, 60.0, 7200.0, 100_000.0] {
            add_to_buckets(&mut counts, &IDLE_BOUNDS, idle);
        }
        assert_eq!(counts[0], 1, "5 s <= 10");
        assert_eq!(counts[2], 1, "60 s <= 60");
        assert_eq!(counts[IDLE_BOUNDS.len() - 1], 1, "7200 s <= 7200");
        assert_eq!(counts[IDLE_BOUNDS.len()], 1, "+Inf");
    }
}
