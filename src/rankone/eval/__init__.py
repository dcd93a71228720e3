"""Evidence before release: case files (CounterFact, testbed worlds), metrics (teacher-forced
and generation-based), evaluation protocols, sequential-editing runs and their plots.

May import: rankone.core, models, methods, artifacts, edit. Not lifecycle, trace, testbed or cli.
"""
