//! The `Members` gRPC service: a replica group's membership, inspected
//! and changed one step at a time (add a learner, promote it, remove a
//! member), as `shardkvctl member` does it. Both roles
//! serve it on their one port; a change is taken by the leader only.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Replica, ReplicaError, Status as ReplicaStatus};
use crate::paxos::types::ids;
use crate::paxos::{Member, Membership, MembershipChange, MembershipError, NodeId, RoleKind};
use crate::proto::change_members_request::Change;
use crate::proto::members_client::MembersClient;
use crate::proto::members_server::{Members, MembersServer};
use crate::proto::{
    AddLearner, ChangeMembersRequest, IdentifyReply, IdentifyRequest, ListMembersReply,
    ListMembersRequest, MemberInfo,
};
use crate::shardmaster::service::not_leader_at;

/// How long a change may take to be decided before the caller is told
/// its outcome is unknown (it may still take effect: list to see).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Replicas one `list` asks at most, following the names they give.
const LIST_ASKED_MAX: usize = 64;

/// Serves one replica's membership API.
#[derive(Clone)]
pub struct MembersService {
    /// Names the group in `Identify`, so a replica is never added to
    /// another group by a wrong address.
    group: String,
    /// Where the peers reach this replica, recorded when it is added.
    address: String,
    /// The peer list the node was started with: the addresses of members
    /// the group has not recorded yet (before its first change).
    peers: Vec<String>,
    /// Length of one Paxos tick, to report silences in milliseconds.
    tick: Duration,
    replica: Replica,
}

impl MembersService {
    pub fn new(
        group: impl Into<String>,
        address: impl Into<String>,
        peers: Vec<String>,
        tick: Duration,
        replica: Replica,
    ) -> Self {
        MembersService {
            group: group.into(),
            address: address.into(),
            peers,
            tick,
            replica,
        }
    }

    pub fn into_server(self) -> MembersServer<Self> {
        MembersServer::new(self)
    }

    /// The address of member `id`: recorded, or from the peer list.
    fn address_of(&self, membership: &Membership, id: NodeId) -> String {
        membership
            .members
            .get(&id)
            .map(|m| m.address.clone())
            .filter(|a| !a.is_empty())
            .or_else(|| self.peers.get(id as usize).cloned())
            .unwrap_or_default()
    }

    fn list(&self, status: &ReplicaStatus) -> ListMembersReply {
        let m = &status.membership;
        let tick_ms = self.tick.as_millis() as u64;
        let members = m
            .members()
            .map(|id| {
                let progress = status.members_progress.iter().find(|p| p.id == id);
                let own = id == status.id && status.role == RoleKind::Leader;
                let (has_progress, commit, heard) = match progress {
                    Some(p) => (true, p.commit, p.heard_ticks_ago * tick_ms),
                    None if own => (true, status.commit, 0),
                    None => (false, 0, 0),
                };
                MemberInfo {
                    id,
                    address: self.address_of(m, id),
                    incarnation: m.members.get(&id).map_or(0, |r| r.incarnation),
                    voter: m.is_voter(id),
                    has_progress,
                    commit,
                    behind_slots: if has_progress {
                        status.commit.saturating_sub(commit)
                    } else {
                        0
                    },
                    heard_ms_ago: heard,
                }
            })
            .collect();
        ListMembersReply {
            epoch: m.epoch,
            has_leader: status.leader.is_some(),
            leader: status.leader.unwrap_or_default(),
            leader_address: status
                .leader
                .map(|l| self.address_of(m, l))
                .unwrap_or_default(),
            commit: status.commit,
            members,
            answered_by: status.id,
        }
    }

    /// The change one request asks for, from the membership in force.
    fn change_from(
        &self,
        current: &Membership,
        change: Change,
    ) -> Result<MembershipChange, Status> {
        let mut voters = current.voters;
        let mut learners = current.learners;
        let mut joiners = BTreeMap::new();
        match change {
            Change::AddLearner(AddLearner {
                id,
                incarnation,
                address,
            }) => {
                check_id(id)?;
                if address.is_empty() {
                    return Err(Status::invalid_argument("a new member needs an address"));
                }
                if !current.is_voter(id) {
                    learners |= 1 << id;
                }
                joiners.insert(
                    id,
                    Member {
                        incarnation,
                        address,
                    },
                );
            }
            Change::Promote(id) => {
                check_id(id)?;
                voters |= 1 << id;
                learners &= !(1 << id);
            }
            Change::Remove(id) => {
                check_id(id)?;
                if !current.is_member(id) {
                    return Err(Status::not_found(format!(
                        "replica {id} is not a member of the group"
                    )));
                }
                voters &= !(1 << id);
                learners &= !(1 << id);
                if voters == 0 {
                    return Err(Status::failed_precondition(format!(
                        "replica {id} is the group's last voter: a group cannot be left \
                         without members (delete the group instead)"
                    )));
                }
            }
        }
        // A group started from a peer list records its members' addresses
        // at its first change.
        let addresses = ids(current.voters | current.learners)
            .filter(|id| !current.members.contains_key(id))
            .filter_map(|id| Some((id, self.peers.get(id as usize)?.clone())))
            .collect();
        Ok(MembershipChange {
            voters,
            learners,
            joiners,
            addresses,
            expected_epoch: Some(current.epoch),
        })
    }
}

/// A refusal as the caller sees it: `Unavailable` for what passes (a
/// change in flight, a learner catching up, members not heard from yet,
/// another change first), which callers retry until their deadline;
/// `FailedPrecondition` for what asking again cannot change.
fn membership_refusal(e: MembershipError) -> Status {
    match e {
        MembershipError::InProgress { .. }
        | MembershipError::LearnerBehind { .. }
        | MembershipError::NoQuorumUp { .. }
        | MembershipError::NotHeardFrom { .. }
        | MembershipError::EpochChanged { .. }
        | MembershipError::NotLeader { .. } => Status::unavailable(e.to_string()),
        MembershipError::NoVoters
        | MembershipError::VoterAndLearner { .. }
        | MembershipError::Unchanged
        | MembershipError::UnknownIdentity { .. }
        | MembershipError::VoterReplaced { .. }
        | MembershipError::NotALearner { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn check_id(id: NodeId) -> Result<(), Status> {
    if id >= crate::paxos::NODE_ID_LIMIT {
        return Err(Status::invalid_argument(format!(
            "replica ids are below {}, not {id}",
            crate::paxos::NODE_ID_LIMIT
        )));
    }
    Ok(())
}

/// A role as `member list` prints it.
pub fn role_name(role: RoleKind) -> &'static str {
    match role {
        RoleKind::Recovering => "recovering",
        RoleKind::Follower => "follower",
        RoleKind::PreCandidate | RoleKind::Candidate => "candidate",
        RoleKind::Leader => "leader",
        RoleKind::Learner => "learner",
        RoleKind::NotMember => "not-member",
    }
}

#[tonic::async_trait]
impl Members for MembersService {
    async fn identify(
        &self,
        _: Request<IdentifyRequest>,
    ) -> Result<Response<IdentifyReply>, Status> {
        let status = self.replica.status();
        Ok(Response::new(IdentifyReply {
            group: self.group.clone(),
            id: status.id,
            incarnation: status.incarnation,
            address: self.address.clone(),
            role: role_name(status.role).to_string(),
            epoch: status.membership.epoch,
        }))
    }

    async fn list(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersReply>, Status> {
        Ok(Response::new(self.list(&self.replica.status())))
    }

    async fn change(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ListMembersReply>, Status> {
        let request = request.into_inner();
        let Some(change) = request.change else {
            return Err(Status::invalid_argument("no change given"));
        };
        let status = self.replica.status();
        if status.role != RoleKind::Leader {
            let address = status
                .leader
                .map(|l| self.address_of(&status.membership, l));
            return Err(not_leader_at(status.leader, address.as_deref()));
        }
        if let Some(expected) = request.expected_epoch {
            if expected != status.membership.epoch {
                return Err(Status::failed_precondition(format!(
                    "the change was planned in membership epoch {expected}, and the group is \
                     in epoch {} now: look at the members again",
                    status.membership.epoch
                )));
            }
        }
        let mut change = self.change_from(&status.membership, change)?;
        // The core refuses it too if another change gets in first.
        change.expected_epoch = Some(request.expected_epoch.unwrap_or(status.membership.epoch));
        let changed = tokio::time::timeout(CHANGE_TIMEOUT, self.replica.change_membership(change))
            .await
            .map_err(|_| {
                Status::deadline_exceeded(
                    "the change was not decided in time; it may still take effect: list the \
                     members to see",
                )
            })?;
        match changed {
            Ok(entered) => {
                // Answered as the replica's status shows it, once that has
                // the new membership (published after the answer).
                let shown = |s: &ReplicaStatus| s.membership.epoch >= entered.epoch;
                self.replica.wait_for(CHANGE_TIMEOUT, shown).await;
                Ok(Response::new(self.list(&self.replica.status())))
            }
            Err(ReplicaError::NotLeader { leader }) => {
                let status = self.replica.status();
                let address = leader.map(|l| self.address_of(&status.membership, l));
                Err(not_leader_at(leader, address.as_deref()))
            }
            Err(ReplicaError::Membership(e)) => Err(membership_refusal(e)),
            Err(ReplicaError::OutcomeUnknown) => Err(Status::unavailable(
                "leadership changed before the change was decided; it may or may not take \
                 effect: list the members to see",
            )),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

/// Calls the `Members` API of the group whose replicas are `servers`,
/// following the leader as the replicas name it.
pub struct MembersAdmin {
    servers: Vec<String>,
    call_timeout: Duration,
}

impl MembersAdmin {
    pub fn new(servers: Vec<String>, call_timeout: Duration) -> Self {
        MembersAdmin {
            servers,
            call_timeout,
        }
    }

    async fn client(&self, addr: &str) -> Result<MembersClient<tonic::transport::Channel>, String> {
        let channel = crate::net::endpoint(addr)
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(self.call_timeout)
            .timeout(CHANGE_TIMEOUT + self.call_timeout)
            .connect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok(MembersClient::new(channel))
    }

    /// Who the replica at `addr` is.
    pub async fn identify(&self, addr: &str) -> Result<IdentifyReply, String> {
        let mut client = self.client(addr).await?;
        client
            .identify(IdentifyRequest {})
            .await
            .map(Response::into_inner)
            .map_err(|e| format!("{addr}: {}", e.message()))
    }

    /// The membership of the latest epoch any replica reached, as its
    /// leader knows it (with each member's progress) if one answers. Replicas name others (the leader, the members of the latest
    /// membership they know), which are asked in turn: the servers given
    /// may all have been removed since, and a removed replica is told the
    /// membership that removed it.
    pub async fn list(&self) -> Result<ListMembersReply, String> {
        let mut best: Option<ListMembersReply> = None;
        let mut errors = Vec::new();
        let mut asked = std::collections::HashSet::new();
        let mut queue: std::collections::VecDeque<String> = self.servers.iter().cloned().collect();
        while let Some(addr) = queue.pop_front() {
            if !asked.insert(addr.clone()) || asked.len() > LIST_ASKED_MAX {
                continue;
            }
            let reply = match self.client(&addr).await {
                Ok(mut client) => {
                    let call = client.list(ListMembersRequest {});
                    tokio::time::timeout(self.call_timeout, call)
                        .await
                        .unwrap_or_else(|_| {
                            Err(tonic::Status::deadline_exceeded("no answer in time"))
                        })
                }
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let reply = match reply {
                Ok(reply) => reply.into_inner(),
                Err(e) => {
                    errors.push(format!("{addr}: {}", e.message()));
                    continue;
                }
            };
            if reply.has_leader && !reply.leader_address.is_empty() {
                queue.push_front(reply.leader_address.clone());
            }
            queue.extend(reply.members.iter().map(|m| m.address.clone()));
            // A leader of the latest epoch heard, not the first replica
            // that says it leads (a deposed one may not know yet).
            let leads = reply.has_leader && reply.leader == reply.answered_by;
            let better = match &best {
                None => true,
                Some(b) => {
                    (reply.epoch, leads) > (b.epoch, b.has_leader && b.leader == b.answered_by)
                }
            };
            if better {
                best = Some(reply);
            }
        }
        best.ok_or_else(|| format!("no replica answered: {}", errors.join("; ")))
    }

    /// Asks the leader for one step; retries what passes (no leader, a
    /// change in flight, a learner behind: `Unavailable`) until `deadline`.
    /// A refusal (`FailedPrecondition`) is
    /// returned as is, for the caller to judge.
    pub async fn change(
        &self,
        change: Change,
        deadline: tokio::time::Instant,
    ) -> Result<ListMembersReply, tonic::Status> {
        self.change_in_epoch(change, None, deadline).await
    }

    /// [`MembersAdmin::change`], made only in membership epoch
    /// `expected_epoch` when given: a change planned from a membership
    /// that has moved on since is refused (`FailedPrecondition`), not made.
    pub async fn change_in_epoch(
        &self,
        change: Change,
        expected_epoch: Option<u64>,
        deadline: tokio::time::Instant,
    ) -> Result<ListMembersReply, tonic::Status> {
        let mut last = tonic::Status::unavailable("no replica reached");
        let mut leader_address: Option<String> = None;
        loop {
            // The leader first, as the group names it: the servers given
            // may all have been removed since.
            if leader_address.is_none() {
                leader_address = (self.list().await.ok())
                    .filter(|m| m.has_leader && !m.leader_address.is_empty())
                    .map(|m| m.leader_address);
            }
            let mut targets: Vec<String> = leader_address.take().into_iter().collect();
            targets.extend(self.servers.iter().cloned());
            for addr in targets {
                let mut client = match self.client(&addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        last = tonic::Status::unavailable(e);
                        continue;
                    }
                };
                let request = ChangeMembersRequest {
                    change: Some(change.clone()),
                    expected_epoch,
                };
                // A replica that does not answer (paused, partitioned) must
                // not hold the caller past its deadline.
                let patience = deadline.saturating_duration_since(tokio::time::Instant::now())
                    + self.call_timeout;
                let answer = tokio::time::timeout(patience, client.change(request))
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::deadline_exceeded(format!(
                            "{addr}: no answer in time"
                        )))
                    });
                match answer {
                    Ok(reply) => return Ok(reply.into_inner()),
                    Err(e)
                        if matches!(
                            e.code(),
                            tonic::Code::FailedPrecondition
                                | tonic::Code::InvalidArgument
                                | tonic::Code::NotFound
                                | tonic::Code::DeadlineExceeded
                        ) =>
                    {
                        return Err(e)
                    }
                    Err(e) => {
                        // Not the leader: ask the one it names next.
                        let named = client.list(ListMembersRequest {});
                        if let Ok(Ok(members)) =
                            tokio::time::timeout(self.call_timeout, named).await
                        {
                            let members = members.into_inner();
                            if members.has_leader && !members.leader_address.is_empty() {
                                leader_address = Some(members.leader_address);
                            }
                        }
                        last = tonic::Status::new(e.code(), format!("{addr}: {}", e.message()));
                        if leader_address.is_some() {
                            break;
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Whether `reply` shows `id` as a member with `incarnation`, a voter if
/// `voter`.
fn holds(reply: &ListMembersReply, id: NodeId, incarnation: u64, voter: bool) -> bool {
    reply
        .members
        .iter()
        .any(|m| m.id == id && m.incarnation == incarnation && (m.voter || !voter))
}

impl MembersAdmin {
    /// Adds the replica at `addr` (started with `--join`) to the group
    /// named `group`: as a learner first, then, once it has caught up, as
    /// a voter. Each step is taken once: a step found already done (an
    /// earlier attempt that timed out) is not taken again.
    pub async fn add(
        &self,
        addr: &str,
        group: &str,
        deadline: tokio::time::Instant,
    ) -> Result<ListMembersReply, String> {
        // A replica just started may not listen yet: ask until it answers.
        let who = loop {
            match self.identify(addr).await {
                Ok(who) => break who,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if who.group != group {
            return Err(format!(
                "{addr} is a replica of {:?}, not of {group:?}",
                who.group
            ));
        }
        let members = self.list().await?;
        if !holds(&members, who.id, who.incarnation, false) {
            if let Some(other) = members.members.iter().find(|m| m.id == who.id && m.voter) {
                return Err(format!(
                    "replica {} votes as {} (incarnation {}): remove it first (`member remove`), \
                     then add the replica at {addr} (incarnation {})",
                    who.id, other.address, other.incarnation, who.incarnation
                ));
            }
            let add = Change::AddLearner(AddLearner {
                id: who.id,
                incarnation: who.incarnation,
                address: who.address.clone(),
            });
            self.step(add, deadline, |m| holds(m, who.id, who.incarnation, false))
                .await?;
        }
        // Promotion is refused (and retried) until the learner is close
        // enough to the leader.
        let promote = Change::Promote(who.id);
        self.step(promote, deadline, |m| {
            holds(m, who.id, who.incarnation, true)
        })
        .await
    }

    /// Removes the member at `addr` from the group.
    pub async fn remove(
        &self,
        addr: &str,
        deadline: tokio::time::Instant,
    ) -> Result<ListMembersReply, String> {
        let members = self.list().await?;
        let Some(member) = members.members.iter().find(|m| m.address == addr) else {
            return Err(format!(
                "no member of the group is at {addr} (members: {})",
                members
                    .members
                    .iter()
                    .map(|m| format!("{} at {}", m.id, m.address))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let id = member.id;
        self.step(Change::Remove(id), deadline, |m| {
            m.members.iter().all(|m| m.id != id)
        })
        .await
    }

    /// Takes one step; a refusal or a lost answer is checked against the
    /// membership (`done`), since a step whose answer was lost may have
    /// been taken.
    async fn step(
        &self,
        change: Change,
        deadline: tokio::time::Instant,
        done: impl Fn(&ListMembersReply) -> bool,
    ) -> Result<ListMembersReply, String> {
        match self.change(change, deadline).await {
            Ok(members) => Ok(members),
            Err(e) => match self.list().await {
                Ok(members) if done(&members) => Ok(members),
                _ => Err(e.message().to_string()),
            },
        }
    }
}
