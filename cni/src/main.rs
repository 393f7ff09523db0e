//! The nodemesh-cni binary: the container runtime runs it with CNI_* in the
//! environment and the network config on stdin.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::process::ExitCode;

use nodemesh_cni::plugin::{self, CniError, DECODE_FAILURE, Env};

/// Network configs are a few KiB; the bound keeps a runaway stdin from
/// growing the process without limit.
const MAX_STDIN_BYTES: u64 = 1024 * 1024;

fn main() -> ExitCode {
    if std::env::args().nth(1).is_some_and(|a| a == "--version") {
        println!("nodemesh-cni {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let mut stdout = io::stdout().lock();
    let result =
        read_stdin().and_then(|stdin| plugin::run(&Env::from_process(), &stdin, &mut stdout));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The spec puts the error result on stdout; stderr is for humans.
            let _ = writeln!(stdout, "{}", e.to_json());
            let _ = stdout.flush();
            eprintln!("nodemesh-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut stdin = Vec::new();
    io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| {
            CniError::new(
                DECODE_FAILURE,
                "cannot read the network configuration from stdin",
            )
            .details(e)
        })?;
    if stdin.len() as u64 > MAX_STDIN_BYTES {
        return Err(CniError::new(
            DECODE_FAILURE,
            "the network configuration on stdin is over 1 MiB",
        ));
    }
    Ok(stdin)
}
