//! Control and metrics connections, served on a thread of their own.
//!
//! The datapath's thread must never wait on a client. It used to read each control request
//! with a 200 ms timeout and write each answer with a 1 s one, so ten clients that connected
//! and sent nothing held every port still for two seconds (a ping's round trip went from
//! 0.1 ms to 2 s), and any local user could do that through the loopback metrics port.
//!
//! Now this thread does every client's I/O: it accepts, reads a request line (or an HTTP
//! scrape) without blocking, each connection against its own deadline, and hands the request
//! to the datapath's thread through a channel, waking it. That thread answers between two
//! turns, at most [`MAX_REQUESTS_PER_TURN`] a turn, and wakes this one, which writes the
//! answer out as the client reads it. An answer that has to wait for other threads (the
//! workers' `conntrack` rows) comes back as [`Answer::Later`] and is made on a short-lived
//! thread of its own, so that it holds up no other client. Each socket serves at most
//! [`MAX_CONNECTIONS`] clients at once (scrapers, which any local user may open, cannot
//! crowd out control clients); more wait in its backlog.
//!
//! The thread is spawned when the datapath starts running, after its seccomp filter is in
//! place, so it runs under the filter too.

use super::sys;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a client may go without reading any of its answer (a large answer, such as a
/// capture's frames, takes as long as the client keeps reading, up to [`MAX_LIFETIME`]).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection may last in all: a client reading a byte a second does not keep
/// its place for ever.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);
/// How soon accepting is tried again after it failed (out of file descriptors, say) with
/// clients perhaps left in the backlog.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a request may wait for the datapath's thread (which answers between turns, so
/// this is only reached if it is stuck or stopping). A request given up on stays queued: an
/// `attach` or `detach` is still carried out, with nobody left to tell.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest control request line.
const MAX_REQUEST: usize = 4096;
/// Connections served at once from each socket (the control socket's and the metrics
/// port's, so that scrapers, which any local user may open, never crowd out control
/// clients); more wait in the socket's backlog until one is done.
pub const MAX_CONNECTIONS: usize = 32;
/// Requests the datapath's thread answers between two turns.
pub const MAX_REQUESTS_PER_TURN: usize = 16;
/// What the metrics port answers with, whatever it is asked.
pub const METRICS_REQUEST: &str = "metrics";

const CONTROL: Token = Token(usize::MAX - 1);
const METRICS: Token = Token(usize::MAX - 2);
const WAKER: Token = Token(usize::MAX - 3);

/// A control request's answer.
pub enum Answer {
    Now(String),
    /// To be made off the datapath's thread (it waits for other threads).
    Later(Box<dyn FnOnce() -> String + Send>),
}

impl From<String> for Answer {
    fn from(text: String) -> Answer {
        Answer::Now(text)
    }
}

impl From<&str> for Answer {
    fn from(text: &str) -> Answer {
        Answer::Now(text.to_string())
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Now(text) => f.debug_tuple("Now").field(text).finish(),
            Answer::Later(_) => f.write_str("Later(..)"),
        }
    }
}

/// A request for the datapath's thread, and where its answer goes.
#[derive(Debug)]
pub struct Request {
    pub line: String,
    pub reply: Sender<Answer>,
}

/// The listening sockets, before the thread takes them.
#[derive(Debug, Default)]
pub struct Listeners {
    pub control: Option<UnixListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub fn is_empty(&self) -> bool {
        self.control.is_none() && self.metrics.is_none()
    }
}

/// The running control thread; stopped and joined when dropped.
#[derive(Debug)]
pub struct ControlThread {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlThread {
    /// Serves `listeners` on a new thread; requests come out of the receiver, and
    /// `datapath` is woken for each.
    pub fn spawn(
        mut listeners: Listeners,
        datapath: Arc<Waker>,
    ) -> io::Result<(ControlThread, Receiver<Request>)> {
        let poll = Poll::new()?;
        if let Some(listener) = &mut listeners.control {
            poll.registry()
                .register(listener, CONTROL, Interest::READABLE)?;
        }
        if let Some(listener) = &mut listeners.metrics {
            poll.registry()
                .register(listener, METRICS, Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (requests, incoming) = crossbeam_channel::unbounded();
        let server = Server {
            poll,
            accept_retry: None,
            own: waker.clone(),
            listeners,
            connections: Vec::new(),
            requests,
            datapath,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("sy-control".into())
            .spawn(move || server.run())?;
        Ok((
            ControlThread {
                waker,
                stop,
                thread: Some(thread),
            },
            incoming,
        ))
    }

    /// Answers are waiting to be written.
    pub fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// What [`ControlThread::wake`] uses, for another thread.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    /// Whether the client may control this process (a metrics scrape only reads).
    fn may_control(&self) -> bool {
        match self {
            Stream::Unix(s) => sys::peer_may_control(s.as_fd()),
            Stream::Tcp(_) => true,
        }
    }

    fn is_metrics(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }
}

enum Stage {
    Reading,
    Waiting(Receiver<Answer>),
    Writing,
    Done,
}

struct Connection {
    opened: Instant,
    stream: Stream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    stage: Stage,
}

/// Whether an accept that failed with `e` may be tried again at once (the next connection
/// may be fine): interrupted, or a client that gave up before it was accepted.
fn retry_accept(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

struct Server {
    poll: Poll,
    /// When accepting is tried again after an error ([`ACCEPT_RETRY`]).
    accept_retry: Option<Instant>,
    /// This thread's own waker, for answers made on a thread of their own.
    own: Arc<Waker>,
    listeners: Listeners,
    connections: Vec<Connection>,
    requests: Sender<Request>,
    datapath: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = (self.connections.iter())
                .map(|c| c.deadline.min(c.opened + MAX_LIFETIME))
                .chain(self.accept_retry)
                .map(|at| at.saturating_duration_since(now))
                .min();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("switchyard: control thread: poll: {e}; no more control requests");
                    return;
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            // Both sockets are tried at every wakeup, not only on their events: a client left
            // in the backlog while all places were taken raises no new one.
            self.accept_all();
            // A handful of connections at most: each is moved on, whatever woke the thread.
            let now = Instant::now();
            for connection in &mut self.connections {
                connection.advance(now, &self.requests, &self.datapath, &self.own);
            }
            self.connections.retain_mut(|c| {
                let keep = !matches!(c.stage, Stage::Done);
                if !keep {
                    let _ = self.poll.registry().deregister(c.stream.source());
                }
                keep
            });
            // Places freed just now go to clients waiting in the backlog at once (a new
            // connection's registration wakes the next poll, which moves it on).
            self.accept_all();
        }
    }

    /// Takes the clients waiting on each socket, while it has places for them.
    fn accept_all(&mut self) {
        self.accept_retry = None;
        for metrics in [false, true] {
            while self.served(metrics) < MAX_CONNECTIONS {
                let accepted = match (metrics, &self.listeners) {
                    (
                        false,
                        Listeners {
                            control: Some(l), ..
                        },
                    ) => l.accept().map(|(s, _)| Stream::Unix(s)),
                    (
                        true,
                        Listeners {
                            metrics: Some(l), ..
                        },
                    ) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                    _ => break,
                };
                match accepted {
                    Ok(stream) => self.add(stream),
                    Err(e) if retry_accept(&e) => {}
                    Err(e) => {
                        self.note_accept_error(&e);
                        break;
                    }
                }
            }
        }
    }

    /// Connections open from the metrics port (`true`) or the control socket.
    fn served(&self, metrics: bool) -> usize {
        (self.connections.iter())
            .filter(|c| c.stream.is_metrics() == metrics)
            .count()
    }

    /// An accept failed with `e`: unless the backlog is empty, it is tried again soon.
    fn note_accept_error(&mut self, e: &io::Error) {
        if e.kind() != io::ErrorKind::WouldBlock {
            self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
        }
    }

    /// Takes a new client.
    fn add(&mut self, mut stream: Stream) {
        let token = Token(self.connections.len());
        // Tokens only say "something happened": every connection is moved on at each wakeup.
        if (self.poll.registry())
            .register(
                stream.source(),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return;
        }
        let now = Instant::now();
        self.connections.push(Connection {
            opened: now,
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            deadline: now + READ_TIMEOUT,
            stage: Stage::Reading,
        });
    }
}

impl Connection {
    /// Moves this connection as far as it can go without waiting.
    fn advance(
        &mut self,
        now: Instant,
        requests: &Sender<Request>,
        datapath: &Waker,
        own: &Arc<Waker>,
    ) {
        if now >= self.opened + MAX_LIFETIME {
            self.stage = Stage::Done;
        }
        if let Stage::Reading = self.stage {
            match self.read_request() {
                Ok(true) => self.ask(now, requests, datapath),
                Ok(false) if now >= self.deadline && self.stream.is_metrics() => {
                    // A scrape is answered whatever it sent, as a scraper expects.
                    self.ask(now, requests, datapath);
                }
                Ok(false) if now >= self.deadline => self.stage = Stage::Done,
                Ok(false) => {}
                Err(_) => self.stage = Stage::Done,
            }
        }
        if let Stage::Waiting(answers) = &self.stage {
            match answers.try_recv() {
                Ok(Answer::Now(text)) => self.answer_with(text, now),
                Ok(Answer::Later(make)) => self.make_later(make, now, own),
                Err(TryRecvError::Empty) if now < self.deadline => {}
                Err(_) => self.stage = Stage::Done,
            }
        }
        if let Stage::Writing = self.stage {
            self.discard_input();
            loop {
                if self.written == self.output.len() {
                    self.stage = Stage::Done;
                    break;
                }
                match self.stream.write(&self.output[self.written..]) {
                    Ok(0) => {
                        self.stage = Stage::Done;
                        break;
                    }
                    Ok(n) => {
                        self.written += n;
                        self.deadline = now + WRITE_TIMEOUT;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if now >= self.deadline {
                            self.stage = Stage::Done;
                        }
                        break;
                    }
                    Err(_) => {
                        self.stage = Stage::Done;
                        break;
                    }
                }
            }
        }
    }

    /// Reads what the client sent; whether the request is complete: a line, or for a scrape
    /// the end of the HTTP header; the end of the stream; the longest request (what follows
    /// is read and dropped while the answer is written: [`Connection::discard_input`]).
    fn read_request(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    let room = MAX_REQUEST - self.input.len();
                    self.input.extend_from_slice(&chunk[..n.min(room)]);
                    if self.input.len() >= MAX_REQUEST
                        || (self.request_complete() && n < chunk.len())
                    {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(self.request_complete());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and drops what the client sent past its request, so that closing does not
    /// reset the connection under the answer (a bounded amount each time).
    fn discard_input(&mut self) {
        let mut chunk = [0u8; 1024];
        for _ in 0..16 {
            match self.stream.read(&mut chunk) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }

    fn request_complete(&self) -> bool {
        let input = &self.input;
        input.len() >= MAX_REQUEST
            || if self.stream.is_metrics() {
                input.windows(4).any(|w| w == b"\r\n\r\n") || input.windows(2).any(|w| w == b"\n\n")
            } else {
                input.contains(&b'\n')
            }
    }

    /// Has `make` make the answer on a thread of its own (it waits for other threads), so
    /// that other clients are not held up meanwhile; the answer comes back as a `Now`.
    fn make_later(
        &mut self,
        make: Box<dyn FnOnce() -> String + Send>,
        now: Instant,
        own: &Arc<Waker>,
    ) {
        let (reply, answers) = crossbeam_channel::bounded(1);
        let own = own.clone();
        let spawned = std::thread::Builder::new()
            .name("sy-control-answer".into())
            .spawn(move || {
                let _ = reply.send(Answer::Now(make()));
                let _ = own.wake();
            });
        if spawned.is_err() {
            self.stage = Stage::Done;
            return;
        }
        self.deadline = now + ANSWER_TIMEOUT;
        self.stage = Stage::Waiting(answers);
    }

    /// Sends the request to the datapath's thread (a refusal is answered here).
    fn ask(&mut self, now: Instant, requests: &Sender<Request>, datapath: &Waker) {
        if !self.stream.may_control() {
            // Read first, so that the refusal is not lost to a reset.
            self.answer_with("error: permission denied: another user\n".into(), now);
            return;
        }
        let line = if self.stream.is_metrics() {
            METRICS_REQUEST.to_string()
        } else {
            let end = (self.input.iter())
                .position(|&b| b == b'\n')
                .unwrap_or(self.input.len());
            String::from_utf8_lossy(&self.input[..end])
                .trim()
                .to_string()
        };
        let (reply, answers) = crossbeam_channel::bounded(1);
        if requests.send(Request { line, reply }).is_err() {
            self.stage = Stage::Done;
            return;
        }
        let _ = datapath.wake();
        self.deadline = now + ANSWER_TIMEOUT;
        self.stage = Stage::Waiting(answers);
    }

    fn answer_with(&mut self, text: String, now: Instant) {
        self.output = if self.stream.is_metrics() {
            format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            )
            .into_bytes()
        } else {
            text.into_bytes()
        };
        self.deadline = now + WRITE_TIMEOUT;
        self.stage = Stage::Writing;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A stand-in for the datapath's thread: answers every request with `answer` (then
    /// wakes the control thread, as the datapath does), and counts them.
    fn engine(
        control: &ControlThread,
        incoming: Receiver<Request>,
        answer: impl Fn(&str) -> Answer + Send + 'static,
    ) -> JoinHandle<usize> {
        let waker = control.waker();
        std::thread::spawn(move || {
            let mut served = 0;
            while let Ok(request) = incoming.recv() {
                served += 1;
                let _ = request.reply.send(answer(&request.line));
                let _ = waker.wake();
            }
            served
        })
    }

    fn datapath_waker() -> (Poll, Arc<Waker>) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        (poll, waker)
    }

    fn ask(path: &std::path::Path, line: &str) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn clients_that_send_nothing_hold_up_neither_the_others_nor_the_datapath() {
        let spawned = spawn_with("idle", false, |line| format!("you said {line}\n").into());
        let path = spawned.path.clone();
        let idle: Vec<_> = (0..20)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        let started = Instant::now();
        assert_eq!(ask(&path, "stats\n"), "you said stats\n");
        assert!(
            started.elapsed() < READ_TIMEOUT,
            "an answer behind 20 idle clients took {:?}",
            started.elapsed()
        );
        // The idle clients are dropped at their deadline, with no answer.
        std::thread::sleep(READ_TIMEOUT * 2);
        for mut client in idle {
            let mut out = String::new();
            client.read_to_string(&mut out).unwrap();
            assert_eq!(out, "");
        }
        // A request without its newline is answered when the client ends its side.
        let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        stream.write_all(b"fdb").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert_eq!(out, "you said fdb\n");
        assert_eq!(spawned.stop(), 2);
    }

    #[test]
    fn a_slow_answer_holds_up_no_other_client_and_a_scrape_gets_http() {
        let spawned = spawn_with("later", true, |line| match line {
            "slow" => Answer::Later(Box::new(|| {
                std::thread::sleep(Duration::from_millis(400));
                std::thread::current().name().unwrap_or("?").to_string() + "\n"
            })),
            other => format!("{other} 1\n").into(),
        });
        let (path, metrics_addr) = (spawned.path.clone(), spawned.metrics.unwrap());
        // A slow answer is made on a thread of its own, and holds up no other client.
        let slow = std::thread::spawn({
            let path = path.clone();
            move || ask(&path, "slow\n")
        });
        std::thread::sleep(Duration::from_millis(50));
        let asked = Instant::now();
        assert_eq!(ask(&path, "fast\n"), "fast 1\n");
        assert!(asked.elapsed() < Duration::from_millis(200));
        assert_eq!(slow.join().unwrap(), "sy-control-answer\n");
        // An idle scraper does not hold up another one.
        let _idle = std::net::TcpStream::connect(metrics_addr).unwrap();
        let mut scrape = std::net::TcpStream::connect(metrics_addr).unwrap();
        scrape.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut reader = BufReader::new(scrape);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert_eq!(status, "HTTP/1.0 200 OK\r\n");
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(rest.ends_with("\r\n\r\nmetrics 1\n"), "{rest:?}");
        spawned.stop();
    }

    /// A control thread on a unix socket (and a metrics port, if `metrics`) in a directory of
    /// its own, with a stand-in datapath answering with `answer`.
    struct Spawned {
        thread: ControlThread,
        path: std::path::PathBuf,
        metrics: Option<std::net::SocketAddr>,
        /// How many requests the stand-in answered, once the thread is dropped.
        served: JoinHandle<usize>,
    }

    fn spawn_with(
        name: &str,
        metrics: bool,
        answer: impl Fn(&str) -> Answer + Send + 'static,
    ) -> Spawned {
        let dir = std::env::temp_dir().join(format!("sy-control-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let listener = super::super::bind_unix(&path, Some(0o600)).unwrap();
        let metrics = metrics.then(|| TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap());
        let addr = metrics.as_ref().map(|m| m.local_addr().unwrap());
        let (_poll, waker) = datapath_waker();
        let listeners = Listeners {
            control: Some(UnixListener::from_std(listener)),
            metrics,
        };
        let (thread, incoming) = ControlThread::spawn(listeners, waker).unwrap();
        let served = engine(&thread, incoming, answer);
        Spawned {
            thread,
            path,
            metrics: addr,
            served,
        }
    }

    impl Spawned {
        /// Stops the thread, removes its directory; the requests the stand-in answered.
        fn stop(self) -> usize {
            drop(self.thread);
            let served = self.served.join().unwrap();
            let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
            served
        }
    }

    /// Scrapers (any local user may open them) cannot crowd out control clients, and a
    /// client past the cap waits its turn.
    #[test]
    fn each_socket_has_its_own_cap_and_a_client_past_it_waits_its_turn() {
        let spawned = spawn_with("cap", true, |line| format!("{line}!\n").into());
        let (path, addr) = (spawned.path.clone(), spawned.metrics);
        let scrapers: Vec<_> = (0..MAX_CONNECTIONS + 8)
            .map(|_| std::net::TcpStream::connect(addr.unwrap()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ask(&path, "stats\n"), "stats!\n");
        let idle: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let asked = Instant::now();
        assert_eq!(ask(&path, "stats\n"), "stats!\n");
        assert!(asked.elapsed() >= READ_TIMEOUT / 2, "no wait past the cap");
        drop((idle, scrapers));
        spawned.stop();
    }

    /// A client that came while every place was taken is served as soon as places free,
    /// even when they all free at once and no other client comes to wake the thread.
    #[test]
    fn a_client_waiting_past_the_cap_is_served_when_the_places_free() {
        let spawned = spawn_with("wait", false, |line| format!("{line}!\n").into());
        let path = spawned.path.clone();
        let idle: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let (done, answered) = crossbeam_channel::bounded(1);
        let asker = path.clone();
        std::thread::spawn(move || {
            let _ = done.send(ask(&asker, "stats\n"));
        });
        assert_eq!(
            answered.recv_timeout(READ_TIMEOUT * 10).unwrap(),
            "stats!\n"
        );
        drop(idle);
        spawned.stop();
    }

    /// A large answer (a capture's frames) goes out whole to a client that reads it slowly,
    /// as long as it keeps reading.
    #[test]
    fn a_large_answer_reaches_a_slow_reader_whole() {
        let big = "x".repeat(1 << 20) + "\n";
        let spawned = spawn_with("big", false, move |_| big.clone().into());
        let path = spawned.path.clone();
        let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        stream.write_all(b"capture read 0\n").unwrap();
        let started = Instant::now();
        let mut got = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            std::thread::sleep(Duration::from_millis(100));
            match stream.read(&mut chunk).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        assert!(started.elapsed() > WRITE_TIMEOUT, "the reader was not slow");
        assert_eq!(got, (1 << 20) + 1);
        spawned.stop();
    }
}
