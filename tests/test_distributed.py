"""Sharded scoring across processes (gloo on CPU) gives the single-process matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imram.config import load_config
from imram.models import build_model
from imram.scoring import distributed_similarity, score_gallery, shard
from imram.scoring.blocks import image_rows, pairs_per_block
from imram.training.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SMALL = dict(vocab_size=30, word_dim=8, img_dim=10, embed_dim=16)


def _inputs():
    torch.manual_seed(0)
    model = build_model("imram_full", **SMALL).eval()
    lengths = torch.randint(2, 12, (9,))
    with torch.no_grad():
        img = model.encode_images(torch.randn(7, 4, 10))
        cap = model.encode_captions(torch.randint(4, 30, (9, 12)), lengths)
    return model, img, cap, lengths


def _worker(rank: int, world: int, init: str, out: str, budget_mb: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, img, cap, lengths = _inputs()
        sims = distributed_similarity(model, img, cap, lengths, budget_mb)
        torch.save(sims, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_shards_cover_every_item_once():
    for n, world, step in [(7, 2, 1), (5, 3, 1), (2, 4, 1), (1000, 8, 1), (7, 2, 2), (9, 4, 4)]:
        parts = [range(n)[shard(n, r, world, step)] for r in range(world)]
        assert [i for part in parts for i in part] == list(range(n))
        assert all(p.start % step == 0 for p in parts if len(p))  # whole groups of ``step``
    assert [len(range(7)[shard(7, r, 2, 2)]) for r in range(2)] == [4, 3]


@pytest.mark.parametrize("budget_mb", [1024.0, 0.04])  # one block; rows of 3 images
def test_two_gloo_processes_gather_the_single_process_matrix(tmp_path, budget_mb):
    """Ranks score whole rows of the single process's blocks, so each block is the same
    computation on the same shapes: with one thread each side, the gathered matrix is the
    single process's bit for bit on any CPU (kernels are deterministic for given shapes and
    thread count), and both ranks hold the same copy."""
    out = str(tmp_path / "sims")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", out, budget_mb), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, img, cap, lengths = _inputs()
        with torch.no_grad():
            step = image_rows(7, pairs_per_block(model, img, cap, budget_mb))
            assert step == (7 if budget_mb > 1 else 3)  # one block, or rows 0-2, 3-5 | 6
            single = np.empty((7, 9), dtype=np.float32)
            score_gallery(model, img, cap, lengths, out=single, budget_mb=budget_mb)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        gathered = torch.load(f"{out}.{rank}")
        assert gathered.shape == (7, 9) and gathered.dtype == torch.float32
        assert torch.equal(gathered, torch.from_numpy(single)), rank


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
    # Every rank encodes the whole split as the single process does (same shapes, one thread
    # each side) and scores whole rows of its blocks: bitwise equal (see the test above).
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["rsum"] == two["rsum"]
