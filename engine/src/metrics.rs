//! Prometheus metrics of one engine, served at `/metrics`: IO counts, bytes and latency by
//! operation (recorded by [`Metered`], a [`Backend`] wrapper), and the volume's replica states,
//! epoch and resync figures (read from the volume at each scrape).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::authority::ReplicaState;
use crate::nbd::{Backend, IoError};
use crate::volume::Volume;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOnly {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The engine's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    ops: Family<OpLabels, Counter>,
    bytes: Family<OpOnly, Counter>,
    latency: Family<OpOnly, Histogram>,
    replicas: Family<StateLabel, Gauge>,
    epoch: Gauge,
    resynced: Gauge,
    size: Gauge,
    rebuild_done: Gauge,
    rebuild_total: Gauge,
    rebuilt: Gauge,
    rebuilds: Gauge,
    min_healthy: Gauge,
    max_iops: Gauge,
    max_bytes: Gauge,
    throttled: Gauge,
    throttled_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Ranges found damaged, bytes repaired, ranges left damaged; the scrub's progress.
    damage: [Gauge; 3],
    scrub: [Gauge; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("barnacle_engine");
        let ops = Family::<OpLabels, Counter>::default();
        let bytes = Family::<OpOnly, Counter>::default();
        // 20 µs to about 10 s.
        let latency = Family::<OpOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(20e-6, 2.0, 20))
        });
        let replicas = Family::<StateLabel, Gauge>::default();
        let (epoch, resynced, size) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register("io_operations", "NBD operations completed, by operation and result", ops.clone());
        registry.register("io_bytes", "Bytes read and written through the export", bytes.clone());
        registry.register("io_latency_seconds", "Latency of NBD operations", latency.clone());
        registry.register("replicas", "Replicas of the volume by state", replicas.clone());
        registry.register("epoch", "The volume's current epoch", epoch.clone());
        registry.register(
            "resynced_bytes",
            "Bytes resynced at start after an unclean stop",
            resynced.clone(),
        );
        registry.register("size_bytes", "The volume's size", size.clone());
        let (rebuild_done, rebuild_total) = (Gauge::default(), Gauge::default());
        let (rebuilt, rebuilds) = (Gauge::default(), Gauge::default());
        registry.register(
            "rebuild_done_bytes",
            "Bytes examined by the rebuild in progress (0 when none runs)",
            rebuild_done.clone(),
        );
        registry.register(
            "rebuild_total_bytes",
            "Bytes the rebuild in progress examines in all (0 when none runs)",
            rebuild_total.clone(),
        );
        registry.register("rebuilt_bytes", "Bytes written to rebuild targets since start", rebuilt.clone());
        registry.register("rebuilds_completed", "Rebuilds completed since start", rebuilds.clone());
        let (min_healthy, max_iops, max_bytes, throttled) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        let throttled_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("min_healthy_replicas", "Healthy replicas writes need", min_healthy.clone());
        registry.register("qos_max_iops", "The volume's IOPS limit (0: none)", max_iops.clone());
        registry.register(
            "qos_max_bytes_per_second",
            "The volume's throughput limit in bytes per second (0: none)",
            max_bytes.clone(),
        );
        registry.register(
            "qos_throttled_ios",
            "IOs the QoS limits made wait, since start",
            throttled.clone(),
        );
        registry.register(
            "qos_throttled_seconds",
            "Time IOs waited for the QoS limits in all, since start",
            throttled_seconds.clone(),
        );
        let damage = [Gauge::default(), Gauge::default(), Gauge::default()];
        registry.register(
            "damaged_ranges",
            "Ranges replicas reported damaged (a block not matching its checksum), since start",
            damage[0].clone(),
        );
        registry.register(
            "repaired_bytes",
            "Bytes rewritten on damaged replicas from a sound copy",
            damage[1].clone(),
        );
        registry.register(
            "unrepaired_ranges",
            "Damaged ranges left as they were (snapshot blocks, or no sound copy), since start",
            damage[2].clone(),
        );
        let scrub = [Gauge::default(), Gauge::default()];
        registry.register("scrub_done_bytes", "Bytes the running or last scrub verified", scrub[0].clone());
        registry.register("scrub_total_bytes", "Bytes the running or last scrub verifies", scrub[1].clone());
        Metrics {
            damage,
            scrub,
            registry,
            ops,
            bytes,
            latency,
            replicas,
            epoch,
            resynced,
            size,
            rebuild_done,
            rebuild_total,
            rebuilt,
            rebuilds,
            min_healthy,
            max_iops,
            max_bytes,
            throttled,
            throttled_seconds,
        }
    }

    fn record<T>(&self, op: &'static str, started: Instant, bytes: u64, r: &Result<T, IoError>) {
        let result = if r.is_ok() { "ok" } else { "error" };
        self.ops.get_or_create(&OpLabels { op, result }).inc();
        self.latency.get_or_create(&OpOnly { op }).observe(started.elapsed().as_secs_f64());
        if r.is_ok() && bytes > 0 {
            self.bytes.get_or_create(&OpOnly { op }).inc_by(bytes);
        }
    }

    /// The text exposition, with the volume's state as of now.
    pub fn render(&self, volume: &Volume) -> String {
        let m = volume.membership();
        let healthy = m.replicas.iter().filter(|r| r.state == ReplicaState::Healthy).count();
        let progress = volume.rebuild_progress();
        let rebuilding = usize::from(progress.is_some());
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.replicas.get_or_create(&StateLabel { state: "healthy" }).set(gauge(healthy));
        self.replicas.get_or_create(&StateLabel { state: "rebuilding" }).set(gauge(rebuilding));
        self.replicas
            .get_or_create(&StateLabel { state: "ejected" })
            .set(gauge(m.replicas.len() - healthy - rebuilding));
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (done, total) = progress.map_or((0, 0), |p| (p.done_bytes, p.total_bytes));
        self.rebuild_done.set(big(done));
        self.rebuild_total.set(big(total));
        let (rebuilt, rebuilds) = volume.rebuild_totals();
        self.rebuilt.set(big(rebuilt));
        self.rebuilds.set(big(rebuilds));
        self.epoch.set(big(m.epoch));
        self.resynced.set(big(volume.resynced_bytes()));
        self.size.set(big(volume.size()));
        let settings = volume.settings();
        self.min_healthy.set(i64::from(settings.min_healthy));
        self.max_iops.set(big(settings.max_iops));
        self.max_bytes.set(big(settings.max_mib_per_sec.saturating_mul(1 << 20)));
        let (throttled, waited) = volume.throttled();
        self.throttled.set(big(throttled));
        self.throttled_seconds.set(waited.as_secs_f64());
        let d = volume.damage_totals();
        for (g, v) in self.damage.iter().zip([d.found, d.repaired_bytes, d.unrepaired]) {
            g.set(big(v));
        }
        let (done, total) = volume.scrub_progress().map_or((0, 0), |p| (p.done_bytes, p.total_bytes));
        self.scrub[0].set(big(done));
        self.scrub[1].set(big(total));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// A [`Backend`] that records every operation in [`Metrics`].
#[derive(Debug)]
pub struct Metered<B> {
    pub inner: Arc<B>,
    pub metrics: Arc<Metrics>,
}

impl<B: Backend> Backend for Metered<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let t = Instant::now();
        let r = self.inner.read(offset, len).await;
        self.metrics.record("read", t, u64::from(len), &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let (t, n) = (Instant::now(), data.len() as u64);
        let r = self.inner.write(offset, data, fua).await;
        self.metrics.record("write", t, n, &r);
        r
    }

    fn write_buffer(&self, len: usize) -> Option<barnacle_replica::shm::Slot> {
        self.inner.write_buffer(len)
    }

    async fn flush(&self) -> Result<(), IoError> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.metrics.record("flush", t, 0, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), IoError> {
        let t = Instant::now();
        let r = self.inner.trim(offset, len).await;
        self.metrics.record("trim", t, 0, &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, fua).await;
        self.metrics.record("write_zeroes", t, 0, &r);
        r
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    volume: Arc<Volume>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (m, v) = (metrics.clone(), volume.clone());
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    m.render(&v),
                )
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
