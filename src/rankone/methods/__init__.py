"""The papers' mathematics: key statistics C, keys, values and one module per method
(`rome.py`: ROME, r-ROME, p-ROME). Each method module opens with its equations.

May import: rankone.core, rankone.models.
"""
