"""The ground floor: what every other package stands on.

Holds the architecture table (where the MLP output projection lives in each model type), hook
context managers, token alignment by character offsets, weight fingerprints, atomic file writes,
the error type and small shared utilities (clock, statistics, tables).

May import: the standard library, torch, transformers. Nothing else from rankone.
"""
