"""Causal tracing (Meng et al. 2022, section 2): where a fact is stored, and the layer choice
that follows from it; heat-map plots.

May import: rankone.core, models, methods, artifacts, edit. Not lifecycle, eval, testbed or cli.
"""
