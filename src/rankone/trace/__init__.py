"""Causal tracing (Meng et al. 2022, section 2): where a fact is stored, and the layer choice
that follows from it; heat-map plots.

May import: rankone.core, models, methods, artifacts, edit. Not lifecycle, eval, testbed or cli.
"""

# Constants the command line needs before anything heavy is imported.
KINDS = ("hidden", "mlp", "attn")  # what a trace restores: the residual stream, MLP outputs, attention outputs
MAX_CASES = 200  # facts traced by default for an AIE (seeded sample when there are more)
