"""MEMBER against VSE++: step and gallery-embedding cost, and test rsum over seeds at equal
training wall-clock, in one run.

python benchmarks/bench_member.py cost [--batch 32 128 --repeats 3]
python benchmarks/bench_member.py accuracy [--data runs/quickstart/tuxpaint_precomp
    --seeds 0 1 2 --minutes 0.25 --out runs/member --baseline quickstart_vsepp
    --member quickstart_member]

``cost``: each model's training step (encode a batch, the hinge loss on its scores, backward,
Adam) and the embedding of a 1,000-image / 5,000-caption gallery without autograd, at d=256,
49 regions × 1280, captions of 10-25 words, in fresh processes alternating over the models;
the best of ``--repeats`` counts and the ratio to VSE++ is printed.
``accuracy``: the ``--baseline`` preset (VSE++) and each MEMBER variant (the ``--member``
preset with ``--set`` overrides) trained with ``train.seed`` = each seed and the same
``train.max_minutes`` (wall-clock, validation included), then evaluated on the test split: mean
test rsum, spread, best dev rsum and epochs reached, and each variant's differences from VSE++
of the same seed. Variants are ``NAME=key=value,key=value``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from quickstart_runs import train_and_test

COST_CHILD = """
import sys, time, torch
from imram.models import build_model
from imram.training.loss import triplet_loss
name, batch, overrides = sys.argv[1], int(sys.argv[2]), dict(a.split("=") for a in sys.argv[3:])
typed = {k: (int(v) if v.isdigit() else float(v) if v.replace(".", "").isdigit() else v)
         for k, v in overrides.items()}
torch.manual_seed(0)
model = build_model(name, img_dim=1280, embed_dim=256, vocab_size=10000, **typed).train()
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
def data(n):
    lengths = torch.randint(12, 28, (n,))
    return torch.randn(n, 49, 1280), torch.randint(4, 10000, (n, 27)), lengths
def step(feats, tokens, lengths):
    scores = model.similarity(model.encode_images(feats), model.encode_captions(tokens, lengths))
    loss = triplet_loss(scores, 0.2, True)
    opt.zero_grad(); loss.backward(); opt.step()
batches = [data(batch) for _ in range(6)]
for b in batches[:2]:
    step(*b)
start = time.perf_counter()
for b in batches[2:]:
    step(*b)
step_s = (time.perf_counter() - start) / 4
model.eval()
feats, tokens, lengths = data(1000)
caps = [data(1000) for _ in range(5)]
with torch.no_grad():
    start = time.perf_counter()
    for i in range(0, 1000, 250):
        model.encode_images(feats[i : i + 250])
    for _, t, l in caps:
        for i in range(0, 1000, 250):
            model.encode_captions(t[i : i + 250], l[i : i + 250])
    embed_s = time.perf_counter() - start
print(step_s, embed_s)
"""


def _cost(args: argparse.Namespace) -> None:
    models = {"vsepp": ("vsepp", [])}
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        models[name] = ("member", [kv for kv in rest.split(",") if kv])
    for batch in args.batch:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for label, (name, overrides) in models.items():
                command = [sys.executable, "-c", COST_CHILD, name, str(batch), *overrides]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                step_s, embed_s = map(float, out.split())
                old = best.get(label, (float("inf"), float("inf")))
                best[label] = (min(old[0], step_s), min(old[1], embed_s))
        base_step, base_embed = best["vsepp"]
        print(
            f"batch {batch}: d=256, 49 regions x 1280, captions 10-25 words, best of {args.repeats}"
        )
        for label, (step_s, embed_s) in best.items():
            print(
                f"  {label:>24}: step {1000 * step_s:7.1f} ms ({step_s / base_step:.2f}x VSE++)"
                f"  gallery 1k/5k embedding {embed_s:6.2f} s ({embed_s / base_embed:.2f}x)"
            )


def _accuracy(args: argparse.Namespace) -> None:
    runs = {"vsepp": (args.baseline, [])}
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        runs[name] = (args.member, [kv for kv in rest.split(",") if kv])
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for seed in args.seeds:
        for name, (preset, overrides) in runs.items():
            run = args.out / f"{name}_seed{seed}"
            sets = [f"train.seed={seed}", f"train.max_minutes={args.minutes}", *overrides]
            tested = train_and_test(preset, args.data, run, sets)
            curve = [c["val_rsum"] for c in tested["curve"]]
            row = {
                "seed": seed,
                "test_rsum": tested["test_rsum"],
                "best_dev_rsum": max(curve),
                "epochs": len(curve),
                "dev_curve": [round(r, 1) for r in curve],
            }
            results[name].append(row)
            print(name, json.dumps(row), flush=True)
    print(f"\nequal wall-clock {args.minutes} min per run, seeds {args.seeds}")
    print("| model | mean test rsum | spread (min-max) | mean best dev rsum | epochs |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        tests = [r["test_rsum"] for r in rows]
        devs = [r["best_dev_rsum"] for r in rows]
        print(
            f"| {name} | {statistics.mean(tests):.1f} | {min(tests):.1f}-{max(tests):.1f} "
            f"| {statistics.mean(devs):.1f} | {statistics.mean(r['epochs'] for r in rows):.1f} |"
        )
    print()
    print(*paired_lines(results), sep="\n")
    (args.out / "member.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


def paired_lines(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Each variant against VSE++ trained with the same seed: the mean difference of test and
    best dev rsum, and in how many seeds the variant is ahead / level / behind."""
    base = {r["seed"]: r for r in results["vsepp"]}
    lines = [
        "paired with VSE++ of the same seed (difference: mean; seeds ahead/level/behind):",
        "| model | test rsum | dev rsum |",
        "|---|---:|---:|",
    ]
    for name, rows in results.items():
        if name == "vsepp":
            continue
        cells = []
        for key in ("test_rsum", "best_dev_rsum"):
            diffs = [r[key] - base[r["seed"]][key] for r in rows if r["seed"] in base]
            ahead = sum(d > 1e-6 for d in diffs)
            behind = sum(d < -1e-6 for d in diffs)
            level = len(diffs) - ahead - behind
            cells.append(f"{statistics.mean(diffs):+.1f} ({ahead}/{level}/{behind})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cost", "accuracy"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[
            "member_kmeans256=member_bank=kmeans,member_bank_size=256",
        ],
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("runs/quickstart/tuxpaint_precomp"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("runs/member"))
    parser.add_argument("--baseline", default="quickstart_vsepp", help="the VSE++ preset")
    parser.add_argument("--member", default="quickstart_member", help="the variants' preset")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _cost(args) if args.what == "cost" else _accuracy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
