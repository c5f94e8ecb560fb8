//! The testkit's delaying proxy as a process of its own, for benchmarks that run a program
//! through it rather than a library call (`cargo xtask bench command` runs the `herald` command
//! and its raw baseline through it at each round trip):
//!
//! `delay_proxy LISTEN TARGET ONE_WAY_MS`, for example
//! `delay_proxy 127.0.0.1:15672 127.0.0.1:5672 5` for a round trip of 10 ms in front of
//! RabbitMQ. Every byte reaches the other side `ONE_WAY_MS` after the proxy read it, in both
//! directions, without a cap on throughput (see `FaultProxy::start_with_latency`). Prints
//! `listening on ADDR` once it accepts connections, and runs until it is killed.

use std::time::Duration;

use herald_testkit::proxy::FaultProxy;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, one_way_ms] = args.as_slice() else {
        eprintln!("usage: delay_proxy LISTEN TARGET ONE_WAY_MS (got {args:?})");
        std::process::exit(2);
    };
    let Ok(one_way_ms) = one_way_ms.parse::<u64>() else {
        eprintln!(
            "delay_proxy: ONE_WAY_MS must be a whole number of milliseconds, not {one_way_ms:?}"
        );
        std::process::exit(2);
    };
    let proxy = FaultProxy::start_on(listen, target, Duration::from_millis(one_way_ms))
        .await
        .unwrap_or_else(|e| {
            eprintln!("delay_proxy: cannot listen on {listen}: {e}");
            std::process::exit(1);
        });
    println!("listening on {}", proxy.addr());
    std::future::pending::<()>().await;
}
