//! Unit tests of the membership state machine and of the merge with the registry.

use super::*;

fn id(n: u8) -> MemberId {
    MemberId {
        id: format!("n{n}"),
        internal: SocketAddr::from(([10, 0, 0, n], 7401)),
        public: SocketAddr::from(([198, 51, 100, n], 7400)),
        started_ms: 1000,
        bump: 0,
    }
}

fn settings() -> Settings {
    Settings::lan(Duration::from_millis(500), Duration::from_secs(2))
}

/// Members exchanging datagrams by hand, with one clock. `drop` loses everything sent to
/// the members it names.
struct Net {
    m: Vec<Membership>,
    now: Instant,
    down: Vec<usize>,
}

impl Net {
    fn new(n: u8) -> Self {
        Self {
            m: (1..=n)
                .map(|i| Membership::new(id(i), settings(), u64::from(i)))
                .collect(),
            now: Instant::now(),
            down: Vec::new(),
        }
    }

    fn index(&self, node: &str) -> usize {
        self.m.iter().position(|m| m.me().id == node).unwrap()
    }

    /// Delivers until nothing is in flight.
    fn deliver(&mut self) {
        loop {
            let mut sent = Vec::new();
            for (i, m) in self.m.iter_mut().enumerate() {
                for (to, data) in m.take_outbox() {
                    sent.push((i, to, data));
                }
            }
            if sent.is_empty() {
                return;
            }
            for (from, to, data) in sent {
                let j = self.index(&to.id);
                if self.down.contains(&j) || self.down.contains(&from) {
                    continue;
                }
                let from_id = self.m[from].me().id.clone();
                let now = self.now;
                let _ = self.m[j].handle(now, &from_id, &data);
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(25);
            for (i, m) in self.m.iter_mut().enumerate() {
                if !self.down.contains(&i) {
                    m.tick(self.now, i as u64);
                }
            }
            self.deliver();
        }
    }

    fn active(&self, i: usize) -> Vec<String> {
        let mut v: Vec<String> = self.m[i]
            .view()
            .into_iter()
            .filter(|v| v.active)
            .map(|v| v.id.id)
            .collect();
        v.sort();
        v
    }
}

#[test]
fn a_node_known_to_one_member_is_known_to_all_within_a_round() {
    let mut net = Net::new(4);
    // n1..n3 form a cluster.
    for i in 1..3 {
        let to = net.m[0].me().clone();
        let now = net.now;
        net.m[i].announce(now, to);
    }
    net.deliver();
    net.run(Duration::from_secs(1));
    assert_eq!(net.active(0), ["n2", "n3"]);
    assert_eq!(net.active(2), ["n1", "n2"]);
    // n4 announces to n2 only: within one gossip round everyone knows it.
    let to = net.m[1].me().clone();
    let now = net.now;
    net.m[3].announce(now, to);
    net.deliver();
    net.run(settings().gossip_period);
    assert_eq!(net.active(0), ["n2", "n3", "n4"]);
    assert_eq!(net.active(2), ["n1", "n2", "n4"]);
    assert_eq!(net.active(3), ["n1", "n2", "n3"]);
    // Metadata travels too.
    net.run(Duration::from_secs(2));
    let v = net.m[0].view();
    let n4 = v.iter().find(|v| v.id.id == "n4").unwrap();
    assert_eq!(n4.meta.as_ref().map(|m| m.sessions), Some(3));
}

#[test]
fn a_silent_member_is_suspected_then_declared_down_and_a_leaving_one_at_once() {
    let mut net = Net::new(3);
    for i in 1..3 {
        let to = net.m[0].me().clone();
        let now = net.now;
        net.m[i].announce(now, to);
    }
    net.deliver();
    net.run(Duration::from_secs(1));
    assert_eq!(net.active(0), ["n2", "n3"]);
    // n3 goes silent (killed): down within probe periods + suspicion.
    net.down.push(2);
    let s = settings();
    net.run(s.probe_period * 4 + s.suspect_to_down);
    assert_eq!(net.active(0), ["n2"]);
    assert_eq!(net.active(1), ["n1"]);
    // n2 leaves: n1 knows at once.
    let now = net.now;
    net.m[1].leave(now);
    net.deliver();
    assert_eq!(net.active(0), Vec::<String>::new());
}

#[test]
fn draining_and_unpublished_writes_are_broadcast_at_once() {
    let mut net = Net::new(2);
    let to = net.m[0].me().clone();
    let now = net.now;
    net.m[1].announce(now, to);
    net.deliver();
    net.run(Duration::from_millis(100));
    let now = net.now;
    net.m[1].set_state(now, NodeState::Draining);
    net.deliver();
    let v = net.m[0].view();
    assert_eq!(
        v[0].meta.as_ref().map(|m| m.state),
        Some(NodeState::Draining)
    );
    assert_eq!(merge(&[], &v)[0].state, NodeState::Draining);
    // So is "Redis lacks some of my presence writes", and its end.
    for behind in [true, false] {
        let now = net.now;
        net.m[1].set_unpublished(now, behind);
        net.deliver();
        let v = net.m[0].view();
        assert_eq!(v[0].meta.as_ref().map(|m| m.unpublished), Some(behind));
    }
}

#[test]
fn spoofed_sender_is_refused() {
    let mut a = Membership::new(id(1), settings(), 1);
    let mut b = Membership::new(id(2), settings(), 2);
    let now = Instant::now();
    b.announce(now, id(1));
    let (_, data) = b.take_outbox().pop().unwrap();
    assert!(matches!(
        a.handle(now, "n3", &data),
        Err(MemberError::Spoofed)
    ));
    assert!(a.handle(now, "n2", &data).is_ok());
    assert!(a.handle(now, "n2", b"garbage").is_err());
}

#[test]
fn merge_rules() {
    let rec = |n: u8, started: u64, state| NodeInfo {
        id: format!("n{n}"),
        public: id(n).public,
        internal: id(n).internal,
        state,
        version: "r".into(),
        sessions: 7,
        started_ms: started,
        expires_ms: 99,
    };
    let view = |n: u8, started: u64, active| MemberView {
        id: MemberId {
            started_ms: started,
            ..id(n)
        },
        active,
        meta: None,
    };
    let redis = [
        rec(1, 1000, NodeState::Active),
        rec(2, 1000, NodeState::Draining),
        rec(3, 2000, NodeState::Active),
        rec(4, 1000, NodeState::Active),
    ];
    let members = [
        view(2, 1000, true),  // draining in the registry: stays draining
        view(3, 1000, false), // down, but the registry has a later life
        view(4, 1000, false), // down: hidden
        view(5, 1000, true),  // only in membership
    ];
    let t = merge(&redis, &members);
    let ids: Vec<(&str, NodeState)> = t.iter().map(|n| (n.id.as_str(), n.state)).collect();
    assert_eq!(
        ids,
        [
            ("n1", NodeState::Active),
            ("n2", NodeState::Draining),
            ("n3", NodeState::Active),
            ("n5", NodeState::Active)
        ]
    );
    assert_eq!(t[3].internal, id(5).internal);
}
