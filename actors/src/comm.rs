//! `CommunicatorActor`: owns the data-plane group of the current generation.
//!
//! It builds the UCX group for each generation (the address rendezvous goes through the
//! coordinator), lends it to the compute loop for that generation, reports collective
//! faults to the coordinator and drops the group when it is superseded. The group's UCX
//! worker lives on its own thread inside [`UcxGroup`]; the compute thread runs the
//! collectives on it directly so that a step costs no extra hop.

use crate::rank::Shared;
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::Client;
use phalanx_runtime::coordinator::observed;
use phalanx_runtime::dataplane::links::summary;
use phalanx_runtime::dataplane::{AddressExchange, Exchanged, GroupKey, UcxConfig, UcxGroup};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
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

pub struct CommunicatorActor;

pub struct CommunicatorArgs {
    pub shared: Arc<Shared>,
}

/// `UcxGroup` is a handle to its UCX thread, usable from one thread at a time: the compute
/// thread locks it for the generation.
pub type SharedGroup = Arc<parking_lot::Mutex<UcxGroup>>;

pub type GroupReply = Result<SharedGroup, String>;

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
                    let _ = reply.send(Err("not registered with the coordinator".into()));
                    return Ok(());
                };
                let mut ucx = UcxConfig::default();
                ucx.coll.timeout = st.shared.params.collective_timeout;
                ucx.liveness_ip = st.shared.params.advertise_ip.clone();
                let exchange = CoordExchange {
                    handle: st.shared.handle.clone(),
                    client: ctl.client,
                    member: ctl.member,
                    secret: ctl.secret,
                };
                let r = tokio::task::spawn_blocking(move || {
                    UcxGroup::connect(rank, world, generation, ucx, Box::new(exchange))
                })
                .await?;
                let r = r
                    .map(|g| Arc::new(parking_lot::Mutex::new(g)))
                    .map_err(|e| e.to_string());
                if let Ok(g) = &r {
                    let links = g.lock().links().to_vec();
                    info!(%generation, %rank, links = %summary(&links), "data-plane group built");
                    *st.shared.group_links.lock() = links.iter().map(observed::to_pb).collect();
                    st.group = Some(g.clone());
                }
                let _ = reply.send(r);
            }
            CommunicatorMsg::Fault(report) => {
                warn!(suspect = report.suspect_rank, kind = %report.kind, detail = %report.detail,
                      "collective failed; reporting to the coordinator");
                st.group = None;
                let _ = st.shared.faults_tx.send(report);
            }
            CommunicatorMsg::Release => st.group = None,
        }
        Ok(())
    }
}
