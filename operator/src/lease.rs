//! Leader election through a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile at once. A leader that cannot renew
//! within the lease's duration stops, and Kubernetes restarts it as a
//! follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;
use tracing::{info, warn};

/// Whether `me` may take the lease now: it is free, already ours, or its
/// holder has not renewed it within its duration.
pub fn may_take(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => return true,
        Some(holder) if holder == me => return true,
        Some(_) => {}
    }
    let duration =
        SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0).into());
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(MicroTime(renewed)) => renewed
            .checked_add(duration)
            .is_ok_and(|expiry| expiry < now),
        None => true,
    }
}

pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl Elector {
    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours =
            previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or renew the lease. `Ok(true)` means we hold it.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                if !may_take(lease.spec.as_ref(), &self.identity, now) {
                    return Ok(false);
                }
                lease.spec = Some(self.spec(lease.spec.as_ref(), now));
                // The resourceVersion in `lease` makes this fail if another
                // candidate wrote in between.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn retry_period(&self) -> Duration {
        self.duration / 3
    }

    /// Returns once this process holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(lease = %self.name, "lease: {e}"),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews the lease until a renewal has failed for a whole lease
    /// duration; then returns, and the caller must stop leading.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            match self.try_hold().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another operator holds the lease");
                    return;
                }
                Err(e) => warn!(lease = %self.name, "could not renew the lease: {e}"),
            }
            // Stop a margin before the lease can expire, so that two
            // operators never both believe they lead.
            if last_renewed.elapsed() + self.retry_period() >= self.duration {
                warn!(lease = %self.name, "lease not renewed in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        let now = Timestamp::from_second(1_000_000).unwrap();
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(
                now.checked_sub(SignedDuration::from_secs(renewed_secs_ago))
                    .unwrap(),
            )),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn takes_a_free_own_or_expired_lease_only() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert!(may_take(None, "a", now));
        assert!(may_take(Some(&spec(None, 0, 15)), "a", now));
        assert!(may_take(Some(&spec(Some("a"), 0, 15)), "a", now));
        assert!(!may_take(Some(&spec(Some("b"), 0, 15)), "a", now));
        assert!(!may_take(Some(&spec(Some("b"), 14, 15)), "a", now));
        assert!(may_take(Some(&spec(Some("b"), 16, 15)), "a", now));
    }
}
