//! The operator's view of the database: the shardmaster's configuration and
//! each kvserver's `GroupStatus`. Every call is bounded in time.

use std::collections::BTreeMap;
use std::time::Duration;

use shardkv::proto::change_members_request::Change;
use shardkv::replica::members::MembersAdmin;

use shardkv::proto::kv::shard_kv_client::ShardKvClient;
use shardkv::proto::kv::GroupStatusRequest;
use shardkv::shardmaster::client::{ClientError, ShardMasterClient};
use shardkv::shardmaster::Config;
use tonic::transport::Endpoint;

use crate::decide::{GroupView, MasterView, ReplicaReport};
use crate::scale::{MemberView, MembershipView, PodIdentity};

/// A whole shardmaster call, retries across replicas included.
const MASTER_TIMEOUT: Duration = Duration::from_secs(5);
/// One kvserver's status call, connection included.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

fn master(addresses: &[String]) -> Result<ShardMasterClient, String> {
    ShardMasterClient::new(addresses, MASTER_TIMEOUT).map_err(|e| e.to_string())
}

/// What the latest configuration says about `gid`, whose servers are among
/// `possible` (every pod the group may have: its leader reports its
/// current voters after each change).
pub fn view_of(config: &Config, gid: u64, possible: &[String]) -> MasterView {
    let in_config = config.groups.get(&gid);
    let ours =
        |servers: &Vec<String>| !servers.is_empty() && servers.iter().all(|s| possible.contains(s));
    MasterView {
        config_num: config.num,
        joined: in_config.is_some_and(ours),
        foreign_servers: in_config.filter(|s| !ours(s)).cloned(),
        shards: (0..config.shards.len() as u64)
            .filter(|&s| config.shards[s as usize] == gid)
            .collect(),
        groups: config.groups.len(),
    }
}

pub async fn latest_config(masters: &[String]) -> Result<Config, String> {
    master(masters)?
        .query(None)
        .await
        .map_err(|e| e.to_string())
}

/// Why a Join did not happen.
#[derive(Debug)]
pub enum JoinError {
    /// The shardmaster decided against it (its reason); trying again
    /// would not help.
    Refused(String),
    /// It could not be asked.
    Failed(String),
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Refused(why) => write!(f, "refused: {why}"),
            JoinError::Failed(why) => f.write_str(why),
        }
    }
}

pub async fn join(masters: &[String], gid: u64, servers: Vec<String>) -> Result<Config, JoinError> {
    let client = master(masters).map_err(JoinError::Failed)?;
    client.join(gid, servers).await.map_err(|e| match e {
        ClientError::Rejected(why) => JoinError::Refused(why),
        other => JoinError::Failed(other.to_string()),
    })
}

pub async fn leave(masters: &[String], gid: u64) -> Result<Config, String> {
    master(masters)?.leave(gid).await.map_err(|e| e.to_string())
}

async fn replica_status(address: &str) -> Result<ReplicaReport, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("{address}: {e}"))?
        .connect_timeout(STATUS_TIMEOUT)
        .timeout(STATUS_TIMEOUT);
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        ShardKvClient::new(channel)
            .group_status(GroupStatusRequest {})
            .await
            .map_err(|s| s.message().to_string())
    };
    let reply = tokio::time::timeout(STATUS_TIMEOUT, call)
        .await
        .map_err(|_| format!("{address}: no answer within {STATUS_TIMEOUT:?}"))?
        .map_err(|e| format!("{address}: {e}"))?
        .into_inner();
    Ok(ReplicaReport {
        config_num: reply.config_num,
        serving: reply.serving.len(),
        pulling: reply.pulling.len(),
        outgoing: reply.outgoing.len(),
        pending_deletes: reply.pending_deletes,
        keys: reply.keys,
        refused: Some(reply.refused).filter(|r| !r.is_empty()),
    })
}

/// Every replica's status, asked at once; the unreachable ones are left out.
pub async fn group_view(addresses: &[String]) -> GroupView {
    let answers = futures::future::join_all(addresses.iter().map(|a| replica_status(a))).await;
    let mut reports = Vec::new();
    let mut last_error = String::from("the group has no replicas");
    for answer in answers {
        match answer {
            Ok(r) => reports.push(r),
            Err(e) => last_error = e,
        }
    }
    if reports.is_empty() {
        GroupView::Unreachable(last_error)
    } else {
        GroupView::Reported(reports)
    }
}

/// One membership call: connection and answer.
const MEMBERS_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// A membership change, retries across a leader change included. A
/// reconcile waits this long at most; a change not yet made is taken
/// again at the next one (each step is checked against the membership
/// first, so none is taken twice).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(20);

fn members_admin(addresses: &[String]) -> MembersAdmin {
    MembersAdmin::new(addresses.to_vec(), MEMBERS_CALL_TIMEOUT)
}

/// The group's membership, from the leader of the latest epoch any of
/// `addresses` knows.
pub async fn membership(addresses: &[String]) -> Result<MembershipView, String> {
    let reply = members_admin(addresses).list().await?;
    let leads = reply.has_leader && reply.leader == reply.answered_by;
    Ok(MembershipView {
        epoch: reply.epoch,
        // Only a leader's answer carries each member's progress; another
        // replica's view is enough to wait on, not to act on.
        leader: leads.then_some(reply.leader),
        members: reply
            .members
            .into_iter()
            .map(|m| MemberView {
                id: m.id,
                address: m.address,
                incarnation: m.incarnation,
                voter: m.voter,
                behind_slots: m.has_progress.then_some(m.behind_slots),
            })
            .collect(),
    })
}

/// What each pod says of itself, by ordinal; those that do not answer, or
/// answer as another group, are left out.
pub async fn identify_pods(addresses: &[String], group: &str) -> BTreeMap<u32, PodIdentity> {
    let admin = members_admin(addresses);
    let answers =
        futures::future::join_all(addresses.iter().map(|a| async {
            tokio::time::timeout(MEMBERS_CALL_TIMEOUT, admin.identify(a)).await
        }))
        .await;
    answers
        .into_iter()
        .enumerate()
        .filter_map(|(ordinal, answer)| {
            let who = answer.ok()?.ok()?;
            (who.group == group && who.id as usize == ordinal).then_some((
                who.id,
                PodIdentity {
                    incarnation: who.incarnation,
                    waiting: who.role == "not-member",
                },
            ))
        })
        .collect()
}

/// One membership step at the group's leader. `done` says, from the
/// membership, whether the step has been taken: a step whose answer was
/// lost is then not reported as failed.
/// `epoch` is the membership epoch the step was planned from: in another,
/// the step is refused, and planned again at the next reconcile.
pub async fn change_members(
    addresses: &[String],
    change: Change,
    epoch: u64,
    done: impl Fn(&MembershipView) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
    let admin = members_admin(addresses);
    match admin.change_in_epoch(change, Some(epoch), deadline).await {
        Ok(_) => Ok(()),
        Err(e) => match membership(addresses).await {
            Ok(m) if done(&m) => Ok(()),
            _ => Err(e.message().to_string()),
        },
    }
}
