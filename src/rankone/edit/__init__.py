"""Editing a model: the editor loop that turns requests into a patch (`editor.py`; one rank-one
edit per request, or a MEMIT/AlphaEdit batch as one patch through `batch.py`), and the guard that
refuses anomalous edits (`guard.py`).

May import: rankone.core, rankone.models, rankone.methods, rankone.artifacts.
"""
