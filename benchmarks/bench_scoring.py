"""Scoring throughput of the engine against the published evaluation's loop, in one run.

python benchmarks/bench_scoring.py [--baseline-captions 32]      (same as `imram bench scoring`)
"""

import sys

from imram.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "scoring", *sys.argv[1:]]))
