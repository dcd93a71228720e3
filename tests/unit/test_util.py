"""The shared helpers: one UTC clock for every record, means that skip gaps."""

import math
from datetime import datetime, timezone

from rankone.core.util import mean, median, user_name, utcnow
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor
from rankone.methods.rome import EditHParams
from tiny import make_model
from conftest import handle_of  # noqa: E402


def _parse(stamp: str) -> datetime:
    assert stamp.endswith("Z"), stamp  # UTC, whatever the machine's time zone
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def test_utcnow_is_utc_and_sorts_as_text(monkeypatch):
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    a, b = utcnow(), utcnow()
    assert a <= b and abs((_parse(a) - datetime.now(timezone.utc)).total_seconds()) < 5


def test_patches_are_stamped_by_the_same_clock(tok, corpus, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    hp = EditHParams(v_steps=2, prefix_spec=[[3, 2]], layer=1, stats_tokens=5_000)
    patch = Editor(handle_of(make_model("gpt2"), tok), hp, corpus, progress=False).edit([EditRequest.create("{} is in", "Paris", "Rome")])
    for stamp in (patch.created_at, patch.edits[0].created_at):
        assert abs((_parse(stamp) - datetime.now(timezone.utc)).total_seconds()) < 120


def test_mean_and_median_skip_gaps():
    assert mean([1.0, None, float("nan"), 3.0]) == 2.0 and median([5, None, 1, 3]) == 3
    assert mean([]) is None and median([None, float("nan")]) is None
    assert isinstance(user_name(), str) and user_name()
    assert not math.isnan(mean([0.5]))
