//! Child processes that a test, failing or not, never leaves behind.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process, killed and reaped when dropped (a panicking test included). Started with
/// [`Proc::collect`], the JSON lines of its stdout are kept as they come.
pub struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Option<Mutex<Receiver<String>>>,
}

impl Proc {
    /// Starts `cmd` with the stdio it was given.
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc {
            child: cmd.spawn().expect("spawn"),
            lines: Arc::default(),
            raw: None,
        }
    }

    /// Starts `cmd` with its stdout read line by line (JSON lines kept for [`Proc::wait_line`],
    /// every line for [`Proc::next_line`]) and its stderr discarded.
    pub fn collect(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    l.lock().unwrap().push(v);
                }
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            lines,
            raw: Some(Mutex::new(rx)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The JSON lines of its stdout so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// The next line of its stdout, JSON or not, if one comes within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        let raw = self.raw.as_ref().expect("stdout is collected");
        raw.lock().unwrap().recv_timeout(timeout).ok()
    }

    /// The first JSON line of its stdout for which `pred` holds, waited for up to `timeout`.
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)) {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Its exit code if it exits within `timeout` (None for a signal, or still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for the exit, with all of its piped stderr (read to its end first, as
    /// `Child::wait_with_output` does, so that a full pipe cannot stall it).
    pub fn wait_with_stderr(&mut self) -> (ExitStatus, String) {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let mut b = Vec::new();
            let _ = e.read_to_end(&mut b);
            err = String::from_utf8_lossy(&b).into_owned();
        }
        (self.wait(), err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
