//! Establishing the session: Register or Resume at one address (following `Retry`, retrying
//! refusals that may pass), and the walk over addresses when a router is draining, full or
//! gone. Part of [`Shared`]'s machinery, kept apart from the request path.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_proto::{encode_hello, ErrorCode, Message, Register, Registered, Resume};
use tokio::time::{sleep_until, Instant};

use super::{lock, Hello, Refused, Settled, Shared, MAX_RETRIES_PER_HELLO, MAX_TOLD};
use crate::backoff::Backoff;
use crate::error::ClientError;
use crate::walk::Walk;

impl Shared {
    /// Register or Resume at `server` (which becomes the current server), padded, retried
    /// until `within` passes. A `Retry` answer (the router validates our address) is followed
    /// at once by the same request with its token and a new rid, up to
    /// [`MAX_RETRIES_PER_HELLO`] times in a row. `RateLimited` and `RetryLater` are retried there after a pause as
    /// for [`Shared::request`]. `Draining` and `Capacity` are not: this node takes no
    /// sessions, so the answer ([`Refused::Elsewhere`], with the node it names, if any) goes
    /// back to the caller at once, to try another address. On success the session takes the
    /// router's answer (UUID, secret, observed address, heartbeat period).
    pub(crate) async fn hello_at(
        &self,
        hello: Hello,
        server: SocketAddr,
        within: Duration,
    ) -> Result<(), Refused> {
        self.update(|s| s.server = server);
        let deadline = Instant::now() + within;
        let mut pause = Backoff::retry();
        let mut refused = None;
        // The token of the last `Retry`, sent with every attempt after it.
        let mut token: Vec<u8> = Vec::new();
        let mut retries = 0;
        loop {
            let rid = self.next_rid();
            let exchanged = self
                .exchange(rid, deadline, |s| {
                    let local = self.announced(s);
                    let token = token.clone();
                    let mut m = match hello {
                        Hello::Register => Message::Register(Register {
                            rid,
                            local,
                            token,
                            pad: Vec::new(),
                        }),
                        Hello::Resume { uuid, secret } => Message::Resume(Resume {
                            rid,
                            uuid,
                            secret,
                            local,
                            token,
                            pad: Vec::new(),
                        }),
                    };
                    Ok(encode_hello(&mut m)?)
                })
                .await;
            let msg = match exchanged {
                Err(ClientError::Timeout) => {
                    return Err(Refused::Failed(
                        refused.map_or(ClientError::Timeout, ClientError::Server),
                    ))
                }
                r => r?.0,
            };
            if !matches!(msg, Message::Retry(_)) {
                retries = 0;
            }
            match msg {
                Message::Registered(r) => {
                    self.apply(&r);
                    return Ok(());
                }
                // The router wants proof that we receive at our address: the same request
                // again at once, with its token, as a new request (it carries other content;
                // the router created nothing for the old rid).
                Message::Retry(r) => {
                    retries += 1;
                    if retries > MAX_RETRIES_PER_HELLO {
                        return Err(Refused::Failed(ClientError::Unexpected(
                            "the router kept answering Retry",
                        )));
                    }
                    tracing::debug!(%server, retries, "address validation: sending again with the token");
                    token = r.token;
                }
                Message::Error(e) => match e.code {
                    ErrorCode::Draining | ErrorCode::Capacity => {
                        let to = e.to.map(|a| a.0);
                        if let Some(to) = to {
                            self.remember(to);
                        }
                        return Err(Refused::Elsewhere { code: e.code, to });
                    }
                    ErrorCode::RateLimited | ErrorCode::RetryLater => {
                        refused = Some(e.code);
                        if !self.pause(&mut pause, deadline).await {
                            return Err(Refused::Failed(ClientError::Server(e.code)));
                        }
                    }
                    code => return Err(Refused::Failed(ClientError::Server(code))),
                },
                _ => {
                    return Err(Refused::Failed(ClientError::Unexpected(
                        "answer to Register/Resume",
                    )))
                }
            }
        }
    }

    /// [`Shared::hello_at`]; a Resume refused with `Unauthorized` (the session is gone: it
    /// expired, or the node that held it restarted) registers a new session there instead
    /// when `register_if_gone`.
    pub(crate) async fn settle_at(
        &self,
        hello: Hello,
        server: SocketAddr,
        within: Duration,
        register_if_gone: bool,
    ) -> Result<Settled, Refused> {
        match self.hello_at(hello, server, within).await {
            Ok(()) => Ok(match hello {
                Hello::Register => Settled::Registered,
                Hello::Resume { .. } => Settled::Resumed,
            }),
            Err(Refused::Failed(ClientError::Server(ErrorCode::Unauthorized)))
                if register_if_gone && matches!(hello, Hello::Resume { .. }) =>
            {
                self.hello_at(Hello::Register, server, within).await?;
                Ok(Settled::Registered)
            }
            Err(e) => Err(e),
        }
    }

    /// Establishes the session at the addresses of `walk`, in its order, until one takes it
    /// ([`Shared::settle_at`]); each try but the first from a new local port when
    /// `rebind_first` is false, every one when true. After a round in which every address
    /// failed, calls `stranded(tried, pause)`, waits the capped, jittered `pause` and starts
    /// another round, until `deadline` (forever when `None`). Returns where the session is
    /// now and how; at the deadline, the last failure.
    pub(crate) async fn walk(
        &self,
        hello: Hello,
        mut walk: Walk,
        deadline: Option<Instant>,
        rebind_first: bool,
        register_if_gone: bool,
        mut stranded: impl FnMut(Vec<SocketAddr>, Duration),
    ) -> Result<(SocketAddr, Settled), ClientError> {
        let mut pause = Backoff::reconnect();
        let mut rebind = rebind_first;
        let mut last = ClientError::Timeout;
        loop {
            while let Some(server) = walk.next() {
                let within = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => self.cfg.request_timeout,
                }
                .min(self.cfg.request_timeout);
                if within.is_zero() {
                    return Err(last);
                }
                if std::mem::replace(&mut rebind, true) {
                    match self.rebind().await {
                        Ok(local) => {
                            tracing::debug!(uuid = %self.session().uuid, %local, %server, "new local port")
                        }
                        Err(ClientError::Closed) => return Err(ClientError::Closed),
                        Err(e) => tracing::warn!(error = %e, "rebind failed"),
                    }
                }
                match self
                    .settle_at(hello, server, within, register_if_gone)
                    .await
                {
                    Ok(how) => return Ok((server, how)),
                    Err(Refused::Elsewhere { code, to }) => {
                        tracing::debug!(uuid = %self.session().uuid, %server, code = code.name(), ?to, "refused; next address");
                        walk.refused(server, to);
                        last = ClientError::Server(code);
                    }
                    Err(Refused::Failed(ClientError::Closed)) => return Err(ClientError::Closed),
                    Err(Refused::Failed(e)) => {
                        tracing::debug!(uuid = %self.session().uuid, error = %e, %server, "failed; next address");
                        last = e;
                    }
                }
            }
            let wait = pause.next_jittered();
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                if let Some(d) = deadline {
                    sleep_until(d).await;
                }
                return Err(last);
            }
            stranded(walk.tried().to_vec(), wait);
            tokio::time::sleep(wait).await;
            walk.next_round();
        }
    }

    /// Notes an address a router named (a `Migrate` target, an `Error Draining` redirect), to
    /// try later when the configured servers fail.
    pub(crate) fn remember(&self, addr: SocketAddr) {
        let mut t = lock(&self.told);
        t.retain(|a| *a != addr);
        t.insert(0, addr);
        t.truncate(MAX_TOLD);
    }

    /// Addresses routers named, most recent first.
    pub(crate) fn told(&self) -> Vec<SocketAddr> {
        lock(&self.told).clone()
    }

    /// The address named by the last `Error Draining` a request got, taken.
    pub(crate) fn take_redirect(&self) -> Option<SocketAddr> {
        lock(&self.redirect).take()
    }

    fn apply(&self, r: &Registered) {
        self.update(|s| {
            s.uuid = r.uuid;
            s.secret = Some(r.secret);
            s.observed = Some(r.observed.0);
            if r.heartbeat_ms > 0 {
                s.heartbeat = Duration::from_millis(u64::from(r.heartbeat_ms));
            }
            s.epoch += 1;
        });
    }
}
