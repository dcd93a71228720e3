"""What an edit leaves behind: the patch format (apply, revert, compose), the merged model
folder and the PEFT LoRA export.

The patch format sits below the editor because the editor produces patches.
May import: rankone.core, rankone.models, rankone.methods.
"""
