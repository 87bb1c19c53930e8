//! Asks a node whether it serves: the gRPC health check that the readiness
//! probe (`shardkvctl health`), the cluster tests and the benchmark use.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("invalid address {0:?}")]
    Address(String),
    #[error("cannot reach {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error("{addr}: {message}")]
    Failed { addr: String, message: String },
    #[error("{addr} is {status}")]
    NotServing { addr: String, status: String },
}

/// Ok once the node at `addr` (`host:port`) reports SERVING; connecting and
/// the check each take at most `timeout`.
pub async fn check_serving(addr: &str, timeout: Duration) -> Result<(), ProbeError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ProbeError::Address(addr.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ProbeError::Unreachable {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| ProbeError::Failed {
            addr: addr.to_string(),
            message: s.message().to_string(),
        })?
        .into_inner();
    match ServingStatus::try_from(reply.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(ProbeError::NotServing {
            addr: addr.to_string(),
            status: other.as_str_name().to_string(),
        }),
        Err(_) => Err(ProbeError::NotServing {
            addr: addr.to_string(),
            status: format!("in unknown status {}", reply.status),
        }),
    }
}
