//! The supervisor task: keeps the session alive. It heartbeats, resumes after
//! `UnknownSession`, follows `Migrate`, and re-homes when heartbeats go unanswered. It is the
//! only task that runs Resume after registration, so resumes never race each other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sigrouter_proto::{ErrorCode, Heartbeat, Message};
use tokio::sync::mpsc;
use tokio::time::{interval_at, sleep, Instant, Interval, MissedTickBehavior};

use crate::backoff::Backoff;
use crate::error::ClientError;
use crate::event::Event;
use crate::shared::{Hello, Shared, SupCmd};

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
                    Some(SupCmd::Migrate { to }) => {
                        let mut order = cfg.servers();
                        if let Some(to) = to {
                            order.retain(|a| *a != to);
                            order.insert(0, to);
                        }
                        let Ok(to) = self.relocate(&order).await else {
                            return;
                        };
                        self.emit(Event::Migrated { to });
                        missed = 0;
                    }
                    Some(SupCmd::Resume { epoch, reply }) => {
                        let r = if self.shared.session().epoch == epoch {
                            self.resume_here().await
                        } else {
                            Ok(()) // someone else's Resume already took care of it
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
                                let mut order = cfg.servers();
                                if order.len() > 1 {
                                    order.retain(|a| *a != current);
                                    order.push(current);
                                }
                                let Ok(server) = self.relocate(&order).await else {
                                    return;
                                };
                                self.emit(Event::Rehomed { server });
                                missed = 0;
                            }
                        }
                        Err(ClientError::Server(ErrorCode::UnknownSession)) => {
                            if let Err(e) = self.resume_here().await {
                                tracing::debug!(error = %e, "resume after UnknownSession failed");
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

    /// Resume with the current secret; if the router no longer knows the session at all,
    /// register a new one.
    async fn resume_or_register(&mut self, server: SocketAddr) -> Result<(), ClientError> {
        let s = self.shared.session();
        let Some(secret) = s.secret else {
            return Err(ClientError::Closed);
        };
        let within = self.shared.cfg.request_timeout;
        let hello = Hello::Resume {
            uuid: s.uuid,
            secret,
        };
        match self.shared.hello(hello, server, within).await {
            Err(ClientError::Server(ErrorCode::Unauthorized)) => {
                self.shared.hello(Hello::Register, server, within).await?;
                let s = self.shared.session();
                self.last_observed = s.observed;
                self.emit(Event::Reregistered { uuid: s.uuid });
                Ok(())
            }
            r => {
                self.last_observed = self.shared.session().observed;
                r
            }
        }
    }

    /// `UnknownSession`: resume at the same address, same port.
    async fn resume_here(&mut self) -> Result<(), ClientError> {
        let server = self.shared.session().server;
        let uuid = self.shared.session().uuid;
        self.resume_or_register(server).await?;
        if self.shared.session().uuid == uuid {
            self.emit(Event::Resumed { server });
        }
        Ok(())
    }

    /// Move to a new local port and resume at the first of `servers` that takes it, cycling
    /// through them with backoff (each attempt from a new port) until one does. Returns the
    /// server; fails only when the client closes.
    async fn relocate(&mut self, servers: &[SocketAddr]) -> Result<SocketAddr, ClientError> {
        let mut pause = Backoff::reconnect();
        for attempt in 0usize.. {
            let server = servers[attempt % servers.len()];
            match self.shared.rebind().await {
                Ok(local) => tracing::debug!(%local, %server, "relocating"),
                Err(ClientError::Closed) => return Err(ClientError::Closed),
                Err(e) => tracing::warn!(error = %e, "rebind failed"),
            }
            match self.resume_or_register(server).await {
                Ok(()) => return Ok(server),
                Err(ClientError::Closed) => return Err(ClientError::Closed),
                Err(e) => {
                    tracing::debug!(error = %e, %server, "resume failed; trying the next");
                    // A pause after each full round; the next address at once otherwise.
                    if (attempt + 1) % servers.len() == 0 {
                        sleep(pause.next_jittered()).await;
                    }
                }
            }
        }
        Err(ClientError::Closed)
    }
}
