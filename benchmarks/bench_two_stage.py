"""Two-stage retrieval: rsum and wall time per shortlist size on a real split, and the time
of each shortlist size on a synthetic 5000-image x 25000-caption gallery.

python benchmarks/bench_two_stage.py --first runs/quickstart/quickstart_member \
    --second runs/quickstart/quickstart_full_imram --data runs/quickstart/tuxpaint_precomp
(same as `imram bench two-stage ...`)
"""

import sys

from imram.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "two-stage", *sys.argv[1:]]))
