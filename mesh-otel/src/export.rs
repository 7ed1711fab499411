//! The background exporter: a thread with a current-thread runtime that batches queued spans
//! and sends them with `TraceService/Export`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::uri::PathAndQuery;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::proto::{self, any_value::Value};
use crate::{Counters, Error, ExportStats, OtlpConfig};

enum Control {
    /// Export everything queued, then answer.
    Flush(oneshot::Sender<()>),
    /// Export everything queued, answer, and stop.
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// Keeps the exporter running; dropping it exports what is queued (bounded by the export
/// timeout) and stops the background thread.
#[derive(Debug)]
pub struct ExporterGuard {
    control: mpsc::UnboundedSender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    shutdown_timeout: Duration,
}

impl ExporterGuard {
    /// Exports every span queued so far and waits for the collector's answers.
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Flush(tx))
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The exporter's counters.
    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }

    pub(crate) fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }
}

impl Drop for ExporterGuard {
    fn drop(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.control.send(Control::Shutdown(tx)).is_ok()
            && rx.recv_timeout(self.shutdown_timeout).is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

/// Validates `config` and starts the exporter thread.
pub(crate) fn start(
    config: OtlpConfig,
) -> Result<(mpsc::Sender<proto::Span>, ExporterGuard), Error> {
    if config.max_queue_size == 0 {
        return Err(Error::Config("max_queue_size"));
    }
    if config.max_export_batch_size == 0 {
        return Err(Error::Config("max_export_batch_size"));
    }
    if config.endpoint.starts_with("https://") {
        return Err(Error::TlsUnsupported(config.endpoint.clone()));
    }
    let endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|source| Error::Endpoint {
            endpoint: config.endpoint.clone(),
            source,
        })?
        .timeout(config.export_timeout);
    let (queue, spans) = mpsc::channel(config.max_queue_size);
    let (control, control_rx) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Thread)?;
    let exporter = Exporter {
        resource: resource(&config),
        batch_size: config.max_export_batch_size,
        delay: config.scheduled_delay,
        timeout: config.export_timeout,
        counters: Arc::clone(&counters),
    };
    let thread = std::thread::Builder::new()
        .name("mesh-otel-exporter".into())
        .spawn(move || runtime.block_on(exporter.run(endpoint, spans, control_rx)))
        .map_err(Error::Thread)?;
    Ok((
        queue,
        ExporterGuard {
            control,
            thread: Some(thread),
            counters,
            shutdown_timeout: config.export_timeout + Duration::from_secs(1),
        },
    ))
}

fn resource(config: &OtlpConfig) -> proto::Resource {
    let mut attributes = vec![
        proto::KeyValue::new(
            "service.name",
            Value::StringValue(config.service_name.clone()),
        ),
        proto::KeyValue::new("telemetry.sdk.name", Value::StringValue("mesh".into())),
    ];
    for (k, v) in &config.resource_attributes {
        attributes.push(proto::KeyValue::new(
            k.clone(),
            Value::StringValue(v.clone()),
        ));
    }
    proto::Resource { attributes }
}

struct Exporter {
    resource: proto::Resource,
    batch_size: usize,
    delay: Duration,
    timeout: Duration,
    counters: Arc<Counters>,
}

impl Exporter {
    async fn run(
        self,
        endpoint: Endpoint,
        mut spans: mpsc::Receiver<proto::Span>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let channel = endpoint.connect_lazy();
        let mut batch: Vec<proto::Span> = Vec::with_capacity(self.batch_size);
        let mut tick = tokio::time::interval(self.delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                c = control.recv() => {
                    while let Ok(s) = spans.try_recv() {
                        batch.push(s);
                    }
                    self.export_all(&channel, &mut batch).await;
                    match c {
                        Some(Control::Flush(done)) => { let _ = done.send(()); }
                        Some(Control::Shutdown(done)) => { let _ = done.send(()); return; }
                        None => return,
                    }
                }
                n = spans.recv_many(&mut batch, self.batch_size), if open => {
                    if n == 0 {
                        // Every layer is gone: wait for the guard.
                        open = false;
                    }
                    if batch.len() >= self.batch_size {
                        self.export_all(&channel, &mut batch).await;
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.export_all(&channel, &mut batch).await;
                    }
                }
            }
        }
    }

    async fn export_all(&self, channel: &Channel, batch: &mut Vec<proto::Span>) {
        while !batch.is_empty() {
            let n = batch.len().min(self.batch_size);
            let spans: Vec<proto::Span> = batch.drain(..n).collect();
            self.export(channel, spans).await;
        }
    }

    async fn export(&self, channel: &Channel, spans: Vec<proto::Span>) {
        let n = spans.len() as u64;
        let request = proto::ExportTraceServiceRequest {
            resource_spans: vec![proto::ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![proto::ScopeSpans {
                    scope: Some(proto::InstrumentationScope {
                        name: "mesh".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            }],
        };
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<
                proto::ExportTraceServiceRequest,
                proto::ExportTraceServiceResponse,
            >::default();
            grpc.unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(proto::EXPORT_PATH),
                codec,
            )
            .await
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => {
                let rejected = response
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                    .min(n);
                self.counters
                    .exported
                    .fetch_add(n - rejected, Ordering::Relaxed);
                self.counters.failed.fetch_add(rejected, Ordering::Relaxed);
            }
            Ok(Err(status)) => {
                self.counters.failed.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(target: "mesh::otel", spans = n, %status, "OTLP export failed");
            }
            Err(_) => {
                self.counters.failed.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(target: "mesh::otel", spans = n, "OTLP export timed out");
            }
        }
    }
}
