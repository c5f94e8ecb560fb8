//! `herald produce`: a file or stdin, one message per line, to a Kafka topic or an AMQP queue
//! or exchange; every message that is not acknowledged goes to the dead-letter file.

use std::io::{BufReader, IsTerminal, Read, Write as _};
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

/// `herald produce`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProduceArgs {
    /// Destination: kafka://HOST:PORT[,HOST:PORT...]/TOPIC, amqp[s]://USER:PASS@HOST:PORT/VHOST?queue=NAME
    /// or amqp[s]://...?exchange=EX&routing_key=RK.
    #[arg(long, value_name = "URL")]
    pub(crate) to: String,
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
    /// Serve Prometheus metrics at /metrics and the producer's health at /health on HOST:PORT
    /// while the command runs (e.g. 127.0.0.1:9464; port 0 picks a free one, printed on stderr).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metrics_addr: Option<String>,
    #[command(flatten)]
    pub(crate) tuning: Tuning,
}

/// How long accepted messages may still take after the input ends is the delivery timeout; this
/// is only for closing the transport afterwards.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// After Ctrl-C, how long what was accepted may still be delivered.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// After Ctrl-C, how long the input thread may take to hand over what it read: it holds no
/// messages while it waits for input (which may never come), so a quiet moment ends reading.
const READER_QUIET: Duration = Duration::from_millis(500);

type Input = BufReader<Box<dyn Read + Send>>;

/// Hands a chunk the input thread read to the sending loop; false once reading should stop.
/// A chunk read before an interrupt is still handed over, to be sent or recorded, never dropped.
fn hand_over(
    tx: &tokio::sync::mpsc::Sender<Vec<Item>>,
    interrupted: &AtomicBool,
    chunk: Vec<Item>,
) -> bool {
    tx.blocking_send(chunk).is_ok() && !interrupted.load(Ordering::SeqCst)
}

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
    let Some(input) = input.filter(|p| p.as_os_str() != "-") else {
        return Ok(());
    };
    let same = match (std::fs::metadata(input), std::fs::metadata(dead_letter)) {
        (Ok(a), Ok(b)) => same_file(&a, &b),
        // No dead-letter file yet: it cannot be the input, which exists.
        _ => false,
    };
    if same {
        bail!(
            "--dead-letter `{}` is the input file: records of what fails would be appended to the file being read; name another dead-letter file (e.g. --dead-letter retry.jsonl)",
            dead_letter.display()
        );
    }
    Ok(())
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

fn open_input(path: Option<&PathBuf>) -> anyhow::Result<(String, Input)> {
    let stdin = || BufReader::with_capacity(256 << 10, Box::new(std::io::stdin()) as Box<_>);
    match path {
        None => Ok(("stdin".into(), stdin())),
        Some(p) if p.as_os_str() == "-" => Ok(("stdin".into(), stdin())),
        Some(p) => {
            let name = p.display().to_string();
            let file = std::fs::File::open(p)
                .with_context(|| format!("cannot read input file `{name}`"))?;
            if file.metadata().is_ok_and(|m| m.is_dir()) {
                bail!("cannot read input file `{name}`: it is a directory");
            }
            Ok((name, BufReader::with_capacity(256 << 10, Box::new(file))))
        }
    }
}

/// Runs `herald produce`. An `Err` is a usage or configuration error found before anything was
/// sent (exit status 2).
pub(crate) async fn run(args: ProduceArgs) -> anyhow::Result<Exit> {
    let target = Target::parse(&args.to)?;
    let (input_name, reader) = open_input(args.input.as_ref())?;
    refuse_same_file(args.input.as_ref(), &args.dead_letter)?;
    // The recorder goes in before the producer is built: the producer registers its metrics then.
    let telemetry = match &args.metrics_addr {
        Some(addr) => {
            let (telemetry, server) = herald::telemetry::prometheus(addr)
                .await
                .context("--metrics-addr")?;
            eprintln!(
                "serving http://{0}/metrics and http://{0}/health",
                server.local_addr()
            );
            Some((telemetry, server))
        }
        None => None,
    };
    let session = args.tuning.build(&target)?;
    if let Some((telemetry, _)) = &telemetry {
        telemetry.watch("produce", &session.producer);
    }
    let destination = session.destination.clone();

    let mut collector = Collector::new(destination.clone());
    collector.dead_letter = Some(DeadLetter::new(&args.dead_letter));
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} messages done ({per_sec}) {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        collector.progress = Some(bar);
    }
    let engine = Engine::start(
        session.producer.clone(),
        args.tuning.buffer_messages,
        collector,
    )
    .keep_copies();

    // Ctrl-C (or SIGTERM, SIGHUP): stop reading, give what was accepted a few seconds, then
    // record everything not acknowledged as failed.
    let interrupted = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(tokio::sync::Notify::new());
    let watcher = {
        let interrupted = interrupted.clone();
        let stop_reading = stop_reading.clone();
        let producer = session.producer.clone();
        let cut_off = engine.cut_off();
        tokio::spawn(async move {
            let signal = stop_signal().await;
            interrupted.store(true, Ordering::SeqCst);
            stop_reading.notify_one();
            let _stderr_gone = writeln!(
                std::io::stderr(),
                "\n{signal}: reading stops; what was accepted has {INTERRUPT_GRACE:?} to be delivered, the rest goes to the dead-letter file (again to quit at once, without recording what is in flight)"
            );
            let closing = producer.close(INTERRUPT_GRACE);
            tokio::select! {
                _ = closing => {}
                _ = stop_signal() => std::process::exit(i32::from(Exit::Interrupted.code())),
            }
            // Batches still in flight are not waited for: their messages are recorded as
            // not acknowledged (they may still arrive).
            cut_off.now();
            stop_signal().await;
            std::process::exit(i32::from(Exit::Interrupted.code()));
        })
    };

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Item>>(8);
    let reader_thread = {
        let interrupted = interrupted.clone();
        let destination = destination.clone();
        let format = args.format;
        let limit = input::line_limit(args.tuning.max_message_bytes);
        std::thread::Builder::new()
            .name("herald-input".into())
            .spawn(move || {
                input::read(reader, format, &destination, limit, |chunk| {
                    hand_over(&tx, &interrupted, chunk)
                })
            })
            .context("cannot start the input thread")?
    };

    let started = Instant::now();
    loop {
        let items = if interrupted.load(Ordering::SeqCst) {
            // The input thread may be blocked reading stdin (a terminal, or a pipe whose writer
            // lives on): take what it hands over, but do not wait for its end.
            match tokio::time::timeout(READER_QUIET, rx.recv()).await {
                Ok(Some(items)) => items,
                Ok(None) | Err(_) => break,
            }
        } else {
            tokio::select! {
                items = rx.recv() => match items {
                    Some(items) => items,
                    None => break,
                },
                () = stop_reading.notified() => continue,
            }
        };
        for item in items {
            match item {
                // After an interrupt the producer is closed: each message comes back at once
                // and is recorded with its line.
                Item::Message { line, msg } => engine.send(line, msg).await?,
                Item::Malformed { line, raw, error } => engine.malformed(line, raw, error).await?,
            }
        }
    }
    let (mut collector, producer) = engine.finish(CLOSE_TIMEOUT).await?;
    let elapsed = started.elapsed();
    watcher.abort();
    let was_interrupted = interrupted.load(Ordering::SeqCst);
    // After an interrupt the reader may be blocked on stdin: do not wait for it.
    let read_result = if was_interrupted {
        None
    } else {
        Some(
            reader_thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the input thread panicked"))),
        )
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
    } else if t.failed > 0 || t.malformed > 0 {
        Exit::Failed
    } else {
        Exit::Ok
    };
    let summary = Summary {
        destination: target.describe(),
        input: input_name,
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
            s += "  interrupted: lines after the last one recorded were not read\n";
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
            "errors": self.errors,
            "exit_code": self.exit.code(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_read_before_an_interrupt_is_handed_over() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Item>>(8);
        let interrupted = AtomicBool::new(false);
        let chunk = |line| {
            vec![Item::Message {
                line,
                msg: herald::Message::new("t", "p"),
            }]
        };
        assert!(hand_over(&tx, &interrupted, chunk(1)));
        interrupted.store(true, Ordering::SeqCst);
        // Reading stops, and the lines already read still reach the sending loop.
        assert!(!hand_over(&tx, &interrupted, chunk(2)));
        let lines: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .flatten()
            .map(|i| match i {
                Item::Message { line, .. } => line,
                Item::Malformed { line, .. } => line,
            })
            .collect();
        assert_eq!(lines, vec![1, 2]);
    }

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
            tally: &tally,
            retries: 3,
            elapsed: Duration::from_secs(2),
            dead_letter: Some(&dl),
            interrupted: false,
            errors: vec![],
            exit: Exit::Failed,
        };
        let j = s.json();
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
