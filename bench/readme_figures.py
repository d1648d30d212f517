"""The README's figures table, rendered from the benches' evidence files (docs/evidence/*.json).

Every figure in the table is read from an evidence file; each row names the file and the command
that writes it. The table sits in README.md between the two marker comments below.

    python bench/readme_figures.py            # print the table
    python bench/readme_figures.py --write    # put it into README.md
    python bench/readme_figures.py --check    # exit 1 if README.md's table differs

``tests/test_readme_figures.py`` fails when README.md and the evidence disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- figures:begin (bench/readme_figures.py --write; do not edit by hand) -->"
END = "<!-- figures:end -->"

Evidence = dict[str, Any]


@dataclass(frozen=True)
class Row:
    what: str
    evidence: str  # file name under docs/evidence/
    command: str
    figure: Callable[[Evidence], str]


def _pct(share: float) -> str:
    """0.9499 -> '95.0 %', 0.4105 -> '41.1 %' (halves round up, as people round)."""
    percent = (Decimal(str(share)) * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{percent} %"


def _accuracy(ev: Evidence) -> str:
    ours = ev["models"]["ours (cnn)"]
    lstm = ev["models"]["seed-lstm"]
    exported = [split["as_exported"] for split in ours["splits"]]
    same = all(e["litert"] == e["tensorflow"] for e in exported)
    differ = sum(e["windows_classed_differently"] for e in exported)
    return (
        f"ours (cnn) **{_pct(ours['median_accuracy'])} / {_pct(ours['median_macro_f1'])}** "
        f"(worst split {_pct(ours['min_accuracy'])}); "
        f"the device turned 90° / 180° about x, no answers: "
        f"{_pct(ours['median_turned_accuracy']['x90'])} / "
        f"{_pct(ours['median_turned_accuracy']['x180'])}; "
        f"{'the same' if same else 'NOT the same'} on LiteRT ({differ} test windows classed "
        f"differently, probabilities within "
        f"{max(e['max_probability_gap'] for e in exported):.0e}); "
        f"the article's stateful LSTM baseline "
        f"{_pct(lstm['median_accuracy'])} / {_pct(lstm['median_macro_f1'])}"
    )


def _placement(ev: Evidence) -> str:
    by_settings = {json.dumps(c["settings"], sort_keys=True): c["mean"] for c in ev["candidates"]}
    landed = by_settings.get(json.dumps({"min_epochs": 0, "rotation": "small"}, sort_keys=True))
    chosen = by_settings[json.dumps({})]  # the defaults

    def figures(mean: dict[str, Any]) -> str:
        return (
            f"upright {_pct(mean['test_upright'])}, turned 90° about x "
            f"{_pct(mean['test_x90'])}, 180° {_pct(mean['test_x180'])}, 90° about y / z "
            f"{_pct(mean['test_y90'])} / {_pct(mean['test_z90'])}"
        )

    before = f"; without turning about gravity in training: {figures(landed)}" if landed else ""
    return f"**{figures(chosen)}**{before}"


def _personalize(ev: Evidence) -> str:
    litert = ev["runtimes"]["litert"]
    results = litert["results"]
    same = all(  # the figures below hold on each runtime (the seconds taken aside)
        {name: r["by_k"] for name, r in runtime["results"].items()}
        == {name: r["by_k"] for name, r in results.items()}
        for runtime in ev["runtimes"].values()
    )

    def row(protocol: str, k: str = "20") -> dict[str, Any]:
        by_k: dict[str, Any] = results[protocol]["by_k"][k]
        return by_k

    def change(protocol: str, k: str = "20") -> str:
        r = row(protocol, k)
        return (
            f"{r['mean_user_accuracy_global']:.1f} -> {r['mean_user_accuracy_device']:.1f} %, "
            f"{r['users_worse_by_more_than_half_a_point']} worse"
        )

    version = row("new_version_turned_90_time_order")
    lgp = litert["learn_guard_persist_per_answer"]
    people = sum(len(s["users"]) for s in ev["splits"].values())
    return (
        f"mean accuracy per person after 20 answers, global model -> device, of {people}: "
        f"**time order {change('time_order')}**; every 3rd {change('spread_every_3rd')}; "
        f"25 % wrong {change('time_order_25pct_wrong')}; "
        f"**device turned 90°: {change('turned_90_time_order')} (time order), "
        f"{change('turned_90_every_3rd')} (every 3rd)**; a new version after 20 answers on a "
        f"turned device: gain {version['mean_gain_before_version_points']:+.1f} -> "
        f"{version['mean_gain_points']:+.1f} points; "
        f"{'identical on TensorFlow and LiteRT' if same else 'runtimes DIFFER'}; learn + guard + "
        f"persist {lgp['p50_ms']:.1f} ms p50 (LiteRT)"
    )


def _model_runtime(ev: Evidence) -> str:
    cnn = next(m for m in ev["models"] if m["arch"] == "cnn")
    return (
        f"load {cnn['load_s']:.2f} s, predict one window {cnn['predict_1_window']['p50_ms']:.2f} / "
        f"{cnn['predict_1_window']['p99_ms']:.2f} ms, learn on 32 "
        f"{cnn['learn_32_windows']['p50_ms']:.1f} ms, persist state "
        f"{cnn['persist_state']['p50_ms']:.1f} ms; SavedModel "
        f"{cnn['saved_model_bytes'] / 1e6:.1f} MB, state file "
        f"{cnn['state_file_bytes'] / 1e3:.1f} KB"
    )


def _agent(ev: Evidence) -> str:
    runs, sizes = ev["runs"], ev["installed_mb"]

    def one(name: str) -> str:
        run = runs[name]
        return (
            f"{run['cpu_share_of_one_core'] * 100:.1f} % of one core, RSS "
            f"{run['rss_mb']['peak']:.0f} MB, predict p50 {run['predict_latency']['p50_ms']:.2f} "
            f"ms ({run['predict_back_to_back']['p50_ms']:.2f} ms back to back), learn + guard + "
            f"persist p50 {run['learn_and_persist_latency']['p50_ms']:.1f} ms"
        )

    return (
        f"**light agent (LiteRT, no TensorFlow): {one('litert')}; installed "
        f"{sizes['device_image_lite']:.0f} MB** (device image; {sizes['venv_lite']:.0f} MB as a "
        f"dev venv). Full agent (TensorFlow): {one('tensorflow')}; installed "
        f"{sizes['venv_full'] / 1000:.1f} GB (medians of {ev['repeat']} runs each)"
    )


def _trainer_ingest(ev: Evidence) -> str:
    rows = ev["table"]
    steady = [row for row in rows if row["mode"] == "steady"]
    burst = {row["config"]: row for row in rows if row["mode"] == "burst"}
    kill = ev["kill"]
    lost = sum(row["lost"] for row in rows)
    return (
        f"steady {_join(sorted({str(row['devices']) for row in steady}, key=int))} devices: "
        f"all stored, **{lost} lost**, p99 <= {max(row['p99_ms'] for row in steady):.0f} ms; "
        f"burst of {ev['burst']['devices'] * ev['burst']['batches_per_device']:,} waiting "
        f"batches: **{burst['sqlite:1']['stored_per_s']:,.0f}/s** (1 replica, SQLite; goal >= "
        f"2,000), PostgreSQL {burst['postgresql:1']['stored_per_s']:,.0f}/s (1) -> "
        f"{burst['postgresql:2']['stored_per_s']:,.0f}/s (2 replicas, "
        f"**x{ev['burst_ratio_2_vs_1_replica']['postgresql']:.2f}**); leader killed "
        f"mid-stream: the other leads after {kill['survivor_leads_after_s']:.1f} s, "
        f"**{kill['lost']} lost, {kill['duplicates_stored']} stored twice** (one run)"
    )


def _join(values: list[str]) -> str:
    return " / ".join(values)


def _fleet(ev: Evidence) -> str:
    medians = sorted(ev["medians"], key=lambda m: m["devices"])
    sizes = _join([str(int(m["devices"])) for m in medians])
    new_version = _join([f"{m['new_version_on_all_devices_s']:.1f}" for m in medians])
    p50 = _join([f"{m['sensor_to_prediction']['p50_ms']:.0f}" for m in medians])
    p99 = _join([f"{m['sensor_to_prediction']['p99_ms'] / 1000:.2f}" for m in medians])
    stored = _join(
        [f"{m['stored_by_trainer']['confirmation_to_stored']['p50_ms']:.0f}" for m in medians]
    )
    lost = sum(sum(m["lost"].values()) for m in medians)
    largest = medians[-1]
    cpu = largest["cpu_share_of_one_core"]
    return (
        f"{sizes} devices: new signed version reported by **all devices in {new_version} s**; "
        f"sensor-to-prediction p50 {p50} ms, p99 {p99} s; confirmation-to-stored p50 {stored} ms; "
        f"**{lost} messages lost**; at {int(largest['devices'])} devices the simulator takes "
        f"{cpu['sim'] * 100:.0f} % of a core, the trainer {cpu['trainer'] * 100:.0f} %, "
        f"Mosquitto {cpu['mosquitto'] * 100:.0f} % (medians of {ev['repeat']} runs)"
    )


def _chaos(ev: Evidence) -> str:
    config = ev["config"]
    kills = ev["phases"]["kills"]
    lost = sum(ev["lost"].values())
    duplicates = sum(ev["duplicates"].values())
    bursts = ev["phases"]["bursts"]
    dropped = sum(burst["dropped"] for burst in bursts.values())
    return (
        f"{config['broker_kills']} broker + {config['trainer_kills']} trainer + "
        f"{config['agent_kills']} agent kills: **{lost} lost** "
        f"({kills['batches']['produced']} batches, {kills['predictions']['in_agent_stores']} "
        f"predictions, {kills['confirmations']['sent']} confirmations), {duplicates} duplicates "
        f"stored, drained {kills['drain_s']:.0f} s after the last kill; {ev['payloads']:,} "
        f"hostile payloads, {ev['dead_threads']} threads dead, "
        f"{len(ev['processes_down'])} processes down; {config['burst']:,}-message bursts: "
        f"{dropped} dropped"
    )


def _chaos_storms(ev: Evidence) -> str:
    trainer = ev["phases"]["fuzz"]["trainer"]
    stall = ev["phases"]["stall"]
    backlog = ev["phases"]["backlog"]
    rates = backlog["drained_per_s"]
    met = ev["targets_met"]
    return (
        f"{ev['payloads']:,} hostile payloads: {trainer['ingested']:,} of "
        f"{trainer['delivered']:,} at the trainer handled **once each** "
        f"({trainer['reports_not_repeated']} reports repeated), **{trainer['reconnects']} "
        f"reconnects**, {ev['dead_threads']} threads dead; store locked "
        f"{stall['stall_s']:.0f} s (> 3 keepalives) under {stall['batches']:,} batches: "
        f"**{stall['lost']} lost, {stall['trainer_reconnects']} reconnects**, stored "
        f"{stall['stored_after_release_s']:.1f} s after; backlog of {backlog['batches']:,} "
        f"batches (1,000 devices): **{backlog['lost']} lost**, no process died, drained at "
        f"**{rates['sqlite:1']:,.0f}/s** (1 replica, SQLite; goal >= 2,000) and "
        f"{rates['postgresql:2']:,.0f}/s (2 replicas, PostgreSQL); targets "
        f"{sum(met.values())}/{len(met)} met"
    )


def _fleet_broker_kill(ev: Evidence) -> str:
    runs = ev["runs"]

    def total(group: str, kind: str) -> int:
        return sum(run[group][kind] for run in runs)

    back = _join([f"{run['broker_kill']['all_online_again_s']:.1f}" for run in runs])
    return (
        f"{runs[0]['devices']:,} devices, Mosquitto SIGKILLed under load and restarted, "
        f"{len(runs)} runs: every device online again in **{back} s**; lost: "
        f"**{total('lost', 'batches')} of {total('made_by_fleet', 'batches'):,} batches, "
        f"{total('lost', 'predictions')} of {total('made_by_fleet', 'predictions'):,} "
        f"predictions** (kept until a receipt, sent again), **{total('lost', 'confirmations')} "
        f"of {total('made_by_fleet', 'confirmations'):,} confirmations** (the people's app "
        f"keeps each until its device relays it: "
        f"{_join([str(run.get('app_confirmations_resent', 0)) for run in runs])} sent again)"
    )


def _retrain_memory(ev: Evidence) -> str:
    def series(mode: str) -> str:
        rounds = ev["rounds"][mode]
        return f"{rounds[0]['rss_after_mb']:.0f} -> {rounds[-1]['rss_after_mb']:.0f} MB"

    counts = [r["windows"] for r in ev["rounds"]["pages"]]
    growth = ev["growth_smallest_to_largest"]
    return (
        f"rounds over {counts[0]:,} to {counts[-1]:,} confirmed windows in one process: RSS "
        f"after each **{series('pages')} ({growth['pages']:+.1%})** paged as the service does, "
        f"{series('whole')} ({growth['whole']:+.1%}) holding them all at once as it did before"
    )


def _soak(ev: Evidence) -> str:
    rss = ev["rss"]

    def one(name: str) -> str:
        r = rss[name]
        return f"{name} {r['after_warmup_mb']:.0f} -> {r['end_mb']:.0f} MB ({r['growth']:+.1%})"

    lost = sum(ev["lost"].values())
    errors = sum(ev["error_events"].values())
    peak = ev.get("retrain_process_peak_rss_mb")
    retrain = f" (each retrain in a child process, its peak {peak:.0f} MB)" if peak else ""
    by_code = ", ".join(f"{n} {key.split(': ')[-1]}" for key, n in ev["error_events"].items())
    return (
        f"{ev['minutes']:.0f} minutes, {ev['devices']:,} simulated devices, a retrain every "
        f"{ev['retrain_every_s'] / 60:.0f} minutes ({len(ev['versions_published']) - 1} new "
        f"versions published): RSS after {ev['warmup_minutes']:.0f} minutes' warm-up -> end: "
        f"{', '.join(one(name) for name in ('trainer', 'agent', 'mosquitto'))} (target <= 5 %), "
        f"{one('sim')} (the load: a model runtime for each of the newest 3 versions)"
        f"{retrain}; **{lost} lost, {errors} error events**{f' ({by_code})' if by_code else ''}"
    )


def _broker_persistence(ev: Evidence) -> str:
    by_setting = {result["setting"]: result for result in ev["results"]}
    shipped = by_setting["interval 10 s"]
    every_change = by_setting["on changes, 1"]
    return (
        f"`autosave_interval 10` (shipped): {shipped['messages_per_s']:,} msg/s; "
        f"saving on every change: {every_change['messages_per_s']:,} msg/s "
        f"({ev['messages']:,} QoS 1 messages of {ev['payload_bytes'] / 1000:.1f} KB)"
    )


ROWS = (
    Row(
        "held-out-user accuracy / macro-F1, HAPT users 1-24, median of 3 by-user splits",
        "accuracy.json",
        ".venv/bin/python bench/accuracy.py > docs/evidence/accuracy.json",
        _accuracy,
    ),
    Row(
        "global model on a device worn turned, no answers: 12 people no model saw (3 splits of "
        "bench/personalize.py), mean of the splits",
        "placement.json",
        ".venv/bin/python bench/placement.py --candidates"
        """ '{"rotation": "small", "min_epochs": 0}' '{"rotation": "small"}' '{}'"""
        """ '{"rotation": "about_x"}' --evidence docs/evidence/placement.json""",
        _placement,
    ),
    Row(
        "on-device learning, people no model saw, answers through the agent's code on both "
        "runtimes, each person's remaining windows scored against the global model",
        "personalize.json",
        ".venv/bin/python bench/personalize.py --candidates"
        " --evidence docs/evidence/personalize.json",
        _personalize,
    ),
    Row(
        "agent at 20 Hz for 60 s (a confirmation every 5 s), each runtime in a process of its "
        "own, side by side",
        "agent.json",
        ".venv/bin/python bench/agent.py",
        _agent,
    ),
    Row(
        "model (cnn): load, predict p50 / p99, learn, persist",
        "model_runtime.json",
        ".venv/bin/python bench/model_runtime.py > docs/evidence/model_runtime.json",
        _model_runtime,
    ),
    Row(
        "fleet through one Mosquitto with the trainer (`har sim`, 20 Hz, 1 s batches, "
        "10 % of predictions confirmed)",
        "fleet.json",
        ".venv/bin/python bench/fleet.py > docs/evidence/fleet.json",
        _fleet,
    ),
    Row(
        "trainer ingest: 1 vs 2 `har trainer serve` replicas on SQLite and on PostgreSQL, "
        "devices on their own connections, 1 s batches",
        "trainer_ingest.json",
        ".venv/bin/python bench/trainer_ingest.py --evidence docs/evidence/trainer_ingest.json",
        _trainer_ingest,
    ),
    Row(
        "kill -9 at random moments while 3 agents stream and a user confirms; hostile "
        "payloads on every subscribed topic; QoS 1 bursts at an agent and at the trainer",
        "chaos.json",
        ".venv/bin/python bench/chaos.py",
        _chaos,
    ),
    Row(
        "storms at the trainer: hostile payloads, a stalled store, a backlog after an outage",
        "chaos_storms.json",
        ".venv/bin/python bench/chaos.py --phases stall fuzz backlog"
        " --evidence docs/evidence/chaos_storms.json",
        _chaos_storms,
    ),
    Row(
        "broker `kill -9` under a fleet of simulated devices (1 s batches)",
        "fleet_broker_kill.json",
        ".venv/bin/python bench/fleet.py --devices 1000 --repeat 3 --broker-kill"
        " > docs/evidence/fleet_broker_kill.json",
        _fleet_broker_kill,
    ),
    Row(
        "what a retrain round leaves in the trainer service as the fleet's answers grow",
        "retrain_memory.json",
        ".venv/bin/python bench/retrain_memory.py",
        _retrain_memory,
    ),
    Row(
        "soak: broker, trainer, `har sim` and a light agent for half an hour",
        "soak.json",
        ".venv/bin/python bench/soak.py --evidence docs/evidence/soak.json",
        _soak,
    ),
    Row(
        "broker autosave (what a `kill -9` of Mosquitto keeps)",
        "broker_persistence.json",
        ".venv/bin/python bench/broker_persistence.py",
        _broker_persistence,
    ),
)


def load_evidence(evidence_dir: Path, name: str) -> Evidence:
    loaded: Evidence = json.loads((evidence_dir / name).read_text())
    return loaded


def render(evidence_dir: Path = REPO / "docs/evidence") -> str:
    """The table, markers included, from the evidence files in ``evidence_dir``."""
    lines = [
        BEGIN,
        "| what | figure | evidence | command |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        figure = row.figure(load_evidence(evidence_dir, row.evidence))
        link = f"[{row.evidence}](docs/evidence/{row.evidence})"
        lines.append(f"| {row.what} | {figure} | {link} | `{row.command}` |")
    lines.append(END)
    return "\n".join(lines)


def table_in(readme: str) -> str:
    """The table between the markers of ``readme``, markers included."""
    start = readme.index(BEGIN)
    end = readme.index(END, start) + len(END)
    return readme[start:end]


def replace_table(readme: str, table: str) -> str:
    return readme.replace(table_in(readme), table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="put the table into README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md differs")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--evidence-dir", type=Path, default=REPO / "docs/evidence")
    args = parser.parse_args(argv)
    table = render(args.evidence_dir)
    if args.write:
        args.readme.write_text(replace_table(args.readme.read_text(), table))
    elif args.check:
        if table_in(args.readme.read_text()) != table:
            print("README.md's figures differ from docs/evidence: run --write", file=sys.stderr)
            return 1
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
