"""No-grad scorer pairs/s of this tree against an earlier commit's, in one run.

python benchmarks/bench_scorer_commits.py --against 4c7fd1a [--dim 256 --regions 49
    --img-dim 1280 --lengths 10 25 --n 128 --model imram_full --repeats 3]

The commit's ``src/`` is exported with ``git archive`` into a temporary folder; each timing runs
in a fresh process (this tree's, then the commit's, alternating ``--repeats`` times, so both see
the same state of the machine) that scores the same ``n`` × ``n`` block of random fragments
through ``block_similarity`` (the engine evaluation and mining call). Caption lengths count
words; ``<start>`` and ``<end>`` add two tokens. The best run of each counts, and the ratio
"this tree / commit" is printed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time, torch
from imram.models import build_model
from imram.scoring import block_similarity
name, dim, regions, img_dim, low, high, n = sys.argv[1:8]
dim, regions, img_dim, low, high, n = map(int, (dim, regions, img_dim, low, high, n))
torch.manual_seed(0)
model = build_model(name, steps=3, embed_dim=dim, img_dim=img_dim).eval()
lengths = torch.randint(low + 2, high + 3, (n,))
tokens = torch.randint(4, 1000, (n, high + 2))
with torch.no_grad():
    img = model.encode_images(torch.randn(n, regions, img_dim))
    cap = model.encode_captions(tokens, lengths)
    block_similarity(model, img[:8], cap[:8], lengths[:8])
    start = time.perf_counter()
    scores = block_similarity(model, img, cap, lengths)
    seconds = time.perf_counter() - start
print(n * n / seconds, float(scores.double().sum()))
"""


def _measure(src: Path, args: argparse.Namespace) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-c", CHILD, args.model, str(args.dim), str(args.regions)]
    command += [str(args.img_dim), str(args.lengths[0]), str(args.lengths[1]), str(args.n)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    rate, checksum = out.split()
    return float(rate), float(checksum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a commit of this repository")
    parser.add_argument("--model", default="imram_full")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--regions", type=int, default=49)
    parser.add_argument("--img-dim", type=int, default=1280)
    parser.add_argument("--lengths", type=int, nargs=2, default=[10, 25], metavar=("MIN", "MAX"))
    parser.add_argument("--n", type=int, default=128, help="images and captions in the block")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.against, "src"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"this tree": ROOT / "src", args.against: Path(tmp) / "src"}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, src in trees.items():
                runs[name].append(_measure(src, args))
    print(
        f"{args.model} K=3, {args.n} x {args.n} pairs, d={args.dim}, {args.regions} regions x "
        f"{args.img_dim}, captions of {args.lengths[0]}-{args.lengths[1]} words, "
        f"{os.cpu_count()} CPUs"
    )
    best = {}
    for name, measured in runs.items():
        best[name] = max(rate for rate, _ in measured)
        rates = ", ".join(f"{rate:,.0f}" for rate, _ in measured)
        print(f"{name:>12}: best {best[name]:,.0f} pairs/s (runs: {rates})")
    sums = {name: measured[0][1] for name, measured in runs.items()}
    print(f"score checksums: {', '.join(f'{k} {v:.6f}' for k, v in sums.items())}")
    print(f"this tree / {args.against}: {best['this tree'] / best[args.against]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
