//! Leader election among controller replicas with a `coordination.k8s.io` Lease: the holder
//! renews it every few seconds; another replica takes it once it has not been renewed for its
//! duration. Every change of the Lease carries the `resourceVersion` read, so two candidates
//! cannot both win. A leader that cannot renew in time stops leading (the process exits, and
//! Kubernetes restarts it as a candidate).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How a candidate takes part.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// Unique per process (the pod name and a random suffix).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Whether the lease is free for `me`: unheld, mine, or not renewed for its duration.
fn available(spec: &LeaseSpec, me: &str, at: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match &spec.renew_time {
        Some(t) => at.as_second() > t.0.as_second() + duration,
        None => true,
    }
}

impl Election {
    /// Takes or renews the lease once; true when this process holds it afterwards.
    async fn try_hold(&self, api: &Api<Lease>) -> Result<bool, kube::Error> {
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        match api.get_opt(&self.lease).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.lease.clone()), ..ObjectMeta::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now()),
                        renew_time: Some(now()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let mut spec = lease.spec.clone().unwrap_or_default();
                if !available(&spec, &self.identity, Timestamp::now()) {
                    return Ok(false);
                }
                if spec.holder_identity.as_deref() != Some(&self.identity) {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(secs);
                spec.renew_time = Some(now());
                lease.spec = Some(spec);
                // The read resourceVersion travels in the object: a concurrent change wins.
                match api.replace(&self.lease, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this process holds the lease, then keeps renewing it in the background; the
    /// returned token fires when leadership is lost.
    pub async fn lead(self, client: Client) -> CancellationToken {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        let mut waiting_logged = false;
        loop {
            match self.try_hold(&api).await {
                Ok(true) => break,
                Ok(false) if !waiting_logged => {
                    info!(lease = %self.lease, identity = %self.identity, "waiting to lead");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(e) => warn!(lease = %self.lease, error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(self.renew_every).await;
        }
        info!(lease = %self.lease, identity = %self.identity, "leading");
        let lost = CancellationToken::new();
        let token = lost.clone();
        tokio::spawn(async move {
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.renew_every).await;
                match self.try_hold(&api).await {
                    Ok(true) => last = tokio::time::Instant::now(),
                    Ok(false) => {
                        warn!(lease = %self.lease, "another controller took the lease");
                        break;
                    }
                    Err(e) => warn!(lease = %self.lease, error = %e, "renewing the lease failed"),
                }
                // Stop before another candidate may take it.
                if last.elapsed() + self.renew_every >= self.lease_duration {
                    warn!(lease = %self.lease, "the lease could not be renewed in time");
                    break;
                }
            }
            lost.cancel();
        });
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_or_expired() {
        let at = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let held = |renewed: i64| LeaseSpec {
            holder_identity: Some("other".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap_or(Timestamp::UNIX_EPOCH))),
            ..LeaseSpec::default()
        };
        assert!(!available(&held(990), "me", at), "renewed 10 s ago, within 15 s");
        assert!(available(&held(980), "me", at), "renewed 20 s ago: expired");
        assert!(available(&held(999), "other", at), "the holder renews its own");
        assert!(available(&LeaseSpec::default(), "me", at), "no holder");
    }
}
