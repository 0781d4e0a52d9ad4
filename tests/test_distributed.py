"""Sharded scoring across processes (gloo on CPU) gives the single-process matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imram.config import load_config
from imram.models import build_model
from imram.scoring import block_similarity, distributed_similarity, shard
from imram.training.trainer import train

SMALL = dict(vocab_size=30, word_dim=8, img_dim=10, embed_dim=16)


def _inputs():
    torch.manual_seed(0)
    model = build_model("imram_full", **SMALL).double().eval()
    lengths = torch.randint(2, 12, (9,))
    with torch.no_grad():
        img = model.encode_images(torch.randn(7, 4, 10, dtype=torch.float64))
        cap = model.encode_captions(torch.randint(4, 30, (9, 12)), lengths)
    return model, img, cap, lengths


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, img, cap, lengths = _inputs()
        sims = distributed_similarity(model, img, cap, lengths)
        torch.save(sims, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_shards_cover_every_item_once():
    for n, world in [(7, 2), (5, 3), (2, 4), (1000, 8)]:
        covered = [i for r in range(world) for i in range(n)[shard(n, r, world)]]
        assert covered == list(range(n))


def test_two_gloo_processes_gather_the_single_process_matrix(tmp_path):
    out = str(tmp_path / "sims")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    model, img, cap, lengths = _inputs()
    with torch.no_grad():
        single = block_similarity(model, img, cap, lengths)
    for rank in range(2):
        gathered = torch.load(f"{out}.{rank}")
        assert gathered.shape == (7, 9)
        assert torch.allclose(gathered, single.float(), atol=0, rtol=0)


def test_torchrun_evaluate_equals_single_process(toy_data, tmp_path):
    overrides = [
        "model.embed_dim=32",
        "model.word_dim=16",
        "model.img_dim=32",
        "train.batch_size=32",
        "data.vocab_threshold=1",
        "train.epochs=1",
    ]
    train(load_config("f30k_full_imram", overrides), toy_data, tmp_path / "run", progress=False)
    args = ["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(toy_data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "imram", *args]
    subprocess.run(
        [*single, "--json", str(tmp_path / "one.json"), "--save-sims", str(tmp_path / "one.npy")],
        check=True,
        env=env,
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "imram",
        *args,
    ]
    result = subprocess.run(
        [*torchrun, "--json", str(tmp_path / "two.json"), "--save-sims", str(tmp_path / "two.npy")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scored by 2 processes" in result.stdout
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["rsum"] == two["rsum"]
