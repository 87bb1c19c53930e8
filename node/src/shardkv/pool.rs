//! Lazily connected gRPC channels to kvservers, by address, shared by the
//! client and by groups calling each other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use std::future::Future;

use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::proto::kv::shard_kv_client::ShardKvClient;
use crate::shardmaster::service::next_server;

/// Past this many addresses the pool is cleared: configurations name few
/// servers, so this only guards against unbounded growth under churn.
const CHANNELS_MAX: usize = 4096;

#[derive(Default)]
pub struct ChannelPool {
    channels: Mutex<HashMap<String, Channel>>,
    /// Bounds connection setup to a dead or unreachable address.
    connect_timeout: Duration,
}

impl ChannelPool {
    pub fn new(connect_timeout: Duration) -> Self {
        ChannelPool {
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// A channel to `addr` (`host:port`). Connects on first use; a channel
    /// reconnects by itself, resolving the name again.
    pub fn get(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = crate::net::endpoint(addr)
            .map_err(|e| format!("invalid address {addr:?}: {e}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        if channels.len() >= CHANNELS_MAX {
            channels.clear();
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Calls each of a group's servers at most twice, following leader
    /// hints, until one succeeds.
    pub async fn call_group<T, F, Fut>(
        &self,
        servers: &[String],
        call_timeout: Duration,
        mut call: F,
    ) -> Result<T, String>
    where
        F: FnMut(ShardKvClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        if servers.is_empty() {
            return Err("group has no servers".into());
        }
        let mut index = 0;
        let mut last_error = String::new();
        for _ in 0..servers.len() * 2 {
            let addr = &servers[index];
            let channel = match self.get(addr) {
                Ok(channel) => channel,
                Err(e) => {
                    // One bad entry must not hide the group's other servers.
                    last_error = e;
                    index = (index + 1) % servers.len();
                    continue;
                }
            };
            let client = ShardKvClient::new(channel)
                .max_decoding_message_size(super::server::MESSAGE_BYTES_MAX)
                .max_encoding_message_size(super::server::MESSAGE_BYTES_MAX);
            match tokio::time::timeout(call_timeout, call(client)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => {
                    last_error = format!("{addr}: {}", status.message());
                    index = next_server(&status, servers, index);
                }
                Err(_) => {
                    last_error = format!("{addr}: no answer");
                    index = (index + 1) % servers.len();
                }
            }
        }
        Err(last_error)
    }
}
