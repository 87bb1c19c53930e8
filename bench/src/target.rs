//! The stores a benchmark drives: shardkv through the `Clerk`, etcd through
//! a tonic client of its KV service (generated from the part of etcd's
//! protos in `proto/etcd_kv.proto`, the calls `etcd-client` makes). Both are
//! tonic gRPC clients, and both reads are linearizable (etcd's default
//! `Range` is; shardkv's `Get` is).

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use shardkv::shardkv::clerk::{Clerk, ClerkOptions};
use shardkv::shardmaster::client::ShardMasterClient;
use shardkv::shardmaster::Config;
use tonic::transport::{Channel, Endpoint};

/// One operation's budget, retries included. Past it, the operation counts
/// as an error.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a store is and how to reach it.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TargetSpec {
    /// The shardmasters' addresses; the Clerk finds the groups from them.
    Shardkv { masters: Vec<String> },
    /// Client URLs of the etcd members (`http://host:port`).
    Etcd { endpoints: Vec<String> },
}

impl TargetSpec {
    pub fn name(&self) -> &'static str {
        match self {
            TargetSpec::Shardkv { .. } => "shardkv",
            TargetSpec::Etcd { .. } => "etcd",
        }
    }

    /// shardkv's configurations from `from` through the latest, to tell
    /// which shards changed group during a run; `None` for etcd, which
    /// has no shards.
    pub async fn configs_since(&self, from: Option<u64>) -> Result<Option<Vec<Config>>, String> {
        let TargetSpec::Shardkv { masters } = self else {
            return Ok(None);
        };
        let client =
            ShardMasterClient::new(masters, OPERATION_TIMEOUT).map_err(|e| e.to_string())?;
        let latest = client.query(None).await.map_err(|e| e.to_string())?;
        let mut configs = Vec::new();
        for num in from.unwrap_or(latest.num)..latest.num {
            configs.push(client.query(Some(num)).await.map_err(|e| e.to_string())?);
        }
        configs.push(latest);
        Ok(Some(configs))
    }

    /// A client of its own, as one independent user would have.
    pub async fn connect(&self) -> Result<Store, String> {
        match self {
            TargetSpec::Shardkv { masters } => {
                let options = ClerkOptions {
                    timeout: OPERATION_TIMEOUT,
                    ..Default::default()
                };
                let clerk = Clerk::new(masters, options).map_err(|e| e.to_string())?;
                Ok(Store::Shardkv(clerk))
            }
            TargetSpec::Etcd { endpoints } => {
                if endpoints.is_empty() {
                    return Err("no etcd endpoints given".into());
                }
                let mut members = Vec::with_capacity(endpoints.len());
                for url in endpoints {
                    let endpoint = Endpoint::from_shared(url.clone())
                        .map_err(|e| format!("etcd endpoint {url:?}: {e}"))?
                        .connect_timeout(Duration::from_secs(2))
                        .timeout(OPERATION_TIMEOUT);
                    members.push(endpoint);
                }
                // Spread over every member, as etcd-client does; the
                // connections open on first use.
                let channel = Channel::balance_list(members.into_iter());
                Ok(Store::Etcd(etcd::kv_client::KvClient::new(channel)))
            }
        }
    }
}

/// A connected client.
pub enum Store {
    Shardkv(Clerk),
    Etcd(etcd::kv_client::KvClient<Channel>),
}

/// etcd's KV service, generated at build time.
mod etcd {
    tonic::include_proto!("etcdserverpb");
}

impl Store {
    /// The value, or `None` if the key is absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<Bytes>, String> {
        match self {
            Store::Shardkv(clerk) => clerk
                .get(Bytes::copy_from_slice(key.as_bytes()))
                .await
                .map_err(|e| e.to_string()),
            Store::Etcd(kv) => {
                let request = etcd::RangeRequest {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    ..Default::default()
                };
                let response = kv.range(request).await.map_err(etcd_error)?;
                Ok(response
                    .into_inner()
                    .kvs
                    .into_iter()
                    .next()
                    .map(|kv| kv.value))
            }
        }
    }

    pub async fn put(&mut self, key: &str, value: Vec<u8>) -> Result<(), String> {
        match self {
            Store::Shardkv(clerk) => clerk
                .put(Bytes::copy_from_slice(key.as_bytes()), value)
                .await
                .map_err(|e| e.to_string()),
            Store::Etcd(kv) => {
                let request = etcd::PutRequest {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    value: Bytes::from(value),
                    ..Default::default()
                };
                kv.put(request).await.map(|_| ()).map_err(etcd_error)
            }
        }
    }
}

/// etcd's refusal as a user reads it: the gRPC code and etcd's message.
fn etcd_error(status: tonic::Status) -> String {
    format!("etcd: {:?}: {}", status.code(), status.message())
}
