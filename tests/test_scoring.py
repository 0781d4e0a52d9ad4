"""The block scheduler: any blocking and length ordering gives the one-call matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram.models import build_model
from imram.scoring import block_similarity, pairs_per_block, score_gallery, score_pairs

SMALL = dict(vocab_size=30, word_dim=8, img_dim=10, embed_dim=16)


def _block(name="imram_full", n_img=5, n_cap=9, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, **SMALL).double()
    lengths = torch.randint(2, 12, (n_cap,))
    tokens = torch.randint(4, 30, (n_cap, 12))
    img = model.encode_images(torch.randn(n_img, 4, 10, dtype=torch.float64))
    cap = model.encode_captions(tokens, lengths)
    return model, img, cap, lengths


@pytest.mark.parametrize("name", ["imram_full", "scan_i2t", "vsepp"])
@pytest.mark.parametrize("max_pairs", [1, 4, 7, 45, None])
@pytest.mark.parametrize("budget_mb", [1024.0, 1e-3], ids=["one-chunk", "chunk-per-block"])
def test_blocks_equal_one_call(name, max_pairs, budget_mb):
    """Any blocking, and captions prepared in one chunk or a chunk per block, is exact."""
    model, img, cap, lengths = _block(name)
    with torch.no_grad():
        whole = model.similarity(img, cap, lengths)
        blocks = block_similarity(model, img, cap, lengths, max_pairs, budget_mb=budget_mb)
    assert torch.allclose(blocks, whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["imram_full", "imram_text", "scan_i2t", "scan_t2i", "vsepp"])
@pytest.mark.parametrize(
    "budget_mb,cache_mb",
    [(1024.0, 1024.0), (1e-4, 1024.0), (1024.0, 1e-4), (1e-2, 0.008)],
    ids=["one-chunk", "chunk-per-pair", "group-per-image", "small-groups"],
)
def test_score_pairs_are_the_matrix_entries(name, budget_mb, cache_mb):
    """Any list of pairs, repeats and all, in any chunking and image grouping, scores as its
    matrix entries."""
    model, img, cap, lengths = _block(name)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 5, (40,), generator=gen)
    cols = torch.randint(0, 9, (40,), generator=gen)
    with torch.no_grad():
        whole = model.similarity(img, cap, lengths)
    got = score_pairs(model, img, cap, lengths, rows, cols, budget_mb, cache_mb)
    assert got.dtype == torch.float64
    assert torch.allclose(got, whole[rows, cols], atol=1e-12, rtol=0)
    assert score_pairs(model, img, cap, lengths, rows[:0], cols[:0]).shape == (0,)


def test_prepared_sides_equal_raw_embeddings():
    """Prepared images and a ``take`` of prepared captions score as the raw embeddings do."""
    model, img, cap, lengths = _block("imram_full")
    rows = torch.tensor([6, 1, 3])
    with torch.no_grad():
        prepared = model.prepare_captions(cap, lengths).take(rows)
        assert prepared.emb.shape[1] == int(lengths[rows].max())
        got = model.similarity(model.prepare_images(img), prepared, lengths[rows])
        expected = model.similarity(img, cap[rows], lengths[rows])
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_scratch_buffers_are_per_thread_and_grow():
    import threading

    from imram.models.workspace import scratch

    like = torch.zeros(1)
    a = scratch("t", (2, 3), like)
    b = scratch("t", (3, 2), like)
    assert a.data_ptr() == b.data_ptr()  # reused
    c = scratch("t", (10, 10), like)
    assert c.shape == (10, 10) and c.numel() == 100  # grown
    seen = []
    thread = threading.Thread(target=lambda: seen.append(scratch("t", (10, 10), like).data_ptr()))
    thread.start()
    thread.join()
    assert seen[0] != scratch("t", (10, 10), like).data_ptr()


def test_blocks_keep_gradients():
    model, img, cap, lengths = _block()
    weights = torch.randn(5, 9, dtype=torch.float64)
    (model.similarity(img, cap, lengths) * weights).sum().backward(retain_graph=True)
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (block_similarity(model, img, cap, lengths, 6) * weights).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, whole[n], atol=1e-10), n


def _saved_bytes(fn) -> int:
    """Bytes autograd holds for the backward pass after ``fn()`` (tensors it saves, counted
    through the saved-tensor hooks; storage shared by several entries counts once)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("name", ["imram_full", "scan_t2i"])
def test_activation_checkpointing_keeps_only_block_scores(name):
    """Checkpointed blocks hold far less for the backward pass, and give the same gradients."""
    model, img, cap, lengths = _block(name, n_img=6, n_cap=12)
    weights = torch.randn(6, 12, dtype=torch.float64)
    grads, held = {}, {}
    for checkpoint in (False, True):
        model.zero_grad()
        held[checkpoint], sims = _saved_bytes(
            lambda c=checkpoint: block_similarity(model, img, cap, lengths, 8, checkpoint=c)
        )
        (sims * weights).sum().backward(retain_graph=True)
        grads[checkpoint] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert held[True] * 5 < held[False]
    for n, g in grads[False].items():
        assert torch.allclose(grads[True][n], g, atol=1e-12, rtol=0), n


def test_budget_sizes_blocks():
    model, img, cap, _ = _block()
    with torch.no_grad():
        small, large = pairs_per_block(model, img, cap, 1), pairs_per_block(model, img, cap, 100)
    assert 1 <= small < large
    assert pairs_per_block(model, img, cap, 1) < small  # autograd keeps more per pair


@pytest.mark.parametrize("name", ["imram_full", "imram_text", "imram_image"])
def test_release_style_baseline_scores_like_the_reference(name):
    """The benchmark's baseline is a faithful mirror: same scores as the per-pair oracle."""
    from imram.bench import release_style_similarity
    from imram.scoring import reference_similarity

    model, img, cap, lengths = _block(name, n_img=3, n_cap=4)
    with torch.no_grad():
        expected = reference_similarity(model, img, cap, lengths)
        assert torch.allclose(release_style_similarity(model, img, cap, lengths), expected)


@pytest.mark.parametrize("name", ["imram_full", "vsepp"])
@pytest.mark.parametrize("budget_mb,image_block", [(1e-3, 2), (1e-2, 3), (100.0, 256)])
def test_gallery_streams_to_memmap_and_topk(tmp_path, name, budget_mb, image_block):
    model, img, cap, lengths = _block(name, n_img=7, n_cap=11)
    with torch.no_grad():
        whole = model.similarity(img, cap, lengths).float()
    out = np.lib.format.open_memmap(tmp_path / "sims.npy", "w+", np.float32, (7, 11))
    result = score_gallery(
        model, img, cap, lengths, out=out, topk=4, budget_mb=budget_mb, image_block=image_block
    )
    out.flush()
    assert np.allclose(np.load(tmp_path / "sims.npy"), whole.numpy(), atol=1e-6)
    # Blocks of other shapes round scores differently (a few ulp), so two items that tie to
    # within that may swap places: the returned items must hold the top-k scores of the whole
    # matrix, not necessarily torch.topk's indices.
    for best, matrix in ((result.captions_per_image, whole), (result.images_per_caption, whole.T)):
        expected = torch.topk(matrix, 4, dim=1).values
        assert torch.allclose(best.scores, expected, rtol=0, atol=1e-6)
        assert torch.allclose(matrix.gather(1, best.indices), expected, rtol=0, atol=1e-6)
        assert all(len(set(row.tolist())) == 4 for row in best.indices)


def test_gallery_topk_larger_than_gallery_and_shape_check():
    model, img, cap, lengths = _block("imram_full", n_img=3, n_cap=5)
    result = score_gallery(model, img, cap, lengths, topk=10)
    assert result.captions_per_image.indices.shape == (3, 5)
    assert result.images_per_caption.indices.shape == (5, 3)
    assert (result.images_per_caption.indices >= 0).all()
    with pytest.raises(ValueError, match=r"expected \(3, 5\)"):
        score_gallery(model, img, cap, lengths, out=np.zeros((3, 4), dtype=np.float32))


@pytest.mark.parametrize("aggregator", ["ours", "add", "mlp", "att", "gate"])
def test_bf16_autocast_scores_track_fp32(aggregator):
    """The in-place inference path works under autocast and stays near the fp32 scores."""
    from imram.precision import autocast

    torch.manual_seed(0)
    model = build_model("imram_full", aggregator=aggregator, **SMALL).eval()
    lengths = torch.randint(2, 12, (6,))
    with torch.no_grad():
        img = model.encode_images(torch.randn(4, 5, 10))
        cap = model.encode_captions(torch.randint(4, 30, (6, 12)), lengths)
        fp32 = block_similarity(model, img, cap, lengths)
        with autocast("bf16", "cpu"):
            bf16 = block_similarity(model, img, cap, lengths)
    assert bf16.dtype in (torch.bfloat16, torch.float32)
    assert (bf16.float() - fp32).abs().max().item() < 0.1


@pytest.mark.parametrize("sim", ["dot", "cosine"])
def test_bf16_keeps_what_decides_rankings_in_fp32(sim):
    """Under bf16 autocast the step-1 raw scores, the norm, the softmax and every final cosine
    stay in fp32; only the memory updates' products run in bf16. So the first step's score is
    the fp32 one, and a one-step model (SCAN) or a dot product of item vectors (VSE++, MEMBER)
    scores exactly as in fp32."""
    from imram.precision import autocast

    torch.manual_seed(0)
    model = build_model("imram_full", steps=3, attn_sim=sim, **SMALL).eval()
    lengths = torch.randint(2, 12, (6,))
    with torch.no_grad():
        img = model.encode_images(torch.randn(4, 5, 10))
        cap = model.encode_captions(torch.randint(4, 30, (6, 12)), lengths)
        fp32 = model.step_scores(img, cap, lengths)
        with autocast("bf16", "cpu"):
            low = model.step_scores(img, cap, lengths)
            traces = model.explain(img, cap, lengths)
    assert low.dtype == torch.float32
    assert torch.allclose(low[..., 0], fp32[..., 0], rtol=0, atol=1e-6)
    assert 0 < (low[..., 1:] - fp32[..., 1:]).abs().max() < 0.05
    for trace in traces.values():
        assert all(w.dtype == torch.float32 for w in trace.attention)
        assert trace.fragment_scores.dtype == torch.float32

    for name in ("scan_t2i", "vsepp", "member"):  # one step, or one vector per item
        other = build_model(name, **SMALL).eval()
        with torch.no_grad():
            img = other.encode_images(torch.randn(4, 5, 10))
            cap = other.encode_captions(torch.randint(4, 30, (6, 12)), lengths)
            exact = block_similarity(other, img, cap, lengths)
            with autocast("bf16", "cpu"):
                assert torch.equal(block_similarity(other, img, cap, lengths), exact), name
