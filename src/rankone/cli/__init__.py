"""The `rankone` command: one module per command group. Commands parse, call the library,
print. Nothing here is imported by the library.

May import: everything.
"""
