//! `herald produce`: a file or stdin, one message per line, to a Kafka topic or an AMQP queue
//! or exchange; every message that is not acknowledged goes to the dead-letter file.

use std::io::{BufReader, IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::dead_letter::DeadLetter;
use crate::engine::{Collector, Engine, Tally};
use crate::input::{self, Format, Item};
use crate::report::{self, Exit, ReportFormat};
use crate::settings::Tuning;
use crate::target::Target;

/// `herald produce`. No `Debug`: `to` and `fallbacks` hold URLs with their passwords.
#[derive(clap::Args)]
pub(crate) struct ProduceArgs {
    /// Destination: kafka://HOST:PORT[,HOST:PORT...]/TOPIC, amqp[s]://USER:PASS@HOST:PORT/VHOST?queue=NAME
    /// or amqp[s]://...?exchange=EX&routing_key=RK.
    #[arg(long, value_name = "URL")]
    pub(crate) to: String,
    /// A destination that takes over while the ones before it are down (their circuit open
    /// after 3 failed batches in a row), and gives traffic back once they answer again.
    /// Repeatable, tried in order; any kafka:// or amqp:// URL.
    #[arg(long = "fallback", value_name = "URL")]
    pub(crate) fallbacks: Vec<String>,
    /// Read messages from FILE; stdin when absent or `-`.
    #[arg(long, value_name = "FILE")]
    pub(crate) input: Option<PathBuf>,
    /// lines: each line one payload, no key; jsonl: each line {"payload": "...", "key": "...",
    /// "headers": {"name": "value"}}.
    #[arg(long, value_enum, default_value_t = Format::Lines)]
    pub(crate) format: Format,
    /// Where messages that were not acknowledged, and malformed lines, are appended (JSONL;
    /// created only when something failed).
    #[arg(long, value_name = "FILE", default_value = "herald-dead-letter.jsonl")]
    pub(crate) dead_letter: PathBuf,
    /// text, or json: the summary, then one JSON object on the last line of stdout.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub(crate) report: ReportFormat,
    /// Serve Prometheus metrics at /metrics and the producer's health at /health (and the
    /// probes /health/live and /health/ready) on HOST:PORT
    /// while the command runs (e.g. 127.0.0.1:9464; port 0 picks a free one, printed on stderr).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metrics_addr: Option<String>,
    /// Keep every accepted message in the spool directory DIR until it is delivered or
    /// recorded as failed, so that a crash or `kill -9` loses nothing accepted; what an
    /// earlier run left in DIR is sent first. One process at a time per DIR. With a spool,
    /// reading the input is bounded by the spool's size, not by --buffer-messages: while the
    /// broker is away, the input goes on into the spool until it is full.
    #[arg(long, value_name = "DIR")]
    pub(crate) spool: Option<PathBuf>,
    /// The spool's size limit: once its files take this much, reading the input waits for
    /// messages to be delivered (herald_spool_disk_bytes against herald_spool_max_bytes); its
    /// files are at most a quarter of it (64 MiB) [default: 1 GiB].
    #[arg(
        long,
        value_name = "BYTES",
        requires = "spool",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) spool_max_bytes: Option<u64>,
    #[command(flatten)]
    pub(crate) tuning: Tuning,
}

/// How long accepted messages may still take after the input ends is the delivery timeout; this
/// is only for closing the transport afterwards.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// After Ctrl-C, how long what was accepted may still be delivered.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// After Ctrl-C, when the input is a terminal or a socket, how long the input thread may take
/// to hand over what it read: its read cannot be stopped while it waits for input (which may
/// never come), and it holds no messages then, so a quiet moment ends reading. (A pipe's or a
/// file's reading stops at the signal: everything it read is handed over, then it ends.)
const READER_QUIET: Duration = Duration::from_millis(500);
/// After a second Ctrl-C, how long the dead-letter records already made may take to be
/// written before the process ends.
const QUIT_WRITE: Duration = Duration::from_secs(1);

/// Which signal stopped the run: the next Ctrl-C, SIGTERM or SIGHUP. A signal whose handler
/// cannot be installed never arrives (the process then ends as the operating system decides).
async fn stop_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "interrupted (Ctrl-C)",
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let on = |kind: SignalKind, name: &'static str| async move {
            match signal(kind) {
                Ok(mut s) => {
                    s.recv().await;
                    name
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            name = ctrl_c => name,
            name = on(SignalKind::terminate(), "terminated (SIGTERM)") => name,
            name = on(SignalKind::hangup(), "hung up (SIGHUP)") => name,
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await
    }
}

/// Refuses a dead-letter file that is the input itself: records would be appended to the file
/// being read (sending a dead-letter file again without `--dead-letter`), so reading might
/// never end and what was delivered would be read again.
fn refuse_same_file(input: Option<&PathBuf>, dead_letter: &std::path::Path) -> anyhow::Result<()> {
    // The input: the file named, or the file stdin was redirected from (`< records.jsonl`).
    let (input, what) = match input.filter(|p| p.as_os_str() != "-") {
        Some(path) => (std::fs::metadata(path).ok(), "the input file"),
        None => (stdin_file(), "the file on stdin"),
    };
    let same = match (input, std::fs::metadata(dead_letter)) {
        (Some(a), Ok(b)) => same_file(&a, &b),
        // No dead-letter file yet: it cannot be the input, which exists.
        _ => false,
    };
    if same {
        bail!(
            "--dead-letter `{}` is {what}: records of what fails would be appended to the file being read; name another dead-letter file (e.g. --dead-letter retry.jsonl)",
            dead_letter.display()
        );
    }
    Ok(())
}

/// The file stdin reads, if it is one (not a terminal, pipe or socket).
#[cfg(unix)]
fn stdin_file() -> Option<std::fs::Metadata> {
    use std::os::fd::AsFd as _;
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    std::fs::File::from(fd)
        .metadata()
        .ok()
        .filter(std::fs::Metadata::is_file)
}

#[cfg(not(unix))]
fn stdin_file() -> Option<std::fs::Metadata> {
    None
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

fn open_input(
    path: Option<&PathBuf>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(String, input::Stoppable)> {
    match path {
        Some(p) if p.as_os_str() != "-" => {
            let name = p.display().to_string();
            let file = std::fs::File::open(p)
                .with_context(|| format!("cannot read input file `{name}`"))?;
            if file.metadata().is_ok_and(|m| m.is_dir()) {
                bail!("cannot read input file `{name}`: it is a directory");
            }
            let input = input::Stoppable::file(file, stop)
                .with_context(|| format!("cannot read input file `{name}`"))?;
            Ok((name, input))
        }
        _ => Ok((
            "stdin".into(),
            input::Stoppable::stdin(stop).context("cannot read stdin")?,
        )),
    }
}

/// Hands `items` to the engine, in order; `last_line` follows the last line number handed.
///
/// Runs of messages go to the producer together (with a spool: one write and one fsync for
/// the run instead of one per message).
async fn feed(engine: &Engine, items: Vec<Item>, last_line: &mut u64) -> anyhow::Result<()> {
    let mut run = Vec::with_capacity(items.len());
    for item in items {
        match item {
            // After an interrupt the producer is closed: each message comes back at once
            // and is recorded with its line.
            Item::Message { line, msg } => {
                *last_line = line;
                run.push((line, msg));
            }
            Item::Malformed { line, raw, error } => {
                *last_line = line;
                if !run.is_empty() {
                    engine.send_many(std::mem::take(&mut run)).await?;
                }
                engine.malformed(line, raw, error).await?;
            }
        }
    }
    if !run.is_empty() {
        engine.send_many(run).await?;
    }
    Ok(())
}

/// Runs `herald produce`. An `Err` is a usage or configuration error found before anything was
/// sent (exit status 2).
pub(crate) async fn run(args: ProduceArgs) -> anyhow::Result<Exit> {
    let target = Target::parse(&args.to)?;
    // Set at the first signal: reading the input stops.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (input_name, reader) = open_input(args.input.as_ref(), stop_rx)?;
    refuse_same_file(args.input.as_ref(), &args.dead_letter)?;
    // The recorder goes in before the producer is built: the producer registers its metrics then.
    let telemetry = match &args.metrics_addr {
        Some(addr) => {
            let (telemetry, server) = herald::telemetry::prometheus(addr)
                .await
                .context("--metrics-addr")?;
            eprintln!(
                "serving http://{0}/metrics and http://{0}/health (probes: /health/live, /health/ready)",
                server.local_addr()
            );
            Some((telemetry, server))
        }
        None => None,
    };
    let fallbacks = args
        .fallbacks
        .iter()
        .map(|url| Target::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    let session = args.tuning.build_with_fallbacks(
        &target,
        &fallbacks,
        args.spool.as_deref().map(|dir| crate::settings::Spooling {
            dir,
            max_bytes: args.spool_max_bytes,
        }),
    )?;
    if let Some((telemetry, _)) = &telemetry {
        telemetry.watch("produce", &session.producer);
    }
    let destination = session.destination.clone();

    let mut collector = Collector::new(destination.clone());
    collector.dead_letter = Some(DeadLetter::new(&args.dead_letter));
    collector.spool = args.spool.is_some();
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} messages done ({per_sec}) {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        collector.progress = Some(bar);
    }
    // Without a spool, a copy of each message the producer holds, to dead-letter if the wait
    // is cut off (see `Engine::cut_off`). With one, the spool bounds what waits (its messages
    // wait there, not in memory; what is cut off stays in it): no copies.
    let engine = Engine::start(session.producer.clone(), collector);

    // Ctrl-C (or SIGTERM, SIGHUP): stop reading, give what was accepted a few seconds, then
    // record everything not acknowledged as failed.
    let interrupted = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(tokio::sync::Notify::new());
    // What the watcher's close hands back that nobody waits for (messages recovered from the
    // spool, failed): recorded with the rest once the engine is done. Dropped unrecorded, they
    // would leave the spool with no record at all.
    let unclaimed_at_interrupt: Arc<std::sync::Mutex<Vec<herald::SendError>>> = Arc::default();
    let watcher = {
        let interrupted = interrupted.clone();
        let stop_reading = stop_reading.clone();
        let producer = session.producer.clone();
        let cut_off = engine.cut_off();
        let held = engine.held_records();
        let unclaimed = unclaimed_at_interrupt.clone();
        tokio::spawn(async move {
            let signal = stop_signal().await;
            interrupted.store(true, Ordering::SeqCst);
            stop_tx.send_replace(true);
            stop_reading.notify_one();
            let _stderr_gone = writeln!(
                std::io::stderr(),
                "\n{signal}: reading stops; what was accepted has {INTERRUPT_GRACE:?} to be delivered, the rest goes to the dead-letter file (again to quit at once, without recording what is in flight)"
            );
            let closing = producer.close(INTERRUPT_GRACE);
            tokio::select! {
                report = closing => {
                    unclaimed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend(report.unclaimed);
                }
                _ = stop_signal() => {
                    // Quit at once: what is in flight goes unrecorded, but not the records
                    // already made and held back for input order.
                    held.write_now(QUIT_WRITE).await;
                    std::process::exit(i32::from(Exit::Interrupted.code()));
                }
            }
            // Batches still in flight are not waited for: their messages are recorded as
            // not acknowledged (they may still arrive).
            cut_off.now();
            stop_signal().await;
            held.write_now(QUIT_WRITE).await;
            std::process::exit(i32::from(Exit::Interrupted.code()));
        })
    };

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Item>>(8);
    // A terminal's or socket's read cannot be stopped: its thread may never end.
    let reader_may_block = reader.may_block();
    let reader_thread = {
        let destination = destination.clone();
        let format = args.format;
        let limit = input::line_limit(args.tuning.max_message_bytes);
        std::thread::Builder::new()
            .name("herald-input".into())
            .spawn(move || {
                let reader = BufReader::with_capacity(256 << 10, reader);
                input::read(reader, format, &destination, limit, |chunk| {
                    tx.blocking_send(chunk).is_ok()
                })
            })
            .context("cannot start the input thread")?
    };

    let started = Instant::now();
    let mut last_line = 0;
    // Whether the input thread ended (it closed the channel): every line it read was handed over.
    let mut reader_ended = true;
    loop {
        let items = if !reader_may_block {
            // After a signal the input thread stops reading, hands over what it read, and ends.
            rx.recv().await
        } else if interrupted.load(Ordering::SeqCst) {
            // The input thread may be blocked reading stdin (a terminal, or a socket whose
            // writer lives on): take what it hands over, but do not wait for its end.
            match tokio::time::timeout(READER_QUIET, rx.recv()).await {
                Ok(items) => items,
                Err(_) => {
                    reader_ended = false;
                    break;
                }
            }
        } else {
            tokio::select! {
                items = rx.recv() => items,
                () = stop_reading.notified() => continue,
            }
        };
        let Some(items) = items else { break };
        feed(&engine, items, &mut last_line).await?;
    }
    if !reader_ended {
        // What was handed over meanwhile is still taken; nothing more can be.
        rx.close();
        while let Ok(items) = rx.try_recv() {
            feed(&engine, items, &mut last_line).await?;
        }
    }
    let (mut collector, producer) = engine.finish(CLOSE_TIMEOUT).await?;
    let elapsed = started.elapsed();
    watcher.abort();
    // Ended (aborted, or exited the process): nothing more lands in the list.
    let _watcher_ended = watcher.await;
    for e in std::mem::take(
        &mut *unclaimed_at_interrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    ) {
        collector.failed(None, &e);
    }
    let was_interrupted = interrupted.load(Ordering::SeqCst);
    // A reader blocked on a terminal or socket is not waited for.
    let read_result = reader_ended.then(|| {
        reader_thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the input thread panicked")))
    });
    // Lines read, blank ones skipped in `jsonl` included; as far as handed over when the input
    // thread was not waited for, or failed.
    let lines_read = match &read_result {
        Some(Ok(n)) => *n,
        _ => last_line,
    };
    if let Some(bar) = collector.progress.take() {
        bar.finish_and_clear();
    }
    let mut dead_letter = collector.dead_letter.take();
    if let Some(dl) = &mut dead_letter {
        dl.finish();
    }
    let retries = producer.stats().totals.retries;

    let read_error = match &read_result {
        Some(Err(e)) => Some(format!("reading {input_name} failed: {e}")),
        _ => None,
    };
    let dl_error = dead_letter
        .as_ref()
        .and_then(|d| d.error().map(str::to_owned));
    let t = &collector.tally;
    let exit = if read_error.is_some() || dl_error.is_some() {
        Exit::Io
    } else if was_interrupted {
        Exit::Interrupted
    } else if t.failed > 0 || t.malformed > 0 || t.kept > 0 {
        Exit::Failed
    } else {
        Exit::Ok
    };
    let summary = Summary {
        destination: target.describe(),
        input: input_name,
        read: lines_read,
        tally: t,
        retries,
        elapsed,
        dead_letter: dead_letter.as_ref(),
        interrupted: was_interrupted,
        errors: [read_error, dl_error].into_iter().flatten().collect(),
        exit,
    };
    out!("{}", summary.text().trim_end());
    if args.report == ReportFormat::Json {
        out!("{}", summary.json());
    }
    Ok(exit)
}

struct Summary<'a> {
    destination: String,
    input: String,
    /// Input lines read.
    read: u64,
    tally: &'a Tally,
    retries: u64,
    elapsed: Duration,
    dead_letter: Option<&'a DeadLetter>,
    interrupted: bool,
    errors: Vec<String>,
    exit: Exit,
}

impl Summary<'_> {
    fn dead_lettered(&self) -> u64 {
        self.dead_letter.map_or(0, DeadLetter::written)
    }

    fn text(&self) -> String {
        let t = self.tally;
        let mut s = format!("herald produce: {} → {}\n", self.input, self.destination);
        let dl = self
            .dead_letter
            .map_or_else(String::new, |d| d.path().display().to_string());
        s += &format!(
            "  sent       {:>10}  acknowledged by the broker\n",
            report::count(t.delivered)
        );
        s += &format!(
            "  failed     {:>10}  not acknowledged\n",
            report::count(t.failed)
        );
        s += &format!(
            "  malformed  {:>10}  input lines that are not messages\n",
            report::count(t.malformed)
        );
        s += &format!(
            "  retries    {:>10}  ({} messages needed more than one attempt)\n",
            report::count(self.retries),
            report::count(t.retried)
        );
        s += &format!(
            "  elapsed    {:>10}  {} msg/s\n",
            report::duration(self.elapsed),
            report::count(report::rate(t.delivered, self.elapsed) as u64)
        );
        if let (Some(p50), Some(p99), Some(max)) = (
            t.latency.quantile(0.5),
            t.latency.quantile(0.99),
            t.latency.max(),
        ) {
            s += &format!(
                "  latency    p50 {}  p99 {}  max {}  (acceptance to acknowledgement)\n",
                report::duration(p50),
                report::duration(p99),
                report::duration(max)
            );
        }
        if self.dead_lettered() > 0 {
            s += &format!(
                "  dead letter: {} records appended to {dl}\n",
                report::count(self.dead_lettered())
            );
            for e in &t.examples {
                s += &format!("    e.g. {e}\n");
            }
        }
        if self.interrupted {
            s += &format!(
                "  interrupted: {} lines were read; the input after them was not\n",
                report::count(self.read)
            );
        }
        if t.kept > 0 {
            s += &format!(
                "  kept       {:>10}  not delivered yet, still in the spool: the next run with --spool sends them first\n",
                report::count(t.kept)
            );
        }
        if t.cut_off > 0 {
            s += &format!(
                "  {} of the failed were still in flight when the grace period ended: they may yet reach the broker (reason `interrupted`)\n",
                report::count(t.cut_off)
            );
        }
        for e in &self.errors {
            s += &format!("  error: {e}\n");
        }
        s
    }

    fn json(&self) -> Value {
        let t = self.tally;
        json!({
            "command": "produce",
            "destination": self.destination,
            "input": self.input,
            "read": self.read,
            "sent": t.delivered,
            "failed": t.failed,
            "malformed": t.malformed,
            "retries": self.retries,
            "retried_messages": t.retried,
            "elapsed_s": report::num(self.elapsed.as_secs_f64()),
            "msgs_per_sec": report::num(report::rate(t.delivered, self.elapsed)),
            "p50_ms": report::ms(t.latency.quantile(0.5)),
            "p99_ms": report::ms(t.latency.quantile(0.99)),
            "max_ms": report::ms(t.latency.max()),
            "dead_lettered": self.dead_lettered(),
            "dead_letter_file": if self.dead_lettered() > 0 {
                self.dead_letter.map(|d| Value::from(d.path().display().to_string()))
            } else {
                None
            },
            "interrupted": self.interrupted,
            "in_flight_at_exit": t.cut_off,
            "kept_in_spool": t.kept,
            "errors": self.errors,
            "exit_code": self.exit.code(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_has_the_contract_fields() {
        let mut tally = Tally {
            delivered: 998,
            failed: 1,
            malformed: 1,
            ..Tally::default()
        };
        tally.latency.record(Duration::from_millis(2));
        let mut dl = DeadLetter::new("/nonexistent-herald/dl.jsonl");
        dl.write(&json!({}));
        dl.write(&json!({}));
        let s = Summary {
            destination: "kafka://h:1/t".into(),
            input: "stdin".into(),
            read: 1000,
            tally: &tally,
            retries: 3,
            elapsed: Duration::from_secs(2),
            dead_letter: Some(&dl),
            interrupted: false,
            errors: vec![],
            exit: Exit::Failed,
        };
        let j = s.json();
        assert_eq!(j["read"], json!(1000));
        assert_eq!(j["sent"], json!(998));
        assert_eq!(j["failed"], json!(1));
        assert_eq!(j["malformed"], json!(1));
        assert_eq!(j["retries"], json!(3));
        assert_eq!(j["elapsed_s"], json!(2.0));
        assert_eq!(j["msgs_per_sec"], json!(499.0));
        assert_eq!(j["dead_lettered"], json!(2));
        assert_eq!(j["dead_letter_file"], json!("/nonexistent-herald/dl.jsonl"));
        assert_eq!(j["exit_code"], json!(1));
        assert!(
            j["p50_ms"].as_f64().is_some_and(|p| (p - 2.0).abs() < 0.1),
            "{j}"
        );
        // One line.
        assert!(!j.to_string().contains('\n'));
        let text = s.text();
        assert!(
            text.contains("2 records appended to /nonexistent-herald/dl.jsonl"),
            "{text}"
        );

        let empty = Tally::default();
        let s = Summary {
            tally: &empty,
            dead_letter: Some(&DeadLetter::new("x")),
            exit: Exit::Ok,
            ..s
        };
        let j = s.json();
        assert_eq!(j["dead_letter_file"], Value::Null);
        assert_eq!(j["p50_ms"], Value::Null);
    }
}
