//! What a lane does with the datagrams its sessions receive: answers matched to requests,
//! refusals (retried, or followed elsewhere), and pushes (`Migrate` followed, every push
//! acknowledged).

use super::*;

impl Lane {
    pub(super) fn on_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: Option<IpAddr>,
        buf: &[u8],
    ) {
        let Some(j) = dst
            .and_then(session_of)
            .filter(|j| *j < self.sessions.len())
        else {
            Ctl::count(&self.ctl.bad);
            return;
        };
        let Ok(msg) = proto::decode(buf) else {
            Ctl::count(&self.ctl.bad);
            return;
        };
        if msg.ty().is_authenticated() && !proto::verify_mac(buf, &self.sessions[j].secret) {
            Ctl::count(&self.ctl.bad);
            return;
        }
        let j32 = j as u32;
        match msg {
            Message::Registered(r) => {
                let Some(req) = self.take(r.rid, j32) else {
                    return;
                };
                self.hellos_in_flight -= 1;
                let s = &mut self.sessions[j];
                s.uuid = r.uuid;
                s.secret = r.secret;
                s.node = req.node;
                let was = s.state;
                s.state = St::Held;
                match req.kind {
                    Kind::Register => Ctl::count(&self.ctl.registered),
                    _ if was == St::Resuming => {
                        let ms = ms_since(self.ctl.t0.get(), now);
                        self.sessions[j].resumed_ms = ms;
                        Ctl::count(&self.ctl.resumed);
                        if let Some(sec) = self.second(now) {
                            self.report.resumes_per_s[sec] += 1;
                        }
                    }
                    _ => {}
                }
            }
            Message::Error(e) | Message::SessionError(e) => {
                let Some(req) = self.take(e.rid, j32) else {
                    return;
                };
                self.on_refusal(now, j32, req, e.code, e.to.map(|a| a.0));
            }
            Message::HeartbeatAck(a) => {
                let Some(req) = self.take(a.rid, j32) else {
                    return;
                };
                match req.kind {
                    Kind::Heartbeat => {
                        self.bg_in_flight -= 1;
                        let us = now.saturating_duration_since(req.first).as_micros() as u64;
                        let w = self.window(req.first);
                        stats::record(&mut self.report.hb[w], us);
                        if let Some(sec) = self.second(req.first).filter(|_| w < 3) {
                            stats::record(&mut self.report.hb_per_s[sec], us);
                        }
                    }
                    Kind::Check => {
                        self.checks_in_flight -= 1;
                        self.sessions[j].checked = true;
                        Ctl::count(&self.ctl.check_acked);
                    }
                    _ => {}
                }
            }
            Message::Ack(a) => {
                if self.take(a.rid, j32).is_some() {
                    Ctl::count(&self.ctl.accepted);
                }
            }
            Message::Migrate(m) => {
                self.push_ack(j32, m.push, src);
                let from = self.node_index(src);
                let s = self.sessions[j];
                if s.state == St::Held && from == Some(s.node) {
                    Ctl::count(&self.ctl.migrated);
                    let ms = ms_since(self.ctl.t0.get(), now);
                    if let Some(sec) = self.second(now) {
                        self.report.migrates_per_s[sec] += 1;
                    }
                    let to =
                        m.to.and_then(|a| self.node_index(a.0))
                            .unwrap_or_else(|| self.other_node(s.node));
                    let s = &mut self.sessions[j];
                    s.migrated_ms = ms;
                    s.state = St::Resuming;
                    s.node = to;
                    self.hellos.push_back((j32, now));
                } else {
                    Ctl::count(&self.ctl.migrate_repeats);
                }
            }
            Message::Incoming(i) => {
                self.push_ack(j32, i.push, src);
                if let Some(node) = self.node_index(src) {
                    Ctl::count(&self.ctl.incoming);
                    self.request(now, j32, Kind::Accept, node, i.connection);
                }
            }
            Message::SignalPush(p) => self.push_ack(j32, p.push, src),
            _ => Ctl::count(&self.ctl.bad),
        }
    }

    /// The request `rid` of session `j`, taken out of flight.
    pub(super) fn take(&mut self, rid: u64, j: u32) -> Option<Req> {
        match self.pending.get(&rid) {
            Some(r) if r.j == j => self.pending.remove(&rid),
            _ => None,
        }
    }

    /// A node that is not `n` (a Migrate without an address, or a redirect to nowhere known).
    pub(super) fn other_node(&self, n: u8) -> u8 {
        let k = self.nodes.len() as u8;
        let pick = (rand::random::<u8>() % (k - 1).max(1)) + 1;
        (n + pick) % k
    }

    pub(super) fn on_refusal(
        &mut self,
        now: Instant,
        j: u32,
        req: Req,
        code: ErrorCode,
        to: Option<SocketAddr>,
    ) {
        match req.kind {
            Kind::Register | Kind::Resume => {
                self.hellos_in_flight -= 1;
                let s = &mut self.sessions[j as usize];
                match code {
                    ErrorCode::Draining => {
                        // A client never asks a draining node again: go where it says.
                        Ctl::count(&self.ctl.redirected);
                        let to = to
                            .and_then(|a| self.node_index(a))
                            .filter(|n| *n != req.node)
                            .unwrap_or_else(|| self.other_node(req.node));
                        self.sessions[j as usize].node = to;
                        self.hellos.push_back((j, now));
                    }
                    ErrorCode::RateLimited | ErrorCode::RetryLater | ErrorCode::Capacity => {
                        if req.kind == Kind::Resume {
                            Ctl::count(&self.ctl.resume_retried);
                        }
                        self.hellos.push_back((j, now + HELLO_BACKOFF));
                    }
                    ErrorCode::Unauthorized if req.kind == Kind::Resume => {
                        s.state = St::Lost;
                        Ctl::count(&self.ctl.resume_lost);
                    }
                    _ => {
                        if req.kind == Kind::Register {
                            Ctl::count(&self.ctl.register_refused);
                            s.state = St::Lost;
                        } else {
                            s.state = St::Lost;
                            Ctl::count(&self.ctl.resume_lost);
                        }
                    }
                }
            }
            Kind::Heartbeat => {
                self.bg_in_flight -= 1;
                *self.report.hb_errors.entry(code.name()).or_default() += 1;
            }
            Kind::Check => {
                self.checks_in_flight -= 1;
                self.sessions[j as usize].checked = true;
                Ctl::count(&self.ctl.check_failed);
                *self.report.check_failures.entry(code.name()).or_default() += 1;
            }
            Kind::Accept => {}
        }
    }

    pub(super) fn push_ack(&mut self, j: u32, push: u64, to: SocketAddr) {
        let s = self.sessions[j as usize];
        let m = Message::PushAck(proto::PushAck { uuid: s.uuid, push });
        if proto::encode_into(&m, Some(&s.secret), &mut self.enc).is_ok() {
            let b = self.enc.clone();
            self.send(j, to, b);
        }
    }
}
