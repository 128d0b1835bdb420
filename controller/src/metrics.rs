//! The controller's Prometheus metrics, served at `/metrics` when `--metrics-listen` is given:
//! volumes by state, and per volume its replicas wanted and placed, replicas lost now and for
//! how long, replicas replenished so far, and replaced replicas whose data awaits their node's
//! return. Everything is read at each scrape from the record store and the replenishment clock,
//! so a standby controller serves the records too (its `barnacle_controller_leading` is 0 and it
//! sees no lost replicas: only the leader watches them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::Result;
use crate::service::Service;
use crate::store::VolumeState;

/// What the replenishment passes did since this controller started.
#[derive(Debug, Default)]
pub struct ReplenishCounters {
    pub passes: AtomicU64,
    /// Volumes a pass could not handle (or passes that could not read the records).
    pub errors: AtomicU64,
    pub replaced: AtomicU64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
    /// The CSI name (the PV's name in Kubernetes).
    name: String,
}

fn family<
    M: prometheus_client::metrics::TypedMetric + Default + Clone + std::fmt::Debug + Send + Sync + 'static,
>(
    reg: &mut Registry,
    name: &str,
    help: &str,
) -> Family<VolumeLabels, M>
where
    Family<VolumeLabels, M>: prometheus_client::encoding::EncodeMetric,
{
    let f = Family::<VolumeLabels, M>::default();
    reg.register(name, help, f.clone());
    f
}

impl Service {
    /// The metrics text (Prometheus exposition format), read now.
    pub async fn metrics_text(&self) -> Result<String> {
        let volumes = self.db(|s| s.volumes()).await?;
        let lost = self.lost_replicas_now();
        let mut reg = Registry::with_prefix("barnacle");

        let leading = Gauge::<i64>::default();
        reg.register(
            "controller_leading",
            "1 when this controller leads (serves and repairs)",
            leading.clone(),
        );
        leading.set(i64::from(self.is_leading()));
        let counters = self.replenish_counters();
        for (name, help, v) in [
            ("controller_replenish_passes", "Replenishment passes run", &counters.passes),
            (
                "controller_replenish_errors",
                "Volumes a replenishment pass could not handle",
                &counters.errors,
            ),
            ("controller_replicas_replaced", "Lost replicas this controller replaced", &counters.replaced),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v.load(Ordering::Relaxed));
            reg.register(name, help, c);
        }

        let by_state = Family::<StateLabel, Gauge>::default();
        reg.register("volumes", "Volumes by state", by_state.clone());
        for s in ["creating", "ready", "deleted"] {
            by_state.get_or_create(&StateLabel { state: s }).set(0);
        }
        let wanted: Family<_, Gauge> =
            family(&mut reg, "volume_replicas_wanted", "Replicas the volume asks for");
        let placed: Family<_, Gauge> = family(&mut reg, "volume_replicas_placed", "Replicas the volume has");
        let lost_now: Family<_, Gauge> = family(
            &mut reg,
            "volume_replicas_lost",
            "Replicas lost now (ejected and not rebuilding, or node gone)",
        );
        let lost_longest: Family<_, Gauge> = family(
            &mut reg,
            "volume_replica_lost_longest_seconds",
            "How long the volume's longest-lost replica has been lost",
        );
        let replace_after: Family<_, Gauge> = family(
            &mut reg,
            "volume_replica_replenish_after_seconds",
            "replicaReplenishAfter: a replica lost this long is replaced (0: never)",
        );
        let replenished: Family<_, Counter> =
            family(&mut reg, "volume_replicas_replenished", "Lost replicas replaced over the volume's life");
        let awaiting_wipe: Family<_, Gauge> = family(
            &mut reg,
            "volume_replicas_awaiting_wipe",
            "Replaced replicas whose data is wiped when their node comes back",
        );
        for v in &volumes {
            let state = match v.state {
                VolumeState::Creating => "creating",
                VolumeState::Ready => "ready",
                VolumeState::Deleted => "deleted",
            };
            by_state.get_or_create(&StateLabel { state }).inc();
            if v.state != VolumeState::Ready {
                continue;
            }
            let l = VolumeLabels { volume: v.id.clone(), name: v.name.clone() };
            wanted.get_or_create(&l).set(v.params.replicas as i64);
            placed.get_or_create(&l).set(v.replicas.len() as i64);
            let mine: Vec<_> = lost.iter().filter(|(vid, _, _)| *vid == v.id).collect();
            lost_now.get_or_create(&l).set(mine.len() as i64);
            let longest = mine.iter().map(|(_, _, d)| d.as_secs()).max().unwrap_or(0);
            lost_longest.get_or_create(&l).set(longest as i64);
            replace_after.get_or_create(&l).set(v.params.replenish_after().map_or(0, |d| d.as_secs() as i64));
            replenished.get_or_create(&l).inc_by(v.replicas_replenished);
            awaiting_wipe.get_or_create(&l).set(v.lost_replicas.len() as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg)
            .map_err(|e| crate::error::ControllerError::Store(format!("encoding metrics: {e}")))?;
        Ok(out)
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let s = service.clone();
            async move {
                match s.metrics_text().await {
                    Ok(text) => (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    ),
                    Err(e) => {
                        warn!(error = %e, "metrics: reading the records failed");
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            format!("reading the records failed: {e}\n"),
                        )
                    }
                }
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
