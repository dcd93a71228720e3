"""What is deployed, asked: greedy answers on an arm of the running server (a pin, over HTTP), or,
with no server, on the local model with the released patches applied (the stable arm offline:
a served greedy answer equals offline generation with the same patches)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rankone.artifacts.patch import Patch, apply_patch
from rankone.heal.client import ServerClient
from rankone.models.generation import greedy
from rankone.models.handle import ModelHandle

Answer = Callable[[str, int], str]


class Deployed:
    def __init__(self, handle: ModelHandle, client: ServerClient | None) -> None:
        self.handle, self.client = handle, client

    @contextmanager
    def arm(self, arm: str, released: list[Patch], candidate: list[Patch] = ()) -> Iterator[Answer]:
        """An answer function for `arm` (stable | candidate) while the block runs."""
        if self.client is not None:
            client = self.client
            yield lambda prompt, n: client.answer(prompt, n, arm)[0]
            return
        with self.local([*released, *(candidate if arm == "candidate" else [])]) as answer:
            yield answer

    @contextmanager
    def local(self, patches: list[Patch]) -> Iterator[Answer]:
        """Greedy answers of the local model with `patches` applied; reverted exactly afterwards."""
        m, tok = self.handle.model, self.handle.tokenizer
        applied = apply_patch(m, patches) if patches else None
        try:
            yield lambda prompt, n: greedy(m, tok, prompt, n)
        finally:
            if applied is not None:
                applied.revert()
