"""Set before torch is imported, for runs under a launcher (torchrun, SLURM): a rank whose peers have ended
logs c10d's C++ warnings, with stack frames, while it stops; mctool reports that itself
(docs/distributed.md). ``TORCH_CPP_LOG_LEVEL=WARNING`` shows them again."""

import os

if "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
