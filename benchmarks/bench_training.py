"""Training steps/s (forward + backward + Adam) of the engine against a loop that mirrors the
release's training step, Full/Text/Image-IMRAM K=3, batch 32, in fp32 and bf16.

python benchmarks/bench_training.py [--models imram_full] [--repeats 2]
(same as `imram bench training ...`)
"""

import sys

from imram.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "training", *sys.argv[1:]]))
