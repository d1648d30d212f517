"""A retraining round in a child process: ``python -m trainer_service.retrain_process FOLDER``.

Why a child: TensorFlow takes about 600 MB that a long-running service never gives back to the
system, and training takes every core. In a child at a lower CPU priority (``retrain.nice``),
the trainer's ingest keeps the CPU first (a fleet's messages do not queue up in the broker while
a model trains), and the memory goes back to the system when the round ends.

The parent (:class:`RetrainProcess`, on the trainer's retrain thread) writes the request and the
fleet's confirmed windows into FOLDER (JSON, and raw float32 samples with a JSON line naming
each window, written a page at a time: nothing is pickled), starts the child, follows its progress
(one JSON line per epoch on its stdout) and reads its outcome. The child trains, evaluates,
gates and, if the candidate passes, registers it (``trainer_service.retrain.train_candidate``).
Signing and promoting stay in the parent: the private key never leaves the service. The child's
log goes to the service's stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.errors import HarError
from trainer_service.retrain import RetrainOutcome
from trainer_service.settings import RetrainSettings
from trainer_service.store import ConfirmedWindow

log = logging.getLogger(__name__)

REQUEST_FILE = "request.json"
CONFIRMED_FILE = "confirmed.jsonl"
SAMPLES_FILE = "confirmed-samples.f32"
OUTCOME_FILE = "outcome.json"


class RetrainProcessError(HarError):
    """The retrain process failed: what it said, or how it ended."""


# ------------------------------------------------------------------------- confirmed windows
def write_confirmed(folder: Path, pages: Iterable[Sequence[ConfirmedWindow]]) -> None:
    """The windows, a page at a time: their samples as raw little-endian float32, and one JSON
    line each naming them (prediction, device, label, when received, how many samples). Both
    are appended as the pages come, so the service holds one page, never the fleet's windows
    (nor a list as long as they are: memory the allocator keeps). Windows of any length: the
    child keeps the usable ones."""
    with (
        (folder / SAMPLES_FILE).open("wb") as samples,
        (folder / CONFIRMED_FILE).open("w", encoding="utf-8") as names,
    ):
        for page in pages:
            for window in page:
                rows = np.ascontiguousarray(window.window, "<f4").reshape(-1, 3)
                samples.write(rows.tobytes())
                line = [window.prediction_id, window.device_id, window.label, window.received]
                names.write(json.dumps([*line, len(rows)]) + "\n")


def read_confirmed(folder: Path) -> list[ConfirmedWindow]:
    samples = np.fromfile(folder / SAMPLES_FILE, dtype="<f4").astype(np.float32).reshape(-1, 3)
    confirmed = []
    start = 0
    with (folder / CONFIRMED_FILE).open(encoding="utf-8") as names:
        for line in names:
            prediction_id, device_id, label, received, length = json.loads(line)
            window = samples[start : start + int(length)]
            if len(window) != length:
                raise RetrainProcessError(f"{SAMPLES_FILE} ends before window {prediction_id}")
            confirmed.append(
                ConfirmedWindow(str(prediction_id), str(device_id), str(label), window, received)
            )
            start += int(length)
    if start != len(samples):
        raise RetrainProcessError(f"{SAMPLES_FILE} holds {len(samples) - start} samples more")
    return confirmed


# ------------------------------------------------------------------------------ the parent
class RetrainProcess:
    """Runs one round at a time in a child process; :meth:`stop` ends a running one."""

    def __init__(
        self,
        *,
        registry_dir: Path,
        base_data: Path | None,
        settings: RetrainSettings,
        python: str = sys.executable,
    ) -> None:
        self._registry_dir = registry_dir
        self._base_data = base_data
        self._settings = settings
        self._python = python
        self._lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None
        self._stopped = False

    def run(
        self,
        confirmed: Iterable[Sequence[ConfirmedWindow]],
        *,
        now: float,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> RetrainOutcome:
        """Train, evaluate, gate and register a candidate in a child; its outcome.
        ``confirmed``: the fleet's confirmed windows, in pages (``confirmed_window_pages``).

        Raises :class:`RetrainProcessError` when the child fails or is stopped."""
        with tempfile.TemporaryDirectory(prefix=".retrain-", dir=self._registry_dir) as tmp:
            folder = Path(tmp)
            write_confirmed(folder, confirmed)
            request = {
                "registry": str(self._registry_dir),
                "base_data": str(self._base_data) if self._base_data else None,
                "settings": dataclasses.asdict(self._settings),
                "now": now,
            }
            (folder / REQUEST_FILE).write_text(json.dumps(request))
            code = self._run_child(folder, on_epoch)
            return _outcome(folder / OUTCOME_FILE, code)

    def _run_child(self, folder: Path, on_epoch: Callable[[int, int], None] | None) -> int:
        command = [self._python, "-m", "trainer_service.retrain_process", str(folder)]
        with self._lock:
            if self._stopped:
                raise RetrainProcessError("the trainer is stopping: no retrain started")
            child = self._child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
            )
        try:
            with child:  # closes its stdout and waits for it
                assert child.stdout is not None
                try:
                    for line in child.stdout:
                        progress = _progress(line)
                        if progress is not None and on_epoch is not None:
                            on_epoch(*progress)
                except BaseException:
                    child.kill()  # nobody would read what it makes
                    raise
            return child.returncode
        finally:
            with self._lock:
                self._child = None

    def stop(self) -> None:
        """End a running round (the trainer is stopping) and start no other."""
        with self._lock:
            self._stopped = True
            if self._child is not None and self._child.poll() is None:
                self._child.terminate()


def _progress(line: str) -> tuple[int, int] | None:
    try:
        message = json.loads(line)
        return int(message["epoch"]), int(message["epochs"])
    except (ValueError, KeyError, TypeError):
        log.debug("retrain process said: %s", line.rstrip())
        return None


def _outcome(path: Path, code: int) -> RetrainOutcome:
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        written = {}
    if code == 0 and "outcome" in written:
        return RetrainOutcome(**written["outcome"])
    said = written.get("error") or "no outcome (its traceback is in the trainer's log)"
    how = f"was stopped by signal {-code}" if code < 0 else f"exited with code {code}"
    raise RetrainProcessError(f"the retrain process {how}: {said}")


# ------------------------------------------------------------------------------- the child
def _child(folder: Path) -> int:
    from trainer_service.registry import ModelRegistry
    from trainer_service.retrain import load_base, train_candidate

    request = json.loads((folder / REQUEST_FILE).read_text())
    settings = RetrainSettings(**request["settings"])
    os.nice(settings.nice)
    parent = os.getppid()

    def on_epoch(epoch: int, epochs: int) -> None:
        if os.getppid() != parent:  # the service died: nobody would promote what this makes
            raise RetrainProcessError("the trainer that started this retrain is gone")
        print(json.dumps({"epoch": epoch, "epochs": epochs}), flush=True)

    try:
        outcome = train_candidate(
            base=load_base(Path(request["base_data"]) if request["base_data"] else None),
            confirmed=read_confirmed(folder),
            registry=ModelRegistry(Path(request["registry"])),
            settings=settings,
            now=float(request["now"]),
            on_epoch=on_epoch,
        )
    except HarError as exc:
        (folder / OUTCOME_FILE).write_text(json.dumps({"error": str(exc)}))
        return 1
    (folder / OUTCOME_FILE).write_text(json.dumps({"outcome": dataclasses.asdict(outcome)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m trainer_service.retrain_process FOLDER", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s retrain %(levelname)s %(message)s")
    return _child(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
