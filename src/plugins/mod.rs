//! Native (Rust) plugins shipped with moongate.

pub mod openfunction;
pub mod opentelemetry;
pub mod prometheus;
pub mod request_id;
pub mod response_headers;

use std::sync::Arc;

use crate::plugin::Plugin;

/// Every native plugin, one instance each.
pub fn native() -> Vec<Arc<dyn Plugin>> {
    vec![
        Arc::new(response_headers::ResponseHeaders),
        Arc::new(openfunction::OpenFunction),
        Arc::new(prometheus::Prometheus),
        Arc::new(request_id::RequestId),
        Arc::new(opentelemetry::OpenTelemetry),
    ]
}
