#!/usr/bin/env python3
"""Generates a synthetic day of serverless traffic in the Azure Functions 2019 per-minute format.

One row per function: `function,Trigger,duration,1,2,...,1440` (invocations per minute of the
day; `duration` the function's mean service time in seconds), readable by
`sluicegate simulate --minute-trace`. The mix follows the patterns "Serverless in the Wild"
(Shahrad et al., USENIX ATC 2020) describes for Azure Functions:

* heavy:    a few functions that carry almost all invocations (the paper: 18.6% of apps are invoked
            more than once a minute and make up 99.6% of invocations), Poisson with a diurnal rate;
* frequent: Poisson, from every few seconds to every two minutes;
* periodic: timer triggers (the paper's CV = 0 functions): every 1 minute to 4 hours, some with
            jitter of up to a minute, some firing 2-3 invocations per tick;
* bursty:   quiet for long random gaps (30 min to 3 h on average), then a burst of calls over a few
            minutes (the paper's CV > 1 functions);
* rare:     Poisson with a mean idle time of 10 minutes to 6 hours, i.e. no pattern;
* mixed:    a timer plus sporadic random calls (apps that mix triggers).

Standard library only; the same seed always gives the same file.

    loadtests/adaptive/gen_trace.py --functions 100 --seed 1 > day.csv
"""

import argparse
import math
import random
import sys

DAY = 24 * 3600


def poisson_times(rng, rate_fn, peak, start=0.0, end=DAY):
    """Arrival times of a Poisson process with rate rate_fn(t) <= peak, by thinning."""
    t, out = start, []
    if peak <= 0:
        return out
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return out
        if rng.random() * peak < rate_fn(t):
            out.append(t)


def diurnal(mean):
    """A day-shaped rate with the given mean: low at night, peak mid-afternoon."""
    return lambda t: mean * (1.0 - 0.8 * math.cos(2 * math.pi * (t - 3 * 3600) / DAY))


def heavy(rng):
    mean = rng.uniform(0.35, 1.5)
    return "http", poisson_times(rng, diurnal(mean), 1.8 * mean)


def frequent(rng):
    iat = math.exp(rng.uniform(math.log(5), math.log(120)))
    return "http", poisson_times(rng, lambda t: 1 / iat, 1 / iat)


def periodic(rng):
    period = 60 * rng.choice([1, 2, 5, 10, 15, 15, 30, 30, 60, 60, 60, 120, 180, 240])
    jitter = rng.choice([0, 0, 5, 15, 30, 60])
    calls = rng.choice([1, 1, 1, 2, 3])
    phase = rng.uniform(0, period)
    times, k = [], 0
    while phase + k * period < DAY:
        tick = phase + k * period + (rng.uniform(-jitter, jitter) if jitter else 0)
        for c in range(calls):
            t = tick + c * rng.uniform(0.5, 5)
            if 0 <= t < DAY:
                times.append(t)
        k += 1
    return "timer", times


def bursty(rng):
    gap = 60 * rng.uniform(30, 180)
    times, t = [], rng.uniform(0, gap)
    while t < DAY:
        length = 60 * rng.uniform(1, 5)
        n = rng.randint(5, 60)
        times += [t + rng.uniform(0, length) for _ in range(n)]
        t += length + rng.expovariate(1 / gap)
    return "queue", [x for x in times if x < DAY]


def rare(rng):
    iat = 60 * math.exp(rng.uniform(math.log(10), math.log(360)))
    return "http", poisson_times(rng, lambda t: 1 / iat, 1 / iat)


def mixed(rng):
    _, timer = periodic(rng)
    _, extra = rare(rng)
    return "others", timer + extra


# How many of each, per 100 functions.
MIX = [
    (heavy, 8),
    (frequent, 10),
    (periodic, 32),
    (bursty, 15),
    (rare, 25),
    (mixed, 10),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--functions", type=int, default=100, help="number of functions (default 100)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    kinds = []
    for make, share in MIX:
        kinds += [make] * share
    out = sys.stdout
    out.write("function,Trigger,duration," + ",".join(str(m) for m in range(1, 1441)) + "\n")
    total = 0
    for i in range(args.functions):
        make = kinds[i % len(kinds)]
        trigger, times = make(rng)
        counts = [0] * 1440
        for t in times:
            counts[min(int(t // 60), 1439)] += 1
        total += len(times)
        # Mean service time: log-normal around 1 s, 50 ms to 30 s (the paper: half of the
        # functions run under a second on average).
        duration = min(30.0, max(0.05, rng.lognormvariate(0, 1.2)))
        name = f"{make.__name__}-{i:03d}"
        out.write(f"{name},{trigger},{duration:.3f}," + ",".join(map(str, counts)) + "\n")
    print(f"{args.functions} functions, {total} invocations", file=sys.stderr)


if __name__ == "__main__":
    main()
