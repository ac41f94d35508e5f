"""A rate-limited loopback for benchmarks: a network namespace of its own, its `lo` shaped by tc's token bucket filter.

Processes started with the namespace's command prefix (`ip netns exec NAME ...`) see only that namespace's loopback,
so their traffic to 127.0.0.1 crosses the limit and nothing else; `ip netns exec` also mounts that namespace's
`/sys/class/net`, so their `lo` byte counters count their own traffic. Needs root and iproute2.

The limit is the total of every flow crossing `lo`, in both directions: one loopback device is a shared medium, not
a full-duplex link. The bucket (`burst`) must hold at least one 64 KiB loopback packet (at 64 KiB the test
all-reduce stalled on drops) and about 3 ms of traffic at the rate (1 MB at 10 Gbit/s, 0.8 ms, gave 9.2 Gbit/s);
`latency` bounds the queue. With these values a 2-process gloo all-reduce of 100 MB moved 0.999-1.004 Gbit/s at
`1gbit` and 10.02 Gbit/s at `10gbit` (the namespace's loopback without a limit: 12-16 Gbit/s on the 2-core machine).
"""

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator

# rate -> (burst, latency) for `tc qdisc add dev lo root tbf`
TBF_SETTINGS = {"1gbit": ("1mb", "10ms"), "10gbit": ("4mb", "10ms")}
RATE_BITS_PER_S = {"1gbit": 1e9, "10gbit": 1e10}


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


class ShapedLoopback:
    """The namespace made by [`shaped_loopback`]: `prefix` runs a command inside it."""

    def __init__(self, name: str):
        self.name = name
        self.prefix = ["ip", "netns", "exec", name]

    def qdisc_stats(self) -> dict:
        """tc's counters of the loopback's limit: bytes and packets sent, drops, overlimits, and its settings."""
        done = subprocess.run(
            [*self.prefix, "tc", "-s", "-j", "qdisc", "show", "dev", "lo"], check=True, capture_output=True, text=True
        )
        return json.loads(done.stdout)[0]


@contextlib.contextmanager
def shaped_loopback(rate: str) -> Iterator[ShapedLoopback]:
    """A new network namespace whose loopback (up, 127.0.0.1) is limited to `rate` (a key of `TBF_SETTINGS`); it is
    deleted on exit, also after an error."""
    burst, latency = TBF_SETTINGS[rate]
    namespace = ShapedLoopback(f"bench_comm_{os.getpid()}")
    _run("ip", "netns", "add", namespace.name)
    try:
        _run(*namespace.prefix, "ip", "link", "set", "lo", "up")
        tbf = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        _run(*namespace.prefix, "tc", "qdisc", "add", "dev", "lo", "root", *tbf)
        yield namespace
    finally:
        subprocess.run(["ip", "netns", "delete", namespace.name], check=False, capture_output=True)
