"""Published numbers the report sets beside this harness's rows: LRA (Tay et al. 2021) Tables 1
and 2 (`python -m lra.report --reference lra-paper`)."""

from __future__ import annotations

# LRA paper (Tay et al. 2021), Table 1 test accuracy and Table 2 (speed / memory relative to
# the Transformer on byte-level text, batch per length as in the paper), for reference rows.
LRA_TABLE1 = {
    "transformer": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44, "pathfinder": 71.40},
    "local": {"listops": 15.82, "text": 52.98, "retrieval": 53.39, "image": 41.46, "pathfinder": 66.63},
    "sparse": {"listops": 17.07, "text": 63.58, "retrieval": 59.59, "image": 44.24, "pathfinder": 71.71},
    "longformer": {"listops": 35.63, "text": 62.85, "retrieval": 56.89, "image": 42.22, "pathfinder": 69.71},
    "linformer": {"listops": 35.70, "text": 53.94, "retrieval": 52.27, "image": 38.56, "pathfinder": 76.34},
    "reformer": {"listops": 37.27, "text": 56.10, "retrieval": 53.40, "image": 38.07, "pathfinder": 68.50},
    "sinkhorn": {"listops": 33.67, "text": 61.20, "retrieval": 53.83, "image": 41.23, "pathfinder": 67.45},
    "synthesizer": {"listops": 36.99, "text": 61.68, "retrieval": 54.67, "image": 41.61, "pathfinder": 69.45},
    "bigbird": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83, "pathfinder": 74.87},
    "linear": {"listops": 16.13, "text": 65.90, "retrieval": 53.09, "image": 42.34, "pathfinder": 75.30},
    "performer": {"listops": 18.01, "text": 65.40, "retrieval": 53.82, "image": 42.77, "pathfinder": 77.05},
}
# Table 2: steps/s speed-up and memory ratio vs Transformer at 1K, 2K, 3K, 4K.
LRA_TABLE2 = {
    "local": ([1.1, 1.7, 3.2, 5.3], [0.49, 0.29, 0.19, 0.14]),
    "linformer": ([1.2, 1.9, 3.7, 5.5], [0.44, 0.21, 0.18, 0.10]),
    "reformer": ([0.5, 0.4, 0.7, 0.8], [0.56, 0.37, 0.28, 0.24]),
    "sinkhorn": ([1.1, 1.6, 2.9, 3.8], [0.55, 0.31, 0.21, 0.16]),
    "synthesizer": ([1.1, 1.2, 2.9, 1.4], [0.76, 0.75, 0.74, 0.74]),
    "bigbird": ([0.9, 0.8, 1.2, 1.1], [0.91, 0.56, 0.40, 0.30]),
    "linear": ([1.1, 1.9, 3.7, 5.6], [0.44, 0.22, 0.15, 0.11]),
    "performer": ([1.2, 1.9, 3.8, 5.7], [0.44, 0.22, 0.15, 0.11]),
}
LRA_TABLE2_LENS = [1024, 2048, 3072, 4096]
# The length each LRA Table 1 task was run at: a task this table splits by length shows the
# paper's value once, in the column nearest it.
LRA_LENGTHS = {"listops": 2000, "text": 4000, "retrieval": 4000, "image": 1024, "pathfinder": 1024}
