"""Child process of ``bench/chaos.py``: two tiny signed releases (TensorFlow stays out of the
harness's own process). ``python bench/_chaos_model.py OUT`` writes OUT/registry, OUT/keys and,
for each release, OUT/<version>.manifest (encoded) and OUT/<version>.payload; prints their
versions as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import REPO  # puts the repository on sys.path

from shared import codec
from simulator.tiny_model import make_releases  # tiny, real, signed releases


def main(out: Path) -> int:
    releases = make_releases(out)
    versions = []
    for release in (releases.first, releases.second):
        version = release.manifest.version
        (out / f"{version}.manifest").write_bytes(codec.encode_manifest(release.manifest))
        (out / f"{version}.payload").write_bytes(release.payload)
        versions.append(version)
    print(json.dumps({"versions": versions, "public_key": str(releases.public_key_path),
                      "repo": str(REPO)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
