"""The WISDM raw loader: every quirk of the real file, read from plain, gzip and tar.gz."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from activity_model.wisdm import load_wisdm, normalise_activity, order_labels
from har.data_cli import register as register_data
from shared.errors import DataError

# One file with every quirk of WISDM_ar_v1.1_raw.txt. Line numbers matter: the report cites them.
QUIRKY = (
    "33,Jogging,49105962326000,-0.6946377,12.680544,0.50395286;\n"  # 1 good
    "33,jogging,49106062271000,5.012288,11.264028,0.95342433;"  # 2 good, two records on a line
    "33,JOGGING,49106112167000,4.903325,10.882658,-0.08172209;\n"
    "33,Jogging,49106222305000,-0.61291564,18.496431,3.0237172;\n"  # 3 good
    "33,Jogging,49106332290000,-1.1849703,12.108489,7.205164;\n"  # 4 good
    "33,Jogging,49106332290000,-1.1849703,12.108489,7.205164;\n"  # 5 duplicate of 4
    "33,Jogging,0,-1.1849703,12.108489,7.205164;\n"  # 6 zero timestamp
    "33,Jogging,49106442306000,-0.6946377,12.680544,;\n"  # 7 empty value
    "33,Walking,49106442306000,-0.6946377,12.680544\n"  # 8 missing field, no ';'
    " 7 , upstairs ,1000, 1.5 ,2,3 ;\r\n"  # 9 good: blanks and CRLF
    ",Walking,49106442306000,1,2,3;\n"  # 10 empty user
    "12,Walking,x49,1,2,3;\n"  # 11 bad timestamp
    "\n"  # 12 blank line
    "12,Walking,49,1,2,nan;\n"  # 13 NaN
    "12,Walking,50,1,2,abc;12,Walking,51,1,2,3;;\n"  # 14 bad number, then a good record
    "12,Walking,52,1,2,3,4;\n"  # 15 too many fields
    "12,Sitting,53,1,2,3"  # 16 good, last line without ';' nor newline
)


@pytest.fixture
def quirky_file(tmp_path: Path) -> Path:
    path = tmp_path / "WISDM_ar_v1.1_raw.txt"
    path.write_text(QUIRKY, encoding="utf-8")
    return path


def test_every_quirk_is_skipped_and_counted_with_its_line(quirky_file: Path) -> None:
    data = load_wisdm(quirky_file)
    report = data.report.to_dict()
    assert report["records_kept"] == 8
    assert report["duplicates_removed"] == 1
    assert report["physical_lines"] == 16
    assert report["skipped_by_reason"] == {
        "zero timestamp": 1,
        "empty value": 2,
        "missing fields": 1,
        "timestamp is not an integer": 1,
        "acceleration is not finite": 1,
        "acceleration is not a number": 1,
        "too many fields": 1,
    }
    bad = {(item["line"], item["reason"]) for item in report["first_bad_lines"]}
    assert bad == {
        (6, "zero timestamp"),
        (7, "empty value"),
        (8, "missing fields"),
        (10, "empty value"),
        (11, "timestamp is not an integer"),
        (13, "acceleration is not finite"),
        (14, "acceleration is not a number"),
        (15, "too many fields"),
    }
    assert report["records_seen"] == report["records_kept"] + 1 + data.report.records_skipped


def test_values_are_parsed_exactly_and_names_normalised(quirky_file: Path) -> None:
    data = load_wisdm(quirky_file)
    assert data.labels == ("Walking", "Jogging", "Upstairs", "Sitting")
    assert data.users.tolist() == [33, 33, 33, 33, 33, 7, 12, 12]
    names = [data.labels[i] for i in data.activity]
    assert names == ["Jogging"] * 5 + ["Upstairs", "Walking", "Sitting"]
    assert data.timestamps.tolist()[:3] == [49105962326000, 49106062271000, 49106112167000]
    np.testing.assert_allclose(data.xyz[5], [1.5, 2.0, 3.0])
    np.testing.assert_allclose(data.xyz[0], [-0.6946377, 12.680544, 0.50395286], rtol=1e-6)
    assert data.xyz.dtype == np.float32


def test_gzip_and_official_tar_gz_read_the_same(quirky_file: Path, tmp_path: Path) -> None:
    plain = load_wisdm(quirky_file)
    gz_path = tmp_path / "raw.txt.gz"
    gz_path.write_bytes(gzip.compress(quirky_file.read_bytes()))
    tar_path = tmp_path / "WISDM_ar_latest.tar.gz"
    with tarfile.open(tar_path, "w:gz") as archive:
        readme = b"about the lab"
        info = tarfile.TarInfo("WISDM_ar_v1.1/readme.txt")
        info.size = len(readme)
        archive.addfile(info, io.BytesIO(readme))
        archive.add(quirky_file, arcname="WISDM_ar_v1.1/WISDM_ar_v1.1_raw.txt")
    for other in (load_wisdm(gz_path), load_wisdm(tar_path)):
        assert other.labels == plain.labels
        np.testing.assert_array_equal(other.xyz, plain.xyz)
        np.testing.assert_array_equal(other.timestamps, plain.timestamps)
        assert other.report.skipped == plain.report.skipped


def test_records_spanning_chunk_boundaries_are_not_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("activity_model.wisdm._CHUNK_BYTES", 37)  # cuts records mid-way
    rows = [
        f"{u},Walking,{1000 + i},{i}.25,-{i}.5,9.81;" for i, u in enumerate([1] * 30 + [2] * 30)
    ]
    # Some lines hold several records; a file need not end with a newline.
    text = "\n".join(rows[i] + rows[i + 1] for i in range(0, 60, 2))
    path = tmp_path / "chunked.txt"
    path.write_text(text)
    data = load_wisdm(path)
    assert len(data) == 60
    assert data.report.records_skipped == 0
    assert data.report.physical_lines == 30
    np.testing.assert_allclose(data.xyz[:, 0], [i + 0.25 for i in range(60)])
    assert data.timestamps.tolist() == list(range(1000, 1060))


def test_a_file_with_no_valid_record_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("garbage;\nmore,garbage;\n")
    with pytest.raises(DataError, match="no valid WISDM record"):
        load_wisdm(path)
    with pytest.raises(DataError, match="no such data file"):
        load_wisdm(tmp_path / "missing.txt")


def test_archive_without_raw_member_is_a_data_error(tmp_path: Path) -> None:
    tar_path = tmp_path / "other.tar.gz"
    with tarfile.open(tar_path, "w:gz") as archive:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match=r"no \*_raw.txt member"):
        load_wisdm(tar_path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("walking", "Walking"),
        ("WALKING", "Walking"),
        (" Upstairs ", "Upstairs"),
        ("upstairs", "Upstairs"),
        ("WALKING_UPSTAIRS", "Upstairs"),
        ("lying", "Laying"),
        ("Jogging", "Jogging"),
        ("cycling", "Cycling"),
    ],
)
def test_activity_names_are_normalised(raw: str, expected: str) -> None:
    assert normalise_activity(raw) == expected


def test_labels_follow_wisdm_order_then_extras() -> None:
    assert order_labels({"Laying", "Standing", "Walking", "Abseiling"}) == (
        "Walking",
        "Standing",
        "Abseiling",
        "Laying",
    )


def test_data_report_command_prints_the_report(
    quirky_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register_data(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "report", str(quirky_file)])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["records_kept"] == 8
    assert printed["labels"] == ["Walking", "Jogging", "Upstairs", "Sitting"]
    assert printed["skipped_by_reason"]["zero timestamp"] == 1
