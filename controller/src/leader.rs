//! Leader election among controllers with a `coordination.k8s.io` Lease: the holder renews it
//! every few seconds; another candidate takes it once it has seen it unchanged for the lease's
//! duration (by its own monotonic clock, so clock skew between nodes does not matter). Every
//! change of the Lease carries the `resourceVersion` read, so two candidates cannot both win. A
//! leader that cannot renew within its deadline, shorter than the duration, exits at once, and
//! Kubernetes restarts it as a candidate.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{error, info, warn};

/// How a candidate takes part.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// Unique per process (the pod name and a random suffix).
    pub identity: String,
    /// How long a lease not seen to change stays with its holder.
    pub lease_duration: Duration,
    /// The holder stops leading when it has not renewed for this long (shorter than
    /// `lease_duration`, so it stops before anyone may take over).
    pub renew_deadline: Duration,
    pub retry_every: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The lease as last seen, and since when (by this process's monotonic clock): expiry is judged
/// by how long the lease stayed unchanged here, not by comparing another node's clock.
#[derive(Debug, Default)]
struct Observed {
    seen: Option<(String, Option<MicroTime>)>,
    since: Option<std::time::Instant>,
}

impl Observed {
    /// Records the lease's holder and renew time; true when it has not changed for `duration`.
    fn expired(&mut self, spec: &LeaseSpec, duration: Duration) -> bool {
        let key = (spec.holder_identity.clone().unwrap_or_default(), spec.renew_time.clone());
        if self.seen.as_ref() != Some(&key) {
            self.seen = Some(key);
            self.since = Some(std::time::Instant::now());
            return false;
        }
        self.since.is_some_and(|t| t.elapsed() > duration)
    }
}

/// Whether the lease is free for `me`: unheld, mine, or expired.
fn available(spec: &LeaseSpec, me: &str, expired: bool) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    holder.is_empty() || holder == me || expired
}

impl Election {
    /// Takes or renews the lease once; true when this process holds it afterwards.
    async fn try_hold(&self, api: &Api<Lease>, observed: &mut Observed) -> Result<bool, kube::Error> {
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
                let expired = observed.expired(&spec, self.lease_duration);
                if !available(&spec, &self.identity, expired) {
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

    /// Waits until this process holds the lease, then keeps renewing it in the background. When
    /// it cannot renew within the deadline, or another holder appears, the process exits at once:
    /// nothing it has in flight may finish under another leader.
    pub async fn lead(self, client: Client) {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        let mut observed = Observed::default();
        let mut waiting_logged = false;
        loop {
            let attempt = tokio::time::timeout(self.renew_deadline, self.try_hold(&api, &mut observed)).await;
            match attempt {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) if !waiting_logged => {
                    info!(lease = %self.lease, identity = %self.identity, "waiting to lead");
                    waiting_logged = true;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(lease = %self.lease, error = %e, "leader election failed; retrying"),
                Err(_) => warn!(lease = %self.lease, "leader election timed out; retrying"),
            }
            tokio::time::sleep(self.retry_every).await;
        }
        info!(lease = %self.lease, identity = %self.identity, "leading");
        tokio::spawn(async move {
            // Measured from before the request that renewed: the server's renew time is later.
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.retry_every).await;
                let started = tokio::time::Instant::now();
                let budget = self.renew_deadline.saturating_sub(renewed.elapsed());
                match tokio::time::timeout(budget, self.try_hold(&api, &mut observed)).await {
                    Ok(Ok(true)) => renewed = started,
                    Ok(Ok(false)) => {
                        error!(lease = %self.lease, "another controller took the lease; exiting");
                        std::process::exit(1);
                    }
                    Ok(Err(e)) => warn!(lease = %self.lease, error = %e, "renewing the lease failed"),
                    Err(_) => warn!(lease = %self.lease, "renewing the lease timed out"),
                }
                if renewed.elapsed() >= self.renew_deadline {
                    error!(lease = %self.lease, "the lease could not be renewed in time; exiting");
                    std::process::exit(1);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_or_unchanged_for_its_duration() {
        let held = |renewed: i64| LeaseSpec {
            holder_identity: Some("other".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap_or(Timestamp::UNIX_EPOCH))),
            ..LeaseSpec::default()
        };
        let d = Duration::from_millis(50);
        let mut o = Observed::default();
        assert!(!o.expired(&held(1), d), "first seen");
        assert!(!available(&held(1), "me", o.expired(&held(1), d)), "held, seen just now");
        std::thread::sleep(Duration::from_millis(80));
        assert!(available(&held(1), "me", o.expired(&held(1), d)), "unchanged for longer than the lease");
        assert!(!o.expired(&held(2), d), "renewed: the clock starts again");
        assert!(available(&held(2), "other", false), "the holder renews its own");
        assert!(available(&LeaseSpec::default(), "me", false), "no holder");
    }
}
