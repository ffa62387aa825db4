"""The robustness matrix: the catalogue, the readings, and the classification in child processes."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from harness.cli import EXIT_FOUND, EXIT_OK, main
from harness.progress import Progress
from harness.robustness.cli import DEFAULT_JSON
from harness.robustness.inputs import READINGS, build_base, build_input, load_catalogue, reading_results
from harness.robustness.matrix import OUTCOMES, control_inputs, load_document, run_matrix, unclean_own
from harness.robustness.render import render_markdown, render_summary
from harness.validate import ProblemError, validate_problem

ROOT = Path(__file__).resolve().parent.parent
PLANTED = Path(__file__).with_name("robustness_planted.py")
CATALOGUE = load_catalogue()
# Readings that coincide whatever the data: a negative id clamps to row 0; a float32 config of
# float64 or float16 weights that hold float32-representable values reads the same values.
SAME_BY_NATURE = ({"ids-clamped", "bad-ids-as-row-0"}, {"as-given", "table-cast-to-config-dtype"})


def planted(attr: str) -> str:
    return f"{PLANTED}:{attr}"


@pytest.mark.parametrize("item", CATALOGUE.inputs, ids=lambda i: i.name)
def test_every_input_is_rejected_by_the_harness_or_is_a_legitimate_value(item):
    p = build_input(CATALOGUE, item)
    if item.clean == "raise":
        with pytest.raises(ProblemError):
            validate_problem(p.tables, p.batch, p.weights)
    else:
        validate_problem(p.tables, p.batch, p.weights)


@pytest.mark.parametrize("item", CATALOGUE.inputs, ids=lambda i: i.name)
def test_every_reading_applies_and_the_readings_tell_apart(item):
    results = reading_results(build_input(CATALOGUE, item), item.readings)
    assert all(r.not_applicable is None for r in results), [(r.name, r.not_applicable) for r in results]
    base = build_base(CATALOGUE, item.base)
    assert all(r.value.shape == (base.batch.batch_size, results[0].value.shape[1]) for r in results)
    for a in results:
        for b in results:
            if a.name < b.name and torch.equal(a.value, b.value):
                assert {a.name, b.name} in SAME_BY_NATURE, (a.name, b.name)


def test_readings_of_an_out_of_range_id():
    item = CATALOGUE.input("id-too-large")  # id 13 at values[7] in a 10-row table
    p = build_input(CATALOGUE, item)
    assert READINGS["ids-modulo"](p).batch.values[7] == 3
    assert READINGS["ids-clamped"](p).batch.values[7] == 9
    assert READINGS["bad-ids-as-row-0"](p).batch.values[7] == 0
    skipped = READINGS["bad-ids-skipped"](p).batch
    assert len(skipped.values) == len(p.batch.values) - 1 and int(skipped.lengths.sum()) == len(
        skipped.values
    )


def test_building_an_input_does_not_touch_its_base():
    before = build_base(CATALOGUE, "plain")
    build_input(CATALOGUE, CATALOGUE.input("table-value-nan"))
    after = build_base(CATALOGUE, "plain")
    assert torch.equal(before.weights["t0"], after.weights["t0"])


def by_backend(doc):
    return {(r["backend"], r["input"]): r for r in doc["results"]}


def test_planted_backends_are_classified(tmp_path):
    specs = [
        planted(a) for a in ("Crashes", "Hangs", "Raises", "Clamps", "ClampsInPlace", "ZeroesNaNInPrepare")
    ]
    doc = run_matrix(specs, ["id-too-large", "table-value-nan"], timeout=3.0, json_path=tmp_path / "r.json")
    r = by_backend(doc)
    for name in ("crash", "hang", "raise", "clamp", "mutate", "nan-to-zero"):
        for control in control_inputs(CATALOGUE):
            c = r[(f"planted-{name}", control.name)]
            if "quantized" in control.name:  # the planted backends declare float tables only
                assert c["outcome"] == "unsupported" and "int8" in c["message"]
                continue
            assert (c["outcome"], c["readings"], c["clean"]) == ("returned", ["as-given"], True)

    crash = r[("planted-crash", "id-too-large")]
    assert (crash["outcome"], crash["signal"], crash["stage"], crash["clean"]) == (
        "crashed",
        "SIGSEGV",
        "lookup",
        False,
    )
    hang = r[("planted-hang", "id-too-large")]
    assert (hang["outcome"], hang["stage"], hang["clean"]) == ("hung", "lookup", False)
    assert 3.0 <= hang["seconds"] < 30
    raised = r[("planted-raise", "id-too-large")]
    assert (raised["outcome"], raised["exception"], raised["message"], raised["clean"]) == (
        "raised",
        "ValueError",
        "planted: an id is outside its table",
        True,
    )
    clamp = r[("planted-clamp", "id-too-large")]
    assert (clamp["outcome"], clamp["readings"], clamp["mutated"], clamp["clean"]) == (
        "returned",
        ["ids-clamped"],
        [],
        False,
    )
    mutate = r[("planted-mutate", "id-too-large")]
    assert mutate["outcome"] == "returned" and mutate["readings"] == ["ids-clamped"]
    assert mutate["mutated"] == ["batch values (in lookup)"] and mutate["clean"] is False
    nan_zeroed = r[("planted-nan-to-zero", "table-value-nan")]
    assert nan_zeroed["mutated"] == ["table 't0' weights (in prepare)"] and nan_zeroed["readings"] == []
    assert nan_zeroed["clean"] is False
    for name in ("crash", "hang", "raise", "clamp", "mutate"):
        nan = r[(f"planted-{name}", "table-value-nan")]
        assert (nan["outcome"], nan["readings"], nan["clean"]) == ("returned", ["as-given"], True)
    assert load_document(tmp_path / "r.json") == json.loads(json.dumps(doc))


def test_a_backend_keeping_a_process_runs_its_inputs_in_one_child_restarted_after_a_crash_or_hang(tmp_path):
    inputs = ["table-value-nan", "weight-nan", "id-too-large", "weight-inf", "id-negative", "table-value-inf"]
    doc = run_matrix([planted("KeepsAWorker")], inputs, timeout=3.0, json_path=tmp_path / "r.json")
    assert [b["keeps_processes"] for b in doc["backends"]] == [True]
    r = {name: by_backend(doc)[("planted-worker", name)] for name in inputs}
    crash, hang = r.pop("id-too-large"), r.pop("id-negative")
    assert (crash["outcome"], crash["signal"], crash["stage"]) == ("crashed", "SIGSEGV", "lookup")
    assert (hang["outcome"], hang["stage"]) == ("hung", "lookup") and 3.0 <= hang["seconds"] < 30
    said = [
        re.fullmatch(r"planted: problem (\d+) of this process, helper (\d+)", c["message"])
        for c in r.values()
    ]
    counts, helpers = [int(m[1]) for m in said], [int(m[2]) for m in said]
    # the first two in one child (one helper); a fresh child after the crash, another after the hang
    assert counts == [1, 2, 1, 1] and helpers[0] == helpers[1] and len(set(helpers)) == 3
    assert all(_gone(h) for h in helpers)

    alone = run_matrix([planted("KeepsAWorker")], inputs[:2], timeout=3.0, process_per_case=True)
    controls = len(control_inputs(CATALOGUE))
    said = [re.fullmatch(r"planted: problem (\d+) .*", c["message"]) for c in alone["results"][controls:]]
    assert [int(m[1]) for m in said] == [1, 1] and alone["process_per_case"] is True


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


class RecordingProgress(Progress):
    """Keeps what the matrix reported, and how many results its JSON held at each update."""

    def __init__(self, path):
        self.path, self.tasks, self.seen = path, [], []

    def start(self, description, *, total=None, unit="it"):
        self.tasks.append((description, total, unit))

    def update(self, done, **status):
        if self.tasks[-1][0] == "robustness":
            self.seen.append((done, len(load_document(self.path)["results"])))


def test_torch_matrix_end_to_end_streams_its_json(tmp_path):
    path = tmp_path / "torch.json"
    inputs = ["id-negative", "weight-nan", "weights-too-long", "stray-key"]
    progress = RecordingProgress(path)
    doc = run_matrix(["torch"], inputs, timeout=30.0, json_path=path, progress=progress)
    assert doc["complete"] and load_document(path)["complete"]
    controls = [c.name for c in control_inputs(CATALOGUE)]
    assert controls == ["valid-plain", "valid-weighted", "valid-quantized", "valid-quantized-weighted"]
    total = len(controls) + len(inputs)
    assert progress.tasks[-1] == ("robustness", total, "cases")
    assert progress.seen == [(n, n) for n in range(1, total + 1)]
    assert [(r["backend"], r["input"]) for r in doc["results"]] == [
        ("torch", i) for i in [*controls, *inputs]
    ]
    for r in doc["results"]:
        assert r["outcome"] in OUTCOMES and r["clean"] in (True, False)
        assert not r["mutated"]
    nan = by_backend(doc)[("torch", "weight-nan")]
    assert (nan["outcome"], nan["readings"], nan["clean"]) == ("returned", ["as-given"], True)
    md = render_markdown(doc)
    assert "| input " in md and "| torch " in md and "weight-nan" in md
    s = doc["summary"]["torch"]
    assert (s["cases"], s["clean"], s["raised"], s["silent"], s["crashed"], s["hung"], s["mutated"]) == (
        8,
        5,
        1,
        3,
        0,
        0,
        0,
    )
    # valid-quantized: torch's quantized ops pool its MEAN int8 table as SUM, a known finding
    # (cases/known/torch-quantized-mean-pooled-as-sum.json) that the matrix shows as it is
    assert s["not_clean"] == ["valid-quantized", "weights-too-long", "stray-key"]


def test_the_summary_counts_each_outcome_and_names_the_cells_that_are_not_clean(tmp_path):
    specs = [planted(a) for a in ("Crashes", "Hangs", "ClampsInPlace")]
    doc = run_matrix(specs, ["id-too-large", "weight-nan"], timeout=8.0)  # room on a busy machine
    columns = ("cases", "clean", "raised", "silent", "crashed", "hung", "mutated")
    assert {name: tuple(s[c] for c in columns) for name, s in doc["summary"].items()} == {
        "planted-crash": (6, 3, 0, 0, 1, 0, 0),  # and 2 unsupported: the quantized controls
        "planted-hang": (6, 3, 0, 0, 0, 1, 0),
        "planted-mutate": (6, 3, 0, 1, 0, 0, 1),
    }
    text = render_summary(doc)
    assert "| backend        | clean | raised | silent | crashed | hung | mutated |" in text
    assert "| planted-crash  | 3/4   | 0      | 0      | 1       | 0    | 0       |" in text
    assert "- planted-crash: id-too-large (CRASH SIGSEGV)" in text
    assert "- planted-hang: id-too-large (HANG)" in text
    assert "- planted-mutate: id-too-large (silent: ids-clamped +MUTATES)" in text
    assert "weight-nan" not in text  # clean everywhere: not named


def test_command_prints_the_summary_and_writes_the_whole_matrix_to_its_files(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = main(["robustness", "--backend", "torch", "--input", "weight-inf", "--json", str(path)])
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "Robustness: 5 cases (1 backends x 5 inputs, 4 of them valid controls)" in out
    assert "| torch   | 4/5   |" in out and "- torch: valid-quantized (silent: GARBAGE)" in out
    assert "| input " not in out  # the matrix is in the files, not on the terminal
    assert load_document(path)["complete"] and "| weight-inf " in path.with_suffix(".md").read_text()


def test_by_default_the_command_writes_only_into_ignored_paths():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(DEFAULT_JSON), str(DEFAULT_JSON.with_suffix(".md"))]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == paths, ignored


def test_our_own_backends_are_clean_on_the_whole_catalogue_when_called_directly(tmp_path):
    doc = run_matrix(["numba", "triton"], timeout=60.0)
    assert [b["name"] for b in doc["backends"] if b["available"]] == ["numba", "triton"]
    assert len(doc["results"]) == 2 * (len(CATALOGUE.inputs) + len(CATALOGUE.bases))
    assert unclean_own(doc) == []
    assert all(r["clean"] for r in doc["results"]), [r for r in doc["results"] if not r["clean"]]


def test_command_exits_1_when_our_own_backend_is_not_clean(tmp_path, capsys):
    path = tmp_path / "r.json"
    spec = planted("ClampsNamedNumba")
    code = main(["robustness", "--backend", spec, "--input", "id-negative", "--json", str(path)])
    assert code == EXIT_FOUND
    assert "numba on id-negative (returned)" in capsys.readouterr().err
    assert [(r.backend, r.input) for r in unclean_own(load_document(path))] == [("numba", "id-negative")]


def test_command_rejects_an_unknown_input(capsys):
    assert main(["robustness", "--input", "no-such-input"]) == 2
    assert "no input 'no-such-input'" in capsys.readouterr().err
