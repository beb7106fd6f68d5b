//! The supervisor task: keeps the session alive. It heartbeats, resumes after
//! `UnknownSession`, follows `Migrate`, and re-homes when heartbeats go unanswered. It is the
//! only task that runs Resume after registration, so resumes never race each other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sigrouter_proto::{ErrorCode, Heartbeat, Message};
use tokio::sync::mpsc;
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};

use crate::error::ClientError;
use crate::event::Event;
use crate::shared::{Hello, Refused, Settled, Shared, SupCmd};
use crate::walk::Walk;

pub(crate) async fn run(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<SupCmd>,
    events: mpsc::Sender<Event>,
) {
    let stop = shared.supervisor_stop.clone();
    let mut sup = Supervisor {
        last_observed: shared.session().observed,
        shared,
        rx,
        events,
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = sup.run() => {}
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<SupCmd>,
    events: mpsc::Sender<Event>,
    last_observed: Option<SocketAddr>,
}

fn ticker(period: Duration) -> Interval {
    let mut t = interval_at(Instant::now() + period, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// What a move of the session was for: says which event reports it.
#[derive(Clone, Copy, Debug)]
enum Move {
    /// A `Migrate` push, or a router that said `Draining`.
    Migrate,
    /// Heartbeats went unanswered.
    Rehome,
}

impl Supervisor {
    async fn run(&mut self) {
        let cfg = self.shared.cfg.clone();
        let mut missed = 0u32;
        let mut period = self.shared.session().heartbeat;
        let mut tick = ticker(period);
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    None => return,
                    Some(SupCmd::Migrate { to, from }) => {
                        if let Some(to) = to {
                            self.shared.remember(to);
                        }
                        if self.relocate(to, Some(from), false, Move::Migrate).await.is_err() {
                            return;
                        }
                        missed = 0;
                    }
                    Some(SupCmd::Resume { epoch, draining, reply }) => {
                        let r = if self.shared.session().epoch != epoch {
                            Ok(()) // someone else's Resume already took care of it
                        } else if let Some(to) = draining {
                            self.away_from_draining(to).await
                        } else {
                            self.resume_here().await
                        };
                        let _ = reply.send(r);
                    }
                },
                _ = tick.tick() => {
                    let within = period.min(cfg.request_timeout);
                    let r = self
                        .shared
                        .request(within, false, |rid, uuid| {
                            Message::Heartbeat(Heartbeat { rid, uuid })
                        })
                        .await;
                    match r {
                        Ok(Message::HeartbeatAck(a)) => {
                            missed = 0;
                            self.saw_observed(a.observed.0);
                        }
                        Ok(_) => tracing::debug!("unexpected answer to Heartbeat"),
                        Err(ClientError::Timeout) => {
                            missed += 1;
                            tracing::debug!(missed, "heartbeat unanswered");
                            if missed >= cfg.missed_acks_before_rehome.max(1) {
                                // The configured address first (a load balancer picks a live
                                // node for the new port), then the others; the silent one last.
                                let current = self.shared.session().server;
                                if self.relocate(None, Some(current), false, Move::Rehome).await.is_err() {
                                    return;
                                }
                                missed = 0;
                            }
                        }
                        Err(ClientError::Server(ErrorCode::UnknownSession)) => {
                            if let Err(e) = self.resume_here().await {
                                tracing::debug!(error = %e, "resume after UnknownSession failed");
                            }
                        }
                        Err(ClientError::Server(ErrorCode::Draining)) => {
                            let to = self.shared.take_redirect();
                            if let Err(e) = self.away_from_draining(to).await {
                                tracing::debug!(error = %e, "moving away from a draining node failed");
                            }
                        }
                        Err(ClientError::Closed) => return,
                        Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
                    }
                }
            }
            let p = self.shared.session().heartbeat;
            if p != period {
                period = p;
                tick = ticker(p);
            }
        }
    }

    fn emit(&self, ev: Event) {
        // Informational; if the application is this far behind, it will not miss one line.
        if self.events.try_send(ev).is_err() {
            tracing::debug!("event queue full or closed; event dropped");
        }
    }

    fn saw_observed(&mut self, observed: SocketAddr) {
        self.shared.update(|s| s.observed = Some(observed));
        if self.last_observed != Some(observed) {
            self.last_observed = Some(observed);
            self.emit(Event::ObservedChanged { observed });
        }
    }

    /// The current session as a Resume.
    fn resume_hello(&self) -> Result<Hello, ClientError> {
        let s = self.shared.session();
        let secret = s.secret.ok_or(ClientError::Closed)?;
        Ok(Hello::Resume {
            uuid: s.uuid,
            secret,
        })
    }

    /// Events for a session established anew: its new UUID, if it had to register.
    fn settled(&mut self, how: Settled) {
        let s = self.shared.session();
        self.last_observed = s.observed;
        if how == Settled::Registered {
            self.emit(Event::Reregistered { uuid: s.uuid });
        }
    }

    /// `UnknownSession`: resume at the same address, same port (or register anew there if the
    /// session is gone). If that node says `Draining`, move elsewhere.
    async fn resume_here(&mut self) -> Result<(), ClientError> {
        let server = self.shared.session().server;
        let hello = self.resume_hello()?;
        let within = self.shared.cfg.request_timeout;
        match self.shared.settle_at(hello, server, within, true).await {
            Ok(how) => {
                self.settled(how);
                if how == Settled::Resumed {
                    self.emit(Event::Resumed { server });
                }
                Ok(())
            }
            Err(Refused::Elsewhere { to, .. }) => self.away_from_draining(to).await,
            Err(Refused::Failed(e)) => Err(e),
        }
    }

    /// The node holding the session said `Draining` (naming `to`, or nothing): never try it
    /// again this round; go to `to`, then the other addresses.
    async fn away_from_draining(&mut self, to: Option<SocketAddr>) -> Result<(), ClientError> {
        let current = self.shared.session().server;
        self.relocate(to, Some(current), true, Move::Migrate)
            .await
            .map(|_| ())
    }

    /// Moves to a new local port and takes the session to the first address that takes it:
    /// `first` (named by a router), the configured servers, the addresses routers named
    /// before, and `leaving` last (skipped altogether when `leaving_refused`: it said
    /// `Draining`). Rounds repeat with a capped, jittered pause, each failed round reported
    /// as [`Event::Stranded`], until one address takes the session; fails only when the
    /// client closes. Reports the move as `why` says.
    async fn relocate(
        &mut self,
        first: Option<SocketAddr>,
        leaving: Option<SocketAddr>,
        leaving_refused: bool,
        why: Move,
    ) -> Result<SocketAddr, ClientError> {
        let hello = self.resume_hello()?;
        let started = std::time::Instant::now();
        let servers = self.shared.cfg.servers();
        let mut walk = Walk::new(first, leaving, &servers, &self.shared.told());
        if let (Some(l), true) = (leaving, leaving_refused) {
            walk.refused(l, first);
        }
        let events = self.events.clone();
        let (server, how) = self
            .shared
            .walk(hello, walk, None, true, true, |tried, retry_in| {
                tracing::debug!(?tried, ?retry_in, "no router took the session");
                if events
                    .try_send(Event::Stranded { tried, retry_in })
                    .is_err()
                {
                    tracing::debug!("event queue full or closed; event dropped");
                }
            })
            .await?;
        tracing::debug!(
            uuid = %self.shared.session().uuid,
            %server,
            took = ?started.elapsed(),
            "session moved"
        );
        self.settled(how);
        self.emit(match why {
            Move::Migrate => Event::Migrated { to: server },
            Move::Rehome => Event::Rehomed { server },
        });
        Ok(server)
    }
}
