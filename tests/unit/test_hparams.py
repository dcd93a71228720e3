"""Settings dataclasses of every method in the table, and trace settings: JSON round trip, frozen,
and a typo or an out-of-range value is one clear error."""

from __future__ import annotations

import re

import pytest

from rankone.core.errors import RankoneError
from rankone.methods.base import METHODS, method
from rankone.methods.rome import EditHParams
from rankone.trace.runs import TraceSettings


def test_hparams_round_trip_through_json() -> None:
    hp = EditHParams(method="p-rome", layer=2, v_steps=7, prefixes=["A. {}"], seed=3)
    assert EditHParams.from_json(hp.to_json()) == hp
    assert EditHParams.from_json(hp.to_json()) != EditHParams()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_settings_round_trip_and_are_frozen(name) -> None:
    cls = method(name).settings
    s = cls.from_dict({"method": name, "layer": 1, "seed": 4, "stats_tokens": 5000})
    assert cls.from_json(s.to_json()) == s and s.method == name
    with pytest.raises(AttributeError):
        s.layer = 2  # resolved settings are what a patch records: never changed in place
    with pytest.raises(RankoneError, match="unknown hyper-parameter"):
        cls.from_dict({"method": name, "layr": 1})
    with pytest.raises(RankoneError, match="stats_tokens must be at least 1"):
        cls.from_dict({"method": name, "stats_tokens": 0})
    with pytest.raises(RankoneError, match="v_lr must be a finite number"):
        cls.from_dict({"method": name, "v_lr": float("inf")})


@pytest.mark.parametrize("cls, bad, what", [(EditHParams, {"v_step": 5}, "hyper-parameter"),
                                            (TraceSettings, {"sample": 3}, "trace setting")])
def test_unknown_key_is_one_clear_line(cls, bad, what) -> None:
    with pytest.raises(RankoneError) as e:
        cls.from_dict(bad)
    msg = str(e.value)
    assert f"unknown {what}(s) {sorted(bad)}" in msg and "known:" in msg and "\n" not in msg


@pytest.mark.parametrize("bad, message", [({"reach_prob": 0.0}, "reach_prob must be in (0, 1]"),
                                          ({"reach_prob": 1.5}, "reach_prob must be in (0, 1]"),
                                          ({"v_steps_max": 0}, "v_steps_max must be at least 1")])
def test_value_loop_extension_settings_are_checked(bad, message) -> None:
    with pytest.raises(RankoneError, match=re.escape(message)):
        EditHParams.from_dict(bad)
