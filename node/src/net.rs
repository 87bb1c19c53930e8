//! Where this process's outgoing connections come from.
//!
//! A node that listens on one specific address also connects from it, so
//! that its peers, and firewall rules between nodes (the fault-injection
//! suite partitions nodes that share one loopback this way), see which node
//! a connection belongs to. Without it, every connection on loopback comes
//! from 127.0.0.1. It is set once per process, by `shardkv-node master|kv`;
//! processes that host many nodes (`local`, the in-process tests) leave it
//! unset and connect from wherever the kernel chooses.

use std::net::IpAddr;
use std::sync::OnceLock;

use tonic::transport::Endpoint;

static SOURCE_ADDRESS: OnceLock<IpAddr> = OnceLock::new();

/// Binds every later outgoing connection to `ip`. The first call wins; an
/// unspecified address (0.0.0.0, ::) is ignored.
pub fn connect_from(ip: IpAddr) {
    if !ip.is_unspecified() {
        let _ = SOURCE_ADDRESS.set(ip);
    }
}

/// An endpoint for `addr` (`host:port`), from the process's source address.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .local_address(SOURCE_ADDRESS.get().copied()))
}
