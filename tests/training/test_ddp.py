"""``torchrun`` training: two gloo processes on one global batch follow the one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from imram.distributed import split_sizes
from imram.training.trainer import epoch_order

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SMALL = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=32",
    "train.batch_size=30",
    "train.lr=2e-5",
    "train.warmup_epochs=1",
    "train.epochs=2",
    "train.log_every=1",
    "data.vocab_threshold=1",
    "data.val_captions=50",
]


def _train(preset, data, out, processes, extra=(), resume=False):
    args = ["train", "--config", preset, "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--resume"] if resume else []
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    launcher = [sys.executable, "-m", "imram"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(processes), "-m", "imram"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _events(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_split_sizes_cover_the_batch_in_order():
    assert split_sizes(30, 2) == [15, 15]
    assert split_sizes(24, 5) == [5, 5, 5, 5, 4]
    assert split_sizes(3, 4) == [1, 1, 1, 0]
    # The data order depends on (seed, epoch) only, so every world size sees the same batches.
    assert torch.equal(epoch_order(600, 3, 1), epoch_order(600, 3, 1))
    assert not torch.equal(epoch_order(600, 3, 1), epoch_order(600, 3, 2))


@pytest.mark.parametrize("preset", ["f30k_full_imram", "vsepp", "member"])
def test_two_processes_follow_the_single_process_loss_curve(toy_data, tmp_path, preset):
    """Same global batches, same losses step by step through a warm-up epoch (the sum over
    negatives) and a hardest-negative epoch, and the same weights at the end; only rank 0
    writes. The learning rate is small on purpose: at 2e-3 Adam amplifies rounding noise about
    tenfold per step on this toy set, so even two single-process runs with 1 and 2 threads part
    by 0.1 % within 8 steps; at 2e-5 the curves stay within a few 1e-5 (they still move:
    about 450 → 470 in warm-up, 37 → 41 after)."""
    extra = ["model.member_bank_size=64"] if preset == "member" else []
    one, two = tmp_path / "one", tmp_path / "two"
    _train(preset, toy_data, one, 1, extra)
    result = _train(preset, toy_data, two, 2, extra)
    assert "finished" in result.stdout
    losses = [torch.tensor([e["loss"] for e in _events(run, "train")]) for run in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 2 * 20
    # Gradients summed over ranks round differently (the forward passes agree to float32
    # rounding: test_sharded_scores_match_the_single_process_ones). Adam turns a gradient entry
    # that is rounding noise into a step of about lr: MEMBER's memory units start with a
    # gradient of exactly zero (empty banks), and their first steps differ that way, which
    # keeps its curves a few 1e-4 apart without growing. The other models' curves part
    # slowly as such noise compounds: measured up to 4e-6 relative on an AVX2 CPU and 2.6e-5
    # at the last step on an AVX-512 one, whose kernels differ more between the shapes each
    # run uses; 1e-4 bounds it with room and still catches any real divergence (a wrong
    # gradient moves the curve by percents within a few steps).
    rtol = 5e-4 if preset == "member" else 1e-4
    assert torch.allclose(losses[1], losses[0], rtol=rtol, atol=0), losses[1] - losses[0]
    assert (losses[0][:20] - losses[0][0]).abs().max() > 5  # the weights do change
    assert [e["world_size"] for e in _events(two, "distributed")] == [2]
    assert [e["rsum"] for e in _events(two, "val")] == pytest.approx(
        [e["rsum"] for e in _events(one, "val")], abs=1e-6
    )
    # Each Adam step moves a weight by about lr (2e-5) at most; the runs' weights may differ
    # by two such steps of the 40 taken (measured: 4.6e-6 on an AVX-512 CPU; MEMBER: 1e-4).
    weights = [load_file(run / "last" / "model.safetensors") for run in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    atol = 1e-4 if preset == "member" else 4e-5
    for key, value in weights[0].items():
        assert torch.allclose(weights[1][key], value, rtol=0, atol=atol), key
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_resume_with_another_world_size(toy_data, tmp_path):
    """Two processes for one epoch, then one process resumes: the run equals one process
    throughout (a checkpoint holds the global position, not a rank's)."""
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    _train("vsepp", toy_data, one, 1)
    _train("vsepp", toy_data, mixed, 2, ["train.epochs=1"])
    _train("vsepp", toy_data, mixed, 1, ["train.epochs=2"], resume=True)
    losses = [e["loss"] for e in _events(mixed, "train")]
    assert losses == pytest.approx([e["loss"] for e in _events(one, "train")], rel=2e-5, abs=0)


def _sharded_worker(rank, pg, out, data):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=2)
    try:
        torch.save(_score_three_batches(data), f"{out}.{rank}")
        dist.barrier()  # neither rank leaves while the other still talks to it
    finally:
        dist.destroy_process_group()


def _score_three_batches(data):
    """Per model: the score matrices of three consecutive training batches of 30 (31, 29 for
    the uneven split) and MEMBER's queue or k-means bank after them; no optimizer step, so any
    difference is the sharding's."""
    from imram.data import PrecompDataset, Vocabulary, collate
    from imram.models import build_model
    from imram.training.batch import batch_scores

    vocab = Vocabulary.from_caption_files([data / "train_caps.txt"], 1)
    dataset = PrecompDataset(data, "train", vocab)
    results = {}
    variants = {"member_kmeans": ("member", {"member_bank": "kmeans"})}
    for name in ("imram_full", "scan_t2i", "vsepp", "member", "member_kmeans"):
        torch.manual_seed(0)
        dims = dict(vocab_size=len(vocab), word_dim=16, img_dim=32, embed_dim=32)
        model_name, extra = variants.get(name, (name, {}))
        model = build_model(model_name, **dims, member_bank_size=64, **extra).train()
        scores = []
        for start, size in ((0, 30), (30, 31), (61, 29)):
            batch = collate([dataset[j] for j in range(start, start + size)])
            scores.append(batch_scores(model, batch, torch.device("cpu"), 1024.0, False).detach())
        banks = {k: v for k, v in model.state_dict().items() if "bank" in k or "staged" in k}
        results[name] = (scores, banks)
    return results


# Float32 unit roundoff. Each rank encodes half the batch with one thread: the encoders' GEMMs
# run on other shapes and thread counts than one process's, and a CPU may pick another kernel
# for them (on AVX2-only machines it does), which adds the same products in another order.
# Each such sum then differs by a few ulp of its inputs, and through K=3 attention steps and
# the softmax temperature a cosine score (|s| <= 1) by a few more: 64 ulp of 1 (3.8e-6) leaves
# ample room (measured on AVX2 and AVX-512 CPUs: at most 2 ulp).
ULP = 2.0**-24
SCORE_ATOL = 64 * ULP


def test_sharded_scores_match_the_single_process_ones(toy_data, tmp_path):
    """Each rank encodes its share, gathers the images and the score columns: the matrix, and
    MEMBER's queue, equal one process's to float32 rounding, for even and uneven splits. The
    two ranks hold bitwise the same matrix: it is one gathered copy of the same columns."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "scores")
    mp.spawn(_sharded_worker, args=(str(tmp_path / "pg"), out, toy_data), nprocs=2, join=True)
    single = _score_three_batches(toy_data)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for name, (scores, banks) in single.items():
        for a, b, c in zip(scores, ranks[0][name][0], ranks[1][name][0], strict=True):
            assert torch.equal(b, c), name
            assert torch.allclose(b, a, rtol=0, atol=SCORE_ATOL), (name, (b - a).abs().max())
        for key, value in banks.items():
            other = ranks[0][name][1][key]
            assert torch.equal(other, ranks[1][name][1][key]), (name, key)
            if value.is_floating_point():  # queued fragments: encoded on each rank's share
                assert torch.allclose(other, value, rtol=0, atol=SCORE_ATOL), (name, key)
            else:  # queue positions and counts
                assert torch.equal(other, value), (name, key)
