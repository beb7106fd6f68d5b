//! State shared by the [`Client`](crate::Client) handles and the background tasks, the
//! commands those tasks take, and the request machinery: request ids, waiters,
//! retransmission, retry on refusals. The bottom layer of the tasks: it names neither
//! `driver` nor `supervisor`, which both build on it.

mod hello;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sigrouter_proto::{encode, Addr, ErrorCode, FailReason, Message, Secret, MAX_LOCAL_ADDRS};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::error::ClientError;

/// How many times one request may trigger a Resume (after `UnknownSession`, or a move after
/// `Draining`) before giving up.
const MAX_RESUMES_PER_REQUEST: u32 = 3;

/// `Retry` answers in a row one Register or Resume follows before it gives up: a router
/// validating addresses asks once; one more covers a token refused after a NAT rebinding.
const MAX_RETRIES_PER_HELLO: u32 = 3;

/// Addresses routers named (Migrate targets, Draining redirects) kept to try later.
const MAX_TOLD: usize = 16;

/// Application requests in flight at once. The router remembers the last 16 answers per
/// session, so at most 16 requests may be outstanding (protocol section 7); one slot is kept
/// for the supervisor's heartbeat so a busy application cannot starve it.
pub(crate) const APP_REQUESTS_IN_FLIGHT: usize = 15;

/// The session as last agreed with the router. Small and `Copy`: readers copy it out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Session {
    /// Our UUID (nil before the first `Registered`).
    pub(crate) uuid: Uuid,
    /// Key of every MAC; `None` before the first `Registered`.
    pub(crate) secret: Option<Secret>,
    /// Our public address as the router last reported it.
    pub(crate) observed: Option<SocketAddr>,
    /// Where requests go: the router holding the session (or being asked to).
    pub(crate) server: SocketAddr,
    /// Heartbeat period the router asked for.
    pub(crate) heartbeat: Duration,
    /// The address the socket is bound to right now.
    pub(crate) local: SocketAddr,
    /// Bumped by every successful Register/Resume, so concurrent requests that all hit
    /// `UnknownSession` trigger one Resume, not one each.
    pub(crate) epoch: u64,
}

/// Work for the socket task.
#[derive(Debug)]
pub(crate) enum DriverCmd {
    /// Send one datagram.
    Send {
        /// Destination.
        to: SocketAddr,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// Replace the socket with one on a new local port; answers with its address.
    Rebind {
        /// Where the new address goes.
        reply: oneshot::Sender<io::Result<SocketAddr>>,
    },
}

/// Work for the supervisor.
#[derive(Debug)]
pub(crate) enum SupCmd {
    /// The router pushed `Migrate`.
    Migrate {
        /// Where to resume; `None`: the configured servers.
        to: Option<SocketAddr>,
        /// The address the push came from: the node being left.
        from: SocketAddr,
    },
    /// A request got `UnknownSession` (or `Draining`) while the session was at `epoch`.
    Resume {
        /// The session epoch the request was sent in.
        epoch: u64,
        /// `Some` after `Draining`: the node holding the session takes no requests, so the
        /// session moves elsewhere, first to the address named (if any).
        draining: Option<Option<SocketAddr>>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
}

/// Why a Register or Resume did not take (see [`Shared::hello_at`]).
#[derive(Debug)]
pub(crate) enum Refused {
    /// `Draining` or `Capacity`: this node takes no sessions; `to` names one that does.
    Elsewhere {
        /// The refusal.
        code: ErrorCode,
        /// The node it named.
        to: Option<SocketAddr>,
    },
    /// Anything else: no answer, or another refusal.
    Failed(ClientError),
}

impl From<ClientError> for Refused {
    fn from(e: ClientError) -> Self {
        Self::Failed(e)
    }
}

/// How the session was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Resumed: same UUID.
    Resumed,
    /// Registered: a new UUID.
    Registered,
}

/// The router's last refusal of a request being retried, reported if the deadline passes.
enum Refusal {
    /// `Error{code}`.
    Error(ErrorCode),
    /// A final answer that still means "retry later" (`ConnectFailed{RetryLater}`).
    Answer(Message),
}

impl Refusal {
    fn into_result(self) -> Result<Message, ClientError> {
        match self {
            Self::Error(code) => Err(ClientError::Server(code)),
            Self::Answer(m) => Ok(m),
        }
    }
}

/// Which hello to send.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hello {
    /// A new session.
    Register,
    /// Take back this session.
    Resume {
        /// The session.
        uuid: Uuid,
        /// Its secret.
        secret: Secret,
    },
}

/// Everything the handle and the tasks share.
pub(crate) struct Shared {
    pub(crate) cfg: ClientConfig,
    /// Std mutex: read on every datagram and request, copied out in nanoseconds, never held
    /// across an `.await` (see [`Shared::session`] and [`Shared::update`]).
    session: Mutex<Session>,
    /// Waiters for answers by request id. Same rule: insert, remove, never awaited under.
    pending: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    next_rid: AtomicU64,
    /// Simulated loss rates as `f64` bits; tests change them while the client runs.
    drop_in: AtomicU64,
    drop_out: AtomicU64,
    /// The IP this host uses to reach the server, announced as our local address.
    route_ip: Option<IpAddr>,
    /// Datagrams and rebinds for the socket task.
    out_tx: mpsc::Sender<DriverCmd>,
    /// Resume requests and migrations for the supervisor task.
    pub(crate) sup_tx: mpsc::Sender<SupCmd>,
    /// Stops every task.
    pub(crate) shutdown: CancellationToken,
    /// Stops only the supervisor (heartbeats, resumes): `Bye` must not be undone by a resume.
    pub(crate) supervisor_stop: CancellationToken,
    /// Tracks the tasks so `close` can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Permits for application requests (see [`APP_REQUESTS_IN_FLIGHT`]).
    pub(crate) in_flight: Semaphore,
    /// Addresses routers named, most recent first ([`Shared::remember`]).
    told: Mutex<Vec<SocketAddr>>,
    /// The address named by the last `Error Draining` answering a request.
    redirect: Mutex<Option<SocketAddr>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new(
        cfg: ClientConfig,
        local: SocketAddr,
        route_ip: Option<IpAddr>,
        out_tx: mpsc::Sender<DriverCmd>,
        sup_tx: mpsc::Sender<SupCmd>,
    ) -> Self {
        let shutdown = CancellationToken::new();
        Self {
            session: Mutex::new(Session {
                uuid: Uuid::nil(),
                secret: None,
                observed: None,
                server: cfg.server,
                heartbeat: Duration::from_secs(15),
                local,
                epoch: 0,
            }),
            pending: Mutex::new(HashMap::new()),
            // Random start below 2^32, never the reserved 0.
            next_rid: AtomicU64::new(u64::from(rand::random::<u32>()).max(1)),
            drop_in: AtomicU64::new(cfg.drop_inbound.to_bits()),
            drop_out: AtomicU64::new(cfg.drop_outbound.to_bits()),
            route_ip,
            out_tx,
            sup_tx,
            supervisor_stop: shutdown.child_token(),
            shutdown,
            tracker: TaskTracker::new(),
            in_flight: Semaphore::new(APP_REQUESTS_IN_FLIGHT),
            told: Mutex::new(Vec::new()),
            redirect: Mutex::new(None),
            cfg,
        }
    }

    /// A copy of the session.
    pub(crate) fn session(&self) -> Session {
        *lock(&self.session)
    }

    /// Changes the session under the lock; `f` must not block.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        f(&mut lock(&self.session))
    }

    /// A fresh request id.
    pub(crate) fn next_rid(&self) -> u64 {
        self.next_rid.fetch_add(1, Ordering::Relaxed)
    }

    /// The waiter for `rid`, removed: an answer is delivered once.
    pub(crate) fn take_pending(&self, rid: u64) -> Option<oneshot::Sender<Message>> {
        lock(&self.pending).remove(&rid)
    }

    pub(crate) fn drop_rates(&self) -> (f64, f64) {
        (
            f64::from_bits(self.drop_in.load(Ordering::Relaxed)),
            f64::from_bits(self.drop_out.load(Ordering::Relaxed)),
        )
    }

    pub(crate) fn set_drop_rates(&self, inbound: f64, outbound: f64) {
        self.drop_in.store(inbound.to_bits(), Ordering::Relaxed);
        self.drop_out.store(outbound.to_bits(), Ordering::Relaxed);
    }

    /// The local address as peers should see it: the bound port, with the IP used to reach the
    /// server when bound to a wildcard.
    pub(crate) fn local_addr(&self, s: &Session) -> SocketAddr {
        match self.route_ip {
            Some(ip) if s.local.ip().is_unspecified() => SocketAddr::new(ip, s.local.port()),
            _ => s.local,
        }
    }

    /// The local addresses announced in Register/Resume.
    fn announced(&self, s: &Session) -> Vec<Addr> {
        if !self.cfg.local_addrs.is_empty() {
            return self
                .cfg
                .local_addrs
                .iter()
                .take(MAX_LOCAL_ADDRS)
                .map(|a| Addr(*a))
                .collect();
        }
        let a = self.local_addr(s);
        if a.ip().is_unspecified() {
            Vec::new()
        } else {
            vec![Addr(a)]
        }
    }

    /// Runs `f` unless the client shuts down first.
    pub(crate) async fn guarded<T>(
        &self,
        f: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(ClientError::Closed),
            r = f => r,
        }
    }

    async fn send(&self, to: SocketAddr, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.out_tx
            .send(DriverCmd::Send { to, bytes })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Moves the socket to a new local port (the old one is closed).
    pub(crate) async fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.out_tx
            .send(DriverCmd::Rebind { reply })
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(rx.await.map_err(|_| ClientError::Closed)??)
    }

    /// Sends one request (built afresh for each transmission from the current session, so a
    /// retransmission after a resume carries the new secret) to the current server, and
    /// retransmits it with the same `rid` on a doubling timeout until an answer with that
    /// `rid` arrives or `deadline` passes. Returns the answer and the session it was sent in.
    async fn exchange(
        &self,
        rid: u64,
        deadline: Instant,
        mut make: impl FnMut(&Session) -> Result<Vec<u8>, ClientError>,
    ) -> Result<(Message, Session), ClientError> {
        struct Waiter<'a>(&'a Shared, u64);
        impl Drop for Waiter<'_> {
            fn drop(&mut self) {
                lock(&self.0.pending).remove(&self.1);
            }
        }
        let (tx, mut rx) = oneshot::channel();
        lock(&self.pending).insert(rid, tx);
        let _waiter = Waiter(self, rid);
        let mut rto = Backoff::new(self.cfg.initial_rto, self.cfg.max_rto);
        loop {
            let s = self.session();
            let bytes = make(&s)?;
            self.send(s.server, bytes).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(rto.next_delay().min(left), &mut rx).await {
                Ok(Ok(m)) => return Ok((m, s)),
                Ok(Err(_)) => return Err(ClientError::Closed),
                Err(_) if Instant::now() >= deadline => return Err(ClientError::Timeout),
                Err(_) => {}
            }
        }
    }

    /// Waits out a refusal the router asked us to retry later: the next pause of `pause`
    /// (capped and jittered), shortened if need be so that the retry still leaves one
    /// retransmission timeout ([`ClientConfig::initial_rto`]) before `deadline`. Returns
    /// `false` when no retry fits any more, after waiting until `deadline`: a caller hears of
    /// the refusal only once its deadline has passed.
    async fn pause(&self, pause: &mut Backoff, deadline: Instant) -> bool {
        let now = Instant::now();
        let last_try = deadline.checked_sub(self.cfg.initial_rto).unwrap_or(now);
        if now >= last_try {
            sleep_until(deadline).await;
            return false;
        }
        sleep_until((now + pause.next_jittered()).min(last_try)).await;
        true
    }

    /// An authenticated request: `build(rid, our_uuid)` makes the message. Retransmits with the
    /// same rid (the router deduplicates). Refusals are retried after a capped, jittered pause
    /// until the deadline ([`Shared::pause`]):
    /// - `RateLimited`, `RetryLater`, and a `ConnectFailed` whose reason is `RetryLater`: a
    ///   new rid. The router did not carry the request out (it rate-limits only new requests:
    ///   a retransmission of one it is working on is never refused), and it may remember the
    ///   refusal as the answer to the old rid.
    /// - `UnknownSession` (when `may_move`): the supervisor resumes, then a new rid, a new
    ///   request for the node now holding the session.
    /// - `Draining`: never retried at that node. When `may_move`, the supervisor moves the
    ///   session elsewhere (to the address the refusal names first), then a new rid; otherwise
    ///   (the supervisor's own heartbeat) the refusal comes back at once, its address kept for
    ///   [`Shared::take_redirect`].
    ///
    /// Returns the first answer that is not a refusal. When the deadline passes, the last
    /// refusal (as `Err(Server(code))`, or the `ConnectFailed` itself), or `Timeout` if the
    /// router never answered.
    pub(crate) async fn request(
        &self,
        within: Duration,
        may_move: bool,
        build: impl Fn(u64, Uuid) -> Message,
    ) -> Result<Message, ClientError> {
        let deadline = Instant::now() + within;
        let mut rid = self.next_rid();
        let mut pause = Backoff::retry();
        let mut resumes = 0;
        let mut refused: Option<Refusal> = None;
        loop {
            let exchanged = self
                .exchange(rid, deadline, |s| {
                    let secret = s.secret.ok_or(ClientError::Closed)?;
                    Ok(encode(&build(rid, s.uuid), Some(&secret))?)
                })
                .await;
            let (msg, sent) = match exchanged {
                // A retry went unanswered: the router's last word says more than "no answer".
                Err(ClientError::Timeout) => {
                    return refused.map_or(Err(ClientError::Timeout), Refusal::into_result)
                }
                r => r?,
            };
            match msg {
                Message::Error(e) => match e.code {
                    ErrorCode::UnknownSession if may_move && resumes < MAX_RESUMES_PER_REQUEST => {
                        resumes += 1;
                        self.ask_resume(sent.epoch, None, deadline).await?;
                        rid = self.next_rid();
                        continue;
                    }
                    ErrorCode::Draining => {
                        let to = e.to.map(|a| a.0);
                        if let Some(to) = to {
                            self.remember(to);
                        }
                        if !may_move || resumes >= MAX_RESUMES_PER_REQUEST {
                            *lock(&self.redirect) = to;
                            return Err(ClientError::Server(ErrorCode::Draining));
                        }
                        resumes += 1;
                        self.ask_resume(sent.epoch, Some(to), deadline).await?;
                        rid = self.next_rid();
                        continue;
                    }
                    ErrorCode::RateLimited | ErrorCode::RetryLater => {
                        refused = Some(Refusal::Error(e.code));
                    }
                    code => return Err(ClientError::Server(code)),
                },
                Message::ConnectFailed(ref f) if f.reason == FailReason::RetryLater => {
                    refused = Some(Refusal::Answer(msg));
                }
                msg => return Ok(msg),
            }
            if !self.pause(&mut pause, deadline).await {
                return refused.map_or(Err(ClientError::Timeout), Refusal::into_result);
            }
            rid = self.next_rid();
        }
    }

    /// Asks the supervisor to resume the session (elsewhere, after `Draining`) if it is still
    /// the one of `epoch`, and waits until it has (or failed), at most until `deadline`.
    async fn ask_resume(
        &self,
        epoch: u64,
        draining: Option<Option<SocketAddr>>,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let (reply, rx) = oneshot::channel();
        self.sup_tx
            .send(SupCmd::Resume {
                epoch,
                draining,
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        match timeout_at(deadline, rx).await {
            Ok(r) => r.map_err(|_| ClientError::Closed)?,
            Err(_) => Err(ClientError::Timeout),
        }
    }
}
