"""Arithmetic for ``bench_relay.py`` and ``bench_load.py``: percentiles, /proc CPU and RSS, Prometheus
histograms and gauges, RTP pacing, least-squares slopes."""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

RTP_CLOCK = 48000
FRAME_S = 0.02


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, inclusive method); NaN for no values."""
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def share_above(values: Sequence[float], limit: float) -> float:
    """Fraction of ``values`` strictly above ``limit``; NaN for no values."""
    return sum(v > limit for v in values) / len(values) if values else math.nan


def in_window(rows: Iterable[Sequence[float]], start: float, end: float) -> list[float]:
    """Second fields of ``(time, value)`` rows with ``start <= time < end``."""
    return [row[1] for row in rows if start <= row[0] < end]


# -- CPU ---------------------------------------------------------------------------------------


def process_cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of its thread ``tid``, in seconds."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """utime + stime of each live thread of a process, in seconds."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[int(task.name)] = process_cpu_s(pid, int(task.name))
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of a process (``VmRSS`` in ``/proc/<pid>/status``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def udp_receive_errors() -> int:
    """UDP datagrams the kernel dropped on receive (``RcvbufErrors``, IPv4 and IPv6), since boot."""
    total = 0
    snmp = Path("/proc/net/snmp").read_text().splitlines()
    for header, values in zip(snmp, snmp[1:], strict=False):
        if header.startswith("Udp:") and values.startswith("Udp:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=True))
            total += int(fields.get("RcvbufErrors", 0))
    with contextlib.suppress(FileNotFoundError):
        for line in Path("/proc/net/snmp6").read_text().splitlines():
            if line.startswith("Udp6RcvbufErrors"):
                total += int(line.split()[1])
    return total


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (NaN for fewer than two distinct x)."""
    if len(points) < 2:
        return math.nan
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def core_busy_s(core: int) -> float:
    """Busy time of one CPU since boot (everything but idle and iowait), in seconds."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(x) for x in line.split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    raise ValueError(f"no cpu{core} in /proc/stat")


# -- Prometheus histograms ---------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LE = re.compile(r'le="([^"]+)"')


@dataclass
class Histogram:
    """One histogram summed over its non-``le`` labels: cumulative bucket counts, sum and count."""

    buckets: dict[float, float]
    total: float
    count: float

    def minus(self, other: Histogram) -> Histogram:
        return Histogram(
            {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - other.total,
            self.count - other.count,
        )

    def quantile(self, q: float) -> float:
        """``histogram_quantile`` as Prometheus does it: linear inside the bucket (NaN when empty)."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        lower_le, lower_n = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return lower_le
                width = n - lower_n
                return lower_le + (le - lower_le) * ((rank - lower_n) / width if width else 0.0)
            lower_le, lower_n = le, n
        return lower_le

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan


def parse_histogram(text: str, name: str) -> Histogram:
    """Read histogram ``name`` from a Prometheus text exposition, summing over other labels."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        metric, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if metric == f"{name}_bucket":
            le = _LE.search(labels)
            if le is not None:
                bound = float(le.group(1).replace("+Inf", "inf"))
                buckets[bound] = buckets.get(bound, 0.0) + value
        elif metric == f"{name}_sum":
            total += value
        elif metric == f"{name}_count":
            count += value
    return Histogram(buckets, total, count)


def parse_value(text: str, name: str) -> float:
    """Sample ``name`` (a gauge or counter) from a Prometheus text exposition, summed over its labels
    (NaN when absent)."""
    found = False
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            found = True
            total += float(match.group(3))
    return total if found else math.nan


def parse_counter(text: str, name: str, label: str) -> float:
    """The value of counter ``name`` with a label value ``label`` (0 when absent)."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name and f'"{label}"' in (match.group(2) or ""):
            return float(match.group(3))
    return 0.0


# -- RTP pacing --------------------------------------------------------------------------------


@dataclass
class Pacing:
    """Pacing of RTP streams in a window, pooled over streams."""

    jitter_ms: list[float]  # |interval - RTP-timestamp interval| of consecutive packets
    late_ms: list[float]  # (t - ts/48k) minus the stream's minimum of it in the window
    max_gap_ms: float
    packets: int

    @classmethod
    def of(cls, streams: Iterable[Sequence[tuple[float, int]]], start: float, end: float) -> Pacing:
        """``streams``: per stream, ``(time, RTP timestamp)`` in send or arrival order."""
        jitter: list[float] = []
        late: list[float] = []
        max_gap = 0.0
        packets = 0
        for stream in streams:
            rows = [(t, ts) for t, ts in stream if start <= t < end]
            if len(rows) < 2:
                continue
            packets += len(rows)
            offsets: list[float] = []
            media = 0  # unwrapped RTP time of the current packet, in samples
            previous_t, previous_ts = rows[0]
            offsets.append(previous_t)
            for t, ts in rows[1:]:
                step = (ts - previous_ts) % (1 << 32)
                if step >= 1 << 31:  # reordered (older) packet: skip it
                    continue
                media += step
                offsets.append(t - media / RTP_CLOCK)
                jitter.append(abs((t - previous_t) - step / RTP_CLOCK) * 1000)
                max_gap = max(max_gap, (t - previous_t) * 1000)
                previous_t, previous_ts = t, ts
            floor = min(offsets)
            late.extend((o - floor) * 1000 for o in offsets)
        return cls(jitter, late, max_gap, packets)


def first_at_least(
    arrivals: Sequence[tuple[float, int, int, int]],
    times: Sequence[float],
    start: float,
    end: float,
    size: int,
) -> float | None:
    """Time of the first arrival in ``[start, end)`` with a payload of at least ``size`` bytes."""
    i = bisect.bisect_left(times, start)
    while i < len(arrivals) and arrivals[i][0] < end:
        if arrivals[i][3] >= size:
            return arrivals[i][0]
        i += 1
    return None


def coach_onsets(
    arrivals: Sequence[tuple[float, int, int, int]],
    events: Iterable[tuple[float, str, str]],
    start: float,
    end: float,
    size: int,
) -> list[tuple[str, float | None]]:
    """For each ``coach.speaking`` event in ``[start, end)``: its item id and the arrival of the
    answer's first RTP packet of at least ``size`` bytes within -0.2 s / +0.3 s of it (None: none)."""
    times = [a[0] for a in arrivals]
    return [
        (item_id, first_at_least(arrivals, times, t - 0.2, t + 0.3, size))
        for t, kind, item_id in events
        if kind == "coach.speaking" and start <= t < end
    ]


def fmt(value: float, digits: int = 1) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_pair(values: Sequence[float], digits: int = 1) -> str:
    """``p50 / p95`` of ``values``."""
    return f"{fmt(pct(values, 50), digits)} / {fmt(pct(values, 95), digits)}"
