"""On-device learning as wearers produce it, through the code the agent runs. Prints JSON.

For every person the model never saw, their windows are taken in time order, as the agent cuts
them (the model's window, hop of half a window). Answers arrive one at a time and go through
``device_agent.learning.DeviceLearner.confirm`` (store, learn, guard, persist) exactly as on
the device, on a real SQLite store and state file; after K of them, the person's *remaining*
windows are scored with ``ActivityModel.predict`` (what the device then serves) and with the
global model on the same windows.

Protocols (``PROTOCOLS``): answers in time order; spread (every 3rd, every 5th window); 10 % and
25 % of the answers wrong (a random other activity); the device worn turned 90 degrees about its
x axis (as the demo's wearers) with answers in time order and spread, and turned about z; and a
new global version (the same users, another training seed) arriving after the K answers: it
goes through the device's own gate (``device_agent.learning.gate``) and ``DeviceLearner.adopt``,
and the person's remaining windows are scored on it, beside its own global model.

Users: three by-user splits of the 24 HAPT people, fixed by a seeded permutation: each split
trains on 16 people and holds out 4 validation and 4 test people, and no person is a validation
or test person twice, so the settings chosen on the 12 validation people
(``--users-from validation``) are reported on 12 others (the default). Each split has two
models: seed s (the device's first version) and seed s + 10 (the new version).
``--model DIR --users 5,11`` scores any exported version instead.

Every protocol runs on each ``--runtimes`` (TensorFlow and LiteRT by default); ``--candidates``
also runs the other methods compared in docs/model.md (LiteRT, main protocols).

    python bench/personalize.py [--data FILE] [--train-dir DIR] [--users-from validation]
        [--runtimes tensorflow litert] [--candidates] [--evidence docs/evidence/personalize.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import DEFAULT_DATA, REPO, percentiles

from activity_model.loading import load_model
from activity_model.runtime import ActivityModel
from activity_model.windowing import make_windows
from activity_model.wisdm import load_wisdm
from device_agent.learning import DeviceLearner, LearningPolicy, evidence_of, gate, personalise
from device_agent.store import AgentStore
from shared.counters import Counters, LatencyRecorder
from simulator.synthetic_data import rotation_about_x

EVIDENCE = REPO / "docs/evidence/personalize.json"
MIN_SCORED = 20  # windows left after the K-th answer, or the K is not scored
SPLIT_SEED = 2026  # the permutation of the people that makes the three splits
NEW_VERSION_SEED = 10  # the new version of split s is trained with seed s + 10
ACCEPT_MARGIN = 0.05  # the agent's defaults (agent.accept_margin, agent.min_replay_for_gate)
MIN_FOR_GATE = 10


@dataclass(frozen=True)
class Protocol:
    every: int = 1  # answer one window in this many, from the start
    wrong: float = 0.0  # share of answers wrong on purpose
    turn: tuple[str, float] | None = None  # (axis, degrees) the device is worn turned by
    new_version: bool = False  # the split's other model arrives after the answers
    ks: tuple[int, ...] = (10, 20, 50)


PROTOCOLS = {
    "time_order": Protocol(),
    "spread_every_3rd": Protocol(every=3),
    "spread_every_5th": Protocol(every=5, ks=(10, 20)),
    "time_order_10pct_wrong": Protocol(wrong=0.1),
    "time_order_25pct_wrong": Protocol(wrong=0.25),
    "spread_every_3rd_10pct_wrong": Protocol(every=3, wrong=0.1),
    "turned_90_time_order": Protocol(turn=("x", 90.0)),
    "turned_90_every_3rd": Protocol(every=3, turn=("x", 90.0)),
    "turned_90_every_5th": Protocol(every=5, turn=("x", 90.0), ks=(10, 20)),
    "turned_90_about_z_time_order": Protocol(turn=("z", 90.0)),
    "new_version_time_order": Protocol(new_version=True),
    "new_version_every_3rd": Protocol(every=3, new_version=True),
    "new_version_turned_90_time_order": Protocol(turn=("x", 90.0), new_version=True),
}
CANDIDATE_PROTOCOLS = (
    "time_order",
    "spread_every_3rd",
    "time_order_25pct_wrong",
    "turned_90_time_order",
    "turned_90_every_3rd",
)


def candidates() -> dict[str, LearningPolicy]:
    """The methods compared (docs/model.md); the first is the chosen default."""
    chosen = LearningPolicy()
    return {
        "chosen: placement + correction, per-activity guard": chosen,
        "no guard: placement + correction always served": replace(chosen, guard=False),
        "correction only (no placement), per-activity guard": replace(
            chosen, min_rotation_deg=180.0
        ),
        "placement only, per-activity guard": replace(chosen, ways=("aligned",)),
        "placement + correction, guard without a margin": replace(
            chosen, guard_margin=0.0, turned_margin=0.0
        ),
        "placement + correction, guard with the full margin on a turned device too": replace(
            chosen, turned_margin=chosen.guard_margin
        ),
        "placement + correction, guard counting right answers": replace(
            chosen, guard_score="right"
        ),
        "placement + correction, guard without each activity's first answer": replace(
            chosen, cold_answers=1
        ),
        "placement + correction, guard without first answers, counting right answers": replace(
            chosen, cold_answers=1, guard_score="right"
        ),
    }


@dataclass(frozen=True)
class Case:
    """One person a model never saw: their windows in time order."""

    split: str
    user: int
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int32]


@dataclass(frozen=True)
class Split:
    name: str
    first: Path  # the version a device starts with
    new: Path | None  # the version that arrives later
    users: tuple[int, ...]


# ------------------------------------------------------------------------------ the device
class Device:
    """DeviceLearner over a real store and state folder, as the agent's worker drives it."""

    def __init__(self, model: ActivityModel, policy: LearningPolicy) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="har-personalize-")
        root = Path(self.tmp.name)
        self.store = AgentStore(root / "agent.sqlite3")
        self.counters = Counters()
        self.latencies = LatencyRecorder()
        self.learner = DeviceLearner(
            self.store,
            root / "learned",
            policy,
            counters=self.counters,
            latencies=self.latencies,
        )
        self.model = model
        model.install(model.nothing_learned())
        self.learner.attach("v1", model)

    def confirm(self, index: int, window: npt.NDArray[np.float32], label: str) -> None:
        self.learner.confirm(f"w{index}", label, window, float(index))

    def new_version(self, model: ActivityModel) -> dict[str, Any]:
        """What the agent's updater and worker do with a verified new version."""
        entries = self.store.replay_entries()
        learned = personalise(model, entries, self.learner.policy)
        verdict = gate(
            learned,
            evidence_of(entries),
            self.learner.policy,
            accept_margin=ACCEPT_MARGIN,
            min_scored=MIN_FOR_GATE,
        )
        if verdict.refusal is None:
            model.install(model.nothing_learned())
            self.learner.adopt("v2", model, learned)
            self.model = model
        return {"refused": verdict.refusal is not None, "gate_way": verdict.way}

    def close(self) -> None:
        self.store.close()
        self.tmp.cleanup()


def _predict(model: ActivityModel, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    return np.concatenate(
        [model.predict(x[i : i + 512]).class_index for i in range(0, len(x), 512)]
    ).astype(np.int64)


def _global(model: ActivityModel, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    installed = model.installed()
    model.install(model.nothing_learned())
    try:
        return _predict(model, x)
    finally:
        model.install(installed)


def _turned(x: npt.NDArray[np.float32], turn: tuple[str, float]) -> npt.NDArray[np.float32]:
    axis, degrees = turn
    rotation = rotation_about_x(degrees)
    if axis == "z":  # the same turn about z: swap the roles of x and z
        swap = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
        rotation = swap @ rotation @ swap
    turned: npt.NDArray[np.float32] = np.einsum("ntc,dc->ntd", x, rotation).astype(np.float32)
    return turned


def run_case(
    models: dict[str, ActivityModel],
    case: Case,
    protocol: Protocol,
    policy: LearningPolicy,
    seed: int,
    latencies: LatencyRecorder,
) -> list[dict[str, Any]]:
    """Answers one at a time; at each K the remaining windows are scored. With a new version,
    each K is a device of its own (the version arrives after its K-th answer)."""
    first = models[case.split]
    x = case.x if protocol.turn is None else _turned(case.x, protocol.turn)
    y = case.y
    answered = np.arange(0, len(y), protocol.every)[: max(protocol.ks)]
    rng = np.random.default_rng(seed)
    given = y[answered].copy()
    k = len(first.labels)
    for i in np.flatnonzero(rng.random(len(answered)) < protocol.wrong):
        given[i] = rng.choice([c for c in range(k) if c != y[answered[i]]])
    scored = [
        t for t in protocol.ks if t <= len(answered) and len(y) - answered[t - 1] - 1 >= MIN_SCORED
    ]
    runs = [[t] for t in scored] if protocol.new_version else [scored]
    rows = []
    for targets in runs:
        device = Device(first, policy)
        try:
            for count, (index, label) in enumerate(zip(answered, given, strict=True), start=1):
                if count > max(targets, default=0):
                    break
                device.confirm(int(index), x[index], first.labels[int(label)])
                if count in targets:
                    rows.append(_score(models, case, device, protocol, x, y, answered[count - 1]))
                    rows[-1]["k"] = count
            for sample in device.latencies.samples("learn_and_persist"):
                latencies.record("learn_and_persist", sample)
        finally:
            device.close()
            for model in models.values():
                model.install(model.nothing_learned())
    return rows


def _score(
    models: dict[str, ActivityModel],
    case: Case,
    device: Device,
    protocol: Protocol,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int32],
    last: int,
) -> dict[str, Any]:
    """The windows after the ``last`` answered one, as the device and its global model read
    them (with a new version: after it arrived, and before, for the gain it kept)."""
    rest = np.arange(last + 1, len(y))
    model = device.model
    row: dict[str, Any] = {
        "split": case.split,
        "user": case.user,
        "y": y[rest],
        "global": _global(model, x[rest]),
        "served": _predict(model, x[rest]),
        "way": device.learner.way,
    }
    if protocol.new_version:
        row["before_version"] = {"global": row["global"], "served": row["served"]}
        row.update(device.new_version(models[f"{case.split}_new"]))
        row["global"] = _global(device.model, x[rest])
        row["served"] = _predict(device.model, x[rest])
        row["way"] = device.learner.way
    return row


# ------------------------------------------------------------------------------ summaries
def _accuracy(predicted: npt.NDArray[np.int64], y: npt.NDArray[np.int32]) -> float:
    return float(np.mean(predicted == y)) * 100


def summarise(rows: list[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in sorted({r["k"] for r in rows}):
        sel = [r for r in rows if r["k"] == k]
        y = np.concatenate([r["y"] for r in sel])
        before = np.concatenate([r["global"] for r in sel])
        after = np.concatenate([r["served"] for r in sel])
        per_user = []
        for r in sel:
            user: dict[str, Any] = {
                "split": r["split"],
                "user": r["user"],
                "windows": len(r["y"]),
                "global": round(_accuracy(r["global"], r["y"]), 1),
                "device": round(_accuracy(r["served"], r["y"]), 1),
                "way": r["way"],
            }
            if "before_version" in r:
                old = r["before_version"]
                user["gain_before_version"] = round(
                    _accuracy(old["served"], r["y"]) - _accuracy(old["global"], r["y"]), 1
                )
                user["refused"] = r["refused"]
            user["gain"] = round(user["device"] - user["global"], 1)
            per_user.append(user)
        gains = [u["gain"] for u in per_user]
        recall = {}
        for c, name in enumerate(labels):
            mine = y == c
            if mine.any():
                recall[name] = {
                    "global": round(float(np.mean(before[mine] == c)) * 100, 1),
                    "device": round(float(np.mean(after[mine] == c)) * 100, 1),
                }
        entry: dict[str, Any] = {
            "users": len(sel),
            "mean_user_accuracy_global": round(statistics.mean(u["global"] for u in per_user), 2),
            "mean_user_accuracy_device": round(statistics.mean(u["device"] for u in per_user), 2),
            "mean_gain_points": round(statistics.mean(gains), 2),
            "users_worse_by_more_than_half_a_point": sum(g < -0.5 for g in gains),
            "worst_user_change_points": round(min(gains), 1),
            "pooled_accuracy_global": round(_accuracy(before, y), 2),
            "pooled_accuracy_device": round(_accuracy(after, y), 2),
            "activities_losing_more_than_2_points": [
                name for name, r in recall.items() if r["device"] < r["global"] - 2.0
            ],
            "served": {w: sum(u["way"] == w for u in per_user) for w in ("aligned", "corrected")},
            "recall": recall,
            "per_user": per_user,
        }
        if any("gain_before_version" in u for u in per_user):
            entry["mean_gain_before_version_points"] = round(
                statistics.mean(u["gain_before_version"] for u in per_user), 2
            )
            entry["users_losing_more_than_1_point_of_gain_across_the_version"] = sum(
                u["gain"] < u["gain_before_version"] - 1.0 for u in per_user
            )
            entry["versions_refused"] = sum(u["refused"] for u in per_user)
        out[str(k)] = entry
    return out


def run_protocols(
    models: dict[str, ActivityModel],
    cases: list[Case],
    policy: LearningPolicy,
    names: Sequence[str],
    latencies: LatencyRecorder,
) -> dict[str, Any]:
    results = {}
    labels = next(iter(models.values())).labels
    for name in names:
        protocol = PROTOCOLS[name]
        if protocol.new_version and not any(key.endswith("_new") for key in models):
            continue
        started = time.monotonic()
        rows: list[dict[str, Any]] = []
        for case in cases:
            seed = 1000 * case.user + sum(map(ord, name))
            rows += run_case(models, case, protocol, policy, seed, latencies)
        results[name] = {
            "protocol": dataclasses.asdict(protocol),
            "seconds": round(time.monotonic() - started, 1),
            "by_k": summarise(rows, labels),
        }
        print(f"  {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------------------ inputs
def split_users(everyone: Sequence[int]) -> list[dict[str, list[int]]]:
    """Three splits of the people: 4 test and 4 validation each, none held out twice."""
    order = [int(u) for u in np.random.default_rng(SPLIT_SEED).permutation(sorted(everyone))]
    if len(order) < 24:
        raise SystemExit(f"the fixed splits need 24 people, the data has {len(order)}")
    return [
        {"test": sorted(order[4 * s : 4 * s + 4]), "val": sorted(order[12 + 4 * s : 16 + 4 * s])}
        for s in range(3)
    ]


def trained_splits(data: Any, out: Path, users_from: str) -> list[Split]:
    from trainer_service.training import TrainConfig, train_and_export

    splits = []
    for s, users in enumerate(split_users(np.unique(data.users).tolist())):
        folders = {}
        for name, seed in ((f"split{s}", s), (f"split{s}_new", s + NEW_VERSION_SEED)):
            folder = folders[name] = out / name
            if not folder.exists():  # --train-dir keeps them for the next run
                config = TrainConfig(
                    seed=seed, val_users=tuple(users["val"]), test_users=tuple(users["test"])
                )
                print(f"training {name}", file=sys.stderr, flush=True)
                train_and_export(data, config, folder, progress=False)
        key = "val" if users_from == "validation" else "test"
        splits.append(
            Split(f"split{s}", folders[f"split{s}"], folders[f"split{s}_new"], tuple(users[key]))
        )
    return splits


def given_splits(folders: Sequence[Path], data: Any, users: Sequence[int] | None) -> list[Split]:
    splits = []
    everyone = sorted(int(u) for u in np.unique(data.users))
    for folder in folders:
        if users:
            chosen = tuple(users)
        else:
            summary_file = folder / "data_summary.json"
            if not summary_file.is_file():
                raise SystemExit(f"{folder} has no data_summary.json: name the users with --users")
            split = json.loads(summary_file.read_text()).get("users", {})
            seen = set(split.get("train", [])) | set(split.get("val", []))
            chosen = tuple(u for u in everyone if u not in seen)
        missing = sorted(set(chosen) - set(everyone))
        if missing:
            raise SystemExit(f"users {missing} are not in the data (users: {everyone})")
        if not chosen:
            raise SystemExit(f"every user of the data trained {folder}: name others with --users")
        splits.append(Split(folder.name, folder, None, chosen))
    return splits


def cases_for(data: Any, models: dict[str, ActivityModel], splits: list[Split]) -> list[Case]:
    cases = []
    for split in splits:
        model = models[split.name]
        if model.labels != data.labels:
            raise SystemExit(f"{split.name} knows {model.labels}, the data has {data.labels}")
        window = model.input_spec.window
        windows = make_windows(data, window, max(1, window // 2))
        for user in split.users:
            mine = windows.for_users([user])
            if len(mine):
                cases.append(Case(split.name, user, mine.x, mine.y))
    return cases


def load_models(splits: list[Split], runtime: str) -> dict[str, ActivityModel]:
    models = {}
    for split in splits:
        models[split.name] = load_model(split.first / "saved_model", runtime)
        if split.new is not None:
            models[f"{split.name}_new"] = load_model(split.new / "saved_model", runtime)
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, action="append", help="an exported version folder")
    parser.add_argument("--users", type=lambda s: [int(u) for u in s.split(",")])
    parser.add_argument("--users-from", choices=("test", "validation"), default="test")
    parser.add_argument("--train-dir", type=Path, help="keep the split models here and reuse them")
    parser.add_argument("--runtimes", nargs="+", default=["tensorflow", "litert"])
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--candidates", action="store_true", help="compare methods too")
    parser.add_argument("--evidence", type=Path, help=f"write the JSON here too ({EVIDENCE})")
    args = parser.parse_args()

    if not args.data.is_file():
        raise SystemExit(f"no data at {args.data}: give --data FILE (WISDM raw format)")
    data = load_wisdm(args.data)
    with tempfile.TemporaryDirectory(prefix="har-personalize-models-") as tmp:
        if args.model:
            splits = given_splits(args.model, data, args.users)
        else:
            splits = trained_splits(data, args.train_dir or Path(tmp), args.users_from)
        report: dict[str, Any] = {
            "data": str(args.data),
            "users_from": "given" if args.model else args.users_from,
            "splits": {s.name: {"users": list(s.users)} for s in splits},
            "policy": dataclasses.asdict(LearningPolicy()),
            "runtimes": {},
        }
        for runtime in args.runtimes:
            print(f"runtime {runtime}", file=sys.stderr, flush=True)
            models = load_models(splits, runtime)
            report["learning"] = next(iter(models.values())).learning_settings
            latencies = LatencyRecorder()
            cases = cases_for(data, models, splits)
            report["runtimes"][runtime] = {
                "results": run_protocols(
                    models, cases, LearningPolicy(), args.protocols, latencies
                ),
                "learn_guard_persist_per_answer": percentiles(
                    latencies.samples("learn_and_persist")
                ),
            }
        if args.candidates:
            runtime = "litert" if "litert" in args.runtimes else args.runtimes[0]
            models = load_models(splits, runtime)
            cases = cases_for(data, models, splits)
            report["candidates"] = {"runtime": runtime, "methods": {}}
            for name, policy in candidates().items():
                print(f"candidate {name}", file=sys.stderr, flush=True)
                report["candidates"]["methods"][name] = {
                    "policy": dataclasses.asdict(policy),
                    "results": run_protocols(
                        models,
                        cases,
                        policy,
                        [p for p in CANDIDATE_PROTOCOLS if p in args.protocols],
                        LatencyRecorder(),
                    ),
                }
    text = json.dumps(report, indent=2, default=_plain)
    print(text)
    if args.evidence:
        args.evidence.parent.mkdir(parents=True, exist_ok=True)
        args.evidence.write_text(text + "\n")
        tables = args.evidence.with_suffix(".md")
        tables.write_text(render_tables(report, args.evidence.name))
        print(f"wrote {args.evidence} and {tables}", file=sys.stderr)
    return 0


def render_tables(report: dict[str, Any], source: str) -> str:
    """One table per protocol (each runtime a column group), and the candidates side by side."""
    people = ", ".join(str(u) for split in report["splits"].values() for u in split["users"])
    lines = [
        "# On-device learning, protocol by protocol",
        "",
        f"Rendered by `bench/personalize.py` from `{source}`; people: "
        f"{report['users_from']} ({people}). "
        "Each cell: mean accuracy per person on the windows after the K-th answer, global "
        "model -> device; then the mean gain, people worse by more than 0.5 point, the worst "
        "change, and activities whose pooled recall fell by more than 2 points.",
        "",
    ]
    runtimes = report["runtimes"]
    first = next(iter(runtimes.values()))["results"]
    for name, result in first.items():
        lines += [
            f"## {name}",
            "",
            "| K | runtime | global -> device | gain | worse | worst | activities down "
            "| served (aligned / corrected) | across the new version |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k in result["by_k"]:
            for runtime, values in runtimes.items():
                r = values["results"][name]["by_k"][k]
                version = ""
                if "mean_gain_before_version_points" in r:
                    version = (
                        f"gain {r['mean_gain_before_version_points']:+.2f} before -> "
                        f"{r['mean_gain_points']:+.2f} after; "
                        f"{r['users_losing_more_than_1_point_of_gain_across_the_version']} lose "
                        f"> 1 point; {r['versions_refused']} refused"
                    )
                lines.append(
                    f"| {k} | {runtime} | {r['mean_user_accuracy_global']:.1f} -> "
                    f"{r['mean_user_accuracy_device']:.1f} % | {r['mean_gain_points']:+.2f} | "
                    f"{r['users_worse_by_more_than_half_a_point']} / {r['users']} | "
                    f"{r['worst_user_change_points']:+.1f} | "
                    f"{', '.join(r['activities_losing_more_than_2_points']) or 'none'} | "
                    f"{r['served']['aligned']} / {r['served']['corrected']} | {version} |"
                )
        lines.append("")
    if "candidates" in report:
        lines += ["## Candidates", "", f"Runtime {report['candidates']['runtime']}.", ""]
        methods = report["candidates"]["methods"]
        protocols = next(iter(methods.values()))["results"]
        header = "| method | " + " | ".join(f"{p}, K = 20" for p in protocols) + " |"
        lines += [header, "|---|" + "---|" * len(protocols)]
        for method, values in methods.items():
            cells = []
            for p in protocols:
                r = values["results"][p]["by_k"].get("20")
                cells.append(
                    "-"
                    if r is None
                    else f"{r['mean_user_accuracy_device']:.1f} % ({r['mean_gain_points']:+.1f}), "
                    f"{r['users_worse_by_more_than_half_a_point']} worse"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
