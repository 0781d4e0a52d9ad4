"""CUDA paths (marker ``gpu``; skipped where no CUDA device is present): the inference scorer,
bf16 autocast scoring and a mined training step agree with the same code on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from imram.data import PrecompBatch
from imram.models import build_model
from imram.precision import autocast
from imram.scoring import block_similarity
from imram.training.batch import mined_batch_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = dict(vocab_size=60, word_dim=16, img_dim=24, embed_dim=32)


def _batch(n=12, regions=7, max_len=9):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, max_len + 1, (n,), generator=gen)
    tokens = torch.randint(4, SMALL["vocab_size"], (n, max_len), generator=gen)
    tokens = tokens.masked_fill(torch.arange(max_len)[None] >= lengths[:, None], 0)
    features = torch.randn(n, regions, SMALL["img_dim"], generator=gen)
    return PrecompBatch(features, tokens, lengths, torch.arange(n), torch.arange(n))


@pytest.mark.parametrize("name", ["imram_full", "imram_text", "imram_image", "scan_t2i"])
def test_cuda_scores_match_the_cpu(name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL).eval()
    batch = _batch()
    with torch.no_grad():
        img = model.encode_images(batch.images)
        cap = model.encode_captions(batch.tokens, batch.lengths)
        cpu = block_similarity(model, img, cap, batch.lengths)
        gpu_model = copy.deepcopy(model).cuda()
        gpu = block_similarity(gpu_model, img.cuda(), cap.cuda(), batch.lengths.cuda())
        with autocast("bf16", "cuda"):
            low = block_similarity(gpu_model, img.cuda(), cap.cuda(), batch.lengths.cuda())
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    assert (low.float().cpu() - cpu).abs().max() < 5e-2


def test_cuda_mined_step_matches_the_cpu_loss_and_gradients():
    torch.manual_seed(0)
    model = build_model("imram_full", **SMALL).train()
    gpu_model = copy.deepcopy(model).cuda()
    batch = _batch()
    losses, grads = [], []
    for net, device in ((model, torch.device("cpu")), (gpu_model, torch.device("cuda"))):
        loss = mined_batch_loss(net, batch, device, 64.0, False, 0.2)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in net.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)
