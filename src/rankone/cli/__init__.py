"""The `rankone` command: one module per command group. Commands parse, call the library,
print. Nothing here is imported by the library.

May import: everything.
"""

import os

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a machine where other
# work shares the cores, spinning threads made small per-step operations (the value loop's) several
# times slower (BENCHMARKS.md, "Edit speed on real models"); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
