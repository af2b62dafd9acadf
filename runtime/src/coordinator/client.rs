//! The rank (and admin) side of the control plane: a channel with keepalive, deadlines and the
//! job token on every call.

use crate::error::RuntimeError;
use phalanx_proto::pb::coordinator_client::CoordinatorClient;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

#[derive(Debug, Clone)]
pub struct ClientOpts {
    pub url: String,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    /// Deadline of every unary call.
    pub rpc_timeout: Duration,
    /// HTTP/2 keepalive: a stopped coordinator is noticed within interval + timeout.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub tls: Option<ClientTlsConfig>,
}

impl ClientOpts {
    pub fn new(url: &str) -> Self {
        ClientOpts {
            url: url.into(),
            token: std::env::var("PHALANX_JOB_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            connect_timeout: Duration::from_secs(2),
            rpc_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            tls: None,
        }
    }
}

#[derive(Clone)]
pub struct TokenInterceptor {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

pub async fn connect(opts: &ClientOpts) -> Result<Client, RuntimeError> {
    let err = |reason: String| RuntimeError::Connect {
        url: opts.url.clone(),
        reason,
    };
    let mut ep = Endpoint::from_shared(opts.url.clone())
        .map_err(|e| {
            err(format!(
                "not a valid URL ({e}); use e.g. http://127.0.0.1:7070"
            ))
        })?
        .connect_timeout(opts.connect_timeout)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = opts.tls.clone() {
        ep = ep.tls_config(tls).map_err(|e| err(format!("TLS: {e}")))?;
    }
    let channel = ep.connect().await.map_err(|e| {
        // The causes, each said once: hyper's and tonic's layers repeat their source's text.
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            let text = c.to_string();
            if !s.contains(&text) {
                s = format!("{s}: {text}");
            }
            src = c.source();
        }
        err(s)
    })?;
    let header = match &opts.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| err("the job token must be printable ASCII".into()))?,
        ),
        None => None,
    };
    Ok(CoordinatorClient::with_interceptor(
        channel,
        TokenInterceptor { header },
    ))
}

/// A unary request with the configured deadline.
pub fn request<T>(msg: T, opts: &ClientOpts) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(opts.rpc_timeout);
    r
}

/// Turns a status into the runtime error, keeping the server's message.
pub fn status_error(s: Status) -> RuntimeError {
    RuntimeError::Rpc {
        code: format!("{:?}", s.code()),
        message: s.message().to_string(),
    }
}

/// A rank's side of the coordinator: registered, with its session stream open. The one way
/// a rank (the control agent, a simulated rank, the coordinator bench) opens it: register
/// (or re-register under the member id in `req`), send the hello that proves the member, open
/// the stream.
pub struct RankSession {
    pub client: Client,
    /// Heartbeats and other rank messages go up here.
    pub tx: tokio::sync::mpsc::Sender<phalanx_proto::pb::RankMessage>,
    /// Directives come down here.
    pub inbound: tonic::Streaming<phalanx_proto::pb::Directive>,
    pub registered: phalanx_proto::pb::RegisterResponse,
}

/// Why a session did not open: the coordinator's answer to the register or the session call.
#[derive(Debug)]
pub enum OpenError {
    Register(Status),
    /// Registered, but the stream did not open: the member exists, and a retry re-registers
    /// under its id.
    Session {
        status: Status,
        registered: Box<phalanx_proto::pb::RegisterResponse>,
    },
}

impl OpenError {
    pub fn status(&self) -> &Status {
        match self {
            OpenError::Register(status) | OpenError::Session { status, .. } => status,
        }
    }
}

impl RankSession {
    pub async fn open(
        mut client: Client,
        opts: &ClientOpts,
        req: phalanx_proto::pb::RegisterRequest,
    ) -> Result<RankSession, OpenError> {
        use phalanx_proto::pb;
        let registered = client
            .register(request(req, opts))
            .await
            .map_err(OpenError::Register)?
            .into_inner();
        // Room for a burst of heartbeats and fault reports while the stream is slow.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let hello = pb::RankMessage {
            msg: Some(pb::rank_message::Msg::Hello(pb::SessionHello {
                member_id: registered.member_id,
                member_secret: registered.member_secret.clone(),
            })),
        };
        // The receiver is held below, so the send cannot fail.
        let _ = tx.send(hello).await;
        let inbound = match client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return Err(OpenError::Session {
                    status,
                    registered: Box::new(registered),
                })
            }
        };
        Ok(RankSession {
            client,
            tx,
            inbound,
            registered,
        })
    }

    /// The coordinator's heartbeat interval, never below `floor`.
    pub fn heartbeat(&self, floor: Duration) -> Duration {
        Duration::from_millis(self.registered.heartbeat_interval_ms as u64).max(floor)
    }
}
