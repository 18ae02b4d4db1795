"""Speed ratios of ressl, measured side by side in one process (issue 5, "Keep the accelerator busy").

``python -m benchmarks`` runs all three; ``python -m benchmarks.step`` (``.augment``, ``.end_to_end``) runs one.
"""
