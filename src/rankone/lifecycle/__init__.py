"""Patches over time: the content-addressed store, the registry with its audit log,
validation gates, conflict detection and release builds.

May import: rankone.core, models, methods, artifacts, edit. Not trace, eval, testbed or cli.
"""
