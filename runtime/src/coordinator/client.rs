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
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s = format!("{s}: {c}");
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
