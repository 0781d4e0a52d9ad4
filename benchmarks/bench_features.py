"""Feature options on the quickstart data: caption encoder × image grid × model, in one run.

python benchmarks/bench_features.py [--out runs/features] [--models vsepp full_imram]
    [--texts gru minilm minilm_tuned] [--images lite0_224 lite2_320] [--skip full_imram/...]

Each image option is extracted from the Tux Paint stamps by ``imram prepare tuxpaint`` (timed);
each combination trains the quickstart preset of its model (``quickstart_vsepp``,
``quickstart_full_imram``; ``_minilm`` for the transformer, ``model.freeze_text=false`` for
``minilm_tuned``) in a fresh process, one after another, and is evaluated on the test split.
Columns: test rsum of the best dev checkpoint, best dev rsum, training seconds (validation
excluded), the frozen transformer's one-off state cache, samples/s and the extraction time.
The table goes to stdout and ``OUT/features.md`` (``OUT/features.json`` has every number).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quickstart_runs import imram, train_and_test

IMAGES = {
    "lite0_224": ("efficientnet_lite0", 224),
    "lite2_320": ("efficientnet_lite2", 320),
}
TEXTS = {
    "gru": ("", []),
    "minilm": ("_minilm", []),
    "minilm_tuned": ("_minilm", ["model.freeze_text=false"]),
}
TEXT_NAMES = {
    "gru": "GRU + GloVe 50-d (frozen)",
    "minilm": "MiniLM frozen",
    "minilm_tuned": "MiniLM fine-tuned",
}


def _prepare(out: Path, option: str) -> tuple[Path, float]:
    backbone, size = IMAGES[option]
    folder = out / f"tuxpaint_{option}"
    timing = out / f"tuxpaint_{option}.seconds"
    if not timing.is_file():
        start = time.perf_counter()
        command = ["prepare", "tuxpaint", "--out", str(folder), "--backbone", backbone]
        imram(*command, "--input-size", str(size), "--no-progress", "--overwrite")
        timing.write_text(f"{time.perf_counter() - start}\n")
    return folder, float(timing.read_text())


def _run(data: Path, run: Path, model: str, text: str) -> dict[str, float]:
    suffix, overrides = TEXTS[text]
    tested = train_and_test(f"quickstart_{model}{suffix}", data, run, overrides)
    last = tested["curve"][-1]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cache = [e["seconds"] for e in events if e.get("event") == "token_states"]
    seconds = last["train_seconds"]
    samples = last["iteration"] * tested["batch_size"]
    return {
        "test_rsum": tested["test_rsum"],
        "best_dev_rsum": max(c["val_rsum"] for c in tested["curve"]),
        "train_seconds": seconds,
        "cache_seconds": cache[0] if cache else 0.0,
        "samples_per_second": samples / seconds if samples and seconds else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/features"))
    parser.add_argument("--models", nargs="+", default=["vsepp", "full_imram"])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    parser.add_argument("--skip", nargs="*", default=[], help="MODEL/TEXT/IMAGE to leave out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, extraction = [], {}
    for image in args.images:
        data, seconds = _prepare(args.out, image)
        extraction[image] = seconds
        for model in args.models:
            for text in args.texts:
                if f"{model}/{text}/{image}" in args.skip:
                    continue
                run = args.out / f"{model}_{text}_{image}"
                numbers = _run(data, run, model, text)
                rows.append({"model": model, "text": text, "image": image, **numbers})
                print(json.dumps(rows[-1]), flush=True)
    lines = [
        "| model | caption encoder | image grid | test rsum | best dev rsum | train s "
        "| text cache s | samples/s | extraction s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {TEXT_NAMES[r['text']]} | {r['image']} | {r['test_rsum']:.1f} "
            f"| {r['best_dev_rsum']:.1f} | {r['train_seconds']:.0f} | {r['cache_seconds']:.1f} "
            f"| {r['samples_per_second']:.0f} | {extraction[r['image']]:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "features.md").write_text(table + "\n", encoding="utf-8")
    payload = {"rows": rows, "extraction_seconds": extraction}
    (args.out / "features.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
