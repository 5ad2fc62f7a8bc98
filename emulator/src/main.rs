//! `listsync-emulator`: the provider emulator as a standalone process, for `make demo`
//! and manual testing. Prints `listening on http://127.0.0.1:PORT` once ready and
//! serves until killed (SIGTERM/SIGINT), or until stdin closes with `--exit-on-stdin-eof`.

use std::io::{self, Read, Write};
use std::process::ExitCode;

use listsync_emulator::Emulator;

const USAGE: &str = "\
usage: listsync-emulator [--port N] [--mailchimp-audience ID]... [--mailchimp-api-key KEY]
                         [--webhook-secret whsec_...] [--exit-on-stdin-eof]

Serves fake email providers on 127.0.0.1 (port 0, the default, picks a free port):
  http://127.0.0.1:PORT/mailchimp/3.0/...   Mailchimp Marketing API subset
  http://127.0.0.1:PORT/webhook/...         pg_listsync webhook receiver
  http://127.0.0.1:PORT/_admin/...          state, fault injection, request log (see README.md)";

#[derive(Default)]
struct Options {
    port: u16,
    audiences: Vec<String>,
    api_key: Option<String>,
    webhook_secret: Option<String>,
    exit_on_stdin_eof: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--port" => {
                let v = value("--port")?;
                options.port = v
                    .parse()
                    .map_err(|_| format!("--port: {v:?} is not a port number"))?;
            }
            "--mailchimp-audience" => options.audiences.push(value("--mailchimp-audience")?),
            "--mailchimp-api-key" => options.api_key = Some(value("--mailchimp-api-key")?),
            "--webhook-secret" => options.webhook_secret = Some(value("--webhook-secret")?),
            "--exit-on-stdin-eof" => options.exit_on_stdin_eof = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("listsync-emulator: {message}");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let emulator = match Emulator::start_on(options.port) {
        Ok(emulator) => emulator,
        Err(e) => {
            eprintln!(
                "listsync-emulator: cannot listen on 127.0.0.1:{}: {e}",
                options.port
            );
            return ExitCode::FAILURE;
        }
    };
    for audience in &options.audiences {
        emulator.mailchimp().create_audience(audience);
    }
    if let Some(key) = &options.api_key {
        emulator.mailchimp().set_api_key(key);
    }
    if let Some(secret) = &options.webhook_secret
        && let Err(message) = emulator.webhook().try_set_secret(secret)
    {
        eprintln!("listsync-emulator: {message}");
        return ExitCode::from(2);
    }

    let mut stdout = io::stdout();
    // Scripts wait for this exact line; flush so it is not stuck in a pipe buffer.
    let _ = writeln!(stdout, "listening on {}", emulator.url());
    let _ = stdout.flush();

    if options.exit_on_stdin_eof {
        // Returns at EOF (or on a read error): the parent closed our stdin.
        let _ = io::copy(&mut io::stdin().lock().take(u64::MAX), &mut io::sink());
    } else {
        // The default action of SIGTERM/SIGINT ends the process; all state is in memory.
        loop {
            std::thread::park();
        }
    }
    ExitCode::SUCCESS
}
