"""Feature extraction pictures/s against a plain decode → resize → forward loop, with glibc's
allocator defaults and tuned, in one run.

python benchmarks/bench_extract.py [--pictures 300] [--sizes 224 320]
(the same as `imram bench extract`)
"""

import sys

from imram.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "extract", *sys.argv[1:]]))
