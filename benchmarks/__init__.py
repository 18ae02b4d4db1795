"""Speed ratios of ressl, measured side by side in one process (issue 5, "Keep the accelerator busy").

``python -m benchmarks`` runs all four; ``python -m benchmarks.step`` (``.augment``, ``.end_to_end``, ``.knn``) runs one.
"""

import os

# The training progress bar would drown the ratios. Set before anything imports tqdm, which reads its
# environment when it is imported (ressl does so through torch and torchvision), not when a bar is made.
os.environ.setdefault("TQDM_DISABLE", "1")
