"""On-device learning as a wearer produces it, through the code the agent runs. Prints JSON.

For every person the model never saw, their windows are taken in time order, as the agent cuts
them (the model's window, hop of half a window). Confirmations arrive one at a time and go
through ``device_agent.learning.DeviceLearner.confirm`` (store, learn, guard, persist) exactly
as on the device; after K of them, the person's *remaining* windows are scored with
``ActivityModel.predict`` (what the device then serves) and with the global model.

Protocols: the first K windows confirmed in time order; the same with 10 % of the answers wrong
on purpose; one window in five confirmed (spread over the recording); a wearer whose device is
turned 90 degrees about its x axis (as in the demo), both in time order and spread.

Users: by default, three models are trained on the three by-user splits of ``bench/accuracy.py``
(seeds 0, 1, 2), and each is scored on its test users; ``--users-from validation`` scores the
validation users instead (where the settings were chosen). ``--model DIR`` (repeatable) takes
any exported version instead; its held-out users come from ``--users`` or from the users of
``--data`` absent from the version's ``data_summary.json``.

``--candidates`` also runs the methods compared in docs/model.md on the main protocols.

    python bench/personalize.py [--data FILE] [--model DIR ...] [--users 5,11] [--candidates]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import DEFAULT_DATA, REPO, percentiles

from device_agent.learning import DeviceLearner, LearningPolicy
from device_agent.store import AgentStore
from har.synthetic_data import rotation_about_x
from shared.counters import Counters, LatencyRecorder
from shared.model.runtime import ActivityModel
from shared.windowing import WindowSet, make_windows
from shared.wisdm import load_wisdm

EVIDENCE = REPO / "docs/evidence/personalize.json"
MIN_SCORED = 20  # windows left after the K-th confirmation, or the K is not scored


@dataclass(frozen=True)
class Protocol:
    every: int = 1  # confirm one window in this many, from the start
    wrong: float = 0.0  # share of answers wrong on purpose
    rotate_degrees: float = 0.0  # about the device's x axis
    ks: tuple[int, ...] = (5, 10, 20, 50)


PROTOCOLS = {
    "time_order": Protocol(),
    "time_order_10pct_wrong": Protocol(wrong=0.1, ks=(10, 20, 50)),
    "spread_one_in_five": Protocol(every=5, ks=(5, 10, 20, 30)),
    "rotated_time_order": Protocol(rotate_degrees=90.0, ks=(10, 20, 30, 50)),
    "rotated_spread_one_in_five": Protocol(every=5, rotate_degrees=90.0, ks=(10, 20, 30)),
}
CANDIDATE_PROTOCOLS = ("time_order", "time_order_10pct_wrong", "rotated_time_order")


@dataclass(frozen=True)
class Case:
    """One person the model never saw: their windows in time order."""

    model_name: str
    user: int
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int32]


@dataclass(frozen=True)
class Version:
    name: str
    folder: Path
    users: tuple[int, ...]


# ------------------------------------------------------------------------------ methods
class Method:
    """Something that learns from confirmations one at a time and then labels windows."""

    def start(self, model: ActivityModel) -> None: ...
    def confirm(self, index: int, window: npt.NDArray[np.float32], label: int) -> None: ...
    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]: ...
    def stop(self) -> dict[str, Any]:
        return {}


class AgentMethod(Method):
    """The device's own code: DeviceLearner over a real store, predictions from the model."""

    def __init__(self, policy: LearningPolicy, learning: dict[str, float] | None = None) -> None:
        self.policy = policy
        self.learning = learning or {}
        self.latencies = LatencyRecorder()

    def start(self, model: ActivityModel) -> None:
        self.model = model
        self.defaults = model.learning_settings
        model.tune_learning(**self.learning)
        self.tmp = tempfile.TemporaryDirectory(prefix="har-personalize-")
        root = Path(self.tmp.name)
        self.store = AgentStore(root / "agent.sqlite3")
        self.counters = Counters()
        self.learner = DeviceLearner(
            self.store,
            root / "learned",
            self.policy,
            counters=self.counters,
            latencies=self.latencies,
        )
        model.install(model.nothing_learned())
        self.learner.attach("bench", model)

    def confirm(self, index: int, window: npt.NDArray[np.float32], label: int) -> None:
        self.learner.confirm(f"w{index}", self.model.labels[label], window, float(index))

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        return _predict(self.model, x)

    def stop(self) -> dict[str, Any]:
        out = {
            "refused": self.counters.get("learn_refused"),
            "serving": self.learner.serving,
        }
        self.store.close()
        self.tmp.cleanup()
        self.model.tune_learning(**self.defaults)
        self.model.install(self.model.nothing_learned())
        return out


class PreviousMethod(Method):
    """The method before this bench existed, for comparison: every confirmation is one Adam
    step (3e-4) on the whole network, on it plus up to 15 earlier confirmations."""

    def start(self, model: ActivityModel) -> None:
        from trainer_service.training import TrainConfig, build_tracker

        self.model = model
        self.tracker = build_tracker(
            TrainConfig(window=model.input_spec.window), model.labels, None, model.folder
        )
        self.tracker.reset_optimizer()
        self.tracker.learning_rate.assign(3e-4)
        self.rng = np.random.default_rng(0)
        self.windows: list[npt.NDArray[np.float32]] = []
        self.labels: list[int] = []

    def confirm(self, index: int, window: npt.NDArray[np.float32], label: int) -> None:
        earlier = self.rng.permutation(len(self.labels))[:15].tolist()
        self.windows.append(window)
        self.labels.append(label)
        batch = [len(self.labels) - 1, *earlier]
        x = np.stack([self.windows[i] for i in batch]).astype(np.float32)
        y = np.array([self.labels[i] for i in batch], np.int32)
        self.tracker.train_step(x, y, np.ones(len(batch), np.float32))

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        parts = [self.tracker.logits(x[i : i + 512]).numpy() for i in range(0, len(x), 512)]
        return np.argmax(np.concatenate(parts), axis=1).astype(np.int64)


def candidates() -> dict[str, Callable[[], Method]]:
    chosen = LearningPolicy()
    bare = replace(chosen, guard=False, align=False)
    return {
        "previous: whole network, 15 own windows rehearsed": PreviousMethod,
        "last layer only (no memory, no anchor)": lambda: AgentMethod(
            bare, {"fit_memory_weight": 0.0, "fit_anchor": 0.0}
        ),
        "last layer + memory + anchor": lambda: AgentMethod(bare),
        "alignment + last layer + memory + anchor": lambda: AgentMethod(
            replace(chosen, guard=False)
        ),
        "chosen: alignment + last layer + memory + anchor + guard": lambda: AgentMethod(chosen),
    }


# ------------------------------------------------------------------------------ running
def _predict(model: ActivityModel, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    return np.concatenate(
        [model.predict(x[i : i + 512]).class_index for i in range(0, len(x), 512)]
    ).astype(np.int64)


def run_case(
    model: ActivityModel, method: Method, case: Case, protocol: Protocol, seed: int
) -> list[dict[str, Any]]:
    x = case.x
    if protocol.rotate_degrees:
        rotation = rotation_about_x(protocol.rotate_degrees).astype(np.float32)
        x = np.einsum("ntc,dc->ntd", x, rotation).astype(np.float32)
    y = case.y
    confirmed = np.arange(0, len(y), protocol.every)[: max(protocol.ks)]
    rng = np.random.default_rng(seed)
    given = y[confirmed].copy()
    k = len(model.labels)
    for i in np.flatnonzero(rng.random(len(confirmed)) < protocol.wrong):
        given[i] = rng.choice([c for c in range(k) if c != y[confirmed[i]]])
    model.install(model.nothing_learned())
    before = _predict(model, x)
    method.start(model)
    rows = []
    try:
        for count, index in enumerate(confirmed, start=1):
            method.confirm(int(index), x[index], int(given[count - 1]))
            rest = np.arange(index + 1, len(y))
            if count in protocol.ks and len(rest) >= MIN_SCORED:
                after = method.predict(x[rest])
                rows.append(
                    {
                        "model": case.model_name,
                        "user": case.user,
                        "k": count,
                        "y": y[rest],
                        "before": before[rest],
                        "after": after,
                    }
                )
    finally:
        extra = method.stop()
    for row in rows:
        row.update(extra)
    return rows


def summarise(rows: list[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in sorted({r["k"] for r in rows}):
        sel = [r for r in rows if r["k"] == k]
        y = np.concatenate([r["y"] for r in sel])
        before = np.concatenate([r["before"] for r in sel])
        after = np.concatenate([r["after"] for r in sel])
        per_user = [
            {
                "model": r["model"],
                "user": r["user"],
                "windows": len(r["y"]),
                "before": round(float(np.mean(r["before"] == r["y"])) * 100, 1),
                "after": round(float(np.mean(r["after"] == r["y"])) * 100, 1),
                **({"serving_learned_state": r["serving"]} if "serving" in r else {}),
            }
            for r in sel
        ]
        gains = [u["after"] - u["before"] for u in per_user]
        recall = {}
        for c, name in enumerate(labels):
            mine = y == c
            if mine.any():
                recall[name] = {
                    "before": round(float(np.mean(before[mine] == c)) * 100, 1),
                    "after": round(float(np.mean(after[mine] == c)) * 100, 1),
                }
        out[str(k)] = {
            "users": len(sel),
            "mean_user_accuracy_before": round(statistics.mean(u["before"] for u in per_user), 2),
            "mean_user_accuracy_after": round(statistics.mean(u["after"] for u in per_user), 2),
            "mean_gain_points": round(statistics.mean(gains), 2),
            "users_worse_by_more_than_half_a_point": sum(g < -0.5 for g in gains),
            "worst_user_change_points": round(min(gains), 1),
            "pooled_accuracy_before": round(float(np.mean(before == y)) * 100, 2),
            "pooled_accuracy_after": round(float(np.mean(after == y)) * 100, 2),
            "classes_losing_more_than_2_points": [
                name for name, r in recall.items() if r["after"] < r["before"] - 2.0
            ],
            "recall": recall,
            "per_user": per_user,
        }
    return out


def run_protocols(
    models: dict[str, ActivityModel],
    cases: list[Case],
    make: Callable[[], Method],
    names: Sequence[str],
) -> dict[str, Any]:
    results = {}
    for name in names:
        protocol = PROTOCOLS[name]
        rows: list[dict[str, Any]] = []
        started = time.monotonic()
        for case in cases:
            seed = 1000 * case.user + len(case.model_name)
            rows += run_case(models[case.model_name], make(), case, protocol, seed)
        labels = next(iter(models.values())).labels
        results[name] = {
            "protocol": protocol.__dict__,
            "seconds": round(time.monotonic() - started, 1),
            "by_k": summarise(rows, labels),
        }
        print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------------------ inputs
def trained_versions(data: Any, out: Path, seeds: Sequence[int], users_from: str) -> list[Version]:
    """One exported version per by-user split (bench/accuracy.py's), and its held-out users."""
    from trainer_service.training import TrainConfig, train_and_export

    versions = []
    for seed in seeds:
        folder = out / f"split{seed}"
        if not folder.exists():  # --train-dir keeps them for the next run
            train_and_export(data, TrainConfig(seed=seed), folder, progress=False)
        users = json.loads((folder / "data_summary.json").read_text())["users"]
        key = "val" if users_from == "validation" else "test"
        versions.append(Version(f"split{seed}", folder, tuple(users[key])))
    return versions


def given_versions(
    folders: Sequence[Path], data: Any, users: Sequence[int] | None
) -> list[Version]:
    versions = []
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
        versions.append(Version(folder.name, folder, chosen))
    return versions


def cases_for(data: Any, models: dict[str, ActivityModel], versions: list[Version]) -> list[Case]:
    cases = []
    for version in versions:
        model = models[version.name]
        if model.labels != data.labels:
            raise SystemExit(f"{version.name} knows {model.labels}, the data has {data.labels}")
        window = model.input_spec.window
        windows: WindowSet = make_windows(data, window, max(1, window // 2))
        for user in version.users:
            mine = windows.for_users([user])
            if len(mine):
                cases.append(Case(version.name, user, mine.x, mine.y))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, action="append", help="an exported version folder")
    parser.add_argument("--users", type=lambda s: [int(u) for u in s.split(",")])
    parser.add_argument("--users-from", choices=("test", "validation"), default="test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-dir", type=Path, help="keep the split models here and reuse them")
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--candidates", action="store_true", help="compare methods too")
    parser.add_argument("--evidence", type=Path, help=f"write the JSON here too ({EVIDENCE})")
    args = parser.parse_args()

    data = load_wisdm(args.data)
    with tempfile.TemporaryDirectory(prefix="har-personalize-models-") as tmp:
        if args.model:
            versions = given_versions(args.model, data, args.users)
        else:
            versions = trained_versions(
                data, args.train_dir or Path(tmp), args.seeds, args.users_from
            )
        models = {v.name: ActivityModel.load(v.folder / "saved_model") for v in versions}
        cases = cases_for(data, models, versions)
        chosen = AgentMethod(LearningPolicy())
        report: dict[str, Any] = {
            "data": str(args.data),
            "models": {v.name: {"users": list(v.users)} for v in versions},
            "users_from": "given" if args.model else args.users_from,
            "policy": dataclasses.asdict(LearningPolicy()),
            "learning": next(iter(models.values())).learning_settings,
            "results": run_protocols(models, cases, lambda: chosen, args.protocols),
            "learn_guard_persist_per_confirmation": percentiles(
                chosen.latencies.samples("learn_and_persist")
            ),
        }
        if args.candidates:
            report["candidates"] = {
                name: run_protocols(models, cases, make, CANDIDATE_PROTOCOLS)
                for name, make in candidates().items()
            }
    text = json.dumps(report, indent=2, default=_plain)
    print(text)
    if args.evidence:
        args.evidence.parent.mkdir(parents=True, exist_ok=True)
        args.evidence.write_text(text + "\n")
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
