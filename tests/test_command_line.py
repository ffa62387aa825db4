"""What every command shares: --quiet, --json PATH (the summary for CI), exit codes, no raw noise."""

import json

import pytest

from harness.cli import EXIT_USAGE, build_parser, main

COMMANDS = ["backends", "check", "fuzz", "replay", "bench", "compare", "report", "robustness"]
POSITIONAL = {"replay": ["case.json"], "compare": ["a.json", "b.json"], "report": ["run.json"]}
OWN_JSON = {"bench", "robustness"}  # their --json is their own document (pytest-benchmark's; the matrix's)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_accepts_quiet_and_json(command):
    args = build_parser().parse_args([command, *POSITIONAL.get(command, []), "--quiet", "--json", "out.json"])
    assert args.quiet is True
    assert (args.json if command in OWN_JSON else args.summary_json) == "out.json"


def test_the_json_summary_holds_the_exit_code_and_the_result(tmp_path, capsys):
    path = tmp_path / "s" / "check.json"
    code = main(["check", "--backend", "torch", "--problems", "2", "--quiet", "--json", str(path)])
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["command"], doc["exit_code"], doc["error"]) == (
        "jagbench-summary/1",
        "check",
        code,
        None,
    )
    counts = doc["result"]["counts"]["torch"]
    assert sum(counts.values()) == 2 and doc["result"]["failures"] == []
    captured = capsys.readouterr()
    assert "| torch " in captured.out and captured.err == ""  # quiet: no progress on stderr


def test_a_usage_error_is_one_line_exit_2_and_in_the_summary(tmp_path, capsys):
    path = tmp_path / "s.json"
    assert main(["check", "--backend", "nope", "--json", str(path)]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("jagbench check: unknown backend 'nope'")
    doc = json.loads(path.read_text())
    assert (
        doc["exit_code"] == EXIT_USAGE and "unknown backend 'nope'" in doc["error"] and doc["result"] is None
    )


def test_progress_goes_to_stderr_as_plain_lines_when_it_is_not_a_terminal(capsys):
    assert main(["check", "--backend", "torch", "--problems", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "check: started, 2 problems" and err[-1].startswith("check: done, 2/2 problems (100%)")
