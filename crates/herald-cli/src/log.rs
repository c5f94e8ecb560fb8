//! The command's own logs: what herald's libraries (and the broker clients) log, on stderr, as
//! text or JSON lines, at the level `-v`/`-q` or `RUST_LOG` chose.

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target` and `fields` (the message and
    /// the event's structured fields).
    Json,
}

/// The global logging flags.
#[derive(Debug, clap::Args)]
pub(crate) struct LogArgs {
    /// Log more on stderr: -v info, -vv debug, -vvv trace for herald's own events (other
    /// libraries log one level less, and never trace: the broker clients' trace events hold
    /// credentials). Default: warnings and errors only.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// Log errors only.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub(crate) quiet: bool,
    /// How log events are written on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,
}

/// The directives `-v`/`-q` stand for. Other libraries stay one step below herald's crates and
/// never reach trace: the broker clients' trace events carry wire frames, which hold the
/// credentials sent at login and the messages' payloads. (RUST_LOG can still ask for them.)
/// lapin logs every message the broker returns (unroutable) at warn, the whole message with
/// its payload and headers, once per message: herald reports those itself (a permanent
/// `NO_ROUTE` failure, `herald_amqp_returned_total`), so that target is kept to errors.
fn directives(args: &LogArgs) -> &'static str {
    if args.quiet {
        return "error";
    }
    match args.verbose {
        0 => "warn,lapin::returned_messages=error",
        1 => "warn,herald=info,lapin::returned_messages=error",
        2 => "info,herald=debug,lapin::returned_messages=error",
        _ => "debug,herald=trace,lapin::returned_messages=error",
    }
}

/// What to log: `RUST_LOG` when it is set (and not empty), which takes precedence over
/// `-v`/`-q`; the flags otherwise. A `RUST_LOG` that is not a filter is an error naming it.
fn filter(args: &LogArgs, rust_log: Option<std::ffi::OsString>) -> Result<EnvFilter, String> {
    let Some(rust_log) = rust_log.filter(|v| !v.is_empty()) else {
        return EnvFilter::builder()
            .parse(directives(args))
            .map_err(|e| format!("internal log filter: {e}"));
    };
    let Some(text) = rust_log.to_str() else {
        return Err("RUST_LOG is not valid UTF-8".to_owned());
    };
    EnvFilter::builder().parse(text).map_err(|e| {
        format!("RUST_LOG=`{text}` is not a log filter: {e} (e.g. RUST_LOG=herald=debug,warn)")
    })
}

/// Installs the process's log subscriber: events at the chosen level, on stderr, in the chosen
/// format. Fails (a usage error) on a bad `RUST_LOG`.
pub(crate) fn init(args: &LogArgs) -> Result<(), String> {
    let filter = filter(args, std::env::var_os("RUST_LOG"))?;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn flags(verbose: u8, quiet: bool) -> LogArgs {
        LogArgs {
            verbose,
            quiet,
            log_format: LogFormat::Text,
        }
    }

    /// Whether `filter` lets an event of `level` from herald's crates, and from lapin, through.
    fn lets_through(filter: EnvFilter, level: Level) -> (bool, bool) {
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            // `enabled!` needs a constant level: one callsite per level.
            let on = |target_is_herald: bool| match (target_is_herald, level) {
                (true, Level::ERROR) => {
                    tracing::enabled!(target: "herald_amqp::transport", Level::ERROR)
                }
                (true, Level::WARN) => {
                    tracing::enabled!(target: "herald_amqp::transport", Level::WARN)
                }
                (true, Level::INFO) => {
                    tracing::enabled!(target: "herald_amqp::transport", Level::INFO)
                }
                (true, Level::DEBUG) => {
                    tracing::enabled!(target: "herald_amqp::transport", Level::DEBUG)
                }
                (true, _) => tracing::enabled!(target: "herald_amqp::transport", Level::TRACE),
                (false, Level::ERROR) => tracing::enabled!(target: "lapin::io_loop", Level::ERROR),
                (false, Level::WARN) => tracing::enabled!(target: "lapin::io_loop", Level::WARN),
                (false, Level::INFO) => tracing::enabled!(target: "lapin::io_loop", Level::INFO),
                (false, Level::DEBUG) => tracing::enabled!(target: "lapin::io_loop", Level::DEBUG),
                (false, _) => tracing::enabled!(target: "lapin::io_loop", Level::TRACE),
            };
            (on(true), on(false))
        })
    }

    #[test]
    fn flags_set_herald_s_level_and_keep_other_libraries_below_trace() {
        let through = |f: &LogArgs, level| lets_through(filter(f, None).expect("valid"), level);
        // Default: warnings and errors.
        assert_eq!(through(&flags(0, false), Level::WARN), (true, true));
        assert_eq!(through(&flags(0, false), Level::INFO), (false, false));
        // -q: errors only.
        assert_eq!(through(&flags(0, true), Level::ERROR), (true, true));
        assert_eq!(through(&flags(0, true), Level::WARN), (false, false));
        // -v, -vv, -vvv (and more).
        assert_eq!(through(&flags(1, false), Level::INFO), (true, false));
        assert_eq!(through(&flags(2, false), Level::DEBUG), (true, false));
        assert_eq!(through(&flags(2, false), Level::INFO), (true, true));
        for v in [3, 4, 200] {
            assert_eq!(
                through(&flags(v, false), Level::TRACE),
                (true, false),
                "{v}"
            );
            assert_eq!(through(&flags(v, false), Level::DEBUG), (true, true), "{v}");
        }
    }

    /// lapin's per-message warning for a returned message (payload and headers included) is
    /// kept out at every verbosity; lapin's other warnings are not.
    #[test]
    fn lapin_s_returned_message_warnings_never_print_a_payload() {
        for v in [0, 1, 2, 3, 200] {
            let subscriber =
                tracing_subscriber::registry().with(filter(&flags(v, false), None).expect("valid"));
            let (returned, other) = tracing::subscriber::with_default(subscriber, || {
                (
                    tracing::enabled!(target: "lapin::returned_messages", Level::WARN),
                    tracing::enabled!(target: "lapin::io_loop", Level::WARN),
                )
            });
            assert_eq!((returned, other), (false, true), "-v x {v}");
        }
    }

    #[test]
    fn rust_log_takes_precedence_and_a_bad_one_is_named() {
        let quiet = flags(0, true);
        let f = filter(&quiet, Some("herald=debug".into())).expect("valid");
        assert_eq!(lets_through(f, Level::DEBUG), (true, false));
        // Empty: as if unset.
        let f = filter(&quiet, Some("".into())).expect("valid");
        assert_eq!(lets_through(f, Level::WARN), (false, false));
        for bad in ["herald=notalevel", "[{", "herald=info,=debug=x"] {
            let e = filter(&quiet, Some(bad.into())).expect_err(bad);
            assert!(e.contains("RUST_LOG") && e.contains(bad), "{bad}: {e}");
        }
    }
}
