//! Lazily connected gRPC channels to kvservers, by address, shared by the
//! client and by groups calling each other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;

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
}
