"""Mined hardest-negative steps against the all-pairs autograd step they replace."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imram.config import load_config
from imram.data import PrecompBatch
from imram.distributed import sum_gradients
from imram.errors import ConfigError
from imram.models import build_model, list_models
from imram.precision import autocast
from imram.scoring import reference_similarity
from imram.training.batch import batch_scores, mined_batch_loss
from imram.training.loss import hardest_negatives, hinge_from_pairs, triplet_loss

SMALL = dict(vocab_size=40, word_dim=8, img_dim=12, embed_dim=16)
LENGTHS = torch.tensor([5, 9, 2, 7, 1, 9, 4])  # padding in every batch, a one-word caption
CPU = torch.device("cpu")
CASES = [(n, {}) for n in list_models()] + [
    ("imram_full", {"aggregator": "gate", "attn_sim": "cosine"}),
    ("imram_text", {"steps": 2, "aggregator": "add", "pooling": "lse"}),
    ("imram_image", {"aggregator": "mlp", "attn_norm": "relu_l2norm", "renorm": True}),
]


def _batch(dtype: torch.dtype, n: int = len(LENGTHS)) -> PrecompBatch:
    gen = torch.Generator().manual_seed(0)
    lengths = LENGTHS[:n]
    tokens = torch.randint(4, SMALL["vocab_size"], (n, int(lengths.max())), generator=gen)
    tokens = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], 0)
    features = torch.randn(n, 6, SMALL["img_dim"], generator=gen).to(dtype)
    return PrecompBatch(features, tokens, lengths, torch.arange(n), torch.arange(n))


def _model(name: str, dtype: torch.dtype, **overrides) -> torch.nn.Module:
    torch.manual_seed(1)
    # eval(): MEMBER's queue would change between the two passes compared (nothing else differs)
    return build_model(name, **SMALL, member_bank_size=64, **overrides).to(dtype).eval()


def _reference_loss(model, batch) -> torch.Tensor:
    img = model.encode_images(batch.images)
    cap = model.encode_captions(batch.tokens, batch.lengths)
    return triplet_loss(reference_similarity(model, img, cap, batch.lengths), 0.2, True)


def _loss_and_gradients(model, batch, mined: bool | None, checkpoint: bool = False):
    """The loss and its parameter gradients: mined, all pairs, or (None) the per-pair
    reference scorer's."""
    model.zero_grad()
    if mined is None:
        loss = _reference_loss(model, batch)
    elif mined:
        loss = mined_batch_loss(model, batch, CPU, 1024.0, checkpoint, 0.2)
    else:
        loss = triplet_loss(batch_scores(model, batch, CPU, 1024.0, checkpoint), 0.2, True)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _max_error(a: dict, b: dict) -> dict:
    """Per parameter, the largest difference from ``b``, relative to ``b``'s largest entry
    where that exceeds 1 (as the scorer's gradient test measures)."""
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1.0)).item() for k in b}


def _fp32_sensitivity(model, batch, truth, draws=3) -> dict:
    """How far the fp64 gradient moves (relative, per parameter) when every weight and feature
    is perturbed by up to half an fp32 ulp: what storing the problem in fp32 alone costs, a
    floor for any fp32 computation of it (as in tests/models/test_similarity.py)."""
    gen = torch.Generator().manual_seed(100)
    moved = dict.fromkeys(truth, 0.0)
    for _ in range(draws):

        def nudge(x):
            return x * (1 + 2.0**-24 * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1))

        nudged = copy.deepcopy(model)
        with torch.no_grad():
            for p in nudged.parameters():
                p.copy_(nudge(p))
        images = nudge(batch.images)
        moved_batch = PrecompBatch(images, *dataclasses.astuple(batch)[1:])
        _, grads = _loss_and_gradients(nudged, moved_batch, mined=False)
        for key, value in _max_error(grads, truth).items():
            moved[key] = max(moved[key], value)
    return moved


@pytest.mark.parametrize("checkpoint", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("name,overrides", CASES)
def test_mined_step_equals_all_pairs_step(name, overrides, checkpoint):
    """Same loss and the same gradient for every parameter. fp64: within 1e-10 relative (the
    same function). fp32: the bound of the scorer's gradient test — within 1e-5 of the fp64
    truth, or 4x the gradient's sensitivity to fp32 rounding of its inputs, or twice the
    per-pair reference's own fp32 distance from the truth: no fp32 computation of this
    function does much better (the all-pairs step lands at 1-9x that sensitivity, too)."""
    exact = _model(name, torch.float64, **overrides)
    batch = _batch(torch.float64)
    loss, truth = _loss_and_gradients(exact, batch, mined=False, checkpoint=checkpoint)
    mined_loss, mined = _loss_and_gradients(exact, batch, mined=True, checkpoint=checkpoint)
    assert loss > 0 and mined.keys() == truth.keys()
    assert abs(mined_loss - loss) <= 1e-10 * loss
    assert max(_max_error(mined, truth).values()) <= 1e-10
    assert any(k.startswith("text_encoder") for k in truth)

    rounded = _model(name, torch.float32, **overrides)
    rounded.load_state_dict({k: v.float() for k, v in exact.state_dict().items()})
    batch32 = _batch(torch.float32)
    loss32, _ = _loss_and_gradients(rounded, batch32, mined=False)
    mined_loss32, mined32 = _loss_and_gradients(rounded, batch32, mined=True)
    _, reference32 = _loss_and_gradients(rounded, batch32, mined=None)
    assert abs(mined_loss32 - loss32) <= 1e-5 * loss32
    own = _max_error({k: v.double() for k, v in reference32.items()}, truth)
    errors = _max_error({k: v.double() for k, v in mined32.items()}, truth)
    sensitivity = _fp32_sensitivity(exact, batch, truth)
    for key, error in errors.items():
        assert error <= max(1e-5, 4 * sensitivity[key], 2 * own[key]), (key, error, own[key])


def test_hinge_from_pairs_is_triplet_loss():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 9):
        sims = torch.randn(n, n, generator=gen, dtype=torch.float64)
        positives = torch.rand(n, n, generator=gen) < 0.3
        for mask in (None, positives):
            for count, hardest in ((1, True), (n, False)):
                hard = hardest_negatives(sims, mask, count)
                loss = hinge_from_pairs(
                    sims.diagonal(),
                    sims.gather(1, hard.caption_of_image),
                    sims.T.gather(1, hard.image_of_caption),
                    0.2,
                    hard,
                )
                expected = triplet_loss(sims, 0.2, hardest, mask).item()
                assert loss.item() == pytest.approx(expected), (n, count)


def test_a_batch_of_one_has_no_negative():
    model = _model("imram_full", torch.float64)
    loss, _ = _loss_and_gradients(model, _batch(torch.float64, n=1), mined=True)
    assert loss.item() == 0.0


def test_mined_step_under_bf16_autocast_tracks_fp32():
    model = _model("imram_full", torch.float32)
    batch = _batch(torch.float32)
    fp32, _ = _loss_and_gradients(model, batch, mined=True)
    with autocast("bf16", "cpu"):
        low = mined_batch_loss(model, batch, CPU, 1024.0, False, 0.2)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - fp32.item()) < 0.05 * fp32.item()


def test_mining_is_a_checked_config_key():
    assert load_config("f30k_full_imram", []).train.mining == "exact"
    assert load_config("f30k_full_imram", ["train.mining=off"]).train.mining == "off"
    short = load_config("f30k_full_imram", ["train.mining=shortlist", "train.mining_shortlist=2"])
    assert (short.train.mining, short.train.mining_shortlist) == ("shortlist", 2)
    with pytest.raises(ConfigError, match="train.mining='some' must be one of exact, shortlist"):
        load_config("f30k_full_imram", ["train.mining=some"])
    with pytest.raises(ConfigError, match="train.mining_shortlist=0 must be >= 1"):
        load_config("f30k_full_imram", ["train.mining_shortlist=0"])


@pytest.mark.parametrize("name", ["imram_full", "imram_text", "imram_image", "scan_t2i"])
def test_first_step_similarity_is_the_first_step_score(name):
    model = _model(name, torch.float64)
    batch = _batch(torch.float64)
    with torch.no_grad():
        img = model.encode_images(batch.images)
        cap = model.encode_captions(batch.tokens, batch.lengths)
        first = model.first_step_similarity(img, cap, batch.lengths)
        steps = model.step_scores(img, cap, batch.lengths)
    assert first.shape == (7, 7)
    assert torch.allclose(first, steps[..., 0], atol=1e-12, rtol=0)


def _shortlist_reference(model, batch, m):
    """Hardest negatives by the straightforward rule: each query's m best negatives by the
    step-1 score, the hardest of them (and of the other direction's candidates) by the full
    score."""
    with torch.no_grad():
        img = model.encode_images(batch.images)
        cap = model.encode_captions(batch.tokens, batch.lengths)
        full = reference_similarity(model, img, cap, batch.lengths)
        coarse = model.step_scores(img, cap, batch.lengths)[..., 0]
    n = len(batch.lengths)
    coarse = coarse.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        keep[i, coarse[i].argsort(descending=True)[:m]] = True
        keep[coarse[:, i].argsort(descending=True)[:m], i] = True
    return hardest_negatives(full.masked_fill(~keep, float("-inf")))


@pytest.mark.parametrize("name", ["imram_full", "imram_image"])
@pytest.mark.parametrize("m", [1, 2, 6])
def test_shortlist_mining_picks_the_hardest_candidate(name, m):
    """The shortlist step charges, for each query, the hardest of its candidates (m best by
    the step-1 score, plus the pairs the other direction shortlisted); with m >= B - 1 every
    pair is a candidate and it is the exact step, loss and gradients."""
    from imram.training.batch import encode_batch, mining_scores

    model = _model(name, torch.float64)
    batch = _batch(torch.float64)
    with torch.no_grad():
        sims = mining_scores(model, encode_batch(model, batch, CPU), 1024.0, m)
    got, expected = hardest_negatives(sims), _shortlist_reference(model, batch, m)
    assert torch.equal(got.caption_of_image, expected.caption_of_image)
    assert torch.equal(got.image_of_caption, expected.image_of_caption)
    assert (sims > -torch.inf).sum(dim=1).min() >= m

    model.zero_grad()
    loss = mined_batch_loss(model, batch, CPU, 1024.0, False, 0.2, shortlist=m)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    exact_loss, exact = _loss_and_gradients(model, batch, mined=True)
    if m >= 6:
        assert abs(loss.item() - exact_loss.item()) <= 1e-10 * exact_loss.item()
        assert max(_max_error(grads, exact).values()) <= 1e-10
    else:
        assert loss.item() <= exact_loss.item() + 1e-10  # candidates only: never harder


def _ranked_worker(rank: int, init: str, out: str, name: str, shortlist=None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = _model(name, torch.float64)
        model.zero_grad()
        loss = mined_batch_loss(model, _batch(torch.float64), CPU, 1024.0, False, 0.2, shortlist)
        (loss / 2).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        sum_gradients(trainable)
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        torch.save((loss.detach(), grads), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["imram_full", "scan_i2t", "vsepp"])
def test_two_gloo_ranks_mine_like_one_process(tmp_path, name):
    """Each rank encodes its share of 7 (4 and 3), mines against the gathered images, scores
    the pairs of its own captions and gathers them: the loss on every rank, and the summed
    gradients, are the single process's all-pairs ones (fp64, within 1e-10 relative)."""
    out = str(tmp_path / "rank")
    mp.spawn(_ranked_worker, args=(f"file://{tmp_path / 'pg'}", out, name), nprocs=2, join=True)
    loss, truth = _loss_and_gradients(_model(name, torch.float64), _batch(torch.float64), False)
    for rank in range(2):
        ranked_loss, grads = torch.load(f"{out}.{rank}")
        assert abs(ranked_loss - loss) <= 1e-10 * loss, rank
        assert grads.keys() == truth.keys()
        assert max(_max_error(grads, truth).values()) <= 1e-10, rank


@pytest.mark.distributed
def test_two_gloo_ranks_shortlist_mine_like_one_process(tmp_path):
    """The same with shortlist mining (2 candidates): every rank builds the same candidate
    set from the gathered step-1 scores and scores its own captions' candidates."""
    out = str(tmp_path / "rank")
    args = (f"file://{tmp_path / 'pg'}", out, "imram_full", 2)
    mp.spawn(_ranked_worker, args=args, nprocs=2, join=True)
    model = _model("imram_full", torch.float64)
    loss = mined_batch_loss(model, _batch(torch.float64), CPU, 1024.0, False, 0.2, shortlist=2)
    loss.backward()
    truth = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    for rank in range(2):
        ranked_loss, grads = torch.load(f"{out}.{rank}")
        assert abs(ranked_loss - loss.detach()) <= 1e-10 * loss.detach(), rank
        assert max(_max_error(grads, truth).values()) <= 1e-10, rank


@pytest.mark.parametrize("name", ["vsepp", "scan_i2t"])
def test_shortlist_mining_without_a_cheaper_first_step_is_exact(name):
    """Embedding models and K=1 models have no cheaper score to shortlist by: they mine
    exactly whatever the shortlist size."""
    model = _model(name, torch.float64)
    batch = _batch(torch.float64)
    short = mined_batch_loss(model, batch, CPU, 1024.0, False, 0.2, shortlist=1)
    exact = mined_batch_loss(model, batch, CPU, 1024.0, False, 0.2)
    assert short.item() == exact.item()


@pytest.mark.parametrize("name", ["imram_full", "scan_t2i", "vsepp"])
@pytest.mark.parametrize("count", [2, 6])
def test_mined_warm_up_charges_each_querys_m_hardest_negatives(name, count):
    """``negatives`` = m charges each query's m hardest negatives: the sum of the m largest
    violations per row and per column of the reference matrix; with m = B - 1 it is the
    warm-up's sum over every negative, with the all-pairs step's gradients (fp64, 1e-10)."""
    model = _model(name, torch.float64)
    batch = _batch(torch.float64)
    model.zero_grad()
    loss = mined_batch_loss(model, batch, CPU, 1024.0, False, 0.2, negatives=count)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        img = model.encode_images(batch.images)
        cap = model.encode_captions(batch.tokens, batch.lengths)
        sims = reference_similarity(model, img, cap, batch.lengths)
    n = len(batch.lengths)
    off = ~torch.eye(n, dtype=torch.bool)
    diagonal = sims.diagonal()
    by_row = [sorted(sims[i][off[i]].tolist(), reverse=True)[:count] for i in range(n)]
    by_col = [sorted(sims[:, j][off[:, j]].tolist(), reverse=True)[:count] for j in range(n)]
    expected = sum(max(0.0, 0.2 + s - diagonal[i].item()) for i in range(n) for s in by_row[i])
    expected += sum(max(0.0, 0.2 + s - diagonal[j].item()) for j in range(n) for s in by_col[j])
    assert abs(loss.item() - expected) <= 1e-10 * expected
    if count >= n - 1:
        model.zero_grad()
        triplet_loss(batch_scores(model, batch, CPU, 1024.0, False), 0.2, False).backward()
        truth = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        assert max(_max_error(grads, truth).values()) <= 1e-10


def test_warm_up_negatives_is_a_checked_config_key():
    assert load_config("f30k_full_imram", []).train.warmup_negatives == 0
    assert load_config("vsepp", ["train.warmup_negatives=8"]).train.warmup_negatives == 8
    with pytest.raises(ConfigError, match="train.warmup_negatives=-1 must be >= 0"):
        load_config("vsepp", ["train.warmup_negatives=-1"])
