//! The OTLP/HTTP span exporter: one thread (`moongate-otel`) per set of settings, fed by the
//! workers through a bounded channel, sending batches as protobuf (`POST .../v1/traces`,
//! `Content-Type: application/x-protobuf`) as the batch span processor settings say.
//!
//! A batch goes when it is full (`max_export_batch_size`), when its first span has waited
//! `batch_timeout`, or when no span has come for `inactive_timeout`. A failed export drops
//! that batch (as the Lua SDK does after its retries) and logs one line per failing stretch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio::sync::mpsc;

use super::Settings;

/// Spans the collector accepted.
pub static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
/// Spans dropped because the queue was full.
pub static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans in batches the collector refused or did not answer.
pub static SPANS_FAILED: AtomicU64 = AtomicU64::new(0);

/// The instrumentation scope spans are reported under (the name APISIX's spans carry).
const SCOPE: &str = "opentelemetry-lua";

/// Hands finished spans to the export thread.
pub struct Exporter {
    tx: Option<mpsc::Sender<Span>>,
}

impl Exporter {
    /// Starts the export thread for `settings`. When the thread cannot start, spans are
    /// counted as dropped.
    pub fn start(settings: &Settings) -> Exporter {
        if !settings.batch.drop_on_queue_full {
            tracing::warn!(
                "opentelemetry: batch_span_processor.drop_on_queue_full false is not followed: \
                 a full queue drops spans so that no request waits on the collector"
            );
        }
        let (tx, rx) = mpsc::channel(settings.batch.max_queue_size);
        let s = settings.clone();
        let spawned = std::thread::Builder::new()
            .name("moongate-otel".into())
            .spawn(move || run(s, rx));
        match spawned {
            Ok(_) => Exporter { tx: Some(tx) },
            Err(e) => {
                tracing::error!("opentelemetry: cannot start the export thread: {e}");
                Exporter { tx: None }
            }
        }
    }

    /// Queues a finished span; never waits.
    pub fn send(&self, span: Span) {
        let queued = self.tx.as_ref().is_some_and(|tx| tx.try_send(span).is_ok());
        if !queued {
            SPANS_DROPPED.fetch_add(1, Relaxed);
        }
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client(settings: &Settings) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.collector.timeout));
    http.set_nodelay(true);
    let tls = crate::tls::client_config(true, crate::tls::Alpn::Http1, None);
    let mut tls = (*tls).clone();
    // The connector sets ALPN itself.
    tls.alpn_protocols.clear();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

fn run(settings: Settings, mut rx: mpsc::Receiver<Span>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("opentelemetry: cannot start the export runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let client = client(&settings);
        let resource = settings.resource_attributes();
        let b = &settings.batch;
        let mut failing = false;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let full_by = tokio::time::Instant::now() + b.batch_timeout;
            let mut open = true;
            while batch.len() < b.max_export_batch_size {
                let idle_by = tokio::time::Instant::now() + b.inactive_timeout;
                match tokio::time::timeout_at(full_by.min(idle_by), rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            match send(&client, &settings, &resource, batch).await {
                Ok(()) => {
                    SPANS_EXPORTED.fetch_add(n, Relaxed);
                    if failing {
                        tracing::info!(
                            endpoint = %settings.collector.endpoint,
                            "opentelemetry: the collector takes spans again"
                        );
                        failing = false;
                    }
                }
                Err(why) => {
                    SPANS_FAILED.fetch_add(n, Relaxed);
                    if !failing {
                        tracing::error!(
                            endpoint = %settings.collector.endpoint,
                            "opentelemetry: exporting {n} spans failed: {why}"
                        );
                        failing = true;
                    }
                }
            }
            if !open {
                break;
            }
        }
    });
}

/// The export request for `spans`.
pub fn request(
    resource: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    spans: Vec<Span>,
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource.to_vec(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: SCOPE.to_string(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn send(
    client: &HttpClient,
    settings: &Settings,
    resource: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    spans: Vec<Span>,
) -> Result<(), String> {
    let body = request(resource, spans).encode_to_vec();
    let mut req = http::Request::post(&settings.collector.endpoint)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    for (k, v) in &settings.collector.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    let call = async {
        let res = client.request(req).await.map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s = format!("{s}: {c}");
                src = c.source();
            }
            s
        })?;
        let status = res.status();
        // Read the answer whole so the connection can be kept.
        let _ = res.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    };
    match tokio::time::timeout(settings.collector.timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer in {} s (collector.request_timeout)",
            settings.collector.timeout.as_secs_f64()
        )),
    }
}
