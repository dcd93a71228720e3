"""The papers' mathematics: key statistics C, keys, values and one module per method
(`rome.py`: ROME, r-ROME, p-ROME; `memit.py`: MEMIT's batches over a window of layers;
`alphaedit.py`: AlphaEdit's null-space updates). Each method module opens with its equations.

May import: rankone.core, rankone.models.
"""
