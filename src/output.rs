//! Lines on stdout that end the process quietly when the reader went away
//! (`phalanx status | head -1`), as a Unix tool ended by SIGPIPE would, instead of panicking
//! the way `println!` does on a closed pipe.

use std::io::Write;

/// `println!` for the CLI's output; see the module docs.
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::output::line(format_args!($($t)*))
    };
}

pub fn line(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}

/// "1 step", "2 steps": a count with its noun, singular or plural.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    let plural = match noun.strip_suffix("batch") {
        Some(_) => format!("{noun}es"),
        None => format!("{noun}s"),
    };
    format!("{n} {}", if n == 1 { noun } else { plural.as_str() })
}

/// An error and its causes on one line, each cause once: a library error that already names its
/// source in its message (as `thiserror`'s `{source}` does) is not followed by that source again.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let named = anyhow::Error::new(io).context("cannot read x: entity not found");
        assert_eq!(super::error_line(&named), "cannot read x: entity not found");
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let bare = anyhow::Error::new(io).context("cannot read x");
        assert_eq!(super::error_line(&bare), "cannot read x: entity not found");
    }

    #[test]
    fn counts_agree_with_their_nouns() {
        assert_eq!(super::count(1u64, "step"), "1 step");
        assert_eq!(super::count(2u64, "step"), "2 steps");
        assert_eq!(super::count(1u64, "micro-batch"), "1 micro-batch");
        assert_eq!(super::count(4u64, "micro-batch"), "4 micro-batches");
    }
}
