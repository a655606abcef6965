//! Prometheus metrics (`GET /metrics`, OpenMetrics text): what vLLM and TGI operators scrape
//! (requests by route and status, queue depth, running batch, tokens, time to first token and
//! per-token latency) plus what is drllm's own, the routing cost of each prompt.
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request counter: the route pattern (never the raw path, so that clients cannot
/// grow the label set) and the HTTP status.
pub type RequestLabels = Vec<(&'static str, String)>;

/// The server's metrics; clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    /// HTTP requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Prompts queued for the model thread and not yet in the running batch.
    pub waiting: Gauge,
    /// Prompts in the running batch (set by the model thread every step).
    pub running: Gauge,
    /// Prompt tokens of the prompts answered.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// From a request's arrival to its first generated token (to its answer when it generates
    /// none, as lm-eval's log-likelihood requests).
    pub time_to_first_token: Histogram,
    /// Mean time per generated token after the first, one observation per prompt.
    pub time_per_output_token: Histogram,
    /// From a request's arrival to its answer (its last event when streamed).
    pub request_duration: Histogram,
    /// Prompts whose client left before their answer was complete.
    pub cancelled: Counter,
    /// Block applications of each prompt's layer path.
    pub routing_cost: Histogram,
    /// Blocks of the model (the all-execute path's cost).
    pub blocks: Gauge,
    registry: std::sync::Arc<Registry>,
}

impl Metrics {
    /// Metrics of a server for a model of `num_layers` blocks.
    pub fn new(num_layers: usize) -> Metrics {
        let requests = Family::<RequestLabels, Counter>::default();
        let waiting = Gauge::default();
        let running = Gauge::default();
        let prompt_tokens = Counter::default();
        let generation_tokens = Counter::default();
        // 1 ms .. about 33 s.
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let time_to_first_token = latency();
        let time_per_output_token = latency();
        let request_duration = latency();
        let cancelled = Counter::default();
        let l = num_layers.max(1) as f64;
        // Fractions of the all-execute cost, up to the search's cost cap of 2L.
        let routing_cost = Histogram::new(
            [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.25, 1.5, 2.0].map(|f| f * l),
        );
        let blocks = Gauge::default();
        blocks.set(num_layers as i64);
        let mut r = Registry::with_prefix("drllm");
        r.register(
            "requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        r.register(
            "requests_waiting",
            "Prompts queued for the model and not yet running",
            waiting.clone(),
        );
        r.register(
            "requests_running",
            "Prompts in the running batch",
            running.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of the prompts answered",
            prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            generation_tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated token (to its answer without one)",
            time_to_first_token.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Mean time per generated token after the first, per prompt",
            time_per_output_token.clone(),
        );
        r.register(
            "request_duration_seconds",
            "From a request's arrival to its answer",
            request_duration.clone(),
        );
        r.register(
            "requests_cancelled",
            "Prompts whose client left before the answer was complete",
            cancelled.clone(),
        );
        r.register(
            "routing_cost_blocks",
            "Block applications of each prompt's layer path",
            routing_cost.clone(),
        );
        r.register(
            "model_blocks",
            "Blocks of the model (the all-execute path's cost)",
            blocks.clone(),
        );
        Metrics {
            requests,
            waiting,
            running,
            prompt_tokens,
            generation_tokens,
            time_to_first_token,
            time_per_output_token,
            request_duration,
            cancelled,
            routing_cost,
            blocks,
            registry: std::sync::Arc::new(r),
        }
    }

    /// Counts one answered request.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// One prompt's timings: `first` from arrival to the first generated token (or the answer),
    /// `total` to the answer, over `generated` tokens.
    pub fn timings(&self, first: Duration, total: Duration, generated: usize) {
        self.time_to_first_token.observe(first.as_secs_f64());
        self.request_duration.observe(total.as_secs_f64());
        if generated > 1 {
            let per = total.saturating_sub(first).as_secs_f64() / (generated - 1) as f64;
            self.time_per_output_token.observe(per);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut s = String::new();
        encode(&mut s, &self.registry)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_metric_once_and_ends_with_eof() {
        let m = Metrics::new(30);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.timings(Duration::from_millis(20), Duration::from_millis(120), 11);
        m.routing_cost.observe(27.0);
        let text = m.encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains(r#"drllm_requests_total{route="/v1/completions",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains("drllm_model_blocks 30"), "{text}");
        // (120 - 20) ms over 10 tokens after the first.
        assert!(
            text.contains("drllm_time_per_output_token_seconds_sum 0.01"),
            "{text}"
        );
        assert!(
            text.contains(r#"drllm_routing_cost_blocks_bucket{le="27.0"} 1"#),
            "{text}"
        );
    }
}
