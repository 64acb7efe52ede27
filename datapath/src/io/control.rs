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
//! workers' `conntrack` rows) comes back as [`Answer::Later`] and waits here.
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
/// How long a client may take to read its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a request may wait for the datapath's thread (which answers between turns, so
/// this is only reached if it is stuck or stopping).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest control request line.
const MAX_REQUEST: usize = 4096;
/// Connections served at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
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
    stream: Stream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    stage: Stage,
}

struct Server {
    poll: Poll,
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
                .map(|c| c.deadline.saturating_duration_since(now))
                .min();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let (mut control, mut metrics) = (false, false);
            for event in events.iter() {
                match event.token() {
                    CONTROL => control = true,
                    METRICS => metrics = true,
                    _ => {}
                }
            }
            if control {
                self.accept_control();
            }
            if metrics {
                self.accept_metrics();
            }
            // A handful of connections at most: each is moved on, whatever woke the thread.
            let now = Instant::now();
            for connection in &mut self.connections {
                connection.advance(now, &self.requests, &self.datapath);
            }
            self.connections.retain_mut(|c| {
                let keep = !matches!(c.stage, Stage::Done);
                if !keep {
                    let _ = self.poll.registry().deregister(c.stream.source());
                }
                keep
            });
        }
    }

    fn accept_control(&mut self) {
        while let Some(listener) = &self.listeners.control {
            match listener.accept() {
                Ok((stream, _)) => self.add(Stream::Unix(stream)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn accept_metrics(&mut self) {
        while let Some(listener) = &self.listeners.metrics {
            match listener.accept() {
                Ok((stream, _)) => self.add(Stream::Tcp(stream)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Takes a new client, unless as many are served already (it is closed).
    fn add(&mut self, mut stream: Stream) {
        if self.connections.len() >= MAX_CONNECTIONS {
            return;
        }
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
        self.connections.push(Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            deadline: Instant::now() + READ_TIMEOUT,
            stage: Stage::Reading,
        });
    }
}

impl Connection {
    /// Moves this connection as far as it can go without waiting.
    fn advance(&mut self, now: Instant, requests: &Sender<Request>, datapath: &Waker) {
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
                Ok(answer) => {
                    let text = match answer {
                        Answer::Now(text) => text,
                        Answer::Later(make) => make(),
                    };
                    self.answer_with(text, Instant::now());
                }
                Err(TryRecvError::Empty) if now < self.deadline => {}
                Err(_) => self.stage = Stage::Done,
            }
        }
        if let Stage::Writing = self.stage {
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
                    Ok(n) => self.written += n,
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

    /// Reads what the client sent; whether the request is complete (a line, the end of the
    /// stream, the longest request; for a scrape, anything).
    fn read_request(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    let room = MAX_REQUEST - self.input.len();
                    self.input.extend_from_slice(&chunk[..n.min(room)]);
                    if self.stream.is_metrics()
                        || self.input.contains(&b'\n')
                        || self.input.len() >= MAX_REQUEST
                    {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
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
        let dir = std::env::temp_dir().join(format!("sy-control-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let listener = super::super::bind_unix(&path, Some(0o600)).unwrap();
        let (_poll, waker) = datapath_waker();
        let listeners = Listeners {
            control: Some(UnixListener::from_std(listener)),
            metrics: None,
        };
        let (thread, incoming) = ControlThread::spawn(listeners, waker).unwrap();
        let served = engine(&thread, incoming, |line| {
            format!("you said {line}\n").into()
        });
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
        drop(thread);
        assert_eq!(served.join().unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_later_answer_is_made_on_the_control_thread_and_a_scrape_gets_http() {
        let dir = std::env::temp_dir().join(format!("sy-control-later-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let listener = super::super::bind_unix(&path, Some(0o600)).unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let (_poll, waker) = datapath_waker();
        let listeners = Listeners {
            control: Some(UnixListener::from_std(listener)),
            metrics: Some(metrics),
        };
        let (thread, incoming) = ControlThread::spawn(listeners, waker).unwrap();
        let _served = engine(&thread, incoming, |line| match line {
            "slow" => Answer::Later(Box::new(|| {
                std::thread::sleep(Duration::from_millis(50));
                std::thread::current().name().unwrap_or("?").to_string() + "\n"
            })),
            other => format!("{other} 1\n").into(),
        });
        assert_eq!(ask(&path, "slow\n"), "sy-control\n");
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
        drop(thread);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
