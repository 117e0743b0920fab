//! `hoshino-netprobe`: traffic generators and sinks for the end-to-end tests and the bench.
//!
//! - `udp-send`/`udp-recv`: numbered datagrams (the first 8 bytes of each payload are a
//!   big-endian sequence number); the receiver prints `seq N` per datagram in arrival order.
//! - `tcp-send`/`tcp-recv`: a bulk stream; the receiver prints bytes and seconds from accept to EOF.
//!
//! Receivers print `listening` on stdout once bound.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Probe,
}

#[derive(Debug, Subcommand)]
enum Probe {
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Payload bytes per datagram (at least 8).
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// Sequence number of the first datagram.
        #[arg(long, default_value_t = 0)]
        first: u64,
    },
    UdpRecv {
        #[arg(long)]
        listen: SocketAddr,
        /// Stop once this many datagrams arrived (plus `linger`).
        #[arg(long)]
        expect: u64,
        /// Give up after this many seconds in total.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Keep listening this many seconds after `expect` datagrams, to catch duplicates.
        #[arg(long, default_value_t = 1)]
        linger: u64,
    },
    /// Sends `bytes` over `flows` TCP connections at once (split evenly); prints `bytes N
    /// seconds S` once the receiver closed them all.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        flows: u32,
        /// TCP congestion control of the flows (`TCP_CONGESTION`, e.g. `cubic`); the
        /// namespace's default if unset.
        #[arg(long)]
        congestion: Option<String>,
    },
    /// Accepts `flows` connections and reads them to the end; prints `bytes N seconds S` (from
    /// the first accept to the last end).
    TcpRecv {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        flows: u32,
    },
    /// `count` sequential HTTP GETs, each on a fresh connection; prints `median_us N` and
    /// `p90_us N` of the time from connect to the end of the response.
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let result = match Args::parse().command {
        Probe::UdpSend {
            to,
            count,
            size,
            first,
        } => udp_send(to, first, count, size),
        Probe::UdpRecv {
            listen,
            expect,
            timeout,
            linger,
        } => udp_recv(
            listen,
            expect,
            Duration::from_secs(timeout),
            Duration::from_secs(linger),
        ),
        Probe::TcpSend {
            to,
            bytes,
            flows,
            congestion,
        } => tcp_send(to, bytes, flows, congestion),
        Probe::TcpRecv { listen, flows } => tcp_recv(listen, flows),
        Probe::HttpGet { to, path, count } => http_get(to, &path, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hoshino-netprobe: {e}");
            ExitCode::from(1)
        }
    }
}

fn udp_send(to: SocketAddr, first: u64, count: u64, size: usize) -> std::io::Result<()> {
    let bind: SocketAddr = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(std::io::Error::other)?;
    let socket = UdpSocket::bind(bind)?;
    let mut payload = vec![0x5a_u8; size.max(8)];
    for seq in first..first.saturating_add(count) {
        if let Some(head) = payload.get_mut(..8) {
            head.copy_from_slice(&seq.to_be_bytes());
        }
        socket.send_to(&payload, to)?;
    }
    println!("sent {count}");
    Ok(())
}

/// Root may exceed rmem_max: a burst delivered from one bundle must not overflow the socket.
fn force_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn udp_recv(
    listen: SocketAddr,
    expect: u64,
    timeout: Duration,
    linger: Duration,
) -> std::io::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    force_receive_buffer(&socket, 16 * 1024 * 1024);
    println!("listening");
    let start = Instant::now();
    let mut deadline = start + timeout;
    let mut received = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut out = std::io::stdout().lock();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        socket.set_read_timeout(Some(deadline - now))?;
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                let seq = buf
                    .get(..8.min(n))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
                match seq {
                    Some(seq) => writeln!(out, "seq {seq}")?,
                    None => writeln!(out, "short {n}")?,
                }
                received += 1;
                if received == expect {
                    deadline = deadline.min(Instant::now() + linger);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e),
        }
    }
    writeln!(out, "done {received}")?;
    out.flush()
}

fn tcp_send(
    to: SocketAddr,
    bytes: u64,
    flows: u32,
    congestion: Option<String>,
) -> std::io::Result<()> {
    let flows = u64::from(flows.max(1));
    let start = Instant::now();
    let senders: Vec<_> = (0..flows)
        .map(|i| {
            let share = bytes / flows + u64::from(i < bytes % flows);
            let congestion = congestion.clone();
            std::thread::spawn(move || send_one(to, share, congestion.as_deref()))
        })
        .collect();
    for s in senders {
        s.join()
            .map_err(|_| std::io::Error::other("a sender thread panicked"))??;
    }
    println!("bytes {bytes} seconds {:.6}", start.elapsed().as_secs_f64());
    Ok(())
}

fn send_one(to: SocketAddr, bytes: u64, congestion: Option<&str>) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {to}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    if let Some(cc) = congestion {
        set_congestion(&stream, cc)?;
    }
    let chunk = vec![0xa5_u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        stream.write_all(chunk.get(..n).unwrap_or(&chunk))?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // Wait for the receiver to close, so the time covers delivery, not just buffering.
    let mut sink = [0u8; 16];
    let _ = stream.read(&mut sink);
    Ok(())
}

/// `TCP_CONGESTION` (root may pick any loaded algorithm, not only the allowed ones).
fn set_congestion(stream: &TcpStream, cc: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the stream's lifetime; the name is a valid buffer of its length.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        Err(std::io::Error::new(
            e.kind(),
            format!("TCP_CONGESTION {cc}: {e}"),
        ))
    }
}

fn tcp_recv(listen: SocketAddr, flows: u32) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening");
    let _ = std::io::stdout().flush();
    let mut readers = Vec::new();
    let mut start = None;
    for _ in 0..flows.max(1) {
        let (stream, _) = listener.accept()?;
        start.get_or_insert_with(Instant::now);
        readers.push(std::thread::spawn(move || read_all(stream)));
    }
    let mut total = 0u64;
    for r in readers {
        total += r
            .join()
            .map_err(|_| std::io::Error::other("a reader thread panicked"))??;
    }
    let seconds = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    println!("bytes {total} seconds {seconds:.6}");
    Ok(())
}

fn read_all(mut stream: TcpStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1024 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

fn http_get(to: SocketAddr, path: &str, count: usize) -> std::io::Result<()> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        to.ip()
    );
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        times.push(start.elapsed());
        if !response.starts_with(b"HTTP/1.1 200") && !response.starts_with(b"HTTP/1.0 200") {
            return Err(std::io::Error::other(format!(
                "not a 200: {}",
                String::from_utf8_lossy(&response[..response.len().min(80)])
            )));
        }
    }
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .map_or(0, |d| d.as_micros())
    };
    println!("median_us {}", at(0.5));
    println!("p90_us {}", at(0.9));
    Ok(())
}
