//! Library side of the `cellplane` command: the local environment (`up`), the
//! operator commands (`status`, `map`, `certs`, `tenant`), the client commands
//! (`kv`, `lease`, `svc`), the Compose and Kubernetes renderers (`deploy`) and signal handling.
//! The binary only parses options and calls in here.

#![forbid(unsafe_code)]

/// `println!` for command output that a closed stdout ends quietly: `cellplane
/// status | head` must not panic when `head` has read enough.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

/// `print!` with [`outln!`]'s handling of a closed stdout.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

/// Ends the process after a failed write to stdout: silently when the reader
/// went away (as a shell pipeline expects), with a message otherwise.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("cellplane: cannot write to stdout: {e}");
    std::process::exit(1);
}

pub mod bucket_cmd;
pub mod cell_cmd;
pub mod certs_cmd;
pub mod client;
pub mod deploy;
pub mod kv_cmd;
pub mod lease_cmd;
pub mod map_cmd;
pub mod move_cmd;
pub mod signals;
pub mod snapshot_cmd;
pub mod status_cmd;
pub mod svc_cmd;
pub mod tenant_cmd;
pub mod up;
