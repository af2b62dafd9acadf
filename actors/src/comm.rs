//! `CommunicatorActor`: owns the data-plane group of the current generation.
//!
//! It builds the group for each generation through the rank's [`DataPlane`] (the address
//! rendezvous goes through the coordinator), lends it to the compute loop for that generation,
//! reports collective faults to the coordinator and drops the group when it is superseded. A
//! UCX group's worker lives on its own thread inside [`UcxGroup`]; the compute thread runs the
//! collectives on it directly so that a step costs no extra hop.

use crate::rank::Shared;
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::Client;
use phalanx_runtime::coordinator::observed;
use phalanx_runtime::dataplane::links::summary;
use phalanx_runtime::dataplane::{
    AddressExchange, CollConfig, Exchanged, Group, GroupKey, InProcFabrics, UcxConfig, UcxGroup,
};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Address exchange through the coordinator's Rendezvous (called on the UCX thread).
struct CoordExchange {
    handle: tokio::runtime::Handle,
    client: Client,
    member: u64,
    secret: String,
}

impl AddressExchange for CoordExchange {
    fn exchange(
        &mut self,
        rank: Rank,
        _world: u32,
        generation: Generation,
        local: &[u8],
        timeout: Duration,
    ) -> Result<Exchanged, RuntimeError> {
        let mut req = tonic::Request::new(pb::RendezvousRequest {
            member_id: self.member,
            generation: generation.0,
            rank: rank.0,
            address: local.to_vec(),
            member_secret: self.secret.clone(),
        });
        req.set_timeout(timeout);
        let mut c = self.client.clone();
        let r = self
            .handle
            .block_on(async move { c.rendezvous(req).await })
            .map_err(|s| RuntimeError::Bootstrap {
                addr: "coordinator".into(),
                reason: format!("{:?}: {}", s.code(), s.message()),
            })?
            .into_inner();
        Ok(Exchanged {
            key: GroupKey::from_bytes(&r.group_key)?,
            addresses: r.addresses,
        })
    }
}

/// What a generation's group is built from.
pub struct GroupRequest {
    pub rank: Rank,
    pub world: u32,
    pub generation: Generation,
    pub collective_timeout: Duration,
    /// Shared-memory collectives within a node (P-11).
    pub mesh: bool,
    /// The address this rank's peers reach its listeners at.
    pub advertise_ip: String,
    /// The address rendezvous through the coordinator, which also hands out the group key.
    pub exchange: Box<dyn AddressExchange>,
    /// See `Shared::abandoned_below`.
    pub abandoned_below: Arc<AtomicU64>,
}

/// Builds a generation's group: over UCX in a worker process, over in-process ranks in tests
/// of the whole rank. Called on a blocking thread.
pub type DataPlane =
    Arc<dyn Fn(GroupRequest) -> Result<Box<dyn Group>, RuntimeError> + Send + Sync>;

/// The data plane of a worker process.
pub fn ucx() -> DataPlane {
    Arc::new(|r: GroupRequest| {
        let mut ucx = UcxConfig::default();
        ucx.coll.timeout = r.collective_timeout;
        ucx.coll.mesh = r.mesh;
        ucx.liveness_ip = r.advertise_ip;
        ucx.abandoned_below = Some(r.abandoned_below);
        let g = UcxGroup::connect(r.rank, r.world, r.generation, ucx, r.exchange)?;
        Ok(Box::new(g) as Box<dyn Group>)
    })
}

/// Ranks that are threads of one process: the rendezvous still goes through the coordinator
/// (it is where a generation's members meet), the bytes through `fabrics`.
pub fn in_process(fabrics: Arc<InProcFabrics>) -> DataPlane {
    Arc::new(move |mut r: GroupRequest| {
        r.exchange.exchange(
            r.rank,
            r.world,
            r.generation,
            &r.rank.0.to_le_bytes(),
            r.collective_timeout * 5,
        )?;
        let cfg = CollConfig {
            timeout: r.collective_timeout,
            mesh: r.mesh,
            ..CollConfig::default()
        };
        Ok(Box::new(fabrics.join(r.rank, r.world, r.generation, cfg)) as Box<dyn Group>)
    })
}

pub struct CommunicatorActor;

pub struct CommunicatorArgs {
    pub shared: Arc<Shared>,
}

/// A generation's group, usable from one thread at a time: the compute thread locks it for the
/// generation.
pub type SharedGroup = Arc<parking_lot::Mutex<Box<dyn Group>>>;

pub type GroupReply = Result<SharedGroup, crate::ActorError>;

pub enum CommunicatorMsg {
    /// Build the group of `generation`, replacing the previous one.
    Connect {
        generation: Generation,
        rank: Rank,
        world: u32,
        reply: RpcReplyPort<GroupReply>,
    },
    /// A collective failed: tell the coordinator and drop the group.
    Fault(pb::FaultReport),
    /// The rank is done with the group (job over, evicted, halted).
    Release,
}

pub struct CommunicatorState {
    shared: Arc<Shared>,
    group: Option<SharedGroup>,
}

impl Actor for CommunicatorActor {
    type Msg = CommunicatorMsg;
    type State = CommunicatorState;
    type Arguments = CommunicatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: CommunicatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(CommunicatorState {
            shared: args.shared,
            group: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: CommunicatorMsg,
        st: &mut CommunicatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CommunicatorMsg::Connect {
                generation,
                rank,
                world,
                reply,
            } => {
                // The old generation's group goes first: its peers moved on too.
                st.group = None;
                let Some(ctl) = st.shared.control.lock().clone() else {
                    let _ = reply.send(Err(crate::ActorError::NotRegistered));
                    return Ok(());
                };
                let req = GroupRequest {
                    rank,
                    world,
                    generation,
                    collective_timeout: st.shared.params.collective_timeout,
                    mesh: st.shared.params.mesh,
                    advertise_ip: st.shared.params.advertise_ip.clone(),
                    exchange: Box::new(CoordExchange {
                        handle: st.shared.handle.clone(),
                        client: ctl.client,
                        member: ctl.member,
                        secret: ctl.secret,
                    }),
                    abandoned_below: st.shared.abandoned_below.clone(),
                };
                let build = st.shared.params.data_plane.clone();
                let r = tokio::task::spawn_blocking(move || build(req)).await?;
                let r = r
                    .map(|g| Arc::new(parking_lot::Mutex::new(g)))
                    .map_err(crate::ActorError::from);
                if let Ok(g) = &r {
                    let links = g.lock().links();
                    info!(%generation, %rank, links = %summary(&links), "data-plane group built");
                    *st.shared.group_links.lock() = Some(pb::GroupLinks {
                        generation: generation.0,
                        rank: rank.0,
                        links: links.iter().map(observed::to_pb).collect(),
                    });
                    // Reported at once, not at the next heartbeat: a rank stopped or killed a
                    // few steps into its generation would otherwise never say how it linked.
                    st.shared.beat_now.notify_one();
                    st.group = Some(g.clone());
                }
                let _ = reply.send(r);
            }
            CommunicatorMsg::Fault(report) => {
                warn!(suspect = report.suspect_rank, kind = ?report.kind(), detail = %report.detail,
                      "collective failed; reporting to the coordinator");
                st.group = None;
                let _ = st.shared.faults_tx.send(report);
            }
            CommunicatorMsg::Release => st.group = None,
        }
        Ok(())
    }
}
