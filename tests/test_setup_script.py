"""scripts/setup.sh installs the project into .venv on a fresh checkout, and again only when
pyproject.toml changed: run in a copy of the checkout, with stand-ins for python, pip and apt."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Stands in for "$PYTHON" and for .venv/bin/python: records its arguments; `-m venv DIR` makes
# DIR/bin/python (this same script).
FAKE_PYTHON = """#!/bin/sh
echo "$*" >>"$CALLS"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && chmod +x "$3/bin/python"
fi
"""


def checkout_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A checkout holding only what setup.sh reads, and an environment whose PATH has stand-ins
    for mosquitto, mosquitto_sub, jq and initdb (so apt is not needed) and for python3."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", checkout / "pyproject.toml")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("mosquitto", "mosquitto_sub", "jq", "initdb"):
        (tools / name).write_text("#!/bin/sh\nexit 0\n")
    (tools / "python3").write_text(FAKE_PYTHON)
    for tool in tools.iterdir():
        tool.chmod(0o755)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CALLS": str(tmp_path / "calls.txt"),
        "PYTHON": "python3",
    }
    return checkout, env


def run_setup(checkout: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def setup(checkout: Path, env: dict[str, str], calls: Path) -> list[str]:
    """Run setup.sh, which must succeed; the python/pip invocations it made."""
    calls.write_text("")
    done = run_setup(checkout, env)
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines()


def test_setup_installs_on_a_fresh_checkout_then_only_when_pyproject_changes(
    tmp_path: Path,
) -> None:
    checkout, env = checkout_copy(tmp_path)
    calls = Path(env["CALLS"])
    install = "-m pip install --quiet -e .[agent,agent-lite,trainer,postgres,dev]"
    light = "-m pip install --quiet -e .[agent-lite]"

    fresh = setup(checkout, env, calls)
    assert fresh[0] == "-m venv .venv"
    assert install in fresh
    # The light agent's venv comes second, with no TensorFlow extra.
    assert fresh.index("-m venv .venv-lite") > fresh.index(install)
    assert fresh[-1] == light

    assert setup(checkout, env, calls) == []  # nothing changed: nothing to install

    with (checkout / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# changed\n")
    assert [install, light] == [c for c in setup(checkout, env, calls) if "-e" in c]
    assert setup(checkout, env, calls) == []

    shutil.rmtree(checkout / ".venv")  # a lost venv is made and filled again
    again = setup(checkout, env, calls)
    assert again[0] == "-m venv .venv"
    assert install in again
    assert light not in again  # .venv-lite is still there and up to date


def test_a_failed_install_is_tried_again(tmp_path: Path) -> None:
    checkout, env = checkout_copy(tmp_path)
    calls = Path(env["CALLS"])
    setup(checkout, env, calls)
    failing = checkout / ".venv" / "bin" / "python"
    failing.write_text('#!/bin/sh\necho "$*" >>"$CALLS"\nexit 1\n')
    with (checkout / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# changed\n")
    assert run_setup(checkout, env).returncode != 0
    shutil.copy(tmp_path / "bin" / "python3", failing)  # pip works again
    again = setup(checkout, env, calls)
    assert "-m pip install --quiet -e .[agent,agent-lite,trainer,postgres,dev]" in again
