"""Which patch set a request gets: sticky canaries, shadow samples and trusted pins.

A user is on a staged patch's canary when hash(patch id, user key) falls below its percentage,
so the same user keeps the same answer source, and raising the percentage only adds users (a
user's hash does not move). The user key is the OpenAI `user` field or the X-Rankone-User
header; a request with neither draws a random key (counted as unkeyed). Each staged patch is
decided on its own, so with several staged patches a user gets stable plus those whose canary
they are in; the full candidate is all of them.

A pin (`X-Rankone-Patchset: base|stable|candidate|<patch id>`, from a trusted caller) names the
patch set outright; a patch id pins stable plus that patch.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from rankone.artifacts.patch import Patch
from rankone.core.errors import RankoneError
from rankone.serve.errors import ApiError
from rankone.serve.patchsets import Arms, PatchSet

PINS = ("base", "stable", "candidate")


def canary_bucket(patch_id: str, user: str) -> float:
    """Where a user falls for a staged patch: a number in [0, 100), fixed by the pair."""
    h = hashlib.sha256(f"{patch_id}\x00{user}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 * 100.0


@dataclass(frozen=True)
class Route:
    user: str | None = None  # the user key; None: unkeyed
    pin: str | None = None  # base | stable | candidate | a patch id (4+ hex characters)


class Router:
    """Resolves routes against the arms in force. Its random draws are seeded (deterministic runs)."""

    def __init__(self, store: Path | None, seed: int = 0, max_pins: int = 8) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.max_pins = max_pins
        self._pins: OrderedDict[str, Patch] = OrderedDict()  # loaded pinned patches, least recent first
        self._lock = threading.Lock()

    def resolve(self, route: Route, arms: Arms) -> PatchSet:
        if route.pin is not None:
            return self.pinned(route.pin, arms)
        with self._lock:
            user = route.user if route.user is not None else f"unkeyed-{self.rng.getrandbits(64):016x}"
        ids = [s.id for s in arms.staged if s.canary > 0 and canary_bucket(s.id, user) < s.canary]
        return arms.with_deltas(ids, "candidate") if ids else arms.stable

    def shadow_ids(self, arms: Arms) -> list[str]:
        """The staged patches a stable request is re-run with: each drawn at its shadow percentage."""
        with self._lock:
            return [s.id for s in arms.staged if s.shadow > 0 and self.rng.random() * 100.0 < s.shadow]

    def pinned(self, pin: str, arms: Arms) -> PatchSet:
        if pin == "stable":
            return arms.stable
        if pin == "base":
            return arms.base
        if pin == "candidate":
            if arms.candidate is None:
                raise ApiError(409, "nothing is staged, so there is no candidate to pin; pin base, stable or a patch id",
                               "no_candidate", "X-Rankone-Patchset")
            return arms.candidate
        ref = pin.lower()
        if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref):
            raise ApiError(400, f"X-Rankone-Patchset takes base, stable, candidate or a patch id (4+ hex characters), "
                                f"not {pin!r}", "invalid_pin", "X-Rankone-Patchset")
        ids = [i for i in arms.known if i.startswith(ref)]
        if not ids:
            raise ApiError(404, f"no patch {pin!r} in the registry", "patch_not_found", "X-Rankone-Patchset")
        if len(ids) > 1:
            raise ApiError(400, f"patch id {pin!r} is ambiguous ({', '.join(ids)}); give more characters",
                           "ambiguous_pin", "X-Rankone-Patchset")
        pid = ids[0]
        if pid in arms.stable_ids:
            return arms.stable
        if arms.known.get(pid) == "compacted":  # stable already holds its edits, re-solved: adding it would write them twice
            raise ApiError(409, f"patch {pid} was compacted into the release; pin stable (it serves its edits) or base",
                           "patch_compacted", "X-Rankone-Patchset")
        return arms.with_deltas([pid], "pin", {pid: self._load(pid)})

    def _load(self, pid: str) -> Patch:
        with self._lock:
            if pid in self._pins:
                self._pins.move_to_end(pid)
                return self._pins[pid]
        if self.store is None:
            raise ApiError(404, f"no patch {pid!r}: this server has no registry", "patch_not_found")
        try:
            patch = Patch.load(self.store / pid)  # verified: a tampered file is refused
        except RankoneError as e:
            raise ApiError(409, f"patch {pid} cannot be served: {e}", "patch_unreadable", "X-Rankone-Patchset") from None
        with self._lock:
            self._pins[pid] = patch
            while len(self._pins) > self.max_pins:
                self._pins.popitem(last=False)
        return patch
