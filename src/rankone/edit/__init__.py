"""Editing a model: hyper-parameters, the editor loop that turns requests into a patch, and
the guard that refuses anomalous edits.

May import: rankone.core, rankone.models, rankone.methods, rankone.artifacts.
"""
