"""Pathfinder and Path-X (Linsley et al. 2018, as used by LRA, Tay et al. 2021).

A grayscale `resolution` x `resolution` image holds two long paths of `num_dashes` short dashes
(bounded turning angle between consecutive dashes), several short distractor paths and two
endpoint circles. Label 1: both circles sit at the two ends of the same long path; label 0: each
circle sits at an end of a different long path. Both labels have the same path statistics, so
only tracing the contour tells them apart. The image is flattened row-major to L = resolution^2
tokens with id = pixel + 1 (0 stays padding; vocab 257), classified with mean pooling (LRA's
classifier_pool='MEAN').

Generated here by default (vectorised over a batch of images; cached as .npz per config), or read
from the LRA release with `task.data_dir=DIR`, DIR holding
`pathfinder{res}/{curv_baseline|curv_contour_length_9|curv_contour_length_14}/` with
`imgs/<k>/sample_<i>.png` and `metadata/<k>.npy` (one text row per image: fields 0-1 the image's
directory and file name relative to the difficulty directory, field 3 the label).

Modules: `generator` (the synthetic images), `release` (the LRA release reader and its cache key),
`task` (the registered pathfinder / pathx tasks and configs), `preview` (a PNG grid of samples).
"""

from lra.tasks.pathfinder.generator import (GENERATOR_VERSION, GEOMETRY, NUM_DASHES, RESOLUTIONS,
                                            Geometry, disk_offsets, generate, geometry, num_dashes)
from lra.tasks.pathfinder.preview import write_preview
from lra.tasks.pathfinder.release import (DIFFICULTY_DIRS, metadata_files, read_metadata,
                                          read_release, release_key, release_rows)
from lra.tasks.pathfinder.task import Pathfinder, PathfinderConfig, PathXConfig

__all__ = ["DIFFICULTY_DIRS", "GENERATOR_VERSION", "GEOMETRY", "NUM_DASHES", "RESOLUTIONS",
           "Geometry", "PathXConfig", "Pathfinder", "PathfinderConfig", "disk_offsets", "generate",
           "geometry", "metadata_files", "num_dashes", "read_metadata", "read_release",
           "release_key", "release_rows", "write_preview"]
