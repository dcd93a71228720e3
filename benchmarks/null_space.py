"""Does a real model's key statistics have the null space AlphaEdit needs?

    python benchmarks/null_space.py [--models smollm2-135m] [--stats-tokens 100000] [--shares 0.01 0.02 0.05]

For each layer of AlphaEdit's window (the model's default edit layer and the window MEMIT's rule
gives it), with C = E[k kᵀ] over the first --stats-tokens tokens of tinyshakespeare (the statistics
the sequential benchmark uses, read from the same cache): how many eigen-directions fall under the
authors' threshold (2e-2) and what share of tr C they hold (`null_energy`: 0 for a true null space,
the share of ordinary text's key energy an update confined to it still reaches); and, for the
scale-free rule `nullspace_energy` = ε, how many directions it leaves to write in and the largest
eigenvalue among them. Reads cached statistics; computing them is the only slow part.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, table  # noqa: E402
from edit_speed import TEXT, load  # noqa: E402

from rankone.core.errors import RankoneError  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.methods.alphaedit import null_energy, null_space_basis  # noqa: E402
from rankone.methods.base import resolve_settings  # noqa: E402
from rankone.models.handle import ModelHandle  # noqa: E402


def rows_for(name: str, stats_tokens: int, shares: list[float]) -> list[list[object]]:
    model, tok, _ = load(name)
    handle = ModelHandle.of(model, tok)
    hp = resolve_settings(handle, {"method": "alphaedit", "stats_tokens": stats_tokens})
    layers = hp.resolve(model).layers
    ed = Editor(handle, hp, str(TEXT), progress=False)
    rows = []
    for layer in layers:
        C = ed.stats(layer).mom2.double()
        ev = torch.linalg.eigvalsh(C)
        U = null_space_basis(C, hp.nullspace_threshold)
        row: list[object] = [name, layer, C.shape[0], f"{float(ev.sum()):.3g}", f"{float(ev[-1] / ev[0].clamp_min(1e-300)):.3g}",
                             f"{U.shape[1]} ({U.shape[1] / C.shape[0]:.0%})", null_energy(C, U)]
        for eps in shares:
            Ue = null_space_basis(C, hp.nullspace_threshold, energy=eps)
            r = Ue.shape[1]
            row.append(f"{r} ({r / C.shape[0]:.0%}), λ ≤ {float(ev[r - 1]) if r else 0.0:.2g}")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--shares", nargs="+", type=float, default=[0.01, 0.02, 0.05])
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        rows = [r for name in args.models for r in rows_for(name, args.stats_tokens, args.shares)]
    except RankoneError as e:
        sys.exit(f"null_space: {e}")
    header = ["model", "layer", "directions", "tr C", "λ_max / λ_min", "under 2e-2 (authors')", "their energy share"]
    header += [f"ε = {eps:g}: directions, largest λ" for eps in args.shares]
    body = (f"C = E[k kᵀ] of each AlphaEdit window layer over {args.stats_tokens:,} tokens of tinyshakespeare (the "
            "sequential benchmark's statistics). \"Energy share\" = tr(Ûᵀ C Û) / tr C, the share of ordinary text's "
            "key energy inside the null space, which an update confined to it still reaches (0 for a true null "
            "space); rankone logs a null space above 5 %. ε columns: the scale-free rule "
            "`--hparams '{\"nullspace_energy\": ε}'`.\n\n" + table(header, rows))
    publish("null_space", "AlphaEdit's null space on a real model", body, write=not args.no_write)


if __name__ == "__main__":
    main()
