"""ci/merge_nightly.py: the shards' nightly.json files merged into one, and hostile inputs
(missing files, duplicate ids, malformed JSON, bad counts) refused with the file's name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ci.merge_nightly import MergeError, inputs, load, main, merge


def row(passed: int = 0, failed: int = 0, skipped: int = 0, **extra: Any) -> dict[str, Any]:
    ran = passed + failed
    return {"passed": passed, "failed": failed, "skipped": skipped,
            "runs": passed + failed + skipped, "pass_rate": round(passed / ran, 3) if ran else None,
            **extra}


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_union_sums_counts_and_recomputes_pass_rate(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "shard-1" / "nightly.json", {
        "tests/suite/test_a.py::test_x[tiny]": row(passed=3),
        "tests/suite/test_a.py::test_y[tiny]": row(passed=2, failed=1),
        "tests/unit/test_u.py::test_skip": row(skipped=1),
    })
    b = write(tmp_path / "shard-2" / "nightly.json", {
        "tests/suite/test_a.py::test_y[tiny]": row(passed=1, failed=2, pass_rate=0.9),  # stale rate
        "tests/suite/test_b.py::test_z[debian]": row(failed=3),
    })
    out = tmp_path / "merged" / "nightly.json"
    rc, text = run(["-o", str(out), str(a), str(b)], capsys)
    assert rc == 0, text
    merged = json.loads(out.read_text())
    assert list(merged) == sorted(merged)
    assert merged["tests/suite/test_a.py::test_x[tiny]"] == row(passed=3)
    assert merged["tests/suite/test_a.py::test_y[tiny]"] == {
        "passed": 3, "failed": 3, "skipped": 0, "runs": 6, "pass_rate": 0.5}
    assert merged["tests/suite/test_b.py::test_z[debian]"]["pass_rate"] == 0.0
    assert merged["tests/unit/test_u.py::test_skip"]["pass_rate"] is None
    assert "merged 2 file(s), 4 tests (3 ran)" in text


def test_pass_rate_rounds_like_ci_nightly() -> None:
    merged = merge([{"t": {"passed": 1, "failed": 0, "skipped": 0, "runs": 1}},
                    {"t": {"passed": 1, "failed": 1, "skipped": 0, "runs": 2}}])
    assert merged["t"]["pass_rate"] == 0.667


def test_folders_are_searched_and_the_output_is_not_read_back(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # what actions/download-artifact leaves: one folder per shard's artifact
    for i in (1, 2, 3):
        write(tmp_path / "shards" / f"nightly-shard-{i}" / "nightly.json", {f"t{i}": row(passed=1)})
    out = tmp_path / "shards" / "nightly.json"
    write(out, {"t1": row(passed=100)})  # last run's merge, inside the folder merged
    rc, text = run(["-o", str(out), str(tmp_path / "shards")], capsys)
    assert rc == 0, text
    assert json.loads(out.read_text()) == {f"t{i}": row(passed=1) for i in (1, 2, 3)}


def test_missing_file_names_it_and_writes_nothing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "a.json", {"t": row(passed=1)})
    missing = tmp_path / "shard-4" / "nightly.json"
    out = tmp_path / "out.json"
    rc, text = run(["-o", str(out), str(good), str(missing)], capsys)
    assert rc == 2
    assert f"{missing}: no such file" in text
    assert not out.exists()


def test_folder_without_nightly_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "nightly-shard-2").mkdir()
    with pytest.raises(MergeError, match=r"nightly-shard-2: no nightly\.json under this folder"):
        inputs([tmp_path / "nightly-shard-2"])


def test_no_inputs_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, text = run([], capsys)
    assert rc == 2
    assert "no input" in text


@pytest.mark.parametrize(("content", "expected"), [
    ("", r"malformed JSON: Expecting value \(line 1, column 1\)"),
    ('{"t": {"passed": 1,', r"malformed JSON"),
    ('{"t": ' + json.dumps(row(passed=1)) + "} trailing", r"malformed JSON: Extra data"),
    ("[1, 2]", r"expected an object \{test id: counts\}, got list"),
    ('{"t": 3}', r"t: expected an object of counts, got int"),
    ('{"": ' + json.dumps(row(passed=1)) + "}", r"an empty test id"),
    ('{"t": {"passed": NaN, "failed": 0, "skipped": 0, "runs": 0}}', r"NaN is not valid JSON"),
    ('{"t": {"passed": 1, "failed": 0, "skipped": 0}}', r"t: runs must be a whole number >= 0, got None"),
    ('{"t": {"passed": -1, "failed": 1, "skipped": 0, "runs": 0}}', r"t: passed must be a whole number"),
    ('{"t": {"passed": 1.5, "failed": 0, "skipped": 0, "runs": 1}}', r"t: passed must be a whole number"),
    ('{"t": {"passed": true, "failed": 0, "skipped": 0, "runs": 1}}', r"t: passed must be a whole number"),
    ('{"t": {"passed": "1", "failed": 0, "skipped": 0, "runs": 1}}', r"t: passed must be a whole number"),
    ('{"t": {"passed": 1, "failed": 0, "skipped": 0, "runs": 5}}',
     r"t: runs \(5\) != passed \+ failed \+ skipped \(1 \+ 0 \+ 0\)"),
])
def test_malformed_input_names_the_file(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "shard-3" / "nightly.json", content)
    with pytest.raises(MergeError, match=expected) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_duplicate_id_within_one_file_is_refused(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # json.loads would silently keep the last one and lose a shard's runs
    one = json.dumps(row(passed=1))
    path = write(tmp_path / "nightly.json", f'{{"t": {one}, "u": {one}, "t": {one}}}')
    rc, text = run(["-o", str(tmp_path / "out.json"), str(path)], capsys)
    assert rc == 2
    assert f"{path}: key 't' appears twice in one object" in text


def test_duplicate_id_across_files_is_summed(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", {"t": row(passed=1)})
    b = write(tmp_path / "b.json", {"t": row(failed=1)})
    assert merge([load(a), load(b)]) == {"t": row(passed=1, failed=1)}


def test_unreadable_inputs_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"t\xe9": 1}')
    with pytest.raises(MergeError, match=r"latin1\.json: not UTF-8 text"):
        load(bad)
    with pytest.raises(MergeError, match=r"is a folder, not a nightly\.json"):
        load(tmp_path)
