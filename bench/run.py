"""Benchmark channels_mini against Channels 4 and a bare floor; print a Markdown table.

Run from the repository root:

    python bench/run.py            # full run (about 7-10 minutes on 2 cores)
    python bench/run.py --quick    # short run (under 2 minutes)
    python bench/run.py --rounds 7 # more rounds for layer + echo benchmarks
    python bench/run.py --only redis stalled   # some sections only
    python bench/run.py --only history         # group sends with history vs without

Every benchmark runs its implementations back to back (channels_mini, Channels 4, floor;
the order is reversed on odd rounds), and each ratio is computed inside a round and then
summarised as the median over rounds. Figures from different runs are never compared.
Results also go to bench/results.json. See bench/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.settings_mini")

import django  # noqa: E402

django.setup()

from bench import (historybench, layerbench, presencebench, redisbench,  # noqa: E402
                   stalledbench, webbench)

IMPLS = ("mini", "ch4", "floor")
SECTIONS = ("layer", "echo", "broadcast", "memory", "flood", "presence", "redis", "stalled",
            "history")
HEADERS = {"mini": "channels_mini", "ch4": "Channels 4", "floor": "floor"}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def raise_file_limit(wanted: int = 65536) -> int:
    """Lift RLIMIT_NOFILE (inherited by the servers) so 1,000+ sockets fit on both ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- configuration -----------------------------------------------------------------------

def make_config(args) -> dict:
    quick = args.quick
    rounds = args.rounds or (2 if quick else 5)
    heavy = args.heavy_rounds or (1 if quick else min(rounds, 3))
    return {
        "quick": quick,
        "rounds": rounds,
        "heavy_rounds": heavy,
        "roundtrip_n": 5_000 if quick else 20_000,
        "group_members": [10, 100, 1000],
        "group_deliveries": 3_000 if quick else 10_000,
        "fanout_members": 1000,
        "fanout_repeats": 3 if quick else 7,
        "layer_capacity": 100,
        "echo_clients": [1, 50],
        "echo_seconds": 0.5 if quick else 2.0,
        "broadcast_clients": 200,
        "broadcast_sends": 200,
        "broadcast_idle_timeout": 3.0,
        "broadcast_hard_timeout": 20.0 if quick else 30.0,
        "memory_sockets": 1000,
        "memory_settle": 0.5 if quick else 1.0,
        "flood_probes": 20,
        "flood_probe_interval": 0.05,
        "flood_before_seconds": 1.0 if quick else 2.0,
        "flood_ramp_seconds": 0.25,
        "flood_during_seconds": 1.5 if quick else 3.0,
        "flood_cap": 5000,
        "flood_drain_timeout": 30.0,
        "presence_members": 1000,
        "redis_clients": 1000,
        "redis_senders": 4,
        "redis_rounds": 5,
        "redis_batch": 50,
        "redis_idle_timeout": 5.0,
        "redis_straggler_timeout": 15.0,
        # about 85 s a round (four servers, each held 15 s + 5 s): 2 rounds, quick 1
        "stalled_rounds": args.heavy_rounds or (1 if quick else 2),
        "stalled_clients": 20,
        "stalled_sends": 1500,
        "stalled_size": 16384,
        "stalled_hold": 15.0,
        "stalled_after": 5.0,
        # history: one process per flavour and round (`rounds`), about 6 s a round
        "history_members": [1, 100],
        "history_deliveries": 5_000 if quick else 20_000,
        "history_min_sends": 500 if quick else 2_000,
        "history_redis_sends": 300 if quick else 1_000,
        "history_batch": 50,
    }


# -- result bookkeeping ----------------------------------------------------------------------

class Row:
    """One table row: per-round figures for each implementation, plus how to show them."""

    def __init__(self, key, label, unit, higher_is_better, fmt="{:.2f}", metric=None):
        self.key, self.label, self.unit = key, label, unit
        self.higher_is_better, self.fmt = higher_is_better, fmt
        self.metric = metric  # for dict results: the key that ratios and medians use
        self.rounds: list[dict] = []  # [{impl: value-or-dict-or-{"error":..}}]

    def value(self, cell):
        if cell is None or (isinstance(cell, dict) and "error" in cell):
            return None
        return cell[self.metric] if self.metric else cell

    def median(self, impl):
        values = [self.value(r.get(impl)) for r in self.rounds]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def ratios(self, a, b) -> list[float]:
        """The ratio a/b of every round in which both sides produced a figure."""
        ratios = []
        for r in self.rounds:
            va, vb = self.value(r.get(a)), self.value(r.get(b))
            if va is not None and vb not in (None, 0):
                ratios.append(va / vb)
        return ratios

    def ratio(self, a, b):
        ratios = self.ratios(a, b)
        return (statistics.median(ratios), len(ratios)) if ratios else (None, 0)

    def cell(self, impl) -> str:
        errors = [r[impl]["error"] for r in self.rounds
                  if isinstance(r.get(impl), dict) and "error" in r[impl]]
        median = self.median(impl)
        if median is None:
            return "ERROR" if errors else "n/a"
        text = self.fmt.format(median)
        extra = self.extra(impl)
        if extra:
            text += f" ({extra})"
        if errors:
            text += f" [{len(errors)} failed]"
        return text

    def extra(self, impl) -> str:
        return ""

    def ratio_text(self) -> str:
        parts = []
        for a, b, name in (("mini", "ch4", "mini/ch4"), ("mini", "floor", "mini/floor")):
            value, n = self.ratio(a, b)
            if value is not None:
                parts.append(f"{name} {value:.2f}×")
        return ", ".join(parts) or "n/a"

    def to_json(self) -> dict:
        return {
            "label": self.label, "unit": self.unit, "higher_is_better": self.higher_is_better,
            "median": {impl: self.median(impl) for impl in IMPLS},
            "ratio_mini_over_ch4": self.ratio("mini", "ch4")[0],
            "ratio_mini_over_floor": self.ratio("mini", "floor")[0],
            "ratios_mini_over_ch4_per_round": self.ratios("mini", "ch4"),
            "ratios_mini_over_floor_per_round": self.ratios("mini", "floor"),
            "rounds": self.rounds,
        }


class EchoRow(Row):
    def extra(self, impl):
        p50 = [r[impl]["p50_ms"] for r in self.rounds if self.value(r.get(impl)) is not None]
        p99 = [r[impl]["p99_ms"] for r in self.rounds if self.value(r.get(impl)) is not None]
        if not p50:
            return ""
        cpu = [r[impl]["server_cpu_us_per_msg"] for r in self.rounds
               if self.value(r.get(impl)) is not None]
        return (f"p50 {statistics.median(p50):.2f} ms, p99 {statistics.median(p99):.2f} ms, "
                f"server CPU {statistics.median(cpu):.0f} µs/msg")

    def ratio_text(self):
        text = super().ratio_text()
        p99 = Row(self.key, "", "", False, metric="p99_ms")
        p99.rounds = self.rounds
        value, _ = p99.ratio("mini", "ch4")
        if value is not None:
            text += f"; p99 mini/ch4 {value:.2f}×"
        cpu = Row(self.key, "", "", False, metric="server_cpu_us_per_msg")
        cpu.rounds = self.rounds
        value, _ = cpu.ratio("mini", "ch4")
        if value is not None:
            text += f"; server CPU/msg mini/ch4 {value:.2f}×"
        return text


class BroadcastRow(Row):
    def extra(self, impl):
        got = [(r[impl]["received"], r[impl]["expected"]) for r in self.rounds
               if self.value(r.get(impl)) is not None]
        if not got:
            return ""
        received = statistics.median(g[0] for g in got)
        lowest = min(g[0] for g in got)
        text = f"{received:.0f}/{got[0][1]} received"
        if lowest != received:
            text += f", min {lowest}"
        disorder = max(r[impl].get("out_of_order", 0) for r in self.rounds
                       if self.value(r.get(impl)) is not None)
        if disorder:
            text += f", {disorder} out of order"
        cpu = [r[impl]["server_cpu_s"] for r in self.rounds if self.value(r.get(impl)) is not None]
        text += f", server CPU {statistics.median(cpu):.2f} s"
        return text

    def ratio_text(self):
        text = super().ratio_text()
        incomplete = [impl for impl in IMPLS for r in self.rounds
                      if self.value(r.get(impl)) is not None and not r[impl]["complete"]]
        if incomplete:
            names = sorted({HEADERS[i] for i in incomplete})
            text += f" — incomplete: {', '.join(names)} (time = last arrival)"
        return text


class FloodLatencyRow(Row):
    """Probe latency before / during the flood; ratios and the target use "during"."""

    #: The issue's target: under the same flood, within this factor of the bare app.
    TARGET = 3.0

    def __init__(self, key, label, percentile):
        super().__init__(key, label, "ms", False, metric=f"{percentile}_during_ms")
        self.before_metric = f"{percentile}_before_ms"

    def cell(self, impl):
        text = super().cell(impl)
        before = [r[impl][self.before_metric] for r in self.rounds
                  if self.value(r.get(impl)) is not None]
        if before and not text.startswith(("ERROR", "n/a")):
            text = f"{statistics.median(before):.2f} / {text}"
        return text

    def extra(self, impl):
        unanswered = sum(r[impl]["during"]["unanswered"] + r[impl]["before"]["unanswered"]
                         for r in self.rounds if self.value(r.get(impl)) is not None)
        return f"{unanswered} pings unanswered" if unanswered else ""

    def ratio_text(self):
        text = super().ratio_text()
        value, _ = self.ratio("mini", "floor")
        if value is not None:
            verdict = "met" if value <= self.TARGET else "missed"
            text += f" — target ≤ {self.TARGET:.0f}× floor during: {verdict}"
        return text


class FloodRow(Row):
    """The flooder's reply rate during the window, and whether every reply came in order."""

    def extra(self, impl):
        runs = [r[impl] for r in self.rounds if self.value(r.get(impl)) is not None]
        if not runs:
            return ""
        sent = statistics.median(run["flood_sent"] for run in runs)
        incomplete = sum(not run["flood_complete"] for run in runs)
        disordered = sum(not run["in_order"] for run in runs)
        text = f"{sent:,.0f} sent"
        if not incomplete and not disordered:
            return text + ", every reply in order"
        if incomplete:
            worst = min(runs, key=lambda run: run["flood_received"] / max(1, run["flood_sent"]))
            text += (f", INCOMPLETE in {incomplete}/{len(runs)} runs (worst "
                     f"{worst['flood_received']:,}/{worst['flood_sent']:,})")
        if disordered:
            text += f", OUT OF ORDER in {disordered}/{len(runs)} runs"
        return text

    def ratio_text(self):
        text = super().ratio_text()
        failed = sorted({HEADERS[impl] for impl in IMPLS for r in self.rounds
                         if self.value(r.get(impl)) is not None
                         and not (r[impl]["flood_complete"] and r[impl]["in_order"])})
        return text + (f" — missing or out-of-order replies: {', '.join(failed)}" if failed
                       else " — every flooder got every reply, in order")


class PresenceRow(Row):
    """A presence row: Channels has no presence, so its column is a dash."""

    def __init__(self, key, label, metric, per_op=None):
        super().__init__(key, label, "ms", False, metric=metric)
        self.per_op = per_op  # ("join_us_per_op", "join"): the µs per call, in the cell

    def cell(self, impl):
        return "—" if impl == "ch4" else super().cell(impl)

    def extra(self, impl):
        if self.per_op is None:
            return ""
        metric, what = self.per_op
        values = [r[impl][metric] for r in self.rounds if self.value(r.get(impl)) is not None]
        return f"{statistics.median(values):,.0f} µs/{what}" if values else ""

    def ratio_text(self):
        return super().ratio_text() + " — no Channels 4 figure: Channels has no presence"


class RedisBurstRow(Row):
    """A redis burst row: channels_mini and Channels 4 on one channels_redis layer; no floor."""

    def cell(self, impl):
        return "—" if impl == "floor" else super().cell(impl)

    def _runs(self, impl):
        return [r[impl] for r in self.rounds if self.value(r.get(impl)) is not None]

    def extra(self, impl):
        runs = self._runs(impl)
        if not runs:
            return ""
        if self.metric == "received":
            lowest = min(run["received"] for run in runs)
            text = f"of {runs[0]['expected']:,}"
            if lowest != self.median(impl):
                text += f", min {lowest:,}"
            dropped = [run.get("dropped") for run in runs if run.get("dropped") is not None]
            if dropped:
                text += f"; dropped {statistics.median(dropped):,.0f}"
                text += (" (stats())" if runs[0].get("dropped_source", "").startswith(
                    "channels_mini") else " (channels_redis INFO log)")
            return text
        sends = statistics.median(run["sends_done_s"] for run in runs)
        cpu = statistics.median(run["server_cpu_burst_s"] for run in runs)
        return f"sends done at {sends:.2f} s; server CPU {cpu:.1f} s in the burst"

    def ratio_text(self):
        text = super().ratio_text()
        incomplete = sorted({HEADERS[impl] for impl in ("mini", "ch4") for run in self._runs(impl)
                             if not run["complete"]})
        if incomplete:
            text += f" — incomplete: {', '.join(incomplete)}"
            if self.metric == "seconds":
                text += " (time = last arrival, of fewer messages)"
        return text


class StalledRow(Row):
    """A stalled-readers row: channels_mini only, under one ASGI server."""

    def __init__(self, key, label, metric):
        super().__init__(key, label, "MiB", False, fmt="{:+.1f}", metric=metric)

    def cell(self, impl):
        return "—" if impl != "mini" else super().cell(impl)

    def extra(self, impl):
        runs = [r[impl] for r in self.rounds if self.value(r.get(impl)) is not None]
        if not runs:
            return ""
        med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
        if self.metric == "growth_after_sends_mib":
            dropped = med_stat(runs, "stats_after_sends", "dropped")
            queued = med_stat(runs, "stats_after_sends", "messages")
            offered = runs[0]["offered_mib"]
            return (f"{med('rss_before_mib'):.1f} → {med('rss_after_sends_mib'):.1f} MiB, "
                    f"peak {med('rss_peak_mib'):.1f}; {offered:.0f} MiB offered, "
                    f"{dropped} frames dropped, {queued} queued")
        closed = "; ".join(
            f"{run['closed_by_server']}/{run['closed_by_server'] + run['held_at_end_of_hold']}"
            + (f" at {min(run['closed_by_server_s']):.1f}–{max(run['closed_by_server_s']):.1f} s"
               if run["closed_by_server_s"] else "")
            for run in runs)
        return (f"{med('rss_after_leave_mib'):.1f} MiB; closed by the server within "
                f"{int(runs[0]['hold_s'])} s of connecting: {closed}")

    def ratio_text(self):
        return "— (channels_mini only, no ratio)"


class HistoryRow(Row):
    """A history row: one layer's group_send to a group with history (channels_mini column)
    and to a group without (floor column), in the same process; no Channels 4 figure."""

    def __init__(self, key, label):
        super().__init__(key, label, "µs/send", False, metric="us_per_send")

    def cell(self, impl):
        return "—" if impl == "ch4" else super().cell(impl)

    def extra(self, impl):
        median = self.median(impl)
        if not median:
            return ""
        kind = "with history" if impl == "mini" else "no history"
        return f"{kind}, {1e6 / median:,.0f} sends/s"

    def ratio_text(self):
        value, _ = self.ratio("mini", "floor")
        if value is None:
            return "n/a"
        extra = [self.value(r["mini"]) - self.value(r["floor"]) for r in self.rounds
                 if self.value(r.get("mini")) is not None and self.value(r.get("floor")) is not None]
        return (f"history/plain {value:.2f}× (+{statistics.median(extra):,.1f} µs/send) — "
                "floor column: the same layer, a group without history")


def med_stat(runs, stats_key, field):
    values = [run[stats_key][field] for run in runs if field in run.get(stats_key, {})]
    return f"{statistics.median(values):,.0f}" if values else "?"


def measure(fn, *args, **kwargs):
    """Run one measurement; an exception becomes {"error": ...} instead of ending the run."""
    failed = [a for a in args if isinstance(a, Exception)]  # e.g. a server that never started
    if failed:
        log(f"    ! {fn.__name__} skipped: {failed[0]!r}"[:800])
        return {"error": repr(failed[0])[:500]}
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # recorded in the results and shown in the table
        log(f"    ! {fn.__name__} failed: {exc!r}")
        log("      " + traceback.format_exc().replace("\n", "\n      ")[-1500:])
        return {"error": repr(exc)[:500]}


def ordered(items, round_index):
    """Interleave: A B C on even rounds, C B A on odd ones, so drift hits both sides."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


# -- 1. layer benchmarks -------------------------------------------------------------------

def layer_factories(cfg, mini):
    import channels.layers

    capacity = cfg["layer_capacity"]
    factories = {
        "ch4": lambda: channels.layers.InMemoryChannelLayer(capacity=capacity),
        "floor": layerbench.BareLayer,
    }
    if mini is not None:
        factories["mini"] = lambda: mini.InMemoryChannelLayer(capacity=capacity)
    return factories


def run_layer(cfg, mini, rows):
    factories = layer_factories(cfg, mini)
    rt = Row("layer_roundtrip", "layer: send+receive round trip, one channel", "µs", False)
    groups = {m: Row(f"group_send_{m}", f"layer: group_send to M={m}, each receives",
                     "µs/delivery", False) for m in cfg["group_members"]}
    fan = Row("fanout_waiting_1000", "layer: one group_send to 1,000 waiting receivers "
              "(until all received)", "ms", False)
    rows += [rt, *groups.values()]
    scaling = Row("group_send_scaling", "layer: per-delivery cost M=1000 ÷ M=10", "×", False)
    fan_call = Row("fanout_call_1000", "layer: one group_send to 1,000 waiting receivers "
                   "(the group_send call alone)", "ms", False)
    rows += [scaling, fan, fan_call]
    for r in range(cfg["rounds"]):
        log(f"[layer] round {r + 1}/{cfg['rounds']}")
        impls = ordered([i for i in IMPLS if i in factories], r)
        cells = {"rt": {}, "fan": {}, "fan_call": {}, **{m: {} for m in groups}}
        for impl in impls:
            cells["rt"][impl] = measure(layerbench.roundtrip, factories[impl], cfg["roundtrip_n"])
        for m in groups:
            for impl in impls:
                cells[m][impl] = measure(layerbench.group_send_members, factories[impl], m,
                                         cfg["group_deliveries"])
        for impl in impls:
            cells["fan"][impl] = measure(layerbench.fanout_waiting, factories[impl],
                                         cfg["fanout_members"], cfg["fanout_repeats"])
            cells["fan_call"][impl] = measure(layerbench.fanout_waiting, factories[impl],
                                              cfg["fanout_members"], cfg["fanout_repeats"], "call")
        rt.rounds.append(cells["rt"])
        fan.rounds.append(cells["fan"])
        fan_call.rounds.append(cells["fan_call"])
        for m, row in groups.items():
            row.rounds.append(cells[m])
        big, small = max(groups), min(groups)
        scale = {}
        for impl in impls:
            a, b = groups[big].value(cells[big].get(impl)), groups[small].value(cells[small].get(impl))
            scale[impl] = a / b if a is not None and b else {"error": "missing input"}
        scaling.rounds.append(scale)
        log("   ", {k: {i: _short(v) for i, v in c.items()} for k, c in cells.items()})


def _short(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items() if k in
                ("msgs_per_s", "p99_ms", "server_cpu_us_per_msg", "received", "seconds",
                 "server_cpu_s", "kib_per_socket", "kib_per_socket_marginal", "error",
                 "p50_during_ms", "p99_during_ms", "flood_replies_per_s", "flood_complete",
                 "in_order", "dropped", "growth_after_sends_mib", "growth_after_leave_mib",
                 "closed_by_server", "server_cpu_burst_s")}
    return value


# -- 2. web benchmarks ---------------------------------------------------------------------

#: (row key, label, {impl: (server, path)})
ECHO_FLAVOURS = [
    ("sync", "sync handler", {"mini": ("mini", "/sync/"), "ch4": ("ch4", "/sync/"),
                              "floor": ("bare", "/echo/")}),
    ("async", "async handler", {"mini": ("mini", "/async/"), "ch4": ("ch4", "/async/"),
                                "floor": ("bare", "/echo/")}),
]
BROADCAST_FLAVOURS = [
    ("sync", "sync handler", {"mini": ("mini", "/broadcast/"), "ch4": ("ch4", "/broadcast/"),
                              "floor": ("bare", "/broadcast/")}),
    ("async", "async handler", {"mini": ("mini", "/broadcast-async/"),
                                "ch4": ("ch4", "/broadcast-async/"),
                                "floor": ("bare", "/broadcast/")}),
]


def target(flavours, key, impl):
    """(server name, path) that serves flavour *key* for implementation *impl*."""
    for flavour_key, _, targets in flavours:
        if flavour_key == key:
            return targets[impl]
    raise KeyError(key)


def run_echo(cfg, have_mini, rows, log_dir):
    echo_rows = {}
    for clients in cfg["echo_clients"]:
        for key, label, _ in ECHO_FLAVOURS:
            row = EchoRow(f"echo_{key}_{clients}",
                          f"ws echo, {label}, {clients} client{'s' * (clients > 1)}",
                          "msgs/s", True, fmt="{:,.0f}", metric="msgs_per_s")
            echo_rows[(key, clients)] = row
            rows.append(row)
    apps = ["bare", "ch4"] + (["mini"] if have_mini else [])
    with webbench.servers(apps, log_dir) as running:
        for r in range(cfg["rounds"]):
            log(f"[echo] round {r + 1}/{cfg['rounds']}")
            for clients in cfg["echo_clients"]:
                cells = {key: {} for key, _, _ in ECHO_FLAVOURS}
                floor_result = None
                # one floor run per round and client count, shared by both flavours
                plan = [("floor", None)] + [(impl, key) for key, _, _ in ECHO_FLAVOURS
                                            for impl in ("mini", "ch4")]
                for impl, key in ordered(plan, r):
                    if impl == "mini" and not have_mini:
                        continue
                    server, path = target(ECHO_FLAVOURS, key or "sync", impl)
                    result = measure(webbench.echo, running[server], path, clients,
                                     cfg["echo_seconds"])
                    if impl == "floor":
                        floor_result = result
                    else:
                        cells[key][impl] = result
                for key in cells:
                    cells[key]["floor"] = floor_result
                    echo_rows[(key, clients)].rounds.append(cells[key])
                log(f"    {clients} client(s):",
                    {k: {i: _short(v) for i, v in c.items()} for k, c in cells.items()})


def run_broadcast(cfg, have_mini, rows, log_dir):
    n, k = cfg["broadcast_clients"], cfg["broadcast_sends"]
    bc_rows = {}
    for key, label, _ in BROADCAST_FLAVOURS:
        row = BroadcastRow(f"broadcast_{key}", f"broadcast, {label}: {n} clients × {k} "
                           f"group sends (s until all {n * k:,} received)", "s", False,
                           metric="seconds")
        bc_rows[key] = row
        rows.append(row)
    plan = [(key, impl) for key, _, _ in BROADCAST_FLAVOURS for impl in ("mini", "ch4")]
    plan.insert(0, ("floor", "floor"))
    for r in range(cfg["heavy_rounds"]):
        log(f"[broadcast] round {r + 1}/{cfg['heavy_rounds']}")
        cells = {key: {} for key in bc_rows}
        floor_result = None
        for key, impl in ordered(plan, r):
            if impl == "mini" and not have_mini:
                continue
            server_name, path = target(BROADCAST_FLAVOURS, "sync" if key == "floor" else key,
                                       impl)
            # a fresh server per run: no queues or groups left over from the previous run
            result = measure(_broadcast_fresh, server_name, path, cfg, log_dir)
            if impl == "floor":
                floor_result = result
            else:
                cells[key][impl] = result
        for key in cells:
            cells[key]["floor"] = floor_result
            bc_rows[key].rounds.append(cells[key])
        log("   ", {k2: {i: _short(v) for i, v in c.items()} for k2, c in cells.items()})


def _broadcast_fresh(server_name, path, cfg, log_dir):
    with webbench.Server(server_name, log_dir) as server:
        return webbench.broadcast(server, path, cfg["broadcast_clients"],
                                  cfg["broadcast_sends"], cfg["broadcast_idle_timeout"],
                                  cfg["broadcast_hard_timeout"])


def run_memory(cfg, have_mini, rows, log_dir):
    n = cfg["memory_sockets"]
    mem_rows = {}
    for metric, what in (("kib_per_socket", f"first {n:,} sockets"),
                         ("kib_per_socket_marginal", f"next {n:,} sockets (marginal)")):
        for key, label, _ in ECHO_FLAVOURS:
            row = Row(f"memory_{key}" + ("_marginal" if "marginal" in metric else ""),
                      f"memory per idle socket, {label} consumer, {what}, server RSS", "KiB",
                      False, fmt="{:.1f}", metric=metric)
            mem_rows[(metric, key)] = row
            rows.append(row)
    baseline = Row("memory_baseline", "server RSS after warm-up, before the sockets (sync "
                   "consumer server)", "MiB", False, fmt="{:.1f}", metric="rss_before_mib")
    mem_rows[("rss_before_mib", "sync")] = baseline
    rows.append(baseline)
    for cells in _rounds_with_one_floor("memory", _memory_fresh, cfg, have_mini, log_dir):
        for (metric, key), row in mem_rows.items():
            row.rounds.append(cells[key])


def _rounds_with_one_floor(section, fresh, cfg, have_mini, log_dir):
    """Run *fresh* for channels_mini and Channels 4 in each flavour, and once for the bare app
    (its figure stands for both flavours), in interleaved order; yield each round's cells."""
    plan = [("floor", "floor")] + [(key, impl) for key, _, _ in ECHO_FLAVOURS
                                   for impl in ("mini", "ch4")]
    for r in range(cfg["heavy_rounds"]):
        log(f"[{section}] round {r + 1}/{cfg['heavy_rounds']}")
        cells = {key: {} for key, _, _ in ECHO_FLAVOURS}
        floor_result = None
        for key, impl in ordered(plan, r):
            if impl == "mini" and not have_mini:
                continue
            server_name, path = target(ECHO_FLAVOURS, "sync" if key == "floor" else key, impl)
            result = measure(fresh, server_name, path, cfg, log_dir)
            if impl == "floor":
                floor_result = result
            else:
                cells[key][impl] = result
        for key in cells:
            cells[key]["floor"] = floor_result
        yield cells
        log("   ", {k2: {i: _short(v) for i, v in c.items()} for k2, c in cells.items()})


def _memory_fresh(server_name, path, cfg, log_dir):
    with webbench.Server(server_name, log_dir) as server:
        return webbench.memory(server, path, cfg["memory_sockets"], cfg["memory_settle"])


def run_flood(cfg, have_mini, rows, log_dir):
    probes = cfg["flood_probes"]
    flood_rows = {}
    for key, label, _ in ECHO_FLAVOURS:
        flood_rows[key] = [
            FloodLatencyRow(f"flood_{key}_p50", f"flood, {label}: {probes} probes' p50 "
                            "before / during the flood", "p50"),
            FloodLatencyRow(f"flood_{key}_p99", f"flood, {label}: {probes} probes' p99 "
                            "before / during the flood", "p99"),
            FloodRow(f"flood_{key}_rate", f"flood, {label}: flooder's echo replies during "
                     "the window", "replies/s", True, fmt="{:,.0f}",
                     metric="flood_replies_per_s"),
        ]
        rows.extend(flood_rows[key])
    for cells in _rounds_with_one_floor("flood", _flood_fresh, cfg, have_mini, log_dir):
        for key in cells:
            for row in flood_rows[key]:
                row.rounds.append(cells[key])


def _flood_fresh(server_name, path, cfg, log_dir):
    # a fresh server per run: nothing queued from the previous flood is still draining
    with webbench.Server(server_name, log_dir) as server:
        return webbench.flood(server, path, cfg["flood_probes"], cfg["flood_probe_interval"],
                              cfg["flood_before_seconds"], cfg["flood_during_seconds"],
                              cfg["flood_ramp_seconds"], cfg["flood_cap"],
                              cfg["flood_drain_timeout"])


# -- 3. presence -------------------------------------------------------------------------------

#: (backend key, label of the cache, label of the floor)
PRESENCE_BACKENDS = [
    ("locmem", "in-process (Django's locmem default cache)", "a plain dict"),
    ("redis", "Redis (Django's RedisCache, local redis-server)", "one Redis hash via redis-py"),
]


def start_redis(server: contextlib.ExitStack, section: str, log_dir):
    """A redis-server for *section*, stopped with *server*: its port, or the error that stopped
    it (the rows that need Redis then show ERROR; the others run)."""
    try:
        port = server.enter_context(presencebench.redis_server(log_dir))
        log(f"[{section}] redis-server {presencebench.redis_version()} on 127.0.0.1:{port}")
        return port
    except Exception as exc:
        log(f"    ! redis-server: {exc!r}")
        return exc


def run_presence(cfg, mini, rows, log_dir):
    """Join, read and leave a group of N tracked members: the sync API, from this (plain)
    thread; the in-process default cache and a real redis-server; the floor in between."""
    n = cfg["presence_members"]
    presence_rows = {}
    for backend, cache_label, floor_label in PRESENCE_BACKENDS:
        prefix = f"presence, {cache_label}: "
        presence_rows[backend] = [
            PresenceRow(f"presence_{backend}_join", prefix + f"{n:,} joins (Group.track, "
                        f"each announced to the group; floor: {floor_label})", "join_ms",
                        ("join_us_per_op", "join")),
            PresenceRow(f"presence_{backend}_read", prefix + f"one presence() read of {n:,} "
                        "members", "read_ms"),
            PresenceRow(f"presence_{backend}_leave", prefix + f"{n:,} leaves (untrack, each "
                        "announced)", "leave_ms", ("leave_us_per_op", "leave")),
        ]
        for row in presence_rows[backend]:
            rows.append(row)
    server = contextlib.ExitStack()
    try:
        port = start_redis(server, "presence", log_dir)

        def mini_run(backend, run, port):
            if mini is None:
                return {"error": "channels_mini unavailable"}
            if backend == "locmem":
                if presencebench.presence_cache_backend() != "LocMemCache":
                    raise AssertionError("the default cache is not Django's LocMemCache")
                return presencebench.mini_presence(mini, n, run)
            with presencebench.redis_cache(port):
                if presencebench.presence_cache_backend() != "RedisCache":
                    raise AssertionError("CHANNELS_MINI_PRESENCE did not reach the RedisCache")
                return presencebench.mini_presence(mini, n, run)

        def floor_run(backend, run, port):
            if backend == "locmem":
                return presencebench.floor_dict(n, run)
            return presencebench.floor_redis(port, n, run)

        plan = [(backend, impl) for backend, _, _ in PRESENCE_BACKENDS for impl in ("mini", "floor")]
        for r in range(cfg["heavy_rounds"]):
            log(f"[presence] round {r + 1}/{cfg['heavy_rounds']}")
            cells = {backend: {} for backend in presence_rows}
            for backend, impl in ordered(plan, r):
                run = f"r{r}-{impl}-{backend}"
                fn = mini_run if impl == "mini" else floor_run
                # with no redis-server (port is its exception) measure() skips the run
                cells[backend][impl] = measure(fn, backend, run,
                                               port if backend == "redis" else None)
            for backend, backend_rows in presence_rows.items():
                for row in backend_rows:
                    row.rounds.append(cells[backend])
            log("   ", {b: {i: {k: round(v, 3) for k, v in c.items() if k != "members"}
                            if "error" not in c else c for i, c in cs.items()}
                        for b, cs in cells.items()})
    finally:
        server.close()  # stops redis-server


# -- 4. redis burst ----------------------------------------------------------------------------

REDIS_APPS = {"mini": "mini_redis", "ch4": "ch4_redis"}


def run_redis(cfg, have_mini, rows, log_dir):
    """The issue's burst on one channels_redis layer: 1,000 single-member groups, 4 handlers
    x 250 group sends a round, 5 rounds; channels_mini and Channels 4 against the same
    redis-server (emptied before each run), a fresh uvicorn process for each run."""
    n = cfg["redis_clients"]
    expected = n * cfg["redis_rounds"]
    per = n // cfg["redis_senders"]
    what = (f"{n:,} clients in {n:,} one-member groups, {cfg['redis_senders']} handlers × {per} "
            f"group sends × {cfg['redis_rounds']} rounds")
    delivered = RedisBurstRow("redis_burst_delivered", f"redis burst ({what}): messages "
                              "delivered", "msgs", True, fmt="{:,.0f}", metric="received")
    seconds = RedisBurstRow("redis_burst_seconds", "redis burst: s from the first frame to the "
                            "last delivery", "s", False, metric="seconds")
    rows += [delivered, seconds]
    options = dict(clients=n, senders=cfg["redis_senders"], rounds=cfg["redis_rounds"],
                   batch=cfg["redis_batch"], idle_timeout=cfg["redis_idle_timeout"],
                   straggler_timeout=cfg["redis_straggler_timeout"])
    server = contextlib.ExitStack()
    try:
        port = start_redis(server, "redis", log_dir)
        for r in range(cfg["heavy_rounds"]):
            log(f"[redis] round {r + 1}/{cfg['heavy_rounds']}")
            cells = {}
            for impl in ordered(["mini", "ch4"], r):
                if impl == "mini" and not have_mini:
                    continue
                cells[impl] = measure(redisbench.fresh, REDIS_APPS[impl], port,
                                      f"r{r}{impl}", log_dir, **options)
            delivered.rounds.append(cells)
            seconds.rounds.append(cells)
            log("   ", {i: _short(v) for i, v in cells.items()}, f"(expected {expected:,})")
    finally:
        server.close()  # stops redis-server


# -- 5. stalled readers --------------------------------------------------------------------------

def run_stalled(cfg, have_mini, rows, log_dir):
    """channels_mini under each ASGI server: 20 clients stop reading while 1,500 group sends
    of 16 KB go to them; the server's RSS and whether it closes them. A fresh server each run."""
    size_kb = cfg["stalled_size"] // 1024
    stalled_rows = {}
    for key, label, _, _ in stalledbench.SERVERS:
        prefix = f"stalled readers, {label}: server RSS growth"
        stalled_rows[key] = [
            StalledRow(f"stalled_{key}_sends", f"{prefix} after {cfg['stalled_sends']:,} group "
                       f"sends of {size_kb} KB to {cfg['stalled_clients']} clients that never "
                       "read", "growth_after_sends_mib"),
            StalledRow(f"stalled_{key}_left", f"{prefix} {cfg['stalled_after']:.0f} s after "
                       "those clients went away", "growth_after_leave_mib"),
        ]
        rows.extend(stalled_rows[key])
    if not have_mini:
        return
    problems = stalledbench.warm(log_dir)
    log("[stalled] bytecode cache warmed for each server" +
        (f"; problems: {problems}" if problems else ""))
    options = dict(clients=cfg["stalled_clients"], sends=cfg["stalled_sends"],
                   size=cfg["stalled_size"], hold=cfg["stalled_hold"], after=cfg["stalled_after"])
    for r in range(cfg["stalled_rounds"]):
        log(f"[stalled] round {r + 1}/{cfg['stalled_rounds']}")
        for key, label, kind, extra in ordered(stalledbench.SERVERS, r):
            result = measure(stalledbench.fresh, kind, extra, log_dir, **options)
            for row in stalled_rows[key]:
                row.rounds.append({"mini": result})
            log(f"    {label}:", _short(result))


# -- 6. history --------------------------------------------------------------------------------

#: (flavour, label of the layer, member counts measured)
HISTORY_FLAVOURS = [
    ("memory", "in memory (InMemoryChannelLayer)", None),
    ("redis", "Redis (channels_redis RedisChannelLayer)", [1]),
    ("pubsub", "Redis pub/sub (channels_redis RedisPubSubChannelLayer)", [1]),
]


def run_history(cfg, have_mini, rows, log_dir):
    """A group send of 100 characters to a group with history (CHANNELS_MINI_HISTORY) and to
    one without, on the same layer in one process: in memory with 1 and 100 members, on a
    local redis-server with 1 (core and pub/sub layers). One fresh process per flavour and
    round (historybench.child), the Redis emptied before each."""
    history_rows = {}
    for flavour, label, members in HISTORY_FLAVOURS:
        for m in members or cfg["history_members"]:
            row = HistoryRow(f"history_{flavour}_{m}", f"history, {label}: group_send of 100 "
                             f"chars to {m} member{'s' * (m > 1)}, a group with history "
                             "(SIZE 200) vs one without")
            history_rows[(flavour, m)] = row
            rows.append(row)
    if not have_mini:
        return
    options = {
        "memory": dict(members=cfg["history_members"], deliveries=cfg["history_deliveries"],
                       min_sends=cfg["history_min_sends"], batch=cfg["history_batch"]),
        "redis": dict(sends=cfg["history_redis_sends"], batch=cfg["history_batch"]),
    }
    options["pubsub"] = options["redis"]
    server = contextlib.ExitStack()
    try:
        port = start_redis(server, "history", log_dir)

        def one(flavour, redis_port):
            if redis_port is not None:
                redisbench.flush(redis_port)  # no stream, group or message of an earlier run
            return historybench.child(flavour, str(Path(log_dir) / f"history-{flavour}.log"),
                                      redis_port, webbench.PYCACHE_DIR, **options[flavour])

        for r in range(cfg["rounds"]):
            log(f"[history] round {r + 1}/{cfg['rounds']}")
            summary = {}
            for flavour, _, _ in ordered(HISTORY_FLAVOURS, r):
                # with no redis-server (port is its exception) measure() skips the Redis runs
                result = measure(one, flavour, None if flavour == "memory" else port)
                for (row_flavour, m), row in history_rows.items():
                    if row_flavour != flavour:
                        continue
                    case = result.get("cases", {}).get(str(m)) if "error" not in result else None
                    if case is None:
                        error = result if "error" in result else {"error": f"no case for {m}"}
                        row.rounds.append({"mini": error, "floor": error})
                        continue
                    row.rounds.append({
                        "mini": {"us_per_send": case["history_us_per_send"], **case},
                        "floor": {"us_per_send": case["plain_us_per_send"], **case}})
                    summary[f"{flavour}/{m}"] = (round(case["history_us_per_send"], 2),
                                                 round(case["plain_us_per_send"], 2))
            log("    (history µs, plain µs):", summary)
    finally:
        server.close()  # stops redis-server


# -- output ----------------------------------------------------------------------------------

def table(rows) -> str:
    lines = [
        "| benchmark | channels_mini | Channels 4 | floor (bare asyncio / bare ASGI) | ratio(s) |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        arrow = "higher is better" if row.higher_is_better else "lower is better"
        lines.append(f"| {row.label} [{row.unit}, {arrow}] | {row.cell('mini')} | "
                     f"{row.cell('ch4')} | {row.cell('floor')} | {row.ratio_text()} |")
    return "\n".join(lines)


def environment(mini_path: Path) -> dict:
    import channels
    import uvicorn
    import websockets

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "django": django.__version__,
        "channels": channels.__version__,
        "uvicorn": uvicorn.__version__,
        "websockets": websockets.__version__,
    }
    try:
        import redis

        env["redis_py"] = redis.__version__
    except ImportError:
        env["redis_py"] = "unavailable"
    env["redis_server"] = presencebench.redis_version()
    from importlib import metadata

    for package in ("channels_redis", "daphne", "hypercorn"):  # the redis and stalled rows
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "unavailable"
    if mini_path.exists():
        env["channels_mini_sha256"] = hashlib.sha256(mini_path.read_bytes()).hexdigest()[:16]
    try:
        env["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                         capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds for layer, echo and history "
                        "benchmarks (default 5, quick 2)")
    parser.add_argument("--heavy-rounds", type=int, help="rounds for broadcast, memory, "
                        "flood, presence and redis (default min(rounds, 3), quick 1), and for "
                        "stalled (default 2, quick 1)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS,
                        help="run only these sections")
    parser.add_argument("--output", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--allow-missing-mini", action="store_true",
                        help="development only: run without channels_mini if it fails to "
                        "import (the table then shows n/a in its column)")
    args = parser.parse_args(argv)
    cfg = make_config(args)
    sections = args.only or list(SECTIONS)

    try:
        import channels_mini as mini
    except Exception as exc:
        if not args.allow_missing_mini:
            log(f"cannot import channels_mini from {REPO_ROOT}: {exc!r}\n"
                "Fix the import (or pass --allow-missing-mini while developing the harness).")
            return 2
        log(f"WARNING: channels_mini unavailable ({exc!r}); its column will be n/a")
        mini = None

    fd_limit = raise_file_limit()
    log_dir = os.environ.get("BENCH_LOG_DIR") or str(Path("/tmp") / f"bench-logs-{os.getpid()}")
    os.makedirs(log_dir, exist_ok=True)
    log(f"config: {cfg}\nserver logs: {log_dir}\nfile limit: {fd_limit}")
    load_before = os.getloadavg()
    if load_before[0] > (os.cpu_count() or 1) * 0.5:
        log(f"note: load average is {load_before[0]:.1f} on {os.cpu_count()} CPUs; other work "
            "will add noise (the interleaved ratios are the figures to trust)")
    started = time.perf_counter()
    if set(sections) - {"layer", "presence", "history"}:  # these start no ASGI servers
        apps = ["bare", "ch4"] + (["mini"] if mini is not None else [])
        problems = webbench.warm_bytecode_cache(apps)
        log(f"bytecode cache {webbench.PYCACHE_DIR} warmed" +
            (f"; problems: {problems}" if problems else ""))
    rows: list[Row] = []
    runners = {"layer": lambda: run_layer(cfg, mini, rows),
               "echo": lambda: run_echo(cfg, mini is not None, rows, log_dir),
               "broadcast": lambda: run_broadcast(cfg, mini is not None, rows, log_dir),
               "memory": lambda: run_memory(cfg, mini is not None, rows, log_dir),
               "flood": lambda: run_flood(cfg, mini is not None, rows, log_dir),
               "presence": lambda: run_presence(cfg, mini, rows, log_dir),
               "redis": lambda: run_redis(cfg, mini is not None, rows, log_dir),
               "stalled": lambda: run_stalled(cfg, mini is not None, rows, log_dir),
               "history": lambda: run_history(cfg, mini is not None, rows, log_dir)}
    for section in sections:
        t = time.perf_counter()
        runners[section]()
        log(f"[{section}] done in {time.perf_counter() - t:.1f}s")
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    markdown = table(rows)
    print(markdown)
    print(f"\n_{'quick' if cfg['quick'] else 'full'} run, {cfg['rounds']} rounds "
          f"(broadcast/memory/flood/presence/redis: {cfg['heavy_rounds']}, stalled: "
          f"{cfg['stalled_rounds']}), {elapsed:.0f} s; figures are medians "
          "over rounds, ratios are medians of per-round ratios; 1-minute load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} CPUs._")
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed,
        "config": cfg,
        "environment": environment(REPO_ROOT / "channels_mini.py"),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "channels_mini_available": mini is not None,
        "rows": {row.key: row.to_json() for row in rows},
        "table_markdown": markdown,
    }
    Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
