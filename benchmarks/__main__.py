"""Run the four benchmarks and print a short table of their ratios.

    python -m benchmarks [--device auto|cpu|cuda] [--quick] [--preset NAME] [--data auto|random|DIR]
"""

from __future__ import annotations

import sys
import time

from benchmarks import augment, common, end_to_end, knn, step


def main(argv: list[str] | None = None) -> int:
    description = "ressl speed ratios: step overhead, augmentation speed-up, end to end, kNN evaluation."
    parser = knn.add_flags(end_to_end.add_flags(common.parser(description, "python -m benchmarks")))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: list[common.Result] = []
    code = common.user_errors_in_one_line(lambda: results.extend(module.run(args) for module in (step, augment, end_to_end, knn)),
                                          "python -m benchmarks")
    if code:
        return code
    width = max(len(r.name) for r in results)
    print(f"\n{'benchmark':<{width}}  {'ratio':>7}  {'target':<8}  met")
    for r in results:
        met = "n/a" if r.quick else "yes" if r.met else "NO"  # --quick's toy sizes say nothing of the targets
        print(f"{r.name:<{width}}  {r.ratio:7.3f}  {r.target:<8}  {met}")
    for r in results:
        print(f"  {r.name}: {r.detail}")
    print(f"({time.perf_counter() - started:.0f} s{', --quick: a smoke test, not a measurement' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
