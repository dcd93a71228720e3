"""Models as users have them: loading (local folder, GGUF file, hub id) into a `ModelHandle`
(model, tokenizer, architecture spec, source, card), the model card (`rankone.json`: recommended
layer, hyper-parameters, statistics corpus, known facts) and greedy generation.

May import: rankone.core.
"""
