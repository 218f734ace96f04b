//! What the daemon shows the world: the HTTP server (`http`, its connection slots in
//! `http_slots`, with TLS and basic auth from `web_config`), the Prometheus metrics
//! (`metrics`), the JSON API's queries and bodies (`api`), and one logfmt line per probe and
//! outcome (`logfmt`).

pub mod api;
pub mod http;
pub mod http_slots;
pub mod logfmt;
pub mod metrics;
pub mod web_config;
