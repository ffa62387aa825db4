"""The progress display: a live bar on a terminal, plain lines at a modest rate elsewhere, or nothing."""

import io

from harness.progress import BarProgress, LineProgress, Progress, progress_for


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_at_start_every_interval_and_at_the_end():
    out, clock = io.StringIO(), FakeClock()
    p = LineProgress(out, interval=10.0, clock=clock)
    p.start("fuzz numba", total=180, unit="s")
    for t in range(1, 31):  # an update a second for 30 s: a line every 10 s, not 30
        clock.now = float(t)
        p.update(float(t), examples=4 * t, agreed=4 * t)
    p.note("fuzz numba: a failure; minimising it")
    clock.now = 180.0
    p.update(180.0, examples=720, agreed=719)
    p.finish()
    p.finish()  # a second finish prints nothing
    assert out.getvalue().splitlines() == [
        "fuzz numba: started, 180 s",
        "fuzz numba: 10/180 s (6%), 0:10 elapsed, ~2:50 left; rate=4.0 ex/s, examples=40, agreed=40",
        "fuzz numba: 20/180 s (11%), 0:20 elapsed, ~2:40 left; rate=4.0 ex/s, examples=80, agreed=80",
        "fuzz numba: 30/180 s (17%), 0:30 elapsed, ~2:30 left; rate=4.0 ex/s, examples=120, agreed=120",
        "fuzz numba: a failure; minimising it",
        "fuzz numba: 180/180 s (100%), 3:00 elapsed; rate=4.0 ex/s, examples=720, agreed=719",
        "fuzz numba: done, 180/180 s (100%), 3:00 elapsed; rate=4.0 ex/s, examples=720, agreed=719",
    ]


def test_a_new_task_finishes_the_previous_one_and_counts_need_no_total():
    out, clock = io.StringIO(), FakeClock()
    p = LineProgress(out, interval=10.0, clock=clock)
    p.start("robustness: loading the backends")
    clock.now = 3.0
    p.update(2, last="numba")
    p.start("robustness", total=6, unit="cases")
    clock.now = 5.0
    p.update(7)  # past the total: shown as the total
    p.finish()
    assert out.getvalue().splitlines() == [
        "robustness: loading the backends: started",
        "robustness: loading the backends: done, 2 it, 0:03 elapsed; last=numba",
        "robustness: started, 6 cases",
        "robustness: done, 6/6 cases (100%), 0:02 elapsed",
    ]


def test_a_terminal_gets_one_live_bar_with_rate_elapsed_and_remaining():
    term = Terminal()
    p = progress_for(stream=term)
    assert isinstance(p, BarProgress)
    p.start("robustness", total=40, unit="cases")
    for n in range(1, 41):
        p.update(n, not_clean=n // 10)
    p.note("a note above the bar")
    p.finish()
    text = term.getvalue()
    assert "\r" in text and text.count("\n") == 2  # redrawn in place; the note and the final bar end lines
    final = text.split("\r")[-1]
    assert "robustness: 100%" in final and "40/40 cases" in final and "cases/s" in final
    assert "not_clean=4" in final and "a note above the bar\n" in text


def test_not_a_terminal_gets_lines_and_quiet_gets_nothing():
    assert isinstance(progress_for(stream=io.StringIO()), LineProgress)
    quiet = progress_for(quiet=True, stream=Terminal())
    assert type(quiet) is Progress
    quiet.start("x", total=1)
    quiet.update(1)
    quiet.note("nothing")
    quiet.finish()
