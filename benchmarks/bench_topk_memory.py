"""Peak memory of top-k streaming at growing gallery sizes, extrapolated to COCO 5K.

python benchmarks/bench_topk_memory.py                     (same as `imram bench memory`)
"""

import sys

from imram.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
