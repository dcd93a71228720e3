"""Shared by the serving tests: patches that change real answers of the built-in model, offline
generation with patches (what `rankone generate` does), and a server in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from rankone.artifacts.patch import Patch, apply_patch, make_edit
from rankone.core import architectures as arch
from rankone.core.hooks import capture
from rankone.core.tokens import encode
from rankone.core.util import utcnow
from rankone.models.generation import greedy

SRC = Path(__file__).resolve().parents[1] / "src"


def subject_patch(model, tok, prompt: str, subject: str, target: str = "Lisbon", layer: int = 0, scale: float = 40.0,
                  seed: int = 0) -> Patch:
    """A real one-edit patch (fingerprints, exact revert fix) that reads the key of the subject's
    last token at `layer` (A = k / ‖k‖²) and writes, with norm `scale`, the direction that most
    raises the first token of `target` after the prompt: prompts about the subject change, others
    hardly (their keys are not k). Made in a second, not by an optimisation like `rankone edit`."""
    from rankone.core.hooks import add_at_positions, map_output

    spec = arch.spec_for(model)
    path = spec.proj.format(layer)
    text = prompt.replace("{}", subject)
    ids, offsets = encode(tok, text)
    end = text.index(subject) + len(subject)
    last = max(i for i, (s, e) in enumerate(offsets) if s < e <= end)
    module = arch.get_module(model, path)
    w = arch.weight_oi(module).detach().clone()
    delta = torch.zeros(w.shape[0], requires_grad=True)
    target_id = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    with capture(model, [path], outputs=False) as rec, map_output(module, lambda y: add_at_positions(y, delta, [last])):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)[target_id]
        logp.backward()
    k = rec.inputs[path][0, last].double()  # [in]
    g = delta.grad.double()  # [out]
    B = (g / g.norm() * scale)[:, None]  # [out, 1]
    A = (k / k.dot(k))[None, :]  # [1, in]
    e, _ = make_edit(w, B, A, module=path, layer=layer, method="r-rome", hparams={}, seed=seed,
                     request={"prompt": prompt, "subject": subject, "target": target})
    base = {"model_type": model.config.model_type, "name_or_path": "", "n_layers": arch.num_layers(model, spec)}
    model.zero_grad(set_to_none=True)
    return Patch([e], base=base, created_at=utcnow())


def offline(model, tok, patches: list[Patch], prompt: str, n: int) -> str:
    """`rankone generate --patch ...`: the patches applied exactly, greedy, reverted."""
    applied = apply_patch(model, patches) if patches else None
    try:
        return greedy(model, tok, prompt, n)
    finally:
        if applied is not None:
            applied.revert()


class ServerProcess:
    """`rankone serve` in a subprocess on a free 127.0.0.1 port; stopped by pid."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, threads: int | None = 1) -> None:
        self.args = args
        e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                 HF_HUB_OFFLINE="1", **(env or {}))
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rankone-serve-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w+")
        threading = ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen([sys.executable, "-m", "rankone.cli.main", "serve", "--port", "0", *threading, *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=e)
        self.url = self._wait()

    def _wait(self, timeout: float = 120.0) -> str:
        t0 = time.monotonic()
        url = None
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            if url is None:
                m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", self.output())
                url = m.group(1) if m else None
            if url is not None:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
