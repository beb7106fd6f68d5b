//! What a lane sends: Registers, Resumes and heartbeats in flight within their windows,
//! encoded, paced per phase, and retransmitted until answered or given up.

use super::*;

impl Lane {
    /// Starts a request: records it and queues its datagram.
    pub(super) fn request(&mut self, now: Instant, j: u32, kind: Kind, node: u8, conn: Uuid) {
        let rid = self.next_rid();
        let req = Req {
            j,
            kind,
            node,
            sent: now,
            first: now,
            tries: 1,
            conn,
        };
        if let Some(bytes) = self.encode(rid, &req) {
            self.pending.insert(rid, req);
            self.order.push_back((rid, now));
            let to = self.nodes[node as usize];
            self.send(j, to, bytes);
        }
    }

    pub(super) fn encode(&mut self, rid: u64, req: &Req) -> Option<Vec<u8>> {
        let s = self.sessions[req.j as usize];
        match req.kind {
            Kind::Register => Some(crate::hello::hello(rid, None)),
            Kind::Resume => Some(crate::hello::hello(rid, Some((s.uuid, s.secret)))),
            Kind::Heartbeat | Kind::Check => {
                let m = Message::Heartbeat(proto::Heartbeat { rid, uuid: s.uuid });
                proto::encode_into(&m, Some(&s.secret), &mut self.enc).ok()?;
                Some(self.enc.clone())
            }
            Kind::Accept => {
                let m = Message::Accept(proto::Answer {
                    rid,
                    uuid: s.uuid,
                    connection: req.conn,
                    payload: proto::Payload::from(b"ok".to_vec()),
                });
                proto::encode_into(&m, Some(&s.secret), &mut self.enc).ok()?;
                Some(self.enc.clone())
            }
        }
    }

    /// Sends due Registers and Resumes within the window.
    pub(super) fn pump_hellos(&mut self, now: Instant) {
        while self.hellos_in_flight < HELLO_WINDOW {
            let Some(&(j, at)) = self.hellos.front() else {
                break;
            };
            if at > now {
                break;
            }
            self.hellos.pop_front();
            let s = self.sessions[j as usize];
            let kind = match s.state {
                St::New => Kind::Register,
                St::Resuming => Kind::Resume,
                St::Held | St::Lost => continue,
            };
            self.hellos_in_flight += 1;
            self.request(now, j, kind, s.node, Uuid::nil());
        }
    }

    /// Check phase: one heartbeat per held session, at the node holding it.
    pub(super) fn pump_checks(&mut self, now: Instant) {
        while self.checks_in_flight < CHECK_WINDOW && self.check_cursor < self.sessions.len() {
            let j = self.check_cursor;
            self.check_cursor += 1;
            let s = self.sessions[j];
            if s.state != St::Held || s.checked {
                continue;
            }
            self.checks_in_flight += 1;
            self.request(now, j as u32, Kind::Check, s.node, Uuid::nil());
        }
    }

    /// Background heartbeats: round-robin over the held sessions at `bg_rate` per second.
    pub(super) fn pump_background(&mut self, now: Instant) {
        let start = *self.bg_start.get_or_insert(now);
        let due = (now.saturating_duration_since(start).as_secs_f64() * self.bg_rate) as u64;
        let n = self.sessions.len();
        let mut skipped = 0;
        while self.bg_sent < due && self.bg_in_flight < BG_WINDOW && skipped < n {
            let j = self.bg_cursor % n;
            self.bg_cursor += 1;
            let s = self.sessions[j];
            if s.state != St::Held {
                skipped += 1;
                continue;
            }
            self.bg_sent += 1;
            self.bg_in_flight += 1;
            let w = self.window(now);
            self.report.hb_sent[w] += 1;
            self.request(now, j as u32, Kind::Heartbeat, s.node, Uuid::nil());
        }
        if self.bg_sent < due {
            // Behind (window full or nothing held): do not build up a burst.
            self.bg_sent = due;
        }
    }

    /// 0 before SIGTERM, 1 during the drain, 2 after it, 3 in the reachability check.
    pub(super) fn window(&self, t: Instant) -> usize {
        if self.ctl.t_after_end.get().is_some_and(|e| t >= *e) {
            return 3;
        }
        match (self.ctl.t0.get(), self.ctl.t_done.get()) {
            (Some(t0), _) if t < *t0 => 0,
            (None, _) => 0,
            (Some(_), Some(done)) if t >= *done => 2,
            _ => 1,
        }
    }

    pub(super) fn second(&self, t: Instant) -> Option<usize> {
        let t0 = self.ctl.t0.get()?;
        let s = t.checked_duration_since(*t0)?.as_secs() as usize;
        (s < TIMELINE_S).then_some(s)
    }

    /// Sends unanswered hellos and checks again; gives up on old heartbeats.
    pub(super) fn retransmit(&mut self, now: Instant) {
        while let Some(&(rid, sent)) = self.order.front() {
            let Some(req) = self.pending.get(&rid).copied() else {
                self.order.pop_front();
                continue;
            };
            if req.sent != sent {
                // Sent again since: its newer entry is further back.
                self.order.pop_front();
                continue;
            }
            let rto = match req.kind {
                Kind::Heartbeat => HEARTBEAT_TIMEOUT,
                _ => HELLO_RTO,
            };
            if now.saturating_duration_since(sent) < rto {
                break;
            }
            self.order.pop_front();
            match req.kind {
                Kind::Heartbeat => {
                    self.pending.remove(&rid);
                    self.bg_in_flight -= 1;
                    let w = self.window(req.first);
                    self.report.hb_lost[w] += 1;
                }
                Kind::Register | Kind::Resume if req.tries >= HELLO_TRIES => {
                    // Start afresh with a new request id.
                    self.pending.remove(&rid);
                    self.hellos_in_flight -= 1;
                    self.hellos.push_back((req.j, now));
                }
                Kind::Check if req.tries >= CHECK_TRIES => {
                    self.pending.remove(&rid);
                    self.checks_in_flight -= 1;
                    self.sessions[req.j as usize].checked = true;
                    Ctl::count(&self.ctl.check_failed);
                    *self.report.check_failures.entry("timeout").or_default() += 1;
                }
                Kind::Accept if req.tries >= CHECK_TRIES => {
                    self.pending.remove(&rid);
                }
                _ => {
                    if req.kind == Kind::Resume {
                        Ctl::count(&self.ctl.resume_retransmits);
                    }
                    let mut r = req;
                    r.sent = now;
                    r.tries += 1;
                    if let Some(bytes) = self.encode(rid, &r) {
                        self.pending.insert(rid, r);
                        self.order.push_back((rid, now));
                        let to = self.nodes[r.node as usize];
                        self.send(r.j, to, bytes);
                    }
                }
            }
        }
    }
}
