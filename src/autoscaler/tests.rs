//! The autoscaler loop on paused time, against a fake backend and a real `Function`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{advance, Instant};

use super::*;
use crate::metrics::PrewarmResult;
use crate::provider::{Backend, Endpoints};
use crate::test_support::{function, replica, Fake};

fn scaler(autoscaler: &str, initial: u32) -> (Autoscaler, Arc<Function>, Arc<Fake>) {
    let (f, fake) = function(&format!(
        "max_ongoing_requests = 1000\nmax_queued_requests = -1\n[functions.f.autoscaler]\n{autoscaler}"
    ));
    fake.set_replicas(initial);
    publish(&f, initial);
    let a = Autoscaler::new(f.clone()).expect("scalable");
    (a, f, fake)
}

fn publish(f: &Arc<Function>, ready: u32) {
    f.set_endpoints(Endpoints {
        replicas: (0..ready).map(|i| replica(1000 + i as u16)).collect(),
        failure: None,
    });
}

fn arrivals(f: &Function, n: usize) {
    let now = Instant::now();
    for _ in 0..n {
        f.arrived(now);
    }
}

const RPS: &str = "type = \"rps\"\nthreshold = 10\nrate_seconds = 10\npolling_interval = 1\n";

#[tokio::test(start_paused = true)]
async fn scales_up_on_the_window_count() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 1\nmax_replicas = 10\ncooldown_period = 60"),
        1,
    );
    // 55 requests spread over 5 s: 55 in the window, under the burst threshold.
    for _ in 0..5 {
        arrivals(&f, 11);
        advance(Duration::from_secs(1)).await;
    }
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 6);
    assert_eq!(f.metrics.desired.get(), 6);
    assert_eq!(f.metrics.scaled_up.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_scale_down_inside_the_cooldown_then_back_to_min() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 1\nmax_replicas = 10\ncooldown_period = 60"),
        1,
    );
    let start = Instant::now();
    for _ in 0..5 {
        arrivals(&f, 11);
        advance(Duration::from_secs(1)).await;
    }
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 6);
    publish(&f, 6);
    // The window still holds all 55 until t = 10 s; from then on the cooldown holds the count
    // for 60 s more (the last tick that saw 55 was just before t = 10 s).
    while Instant::now() < start + Duration::from_secs(68) {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
        assert_eq!(fake.replicas(), 6);
    }
    // Then it steps down as each second's arrivals left the window 60 s earlier: 5, 4, 3, 2, 1.
    let mut seen = Vec::new();
    for _ in 0..8 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
        if seen.last() != Some(&fake.replicas()) {
            seen.push(fake.replicas());
        }
    }
    assert_eq!(seen, [6, 5, 4, 3, 2, 1]);
    assert_eq!(f.metrics.scaled_down.get(), 5);
}

#[tokio::test(start_paused = true)]
async fn scales_to_zero_only_after_a_whole_idle_cooldown() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 0\nmax_replicas = 3\ncooldown_period = 30"),
        1,
    );
    arrivals(&f, 1);
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 1);
    advance(Duration::from_secs(29)).await;
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 1, "29 s idle is not enough");
    advance(Duration::from_secs(2)).await;
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_keeps_the_function_alive() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 0\nmax_replicas = 3\ncooldown_period = 5"),
        1,
    );
    arrivals(&f, 1);
    let permit = f.admit(Instant::now()).await.expect("a slot");
    for _ in 0..120 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
        assert_eq!(fake.replicas(), 1, "a long request must not be idled");
    }
    drop(permit);
    for _ in 0..4 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
    }
    assert_eq!(
        fake.replicas(),
        1,
        "the cooldown runs from the end of the request"
    );
    advance(Duration::from_secs(2)).await;
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 0);
}

#[tokio::test(start_paused = true)]
async fn burst_mode_scales_up_before_the_next_tick_and_blocks_scale_down() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 1\nmax_replicas = 8\ncooldown_period = 0"),
        1,
    );
    // 30 requests inside the 1 s burst window: 300 per window against a capacity of 10.
    arrivals(&f, 30);
    a.step(Instant::now(), false);
    assert_eq!(
        fake.replicas(),
        8,
        "burst scale-up without waiting for a decision tick"
    );
    publish(&f, 8);
    a.step(Instant::now(), true);
    assert_eq!(f.metrics.burst_mode.get(), 1);
    // The burst is over, the window still holds the 30, and the cooldown is zero: without burst
    // mode this would scale down to 3. Burst mode holds 8 for a whole window.
    for _ in 0..9 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
        assert_eq!(fake.replicas(), 8);
    }
    advance(Duration::from_secs(2)).await;
    a.step(Instant::now(), true);
    assert_eq!(f.metrics.burst_mode.get(), 0);
    assert_eq!(fake.replicas(), 1);
}

#[tokio::test(start_paused = true)]
async fn bounds_hold_whatever_the_load() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 2\nmax_replicas = 4\ncooldown_period = 0"),
        2,
    );
    for _ in 0..9 {
        arrivals(&f, 50);
        advance(Duration::from_secs(1)).await;
    }
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 4);
    advance(Duration::from_secs(60)).await;
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrency_mode_averages_ongoing_and_queued_over_the_window() {
    let (mut a, f, fake) = scaler(
        "type = \"concurrency\"\ntarget_ongoing_requests = 2\nrate_seconds = 6\npolling_interval = 1\nmin_replicas = 1\nmax_replicas = 10\ncooldown_period = 0",
        1,
    );
    // Seven requests held in flight for the whole window.
    let mut permits = Vec::new();
    for _ in 0..7 {
        permits.push(f.admit(Instant::now()).await.unwrap());
    }
    let every = sample_interval(Duration::from_secs(6), Duration::from_secs(1));
    for _ in 0..(6_000 / every.as_millis() as usize) {
        advance(every).await;
        a.step(Instant::now(), false);
    }
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 4, "ceil(7 / 2)");
    drop(permits);
}

#[tokio::test(start_paused = true)]
async fn the_loop_decides_every_polling_interval() {
    let (a, _f, fake) = scaler(
        "type = \"rps\"\nthreshold = 10\nrate_seconds = 10\npolling_interval = 2\nmin_replicas = 1\nmax_replicas = 10\ncooldown_period = 0",
        5,
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(a.run(stop_rx));
    tokio::time::sleep(Duration::from_millis(1900)).await;
    assert_eq!(
        fake.replicas(),
        5,
        "no decision before the first polling interval"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(fake.replicas(), 1, "the loop decided on its own at 2 s");
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn manual_scale_is_not_undone_by_the_next_tick() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 1\nmax_replicas = 10\ncooldown_period = 60"),
        1,
    );
    f.scale_manually(5);
    assert_eq!(fake.replicas(), 5);
    for _ in 0..30 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
    }
    assert_eq!(fake.replicas(), 5, "held for the cooldown");
    // The loop saw the manual value at its first step, 1 s after it was made.
    advance(Duration::from_secs(32)).await;
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 1);
}

#[test]
fn decisions_keep_to_the_polling_schedule_when_samples_do_not_divide_it() {
    let ms = Duration::from_millis;
    // 167 ms samples, 500 ms polling: due at 500, first sample after it at 501 -> next due 1000.
    assert_eq!(next_decision(ms(500), ms(501), ms(500)), ms(1000));
    // A stalled loop skips the deadlines it missed instead of deciding several times at once.
    assert_eq!(next_decision(ms(500), ms(1700), ms(500)), ms(2000));
}

#[tokio::test(start_paused = true)]
async fn queue_mode_scales_on_the_async_backlog() {
    let (a, f, fake) = scaler(
        "type = \"queue\"\nqueue_length = 5\nrate_seconds = 10\npolling_interval = 1\nmin_replicas = 0\nmax_replicas = 10\ncooldown_period = 30",
        0,
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(a.run(stop_rx));
    let sleep = |secs: f64| tokio::time::sleep(Duration::from_secs_f64(secs));

    // Nothing pending: stays at zero.
    sleep(2.5).await;
    assert_eq!(fake.replicas(), 0);

    // 23 pending invocations, 5 per replica: ceil(23 / 5) = 5, from zero.
    f.metrics.async_backlog.set(23);
    sleep(1.1).await;
    assert_eq!(fake.replicas(), 5);
    publish(&f, 5);

    // 60 pending: ceil(60 / 5) = 12, clamped to max_replicas.
    f.metrics.async_backlog.set(60);
    sleep(1.1).await;
    assert_eq!(fake.replicas(), 10);
    publish(&f, 10);

    // The backlog shrinks to 7: held for the cooldown, then ceil(7 / 5) = 2.
    f.metrics.async_backlog.set(7);
    sleep(25.0).await;
    assert_eq!(fake.replicas(), 10, "no scale-down inside the cooldown");
    sleep(10.0).await;
    assert_eq!(fake.replicas(), 2);
    publish(&f, 2);

    // Drained: back to zero after a whole cooldown.
    f.metrics.async_backlog.set(0);
    sleep(29.0).await;
    assert_eq!(fake.replicas(), 2);
    sleep(3.0).await;
    assert_eq!(fake.replicas(), 0);
    assert_eq!(f.metrics.desired.get(), 0);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pending_async_backlog_keeps_the_function_alive_in_every_mode() {
    let (mut a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 0\nmax_replicas = 3\ncooldown_period = 5"),
        1,
    );
    // Three async invocations wait for a retry: no request arrives, nothing is in flight.
    f.metrics.async_backlog.set(3);
    for _ in 0..60 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
        assert_eq!(
            fake.replicas(),
            1,
            "owed async work must not be scaled to zero"
        );
    }
    // Done: like a request, the owed work counts as demand for one more cooldown.
    f.metrics.async_backlog.set(0);
    for _ in 0..4 {
        advance(Duration::from_secs(1)).await;
        a.step(Instant::now(), true);
        assert_eq!(fake.replicas(), 1);
    }
    advance(Duration::from_secs(2)).await;
    a.step(Instant::now(), true);
    assert_eq!(fake.replicas(), 0);
}

/// Spawns the live loop over `a`; the returned sender stops it.
fn spawn_loop(
    a: Autoscaler,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    (stop, tokio::spawn(a.run(stop_rx)))
}

#[tokio::test(start_paused = true)]
async fn an_idle_function_at_zero_sleeps_until_its_first_arrival_then_scales_as_before() {
    let (a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 0\nmax_replicas = 3\ncooldown_period = 30"),
        0,
    );
    let (stop, task) = spawn_loop(a);
    // At zero with nothing to do: asleep after its first sample, and stays so (no timer).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(f.autoscaler_dormant());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(f.autoscaler_dormant());
    assert_eq!(fake.replicas(), 0);
    assert_eq!(f.metrics.scaled_up.get(), 0);

    // The first arrival wakes it: 25 requests in the window, threshold 10 → 3 at the next decision.
    arrivals(&f, 25);
    assert!(!f.autoscaler_dormant());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(fake.replicas(), 3);
    assert!(!f.autoscaler_dormant());
    publish(&f, 3);

    // Back to zero only after the window empties and a whole idle cooldown, as before; then asleep.
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(fake.replicas(), 3, "inside the cooldown");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fake.replicas(), 0);
    publish(&f, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(f.autoscaler_dormant());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_manual_scale_wakes_a_sleeping_autoscaler_and_holds_for_the_cooldown() {
    let (a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 0\nmax_replicas = 5\ncooldown_period = 20"),
        0,
    );
    let (stop, task) = spawn_loop(a);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(f.autoscaler_dormant());
    f.scale_manually(2);
    publish(&f, 2);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!f.autoscaler_dormant());
    // Held for the cooldown, then down to zero (nothing arrived), then asleep again.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(fake.replicas(), 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fake.replicas(), 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(f.autoscaler_dormant());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_wakes_a_sleeping_autoscaler() {
    let (a, f, fake) = scaler(
        &format!("{RPS}min_replicas = 0\nmax_replicas = 5\ncooldown_period = 20"),
        0,
    );
    let (stop, task) = spawn_loop(a);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(f.autoscaler_dormant());
    // A request held at zero: the cold start asks for one replica, the loop wakes and keeps it.
    let held = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!f.autoscaler_dormant());
    assert_eq!(fake.replicas(), 1);
    // 25 s: past the cooldown, inside the held request's 30 s cold-start timeout.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        fake.replicas(),
        1,
        "a held request is in flight: never scaled to zero"
    );
    held.abort();
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn skipped_samples_at_rest_count_as_zeros_in_the_concurrency_average() {
    let (f, _) = function(
        "[functions.f.autoscaler]\ntype = \"concurrency\"\ntarget_ongoing_requests = 1\nrate_seconds = 60\nmin_replicas = 0",
    );
    let every = Duration::from_secs(1);
    let busy = Figures {
        ongoing: 10,
        ..Figures::default()
    };
    let idle = Figures::default();
    let s = Duration::from_secs;
    // One controller samples every second; the other rests after its samples at 0..=5 s, forgets
    // them, and is woken at 40 s.
    let mut ticking = Controller::new(f.config.autoscaler.clone());
    let mut resting = Controller::new(f.config.autoscaler.clone());
    for t in 0..40 {
        ticking.step(s(t), &idle, None, t % 10 == 0);
    }
    for t in 0..=5 {
        let step = resting.step(s(t), &idle, None, t % 10 == 0);
        assert!(resting.at_rest(s(t), &step));
    }
    resting.rest();
    resting.rested(s(5), s(40), every);
    // A request in flight at 40 s: both see the same average over the window (10 / 41).
    let a = ticking.step(s(40), &busy, None, true);
    let b = resting.step(s(40), &busy, None, true);
    assert_eq!(a, b);
    assert!((a.inputs.metric - 10.0 / 41.0).abs() < 1e-9, "{a:?}");
    // And again a window later, when the samples from before the rest have aged out.
    for t in 41..100 {
        assert_eq!(
            ticking.step(s(t), &idle, None, t % 10 == 0),
            resting.step(s(t), &idle, None, t % 10 == 0)
        );
    }
}

const CPU: &str =
    "type = \"cpu\"\ntarget_cpu_percent = 50\nrate_seconds = 10\npolling_interval = 1\n";

/// `cores` busy for the next second, then one step.
async fn burn(a: &mut Autoscaler, fake: &Fake, cores: f64) {
    fake.cpu_ms
        .fetch_add((cores * 1000.0) as u64, std::sync::atomic::Ordering::SeqCst);
    advance(Duration::from_secs(1)).await;
    a.step(Instant::now(), true);
}

#[tokio::test(start_paused = true)]
async fn cpu_mode_scales_on_the_replicas_cpu_time_and_back_down_after_the_cooldown() {
    let (mut a, f, fake) = scaler(
        &format!("{CPU}min_replicas = 1\nmax_replicas = 4\ncooldown_period = 30"),
        1,
    );
    a.step(Instant::now(), true);
    // Half a core: at the 50 % target, one replica is enough.
    for _ in 0..10 {
        burn(&mut a, &fake, 0.5).await;
    }
    assert_eq!(fake.replicas(), 1);
    // One replica keeps a whole core busy: 100 % over the window -> two at 50 %.
    for _ in 0..10 {
        burn(&mut a, &fake, 1.0).await;
    }
    assert_eq!(fake.replicas(), 2);
    publish(&f, 2);
    // Both busy: 200 % -> four.
    for _ in 0..10 {
        burn(&mut a, &fake, 2.0).await;
    }
    assert_eq!(fake.replicas(), 4);
    publish(&f, 4);
    assert_eq!(f.metrics.scaled_up.get(), 2);

    // Idle: the count holds for the cooldown (the window still shows CPU for 10 s, then the
    // highest candidate of the last 30 s stands), then steps down to min_replicas.
    for _ in 0..30 {
        burn(&mut a, &fake, 0.0).await;
        assert_eq!(fake.replicas(), 4, "held inside the cooldown");
    }
    for _ in 0..15 {
        burn(&mut a, &fake, 0.0).await;
    }
    assert_eq!(fake.replicas(), 1);
    assert!(f.metrics.scaled_down.get() >= 1);
}

#[test]
fn cpu_samples_give_percent_of_one_core_over_the_window() {
    let mut cpu = CpuSamples::default();
    let s = Duration::from_secs;
    assert_eq!(cpu.percent_since(s(0)), 0.0);
    cpu.push(s(0), 0.0, s(10));
    assert_eq!(cpu.percent_since(s(0)), 0.0, "one reading is no rate");
    cpu.push(s(5), 7.5, s(10));
    assert_eq!(cpu.percent_since(s(0)), 150.0);
    cpu.push(s(15), 7.5, s(10));
    // From t = 5 (the reading at the window's start) to 15: nothing used.
    assert_eq!(cpu.percent_since(s(5)), 0.0);
    // The last second only (a burst window): the reading at or before t = 14 is t = 5's.
    assert_eq!(cpu.percent_since(s(14)), 0.0);
}

/// An adaptive function on a backend whose replicas are ready 2 s after they are asked for.
fn adaptive_function(extra: &str) -> (Arc<Function>, Arc<crate::test_support::Delayed>, Instant) {
    let text = format!(
        "[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\nmax_ongoing_requests = 10\n[functions.f.autoscaler]\ntype = \"rps\"\nmin_replicas = 0\nmax_replicas = 3\ncooldown_period = \"adaptive\"\n{extra}"
    );
    let config = crate::config::Config::parse(std::path::Path::new("t.toml"), &text, None).unwrap();
    let f = Function::new(
        config.functions["f"].clone(),
        &crate::metrics::Metrics::new(),
    );
    let origin = Instant::now();
    let publisher = f.publisher();
    let backend = Arc::new(crate::test_support::Delayed::new(
        move |e| publisher.publish(e),
        Duration::from_secs(2),
        origin,
    ));
    f.attach(backend.clone());
    (f, backend, origin)
}

/// One call of 1 s at `at`: whether it waited for a cold start.
async fn call_at(f: &Arc<Function>, at: Instant) -> bool {
    tokio::time::sleep_until(at).await;
    f.arrived(Instant::now());
    let permit = f.admit(Instant::now()).await.expect("served");
    let cold = matches!(permit.waited(), crate::function::Waited::ColdStart(_));
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(permit);
    cold
}

fn minutes(m: u64) -> Duration {
    Duration::from_secs(60 * m)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn adaptive_a_periodic_function_is_prewarmed_before_each_call_and_scaled_down_after() {
    let (f, backend, origin) = adaptive_function("");
    let (stop, task) = spawn_loop(Autoscaler::new(f.clone()).unwrap());
    // A call every 20 minutes.
    let mut colds = Vec::new();
    for i in 0..20 {
        colds.push(call_at(&f, origin + minutes(20) * i).await);
    }
    // Learning: the first call; the second after the cold start's worth (15 minutes) of
    // keep-alive; the third after one bin (the idle time seen was longer than 15 minutes). Two
    // idle times agree from then on: forecast, then (from ten) the histogram: every call warm.
    assert!(colds[..3].iter().all(|c| *c), "{colds:?}");
    assert!(colds[3..].iter().all(|c| !*c), "{colds:?}");
    let m = &f.metrics;
    assert_eq!(m.prewarm_count(PrewarmResult::Started), 17);
    assert_eq!(m.prewarm_count(PrewarmResult::Used), 17);
    assert_eq!(m.prewarm_count(PrewarmResult::Wasted), 0);
    // Idle 19:59 each time: bin 19, pre-warm twice the 2 s a start was seen to take before it
    // (18:56), keep-alive 20 × 1.1 min.
    assert_eq!(m.adaptive_windows(), Some((minutes(22), Some(secs(1136)))));
    // Between two warm calls: down at the first decision after the call ended (no call was
    // ever followed by another within a minute: the first bin is not kept), up again 18:56
    // after.
    let log = backend.log();
    let last = minutes(20) * 19;
    let around: Vec<_> = log
        .iter()
        .filter(|(t, _, _)| *t > last - minutes(20) && *t <= last)
        .map(|(t, asked, _)| (t.as_secs() - (last - minutes(20)).as_secs(), *asked))
        .collect();
    assert_eq!(around, [(1, 0), (1137, 1), (1139, 1)], "{log:?}");
    // The calls stop: the last pre-warm goes unused, and the function is at zero after it.
    tokio::time::sleep(minutes(60)).await;
    assert_eq!(m.prewarm_count(PrewarmResult::Wasted), 1);
    assert_eq!(backend.replicas(), 0);
    assert!(f.autoscaler_dormant());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn adaptive_a_random_call_between_ticks_leaves_the_next_tick_prewarmed() {
    let (f, backend, origin) = adaptive_function("");
    let (stop, task) = spawn_loop(Autoscaler::new(f.clone()).unwrap());
    // A timer every 20 minutes, learned (warm from the fourth call).
    for i in 0..12 {
        call_at(&f, origin + minutes(20) * i).await;
    }
    let tick = origin + minutes(20) * 12;
    assert!(!call_at(&f, tick).await, "the 13th tick is pre-warmed");
    // A random call 7 minutes after the tick: cold (the replica went right after the tick).
    assert!(call_at(&f, tick + minutes(7)).await);
    // Counted from the random call, the pre-warm would come 7 + 18 minutes after the tick; the
    // timer's clock keeps the window counted from the tick, so the next tick is warm.
    assert!(
        !call_at(&f, tick + minutes(20)).await,
        "{:?}",
        backend.log()
    );
    assert_eq!(f.metrics.prewarm_count(PrewarmResult::Wasted), 0);
    // The calls stop: every replica is gone an hour after the last one.
    tokio::time::sleep(minutes(60)).await;
    assert_eq!(backend.replicas(), 0);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn adaptive_a_changed_pattern_is_followed_within_a_bounded_number_of_calls() {
    let (f, _backend, origin) = adaptive_function("");
    let (stop, task) = spawn_loop(Autoscaler::new(f.clone()).unwrap());
    let mut at = origin;
    for _ in 0..30 {
        call_at(&f, at).await;
        at += minutes(10);
    }
    // Bin 9, led by twice the 2 s start.
    assert_eq!(
        f.metrics.adaptive_windows().unwrap().1,
        Some(minutes(9) - secs(4)),
        "every 10 minutes"
    );
    // Now every 25 minutes. The learned stretch (8 to 11 minutes) covers one mode of the idle
    // times: the calls are cold until the new period's arrivals are worth more than the old
    // one's (the old idle times' weight decays by 1/32 per call), then pre-warmed.
    let mut colds = 0;
    let mut calls = 0;
    while f.metrics.adaptive_windows().unwrap().1 != Some(minutes(24) - secs(4)) {
        colds += call_at(&f, at).await as u32;
        at += minutes(25);
        calls += 1;
        assert!(calls <= 16, "{:?}", f.metrics.adaptive_windows());
    }
    assert!(colds <= 14, "{colds} cold starts");
    // Back to every 10 minutes: faster (the stretch at 10 minutes costs less waiting).
    let mut colds = 0;
    for _ in 0..10 {
        colds += call_at(&f, at).await as u32;
        at += minutes(10);
    }
    // (Three: the first is cold, and so is one whose idle time falls just before the stretch
    // then learned, which a pre-warm leading by a whole bin used to catch.)
    assert!(colds <= 3, "{colds} cold starts");
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn adaptive_the_histogram_survives_a_restart_in_the_state_store() {
    let state: Arc<dyn crate::state::StateStore> = Arc::new(crate::state::MemoryState::default());
    let (f, _backend, origin) = adaptive_function("");
    let (stop, task) = spawn_loop(
        Autoscaler::new(f.clone())
            .unwrap()
            .with_state(state.clone()),
    );
    for i in 0..14 {
        call_at(&f, origin + minutes(20) * i).await;
    }
    let learned = f.metrics.adaptive_windows();
    assert_eq!(learned, Some((minutes(22), Some(secs(1136)))));
    stop.send(true).unwrap();
    task.await.unwrap();
    let saved = state
        .state_get(IDLE_HISTORY_BUCKET, "f")
        .await
        .unwrap()
        .expect("saved when the loop stopped");
    assert_eq!(
        IdleHistogram::decode(&saved, minutes(1))
            .unwrap()
            .observations(),
        13
    );

    // A new gateway: the same windows before a single call (the pre-warm leading by a bin until
    // it sees a start: how long starts take is not kept), and its first idle period is
    // pre-warmed at once.
    let (g, _backend, origin) = adaptive_function("");
    let (stop, task) = spawn_loop(
        Autoscaler::new(g.clone())
            .unwrap()
            .with_state(state.clone()),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        g.metrics.adaptive_windows(),
        Some((minutes(22), Some(minutes(18))))
    );
    assert!(
        call_at(&g, origin + minutes(1)).await,
        "nothing ran yet: cold"
    );
    assert!(!call_at(&g, origin + minutes(21)).await, "pre-warmed");
    assert_eq!(g.metrics.prewarm_count(PrewarmResult::Used), 1);
    stop.send(true).unwrap();
    task.await.unwrap();
}
