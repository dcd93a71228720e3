"""Models as users have them: loading (local folder, GGUF file, hub id), the model card
(`rankone.json`: recommended layer, hyper-parameters, statistics corpus) and greedy generation.

May import: rankone.core.
"""
