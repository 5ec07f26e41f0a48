//! A TCP fault proxy for loopback tests: services connect to the proxy
//! instead of RabbitMQ or PostgreSQL, and the test breaks the network
//! between them at will, without touching the shared servers.
//!
//! ```text
//!  service ──▶ 127.0.0.1:<proxy port> ──(pump per direction)──▶ upstream (5672 / 5432)
//! ```
//!
//! Faults, switchable at any moment ([`FaultProxy::set_mode`] and friends):
//! - [`Mode::Pass`]: bytes flow untouched.
//! - [`Mode::Refuse`]: every open connection is closed (FIN, as by a server
//!   that stops) and new ones are reset as soon as they are accepted — the
//!   server looks down.
//! - [`Mode::BlackHole`]: nothing is forwarded in either direction and new
//!   connections are accepted but never reach upstream; bytes already sent
//!   wait, like TCP retransmissions, and flow again when the mode changes —
//!   a network partition that heals.
//! - [`Mode::Partition`]: a black hole whose victims never come back: a
//!   connection that had bytes to send during it (or was opened during it)
//!   stays silent for ever after the heal, with no reset — as behind a
//!   firewall that forgot its connections, or during the minutes of TCP
//!   retransmission backoff. Only connections idle throughout, and new
//!   ones, work after the heal: a service must notice and replace the dead.
//! - [`Mode::Latency`]: every chunk is delivered that much later, in order.
//! - [`FaultProxy::cut`]: a one-off reset (RST) of every open connection (a
//!   network blip); [`FaultProxy::close_all`]: a one-off clean close (a
//!   server restart); the mode does not change.
//! - [`FaultProxy::cut_after_commits`] and [`FaultProxy::cut_after_statement`]:
//!   the next `n` PostgreSQL `COMMIT`s (or autocommit statements whose SQL
//!   contains a pattern) are forwarded and executed, then the server's
//!   answer that reports the commit is swallowed and the connection is cut:
//!   a commit whose outcome the client never learns. The answer is found by
//!   following the server's message framing: the first `CommandComplete`
//!   followed by `ReadyForQuery` with status idle (`I`), i.e. no
//!   transaction open any more, so the work is committed.
//!
//! Every connection is bounded in memory (a small queue of chunks per
//! direction), so a black-holed peer is back-pressured rather than buffered
//! without limit. Dropping the proxy closes its listener and every
//! connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything at once.
    Pass,
    /// Reset every connection, open or new.
    Refuse,
    /// Forward nothing (and hold it) until the mode changes.
    BlackHole,
    /// Forward nothing; what was held is never forwarded (see the module).
    Partition,
    /// Forward everything after this delay.
    Latency(Duration),
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on 127.0.0.1 for a proxy to {upstream}: {source}")]
pub struct ProxyError {
    /// The address the proxy would forward to.
    upstream: SocketAddr,
    /// Why binding failed.
    source: std::io::Error,
}

/// Which requests doom their connection to a lost commit.
#[derive(Debug, Clone)]
struct Armed {
    /// Bytes the client's request contains.
    pattern: Vec<u8>,
    /// Cuts still to make.
    remaining: u64,
}

/// Counters of what the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted (including refused ones).
    pub accepted: u64,
    /// Connections reset because the mode was `Refuse` when they arrived.
    pub refused: u64,
    /// Open connections cut by `cut`, `Refuse` or a commit cut.
    pub cut: u64,
    /// Commits forwarded whose answer was swallowed.
    pub commits_cut: u64,
    /// Connections open right now.
    pub open: u64,
}

/// The simple-query message sqlx sends to end a transaction:
/// `'Q'`, length 11 (big-endian, including itself), `"COMMIT\0"`.
const COMMIT_MESSAGE: &[u8] = b"Q\x00\x00\x00\x0bCOMMIT\x00";
/// Bytes of a client chunk kept to find a pattern split across reads.
const TAIL: usize = 256;
/// Chunks queued per direction before the reader stops reading.
const QUEUED_CHUNKS: usize = 256;
/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;

/// State shared by the accept loop, every connection and the handle.
#[derive(Debug)]
struct Shared {
    /// Where connections go.
    upstream: SocketAddr,
    /// The current mode; pumps wait on changes.
    mode: watch::Sender<Mode>,
    /// Cancelled (and replaced) to cut every open connection at once.
    generation: Mutex<CancellationToken>,
    /// Requests whose commit is to be cut.
    armed: Mutex<Option<Armed>>,
    /// Whether the last cut resets connections (else closes them cleanly).
    resets: AtomicBool,
    /// Counters.
    accepted: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    commits_cut: AtomicU64,
    open: AtomicU64,
}

impl Shared {
    fn current_generation(&self) -> CancellationToken {
        self.generation.lock().expect("generation lock").clone()
    }

    /// Ends every open connection: with a reset (`reset`), as a broken
    /// network does, or with a clean close, as a server that goes away does.
    fn cut_all(&self, reset: bool) {
        let mut generation = self.generation.lock().expect("generation lock");
        self.resets.store(reset, Ordering::SeqCst);
        generation.cancel();
        *generation = CancellationToken::new();
    }

    /// Whether a client chunk (after `tail`) dooms its connection; takes
    /// one armed cut if so.
    fn dooms(&self, tail: &[u8], chunk: &[u8]) -> bool {
        let mut armed = self.armed.lock().expect("armed lock");
        let Some(current) = armed.as_mut() else {
            return false;
        };
        if !contains_across(tail, chunk, &current.pattern) {
            return false;
        }
        current.remaining -= 1;
        if current.remaining == 0 {
            *armed = None;
        }
        true
    }
}

/// A running fault proxy; see the module documentation.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where clients connect.
    addr: SocketAddr,
    /// Mode, counters and the cut switch.
    shared: Arc<Shared>,
    /// Stops the accept loop and every connection.
    shutdown: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port, in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| ProxyError { upstream, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ProxyError { upstream, source })?;
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
            generation: Mutex::new(CancellationToken::new()),
            armed: Mutex::new(None),
            resets: AtomicBool::new(true),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            commits_cut: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown.clone()));
        Ok(Self {
            addr,
            shared,
            shutdown,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The upstream this proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Switches mode; `Refuse` also closes every open connection (cleanly,
    /// as a server that stops does; new ones are reset, as a closed port
    /// does).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
        if mode == Mode::Refuse {
            self.shared.cut_all(false);
        }
        tracing::debug!(proxy = %self.addr, upstream = %self.shared.upstream, ?mode, "proxy mode");
    }

    /// Forward everything again (held bytes flow on).
    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }

    /// The server looks down: close everything and reset new connections.
    pub fn refuse(&self) {
        self.set_mode(Mode::Refuse);
    }

    /// A partition: hold every byte until the mode changes.
    pub fn black_hole(&self) {
        self.set_mode(Mode::BlackHole);
    }

    /// Silence every connection that has something to say, for good.
    pub fn partition(&self) {
        self.set_mode(Mode::Partition);
    }

    /// Deliver every chunk `delay` late.
    pub fn latency(&self, delay: Duration) {
        self.set_mode(Mode::Latency(delay));
    }

    /// Resets every open connection once (RST, as a broken network does);
    /// new ones are served per the mode.
    pub fn cut(&self) {
        tracing::debug!(proxy = %self.addr, upstream = %self.shared.upstream, "proxy cuts every connection");
        self.shared.cut_all(true);
    }

    /// Closes every open connection once, cleanly (FIN, as a server that
    /// restarts does); new ones are served per the mode.
    pub fn close_all(&self) {
        tracing::debug!(proxy = %self.addr, upstream = %self.shared.upstream, "proxy closes every connection");
        self.shared.cut_all(false);
    }

    /// Arms the next `count` PostgreSQL `COMMIT`s (on any connection) to be
    /// executed and then cut before the client hears the answer. Replaces
    /// whatever was armed before.
    pub fn cut_after_commits(&self, count: u64) {
        self.arm(COMMIT_MESSAGE.to_vec(), count);
    }

    /// Arms the next `count` requests whose bytes contain `pattern` (e.g.
    /// the SQL of an autocommit statement, sent when a connection prepares
    /// it) to be executed and committed, and then cut before the client
    /// hears the answer. Replaces whatever was armed before.
    pub fn cut_after_statement(&self, pattern: &str, count: u64) {
        self.arm(pattern.as_bytes().to_vec(), count);
    }

    fn arm(&self, pattern: Vec<u8>, count: u64) {
        let armed = (count > 0).then_some(Armed {
            pattern,
            remaining: count,
        });
        *self.shared.armed.lock().expect("armed lock") = armed;
    }

    /// Commit cuts still armed.
    pub fn commit_cuts_pending(&self) -> u64 {
        self.shared
            .armed
            .lock()
            .expect("armed lock")
            .as_ref()
            .map_or(0, |a| a.remaining)
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        ProxyStats {
            accepted: load(&self.shared.accepted),
            refused: load(&self.shared.refused),
            cut: load(&self.shared.cut),
            commits_cut: load(&self.shared.commits_cut),
            open: load(&self.shared.open),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.shared.cut_all(true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // EMFILE and friends: back off a little instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if *shared.mode.borrow() == Mode::Refuse {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            reset(client);
            continue;
        }
        let generation = shared.current_generation();
        tokio::spawn(connection(
            client,
            shared.clone(),
            generation,
            shutdown.clone(),
        ));
    }
}

/// Closes with RST rather than FIN, as a broken network or a dead server would.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// What a connection waiting for traffic to flow got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Traffic flows.
    Yes,
    /// Cut (or refused) meanwhile.
    Cut,
    /// A partition caught it: it stays silent for ever.
    Lost,
}

/// Waits until the mode lets traffic through.
async fn wait_until_open(mode: &mut watch::Receiver<Mode>, cut: &CancellationToken) -> Open {
    let mut partitioned = false;
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Pass | Mode::Latency(_) if partitioned => return Open::Lost,
            Mode::Pass | Mode::Latency(_) => return Open::Yes,
            Mode::Refuse => return Open::Cut,
            Mode::BlackHole => {}
            Mode::Partition => partitioned = true,
        }
        tokio::select! {
            () = cut.cancelled() => return Open::Cut,
            changed = mode.changed() => if changed.is_err() { return Open::Cut },
        }
    }
}

async fn connection(
    client: TcpStream,
    shared: Arc<Shared>,
    generation: CancellationToken,
    shutdown: CancellationToken,
) {
    shared.open.fetch_add(1, Ordering::SeqCst);
    let cut = generation.child_token();
    let stop = shutdown.child_token();
    let mut mode = shared.mode.subscribe();
    let served = async {
        // A black hole swallows the handshake too: the client sees a
        // connection that never answers.
        match wait_until_open(&mut mode, &cut).await {
            Open::Yes => {}
            Open::Cut => return None,
            Open::Lost => {
                // Accepted, never answered: hold the client's end open and
                // swallow what it sends until it gives up.
                let mut client = client;
                let mut sink = vec![0u8; CHUNK];
                loop {
                    tokio::select! {
                        () = cut.cancelled() => return None,
                        read = client.read(&mut sink) => match read {
                            Ok(0) | Err(_) => return None,
                            Ok(_) => {}
                        },
                    }
                }
            }
        }
        let upstream = tokio::select! {
            () = cut.cancelled() => return None,
            upstream = TcpStream::connect(shared.upstream) => upstream.ok()?,
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let (client_read, client_write) = client.into_split();
        let (upstream_read, upstream_write) = upstream.into_split();
        let doomed = Arc::new(AtomicBool::new(false));
        let to_server = pump(
            client_read,
            upstream_write,
            shared.clone(),
            generation.clone(),
            cut.clone(),
            Direction::ToServer {
                doomed: doomed.clone(),
            },
        );
        let to_client = pump(
            upstream_read,
            client_write,
            shared.clone(),
            generation.clone(),
            cut.clone(),
            Direction::ToClient { doomed },
        );
        let (a, b) = tokio::join!(to_server, to_client);
        Some((a, b))
    };
    let result = tokio::select! {
        () = stop.cancelled() => None,
        result = served => result,
    };
    // Both halves are dropped by now; a cut drops them with linger 0 below.
    let was_cut = cut.is_cancelled() || result.is_none();
    if was_cut && !stop.is_cancelled() {
        shared.cut.fetch_add(1, Ordering::SeqCst);
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

/// Which way a pump forwards, with what it needs for commit cuts.
enum Direction {
    /// Client → server: looks for COMMIT messages.
    ToServer {
        /// Set when a commit on this connection is to be cut.
        doomed: Arc<AtomicBool>,
    },
    /// Server → client: swallows the answer that reports a doomed commit,
    /// then cuts.
    ToClient {
        /// Set by the other direction.
        doomed: Arc<AtomicBool>,
    },
}

/// Forwards one direction until EOF, an error or a cut. On a cut both
/// sockets are reset (linger 0).
async fn pump(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    shared: Arc<Shared>,
    generation: CancellationToken,
    cut: CancellationToken,
    direction: Direction,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let writer = tokio::spawn(deliver(rx, to, shared.mode.subscribe(), cut.clone()));
    let mut buf = vec![0u8; CHUNK];
    // The tail of the previous chunk, so a pattern split across reads is found.
    let mut tail: Vec<u8> = Vec::new();
    let mut framer = Framer::default();
    let mut completed_since_ready = false;
    loop {
        let n = tokio::select! {
            () = cut.cancelled() => break,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let chunk = &buf[..n];
        match &direction {
            Direction::ToServer { doomed } => {
                if !doomed.load(Ordering::SeqCst) && shared.dooms(&tail, chunk) {
                    // Set before forwarding, so the answer is swallowed.
                    doomed.store(true, Ordering::SeqCst);
                    tracing::debug!(proxy_upstream = %shared.upstream, "forwarding a request whose committed answer will be swallowed");
                }
                remember_tail(&mut tail, chunk, TAIL);
            }
            Direction::ToClient { doomed } => {
                let mut commits_here = false;
                for (kind, status) in framer.feed(chunk) {
                    match kind {
                        b'C' => completed_since_ready = true,
                        b'Z' => {
                            if completed_since_ready && status == b'I' {
                                commits_here = true;
                            }
                            completed_since_ready = false;
                        }
                        _ => {}
                    }
                }
                if commits_here && doomed.load(Ordering::SeqCst) {
                    // The server committed and said so; the client never hears it.
                    shared.commits_cut.fetch_add(1, Ordering::SeqCst);
                    cut.cancel();
                    break;
                }
            }
        }
        let delay = match *shared.mode.borrow() {
            Mode::Latency(delay) => delay,
            _ => Duration::ZERO,
        };
        if tx
            .send((Instant::now() + delay, chunk.to_vec()))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    if cut.is_cancelled() {
        // This direction reads one socket and writes the other; a reset
        // makes both peers see a broken connection, else they see a close.
        // A cut of this connection alone (a lost commit, a write error)
        // resets it; a cut of all follows that cut's style.
        let reset = !generation.is_cancelled() || shared.resets.load(Ordering::SeqCst);
        if reset {
            let _ = from.as_ref().set_zero_linger();
        }
        if let Ok(Some(to)) = writer.await
            && reset
        {
            let _ = to.as_ref().set_zero_linger();
        }
    } else {
        // EOF from this side: let queued bytes go, then half-close.
        let _ = writer.await;
    }
}

/// Writes queued chunks at their delivery time, holding them while the
/// mode is a black hole. Returns the write half if the connection was cut.
async fn deliver(
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    cut: CancellationToken,
) -> Option<OwnedWriteHalf> {
    loop {
        let next = tokio::select! {
            () = cut.cancelled() => return Some(to),
            next = rx.recv() => next,
        };
        let Some((at, chunk)) = next else {
            let _ = to.shutdown().await;
            return None;
        };
        tokio::select! {
            () = cut.cancelled() => return Some(to),
            () = tokio::time::sleep_until(at) => {}
        }
        match wait_until_open(&mut mode, &cut).await {
            Open::Yes => {}
            Open::Cut => {
                cut.cancel();
                return Some(to);
            }
            Open::Lost => {
                // Swallow everything that comes for this direction, for ever.
                loop {
                    tokio::select! {
                        () = cut.cancelled() => return Some(to),
                        next = rx.recv() => { next.as_ref()?; }
                    }
                }
            }
        }
        let written = tokio::select! {
            () = cut.cancelled() => return Some(to),
            written = to.write_all(&chunk) => written,
        };
        if written.is_err() {
            cut.cancel();
            return Some(to);
        }
    }
}

/// Follows the framing of PostgreSQL's backend messages (a type byte and a
/// big-endian length that counts itself) across chunks, reporting each
/// message's type and the first byte of its body (the transaction status
/// of `ReadyForQuery`). A stream that does not frame (it never should) is
/// given up on: nothing is reported any more.
#[derive(Debug, Default)]
struct Framer {
    /// Header bytes of the message being read (type + length).
    header: Vec<u8>,
    /// Body bytes of the current message still to skip.
    remaining: usize,
    /// Type of the current message, while its body is read.
    current: u8,
    /// Whether the current body's first byte is still to come.
    at_body_start: bool,
    /// The stream stopped making sense.
    lost: bool,
}

impl Framer {
    fn feed(&mut self, mut data: &[u8]) -> Vec<(u8, u8)> {
        let mut seen = Vec::new();
        while !data.is_empty() && !self.lost {
            if self.remaining == 0 {
                let want = 5 - self.header.len();
                let take = want.min(data.len());
                self.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header.len() < 5 {
                    break;
                }
                let kind = self.header[0];
                let length = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.header.clear();
                if !(4..=1 << 30).contains(&length) {
                    self.lost = true;
                    break;
                }
                self.remaining = length - 4;
                self.current = kind;
                self.at_body_start = true;
                if self.remaining == 0 {
                    seen.push((kind, 0));
                }
            } else {
                if self.at_body_start {
                    seen.push((self.current, data[0]));
                    self.at_body_start = false;
                }
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                data = &data[take..];
            }
        }
        seen
    }
}

/// Whether `pattern` occurs in `tail ++ chunk` (ending inside `chunk`).
fn contains_across(tail: &[u8], chunk: &[u8], pattern: &[u8]) -> bool {
    if chunk.windows(pattern.len()).any(|w| w == pattern) {
        return true;
    }
    if tail.is_empty() {
        return false;
    }
    let head = &chunk[..chunk.len().min(pattern.len() - 1)];
    let joined: Vec<u8> = tail.iter().chain(head).copied().collect();
    joined.windows(pattern.len()).any(|w| w == pattern)
}

/// Keeps the last `keep` bytes seen.
fn remember_tail(tail: &mut Vec<u8>, chunk: &[u8], keep: usize) {
    tail.extend_from_slice(chunk);
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_found_across_chunk_boundaries() {
        let mut tail = Vec::new();
        let first = b"xxxxQ\x00\x00\x00\x0bCOM";
        assert!(!contains_across(&tail, first, COMMIT_MESSAGE));
        remember_tail(&mut tail, first, TAIL);
        assert!(contains_across(&tail, b"MIT\x00yy", COMMIT_MESSAGE));
        assert!(contains_across(&[], COMMIT_MESSAGE, COMMIT_MESSAGE));
        assert!(!contains_across(&tail, b"nothing", COMMIT_MESSAGE));
    }

    #[test]
    fn backend_messages_are_framed_across_chunks() {
        // CommandComplete "COMMIT", then ReadyForQuery idle, split oddly.
        let stream = b"C\x00\x00\x00\x0bCOMMIT\x00Z\x00\x00\x00\x05I";
        let mut framer = Framer::default();
        let mut seen = framer.feed(&stream[..3]);
        seen.extend(framer.feed(&stream[3..13]));
        seen.extend(framer.feed(&stream[13..]));
        assert_eq!(seen, vec![(b'C', b'C'), (b'Z', b'I')]);
        assert!(Framer::default().feed(b"X\x00\x00\x00\x01").is_empty());
    }
}
