"""Downstream regression checks: GLUE few-shot, the r-ROME paper's protocol.

The model reads k solved examples, then the query; the prediction is the label word with the
higher teacher-forced log-probability (`rankone.eval.metrics.score`). Reported per task:
accuracy, F1 and MCC over a seeded sample of the subset.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

from rankone.core.errors import RankoneError
from rankone.eval.metrics import score

# task -> (prompt template over the record's fields, label words by GLUE label id). The model
# reads k solved examples, then the query; the prediction is the label word with the higher
# teacher-forced log-probability. GLUE's RTE uses 0 = entailment, 1 = not entailment.
GLUE_TASKS: dict[str, tuple[str, dict[int, str]]] = {
    "sst2": ("Review: {sentence}\nSentiment:", {0: "negative", 1: "positive"}),
    "mrpc": ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
             {0: "No", 1: "Yes"}),
    "rte": ("{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", {0: "True", 1: "False"}),
    "cola": ("Sentence: {sentence}\nQuestion: Is this sentence grammatical?\nAnswer:", {0: "No", 1: "Yes"}),
}


def load_glue(path: str, task: str) -> list[dict[str, Any]]:
    """A GLUE subset as a JSON list of records (a folder holding {task}.json, or the file)."""
    import json
    import os

    if task not in GLUE_TASKS:
        raise RankoneError(f"unknown GLUE task {task!r}; choose from {', '.join(GLUE_TASKS)}")
    f = os.path.join(path, f"{task}.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise RankoneError(f"GLUE file {f} does not exist; give a folder with {', '.join(t + '.json' for t in GLUE_TASKS)}")
    try:
        data = json.loads(open(f, encoding="utf-8").read())
    except json.JSONDecodeError as e:
        raise RankoneError(f"{f} is not valid JSON ({e.msg})") from None
    fields = re.findall(r"{(\w+)}", GLUE_TASKS[task][0]) + ["label"]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) and all(k in r for k in fields) for r in data):
        raise RankoneError(f"{f} must be a non-empty JSON list of records with {fields}")
    return data


def binary_scores(gold: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    """Accuracy, F1 of label 1, and Matthews correlation (CoLA's GLUE metric)."""
    tp = sum(g == 1 and p == 1 for g, p in zip(gold, pred))
    tn = sum(g == 0 and p == 0 for g, p in zip(gold, pred))
    fp = sum(g == 0 and p == 1 for g, p in zip(gold, pred))
    fn = sum(g == 1 and p == 0 for g, p in zip(gold, pred))
    n = len(gold)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"acc": (tp + tn) / n if n else float("nan"), "f1": f1, "mcc": (tp * tn - fp * fn) / den if den else 0.0, "n": n}


def glue_fewshot(model: torch.nn.Module, tok: Any, records: Sequence[dict[str, Any]], task: str, shots: int = 4,
                 n: int | None = None, seed: int = 0, batch_size: int = 16) -> dict[str, float]:
    """k-shot accuracy/F1/MCC. The k demonstrations (balanced over labels, seeded) are the same for
    every query and never among the queries; prompts too long for the model lose their oldest tokens."""
    import random

    template, labels = GLUE_TASKS[task]
    rng = random.Random(f"rankone-glue-{task}-{seed}")
    idx = list(range(len(records)))
    rng.shuffle(idx)
    demo: list[int] = []
    for i in idx:  # alternate labels so the demonstrations do not favour one answer
        if len(demo) < shots and int(records[i]["label"]) == sorted(labels)[len(demo) % len(labels)]:
            demo.append(i)
    queries = [i for i in idx if i not in demo][:n]
    context = "".join(template.format(**records[i]) + " " + labels[int(records[i]["label"])] + "\n\n" for i in demo)
    pairs = [(context + template.format(**records[i]), labels[lab]) for i in queries for lab in sorted(labels)]
    sc = score(model, tok, pairs, batch_size)
    k = len(labels)
    pred = [sorted(labels)[max(range(k), key=lambda j: sc[q * k + j].logprob)] for q in range(len(queries))]
    return binary_scores([int(records[i]["label"]) for i in queries], pred)


def glue_suite(model: torch.nn.Module, tok: Any, path: str, tasks: Sequence[str] = tuple(GLUE_TASKS), shots: int = 4,
               n: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    return {t: glue_fewshot(model, tok, load_glue(path, t), t, shots, n, seed) for t in tasks}
