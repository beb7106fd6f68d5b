//! Batched datagram I/O on one socket.
//!
//! - Receive: `recvmmsg` through quinn-udp ([`quinn_udp::UdpSocketState::recv`]), up to
//!   [`quinn_udp::BATCH_SIZE`] datagrams per system call, into buffers allocated once per socket.
//!   UDP GRO is switched off again after quinn-udp enables it: a coalesced receive needs 64 KiB
//!   buffers, and clients send one small datagram every few seconds each, so there is nothing
//!   to coalesce. quinn-udp's "never fragment" and its per-datagram control messages (destination
//!   address, TOS, receive timestamp) are undone too (see `sys::restore_defaults`).
//! - Send: `sendmmsg` on Linux, up to [`SEND_BATCH`] datagrams to any destinations per system
//!   call, built on the stack (no allocation). Runs of equal-sized datagrams to one destination
//!   go out as one UDP GSO message where the kernel supports it: a client with many sessions
//!   behind one address (a relay, a gateway, a load generator) gets its answers in one pass
//!   through the stack. Elsewhere, one `send_to` per datagram.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::router::Transmit;

/// Largest receive: bigger than any valid datagram, so oversized ones are seen and counted.
pub(crate) const RECV_BUF: usize = 2048;
/// Datagrams per receive system call.
pub(crate) const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Most datagrams per send system call.
pub(crate) const SEND_BATCH: usize = 64;

/// A socket's receive side: quinn-udp's state and reused buffers.
pub(crate) struct Rx {
    state: UdpSocketState,
    bufs: Box<[[u8; RECV_BUF]; RECV_BATCH]>,
    meta: [RecvMeta; RECV_BATCH],
}

impl Rx {
    /// Prepares `sock` for batched receives (quinn-udp sets its socket options).
    pub(crate) fn new(sock: &UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(sock.into())?;
        sys::restore_defaults(sock);
        let bufs: Box<[[u8; RECV_BUF]; RECV_BATCH]> = vec![[0u8; RECV_BUF]; RECV_BATCH]
            .into_boxed_slice()
            .try_into()
            .map_err(|_| io::Error::other("receive buffers"))?;
        Ok(Self {
            state,
            bufs,
            meta: [RecvMeta::default(); RECV_BATCH],
        })
    }

    /// Receives what is waiting, up to one batch, and hands each datagram to `f`. Returns how
    /// many arrived; `WouldBlock` when none did (the socket's readiness is then cleared).
    pub(crate) fn recv(
        &mut self,
        sock: &UdpSocket,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let Self { state, bufs, meta } = self;
        let n = {
            let mut iovs = bufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
            sock.try_io(Interest::READABLE, || {
                state.recv(sock.into(), &mut iovs, meta)
            })?
        };
        let mut count = 0;
        for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
            let data = &buf[..m.len.min(RECV_BUF)];
            if m.stride == 0 || m.stride >= data.len() {
                f(m.addr, data);
                count += 1;
            } else {
                // Coalesced by GRO (should it be on after all): split at the stride.
                for d in data.chunks(m.stride) {
                    f(m.addr, d);
                    count += 1;
                }
            }
        }
        Ok(count)
    }
}

/// A socket's send side.
pub(crate) struct Tx {
    /// Whether UDP GSO may be used (cleared after the kernel refused it once).
    gso: bool,
}

impl Tx {
    /// A sender for `sock`.
    pub(crate) fn new(_sock: &UdpSocket) -> Self {
        Self {
            gso: sys::GSO_SUPPORTED,
        }
    }

    /// Sends datagrams from the front of `q`, at most [`SEND_BATCH`] in one system call.
    /// Returns how many left; `WouldBlock` when the socket buffer is full (readiness cleared),
    /// another error when the first datagram could not be sent (the caller drops it).
    pub(crate) fn send(&mut self, sock: &UdpSocket, q: &[Transmit]) -> io::Result<usize> {
        loop {
            let gso = self.gso;
            let r = sock.try_io(Interest::WRITABLE, || sys::send(sock, q, gso));
            match r {
                Err(e) if gso && sys::is_gso_error(&e) => {
                    // The route's device cannot segment: send plainly from now on.
                    tracing::info!(error = %e, "UDP GSO refused; sending without it");
                    self.gso = false;
                }
                r => return r,
            }
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    //! `sendmmsg` with optional UDP GSO per message, and the GRO switch. The only unsafe code
    //! in the crate: system calls on buffers that live on this function's stack.

    use std::io;
    use std::mem::{self, MaybeUninit};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use tokio::net::UdpSocket;

    use super::SEND_BATCH;
    use crate::router::Transmit;

    /// Whether this platform has UDP GSO (Linux 4.18+; refused at run time otherwise).
    pub(super) const GSO_SUPPORTED: bool = true;
    /// Most segments per GSO message (the kernel's `UDP_MAX_SEGMENTS`).
    const GSO_MAX_SEGMENTS: usize = 64;
    /// Most payload per GSO message.
    const GSO_MAX_BYTES: usize = 65_000;

    /// Undoes quinn-udp's socket options that do not suit this server: UDP GRO (off), "never
    /// fragment" (back to the kernel's default of path-MTU discovery, which fragments a
    /// datagram larger than the path allows: node-to-node datagrams can exceed the MTU of some
    /// overlay networks), and the per-datagram control messages (destination address, TOS,
    /// timestamp; off). Failures are ignored (the option was then not set either).
    pub(super) fn restore_defaults(sock: &UdpSocket) {
        let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
            // SAFETY: a valid socket fd and a pointer to a c_int of the given size.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    level,
                    name,
                    (&value as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        };
        set(libc::SOL_UDP, libc::UDP_GRO, 0);
        set(
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_WANT,
        );
        // Per-datagram ancillary data nobody reads here (the destination address, the TOS/ECN
        // byte, a receive timestamp): each costs the kernel a control message per datagram,
        // and timestamps switch on time-stamping of every packet the host receives.
        set(libc::IPPROTO_IP, libc::IP_PKTINFO, 0);
        set(libc::IPPROTO_IP, libc::IP_RECVTOS, 0);
        set(libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0);
        if sock.local_addr().is_ok_and(|a| a.is_ipv6()) {
            set(
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_WANT,
            );
            set(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 0);
            set(libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 0);
        }
    }

    /// Whether `e` says the kernel would not segment (no GSO on the route's device).
    pub(super) fn is_gso_error(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    union RawAddr {
        v4: libc::sockaddr_in,
        v6: libc::sockaddr_in6,
    }

    fn raw_addr(a: &SocketAddr) -> (RawAddr, libc::socklen_t) {
        match a {
            SocketAddr::V4(a) => {
                // SAFETY: all-zero is a valid sockaddr_in.
                let mut s: libc::sockaddr_in = unsafe { mem::zeroed() };
                s.sin_family = libc::AF_INET as libc::sa_family_t;
                s.sin_port = a.port().to_be();
                s.sin_addr = libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                };
                (
                    RawAddr { v4: s },
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                // SAFETY: all-zero is a valid sockaddr_in6.
                let mut s: libc::sockaddr_in6 = unsafe { mem::zeroed() };
                s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                s.sin6_port = a.port().to_be();
                s.sin6_flowinfo = a.flowinfo();
                s.sin6_addr = libc::in6_addr {
                    s6_addr: a.ip().octets(),
                };
                s.sin6_scope_id = a.scope_id();
                (
                    RawAddr { v6: s },
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    }

    /// Room for one `UDP_SEGMENT` control message, aligned for `cmsghdr`.
    #[derive(Clone, Copy)]
    #[repr(C, align(8))]
    struct Ctrl([u8; 32]);

    /// How many transmits from the front of `q` form one GSO message: equal sizes (the last
    /// may be shorter), one destination, within the kernel's limits.
    fn run_len(q: &[Transmit]) -> usize {
        let Some(first) = q.first() else {
            return 0;
        };
        let size = first.bytes.len();
        if size == 0 {
            return 1;
        }
        let mut n = 1;
        let mut bytes = size;
        for t in &q[1..] {
            if n == GSO_MAX_SEGMENTS
                || t.to != first.to
                || t.bytes.len() > size
                || bytes + t.bytes.len() > GSO_MAX_BYTES
            {
                break;
            }
            n += 1;
            bytes += t.bytes.len();
            if t.bytes.len() < size {
                // A shorter segment ends the message.
                break;
            }
        }
        n
    }

    /// One `sendmmsg` of up to [`SEND_BATCH`] datagrams from the front of `q` (fewer messages
    /// when GSO groups them). Returns how many datagrams left.
    pub(super) fn send(sock: &UdpSocket, q: &[Transmit], gso: bool) -> io::Result<usize> {
        let q = &q[..q.len().min(SEND_BATCH)];
        if q.is_empty() {
            return Ok(0);
        }
        let mut addrs = [MaybeUninit::<RawAddr>::uninit(); SEND_BATCH];
        let mut ctrls = [Ctrl([0; 32]); SEND_BATCH];
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths).
        let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
        // Datagrams carried by each message, to turn messages sent into datagrams sent.
        let mut per_msg = [0u8; SEND_BATCH];

        // First pass: lay out addresses and iovecs; messages are (first iovec, count, gso).
        let mut msgs = 0;
        let mut i = 0;
        let addr_base = addrs.as_mut_ptr();
        let iov_base = iovs.as_mut_ptr();
        let ctrl_base = ctrls.as_mut_ptr();
        while i < q.len() {
            let run = if gso { run_len(&q[i..]) } else { 1 };
            let (a, alen) = raw_addr(&q[i].to);
            addrs[msgs].write(a);
            for (k, t) in q[i..i + run].iter().enumerate() {
                iovs[i + k] = libc::iovec {
                    iov_base: t.bytes.as_ptr() as *mut libc::c_void,
                    iov_len: t.bytes.len(),
                };
            }
            let h = &mut hdrs[msgs].msg_hdr;
            // SAFETY (all pointer arithmetic below): indices are below SEND_BATCH, the arrays
            // live until the system call returns and are not moved after this point.
            h.msg_name = unsafe { addr_base.add(msgs) }.cast();
            h.msg_namelen = alen;
            h.msg_iov = unsafe { iov_base.add(i) };
            h.msg_iovlen = run as _;
            if run > 1 {
                h.msg_control = unsafe { ctrl_base.add(msgs) }.cast();
                // SAFETY: CMSG_SPACE is a pure computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
                // SAFETY: msg_control points at a zeroed, aligned buffer of msg_controllen
                // bytes, so CMSG_FIRSTHDR returns a valid header inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    let seg = q[i].bytes.len() as u16;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
            per_msg[msgs] = run as u8;
            msgs += 1;
            i += run;
        }
        let sent = loop {
            // SAFETY: `hdrs[..msgs]` point at addresses, iovecs and control buffers on this
            // stack frame, and the iovecs at `q`'s bytes, all alive for the call.
            let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), msgs as _, 0) };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        Ok(per_msg[..sent.min(msgs)].iter().map(|&n| n as usize).sum())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    //! Portable fallback: one `send_to` per datagram.

    use std::io;

    use tokio::net::UdpSocket;

    use super::SEND_BATCH;
    use crate::router::Transmit;

    pub(super) const GSO_SUPPORTED: bool = false;

    pub(super) fn restore_defaults(_sock: &UdpSocket) {}

    pub(super) fn is_gso_error(_e: &io::Error) -> bool {
        false
    }

    pub(super) fn send(sock: &UdpSocket, q: &[Transmit], _gso: bool) -> io::Result<usize> {
        let s = socket2::SockRef::from(sock);
        let mut n = 0;
        for t in q.iter().take(SEND_BATCH) {
            match s.send_to(&t.bytes, &t.to.into()) {
                Ok(_) => n += 1,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    async fn socket() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind loopback")
    }

    fn t(to: SocketAddr, tag: u8, len: usize) -> Transmit {
        Transmit::new(to, vec![tag; len])
    }

    /// Reads `n` datagrams (or fails after a deadline): what a client would see.
    async fn read(sock: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < n {
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                .await
                .expect("datagram within 5 s")
                .expect("recv");
            got.push(buf[..len].to_vec());
        }
        got
    }

    /// Runs of equal-sized datagrams to one destination (sent as GSO messages where the kernel
    /// allows), a shorter one ending a run, and a second destination in between all arrive as
    /// the separate datagrams they were, in order per destination.
    #[tokio::test]
    async fn batched_sends_arrive_as_the_datagrams_queued() {
        let server = socket().await;
        let a = socket().await;
        let b = socket().await;
        let (ta, tb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut q = Vec::new();
        for i in 0..20u8 {
            q.push(t(ta, i, 100));
        }
        q.push(t(ta, 20, 40));
        q.push(t(ta, 21, 100));
        q.push(t(tb, 100, 300));
        q.push(t(tb, 101, 300));
        q.push(t(ta, 22, 100));
        q.push(t(tb, 102, 1));
        let mut tx = Tx::new(&server);
        let mut sent = 0;
        while sent < q.len() {
            server.writable().await.unwrap();
            match tx.send(&server, &q[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("send failed: {e}"),
            }
        }
        let want = |to: SocketAddr| -> Vec<Vec<u8>> {
            q.iter()
                .filter(|x| x.to == to)
                .map(|x| x.bytes.to_vec())
                .collect()
        };
        assert_eq!(read(&a, 23).await, want(ta));
        assert_eq!(read(&b, 3).await, want(tb));
    }

    /// After quinn-udp's setup the socket still fragments what the path cannot carry (the
    /// kernel's default), GRO is off, and no per-datagram control messages are asked for.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn socket_keeps_the_kernels_fragmentation_default_and_no_gro() {
        use std::os::fd::AsRawFd;
        let server = socket().await;
        let _rx = Rx::new(&server).expect("rx");
        let get = |level: libc::c_int, name: libc::c_int| -> libc::c_int {
            let mut v: libc::c_int = -1;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: a valid fd, and a c_int with its size for the kernel to fill.
            let r = unsafe {
                libc::getsockopt(
                    server.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0, "getsockopt");
            v
        };
        assert_eq!(
            get(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_WANT
        );
        assert_eq!(get(libc::SOL_UDP, libc::UDP_GRO), 0);
        assert_eq!(get(libc::IPPROTO_IP, libc::IP_PKTINFO), 0);
        assert_eq!(get(libc::IPPROTO_IP, libc::IP_RECVTOS), 0);
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_TIMESTAMPNS), 0);
    }

    /// A batch of datagrams from several sources is received whole, with each source address.
    #[tokio::test]
    async fn batched_receive_sees_every_datagram_and_its_source() {
        let server = socket().await;
        let to = server.local_addr().unwrap();
        let mut rx = Rx::new(&server).expect("rx");
        let clients = [socket().await, socket().await];
        for (k, c) in clients.iter().enumerate() {
            for i in 0..40u8 {
                c.send_to(&[k as u8, i], to).await.unwrap();
            }
        }
        let mut got = Vec::new();
        while got.len() < 80 {
            tokio::time::timeout(Duration::from_secs(5), server.readable())
                .await
                .expect("readable within 5 s")
                .unwrap();
            match rx.recv(&server, |src, b| got.push((src, b.to_vec()))) {
                Ok(n) => assert!(n <= RECV_BATCH),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv failed: {e}"),
            }
        }
        for (k, c) in clients.iter().enumerate() {
            let from = c.local_addr().unwrap();
            let mine: Vec<Vec<u8>> = got
                .iter()
                .filter(|(s, _)| *s == from)
                .map(|(_, b)| b.clone())
                .collect();
            let want: Vec<Vec<u8>> = (0..40u8).map(|i| vec![k as u8, i]).collect();
            assert_eq!(mine, want);
        }
    }
}
