"""The batched scorer against the per-pair reference, for every model and option."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from imram.config import AGGREGATORS, ATTENTION_NORMS
from imram.models import build_model, list_models
from imram.scoring import block_similarity, reference_similarity
from imram.training.loss import triplet_loss

SMALL = dict(vocab_size=40, word_dim=8, img_dim=12, embed_dim=16)
LENGTHS = torch.tensor([5, 9, 2, 7, 1])
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _raw(dtype, seed=0, n_images=3):
    """Region features and padded token ids for 3 images and 5 captions of mixed lengths."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_images, 6, SMALL["img_dim"], generator=gen, dtype=dtype)
    shape = (len(LENGTHS), int(LENGTHS.max()))
    tokens = torch.randint(4, SMALL["vocab_size"], shape, generator=gen)
    tokens = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= LENGTHS[:, None], 0)
    return features, tokens


def _inputs(model, dtype, seed=0):
    features, tokens = _raw(dtype, seed)
    return model.encode_images(features), model.encode_captions(tokens, LENGTHS)


def _model(name, dtype, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, **SMALL, **overrides).to(dtype)


CROSS = ["imram_full", "imram_text", "imram_image"]
CASES = [
    (name, steps, norm, agg)
    for name, steps, norm, agg in itertools.product(CROSS, (1, 2, 3), ATTENTION_NORMS, AGGREGATORS)
    if steps > 1 or agg == "ours"
]


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,steps,norm,agg", CASES)
def test_imram_matches_reference(name, steps, norm, agg, dtype, grad):
    """Both paths: with autograd, and the in-place inference path evaluation takes."""
    model = _model(name, dtype, steps=steps, attn_norm=norm, aggregator=agg)
    img, cap = _inputs(model, dtype)
    with torch.set_grad_enabled(grad):
        batched = model.similarity(img, cap, LENGTHS)
    reference = reference_similarity(model, img, cap, LENGTHS)
    assert batched.shape == (3, len(LENGTHS))
    assert (batched - reference).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("scan_t2i", {}),
        ("scan_i2t", {}),
        ("scan_t2i", {"pooling": "lse"}),
        ("scan_i2t", {"pooling": "lse", "attn_norm": "relu_l2norm"}),
        ("vsepp", {}),
        ("vsepp", {"text_pool": "mean"}),
        ("member", {}),
        ("imram_full", {"attn_sim": "cosine"}),
        ("imram_full", {"renorm": True, "aggregator": "gate"}),
        ("imram_full", {"lambda_image": 4.0, "pooling": "lse", "lambda_lse": 5.0}),
        ("imram_text", {"attn_sim": "cosine", "renorm": True, "steps": 3}),
    ],
)
def test_other_models_and_options_match_reference(name, overrides, dtype):
    model = _model(name, dtype, **overrides)
    img, cap = _inputs(model, dtype)
    reference = reference_similarity(model, img, cap, LENGTHS)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            diff = model.similarity(img, cap, LENGTHS) - reference
        assert diff.abs().max().item() <= TOLERANCE[dtype], grad


PAIR_CASES = [(n, dict(steps=k, attn_norm=a, aggregator=g)) for n, k, a, g in CASES] + [
    ("scan_t2i", {}),
    ("scan_i2t", {"pooling": "lse", "attn_norm": "relu_l2norm"}),
    ("vsepp", {}),
    ("member", {}),
    ("imram_full", {"attn_sim": "cosine", "renorm": True, "aggregator": "gate"}),
    ("imram_text", {"pooling": "lse", "lambda_lse": 5.0}),
]


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,overrides", PAIR_CASES)
def test_pair_similarity_is_the_matrix_entry(name, overrides, dtype, grad):
    """Every (image, caption) pair of the block, in a scrambled order with repeats and
    captions of every length padded to the longest, scored as aligned pairs: the entries of
    ``similarity`` (to rounding) and of the per-pair reference."""
    model = _model(name, dtype, **overrides)
    img, cap = _inputs(model, dtype)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, img.shape[0], (19,), generator=gen)
    cols = torch.randint(0, cap.shape[0], (19,), generator=gen)
    with torch.set_grad_enabled(grad):
        pairs = model.pair_similarity(img[rows], cap[cols], LENGTHS[cols])
        matrix = model.similarity(img, cap, LENGTHS)
    reference = reference_similarity(model, img, cap, LENGTHS)
    assert pairs.shape == (19,) and pairs.dtype == dtype
    assert (pairs - matrix[rows, cols]).abs().max().item() <= TOLERANCE[dtype]
    assert (pairs - reference[rows, cols]).abs().max().item() <= TOLERANCE[dtype]


def test_every_registered_name_is_covered():
    covered = {c[0] for c in CASES} | {"scan_t2i", "scan_i2t", "vsepp", "member"}
    assert set(list_models()) == covered


def _training_loss(sims):
    """The trainer's loss in both modes (hardest negative, and the warm-up's sum of every
    violation) plus a weighted sum, so every entry of the score matrix gets a gradient."""
    weights = torch.linspace(-1.0, 1.0, sims.numel(), dtype=sims.dtype).reshape(sims.shape)
    return (
        triplet_loss(sims, 0.2, hardest=True)
        + triplet_loss(sims, 0.2, hardest=False)
        + 0.1 * (sims * weights).sum()
    )


GRADIENT_CASES = (
    # MEMBER scores by VSE++'s dot product; in training mode its queue changes between the
    # runs compared here, and tests/models/test_member.py checks its encoders.
    [(n, {}) for n in list_models() if n != "member"]
    + [("imram_full", {"aggregator": a}) for a in AGGREGATORS if a != "ours"]
    + [("imram_text", {"attn_norm": "relu_l2norm", "pooling": "lse"})]
    + [("imram_image", {"steps": 2, "attn_sim": "cosine", "renorm": True})]
)


def _parameter_gradients(model, scorer, features, tokens):
    """Gradients of :func:`_training_loss` through the encoders and ``scorer``, by parameter."""
    model.zero_grad()
    img = model.encode_images(features.to(next(model.parameters()).dtype))
    cap = model.encode_captions(tokens, LENGTHS)
    _training_loss(scorer(model, img, cap)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, img, cap):
    return reference_similarity(model, img, cap, LENGTHS)


def _fp32_sensitivity(model, features, tokens, truth, draws=3):
    """How far the exact (fp64) gradient moves, per parameter, when every weight and feature
    is perturbed by up to half an fp32 ulp (relative 2⁻²⁴): the error that merely storing the
    problem in fp32 causes, and so a floor for any fp32 computation of it, the reference's too."""
    gen = torch.Generator().manual_seed(100)
    moved = dict.fromkeys(truth, 0.0)
    for _ in range(draws):

        def nudge(x):
            noise = 2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1
            return x * (1 + 2.0**-24 * noise)

        nudged = copy.deepcopy(model)
        with torch.no_grad():
            for p in nudged.parameters():
                p.copy_(nudge(p))
        grads = _parameter_gradients(nudged, _reference, nudge(features), tokens)
        for key, expected in truth.items():
            moved[key] = max(moved[key], (grads[key] - expected).abs().max().item())
    return moved


@pytest.mark.parametrize("checkpoint", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("name,overrides", GRADIENT_CASES)
def test_training_gradients_match_reference(name, overrides, checkpoint):
    """The trainer's path (encoders, ``block_similarity`` in several blocks, with or without
    activation checkpointing, the hinge loss) against the plain per-pair reference.

    fp64: equal to 1e-10, so the restructured computation is the same function with the same
    gradient. fp32: within 1e-5 of the reference's own fp32 gradient, or, where the problem is
    worse conditioned than that, within 4x its sensitivity to fp32 rounding of the inputs
    (:func:`_fp32_sensitivity`) or twice the reference's own distance from the fp64 truth. On
    these small random models the text branch's gradient moves by ~1e-4 when the weights are
    merely stored in fp32, so no fp32 computation can do better; the plain reference's own fp32
    gradient lies up to ~16x that sensitivity from the truth.
    """
    exact = _model(name, torch.float64, **overrides)
    features, tokens = _raw(torch.float64, seed=1, n_images=len(LENGTHS))
    features = features.float().double()  # exactly representable in fp32, like the weights

    def training(m, i, c):
        return block_similarity(m, i, c, LENGTHS, max_pairs=6, checkpoint=checkpoint)

    truth = _parameter_gradients(exact, _reference, features, tokens)
    rounded = copy.deepcopy(exact).float()
    fp64 = _parameter_gradients(exact, training, features, tokens)
    fp32 = _parameter_gradients(rounded, training, features, tokens)
    reference32 = _parameter_gradients(rounded, _reference, features, tokens)
    assert fp64.keys() == truth.keys() == fp32.keys() == reference32.keys()
    assert any(n.startswith("text_encoder.gru") for n in truth)
    if name != "vsepp" and exact.config.steps > 1 and exact.config.aggregator != "add":
        assert any("memory" in n for n in truth)
    sensitivity = _fp32_sensitivity(exact, features, tokens, truth)
    for key, expected in truth.items():
        scale = max(1.0, expected.abs().max().item())
        assert (fp64[key] - expected).abs().max().item() <= 1e-10 * scale, key
        assert torch.isfinite(fp32[key]).all(), key
        error = (fp32[key] - reference32[key]).abs().max().item()
        own = (reference32[key].double() - expected).abs().max().item()
        assert error <= max(1e-5, 4 * sensitivity[key], 2 * own), (key, error, sensitivity[key])


def test_padding_is_invisible():
    """Extra padding columns and garbage past each length change nothing."""
    model = _model("imram_full", torch.float64)
    img, cap = _inputs(model, torch.float64)
    wider = torch.cat([cap, torch.randn(cap.shape[0], 4, cap.shape[2], dtype=cap.dtype)], dim=1)
    wider[2, 2:] = torch.randn(wider.shape[1] - 2, cap.shape[2], dtype=cap.dtype)
    base = model.similarity(img, cap, LENGTHS)
    assert torch.allclose(model.similarity(img, wider, LENGTHS), base, atol=1e-12, rtol=0)


def test_block_split_is_exact():
    """Every pair's score is independent: scoring sub-blocks gives the same matrix."""
    model = _model("imram_full", torch.float64)
    img, cap = _inputs(model, torch.float64)
    whole = model.similarity(img, cap, LENGTHS)
    parts = torch.cat(
        [model.similarity(img[i : i + 1], cap[2:], LENGTHS[2:]) for i in range(img.shape[0])]
    )
    assert torch.allclose(parts, whole[:, 2:], atol=1e-12, rtol=0)


def test_full_is_text_plus_image():
    full = _model("imram_full", torch.float64)
    text = _model("imram_text", torch.float64)
    image = _model("imram_image", torch.float64)
    text.load_state_dict(full.state_dict(), strict=False)
    image.load_state_dict(full.state_dict(), strict=False)
    image.image_memory.load_state_dict(full.image_memory.state_dict())
    img, cap = _inputs(full, torch.float64)
    total = text.similarity(img, cap, LENGTHS) + image.similarity(img, cap, LENGTHS)
    assert torch.allclose(full.similarity(img, cap, LENGTHS), total, atol=1e-12, rtol=0)


def test_scan_t2i_is_one_step_text_imram():
    scan = _model("scan_t2i", torch.float64)
    imram = _model("imram_text", torch.float64, steps=1)
    imram.load_state_dict(scan.state_dict())
    img, cap = _inputs(scan, torch.float64)
    assert torch.allclose(
        scan.similarity(img, cap, LENGTHS), imram.similarity(img, cap, LENGTHS), atol=1e-12
    )


def test_reference_golden_single_pair():
    """One word [1, 0] against regions [1, 0] and [0, 1], λ = 9, by hand."""
    model = _model("scan_t2i", torch.float64)
    word = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    lengths = torch.tensor([1])
    # Column norms over the single query: z̄ = [1/(1+1e-8), 0].
    a0 = math.exp(9 / (1 + 1e-8))
    alpha = torch.tensor([a0, 1.0], dtype=torch.float64) / (a0 + 1)
    expected = alpha[0] / alpha.norm()
    for scorer in (model.similarity, lambda i, c, n: reference_similarity(model, i, c, n)):
        assert scorer(regions, word, lengths).item() == pytest.approx(expected.item(), abs=1e-12)


def test_lse_pooling_approaches_max():
    model = _model("scan_t2i", torch.float64, pooling="lse", lambda_lse=2000.0)
    avg = _model("scan_t2i", torch.float64)
    avg.load_state_dict(model.state_dict())
    img, cap = _inputs(model, torch.float64)
    trace = avg.explain(img, cap, LENGTHS)["text"]
    best = (
        trace.fragment_scores[..., 0, :]
        .masked_fill(torch.arange(cap.shape[1])[None, None] >= LENGTHS[:, None, None], -2)
        .amax(-1)
    )
    assert torch.allclose(model.similarity(img, cap, LENGTHS), best.T, atol=5e-3)


def test_explain_traces():
    model = _model("imram_full", torch.float64)
    img, cap = _inputs(model, torch.float64)
    traces = model.explain(img, cap, LENGTHS)
    text, image = traces["text"], traces["image"]
    assert len(text.attention) == 3 and text.attention[0].shape == (5, 3, 9, 6)
    assert image.attention[2].shape == (3, 5, 6, 9)
    for w in text.attention + image.attention:
        assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))
    # Padded words never receive attention from regions.
    pad = torch.arange(9)[None] >= LENGTHS[:, None]
    assert (image.attention[1].permute(1, 3, 0, 2)[pad] == 0).all()
    assert (text.fragment_scores[pad[:, None, None, :].expand_as(text.fragment_scores)] == 0).all()
    total = text.step_scores.sum(-1).T + image.step_scores.sum(-1)
    assert torch.allclose(total, model.similarity(img, cap, LENGTHS), atol=1e-12)
