//! A panic is reported at once; its backtrace is resolved on a thread of its own.
//!
//! Resolving a backtrace reads the binary's debug information: about 0.2 s here on a quiet
//! machine, seconds on a loaded one. The default hook does it on the panicking thread before
//! the unwinding starts, so a compute actor that panics holds its supervisor, its peers (who
//! wait in a collective) and the coordinator for that long, and a rank that could restart in
//! place in a few milliseconds is evicted for being slow (S-4).

use std::backtrace::Backtrace;
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicBool, Ordering};

/// A backtrace is being resolved. Taking one waits on the same lock the resolution holds, so
/// a second panic meanwhile goes without one rather than wait.
static RESOLVING: AtomicBool = AtomicBool::new(false);

/// Replaces the default panic hook: the same first lines, and a backtrace when
/// `RUST_BACKTRACE` asks for one (as the default hook reads it).
pub fn install() {
    std::panic::set_hook(Box::new(report));
}

fn report(info: &PanicHookInfo<'_>) {
    let current = std::thread::current();
    let thread = current.name().unwrap_or("<unnamed>");
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    eprintln!(
        "thread '{thread}' panicked at {location}:\n{}",
        message(info)
    );
    if !wanted() {
        return;
    }
    if RESOLVING.swap(true, Ordering::SeqCst) {
        eprintln!("(no backtrace: another panic's is being resolved)");
        return;
    }
    // Taking the frames is cheap; naming them is what takes time.
    let trace = Backtrace::force_capture();
    let name = thread.to_string();
    let print = move || {
        // Named before the write: `eprintln!` holds the stderr lock while it formats, and every
        // log line of the process (the supervisor's restart, the compute's) would wait on it.
        let named = trace.to_string();
        RESOLVING.store(false, Ordering::SeqCst);
        eprintln!("stack backtrace of the panic in thread '{name}':\n{named}");
    };
    // The main thread's panic ends the process: a thread of its own would not finish.
    if thread == "main" {
        print();
    } else if std::thread::Builder::new()
        .name("panic-backtrace".into())
        .spawn(print)
        .is_err()
    {
        RESOLVING.store(false, Ordering::SeqCst);
    }
}

fn wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

fn message(info: &PanicHookInfo<'_>) -> String {
    let p = info.payload();
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "Box<dyn Any>".into())
}
