"""rankone: rank-one model editing (ROME, r-ROME, p-ROME) for Hugging Face causal LMs."""

__version__ = "0.1.0"
