"""lra-bench: a Long-Range-Arena harness for efficient Transformers in JAX/Flax."""

import os as _os

# jaxlib's CPU LAPACK kernels (the QR of Performer's per-step feature redraw) run on scipy's
# OpenBLAS. Entered from XLA's worker threads, OpenBLAS's own thread pool can deadlock: measured
# here, `model=performer task=copy task.seq_len=256` hung at its first train step at 0% CPU, twice,
# with and without the compile cache. One OpenBLAS thread per caller avoids it. It must be set
# before numpy loads OpenBLAS, hence here; an explicit OPENBLAS_NUM_THREADS is respected.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
