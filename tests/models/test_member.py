"""MEMBER: embedding independence, the maths against a plain reference, the memory queue's
semantics, training and exact resume through the standard pipeline, and config errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from imram.checkpoint import load_checkpoint
from imram.config import load_config
from imram.data import PrecompDataset, Vocabulary
from imram.errors import ConfigError
from imram.evaluation import evaluate_model
from imram.metrics import chance_metrics
from imram.models import MEMBER, build_model
from imram.models.member import kmeans_update
from imram.training.trainer import train

SMALL = dict(vocab_size=30, word_dim=6, img_dim=10, embed_dim=8, member_fusion="fragments")
LENGTHS = torch.tensor([2, 3])


def _model(seed: int = 0, **overrides) -> MEMBER:
    torch.manual_seed(seed)
    model = build_model("member", **{**SMALL, "member_bank_size": 10, **overrides})
    assert isinstance(model, MEMBER)
    return model


def _batch(seed: int, n_images: int = 2, lengths: torch.Tensor = LENGTHS):
    """Region features ``[n, 3, img_dim]`` and padded token ids (padding holds real ids too,
    so a model that read it would be caught)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_images, 3, SMALL["img_dim"], generator=gen)
    tokens = torch.randint(
        4, SMALL["vocab_size"], (len(lengths), int(lengths.max()) + 2), generator=gen
    )
    return features, tokens


def _step(model: MEMBER, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One training-mode step (images then captions, as the trainer calls them); returns the
    step's unit fragments: regions ``[6, d]`` and real words ``[5, d]``."""
    features, tokens = _batch(seed)
    with torch.no_grad():
        model.encode_images(features)
        model.encode_captions(tokens, LENGTHS)
        regions = model.image_encoder(features).reshape(-1, SMALL["embed_dim"])
        words, _ = model.text_encoder(tokens, LENGTHS)
    mask = torch.arange(words.shape[1])[None] < LENGTHS[:, None]
    return regions, words[mask]


def _filled(steps: int, **overrides) -> MEMBER:
    model = _model(**overrides).train()
    for s in range(steps):
        _step(model, 100 + s)
    return model.eval()


def _chronological(model: MEMBER, modality: str) -> torch.Tensor:
    """The bank's filled slots, oldest first."""
    bank = getattr(model, f"{modality}_bank")
    count = int(getattr(model, f"{modality}_bank_count"))
    if count < bank.shape[0]:
        return bank[:count]
    return torch.roll(bank, -int(getattr(model, f"{modality}_bank_ptr")), dims=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"member_pool": "attention"}, {"member_bank": "learned", "aggregator": "gate"}],
    ids=["queue-mean", "queue-attention", "learned-gate"],
)
def test_embeddings_do_not_depend_on_the_batch(overrides):
    model = _filled(3, **overrides)
    lengths = torch.tensor([3, 7, 5, 1])
    features, tokens = _batch(7, n_images=4, lengths=lengths)
    with torch.no_grad():
        images = model.embed_images(features)
        captions = model.embed_captions(tokens, lengths)
        for j, n in enumerate(lengths.tolist()):
            alone = model.embed_images(features[j : j + 1])
            assert torch.allclose(images[j], alone[0], atol=1e-6)
            alone = model.embed_captions(tokens[j : j + 1, :n], lengths[j : j + 1])
            assert torch.allclose(captions[j], alone[0], atol=1e-6)
    assert torch.allclose(images.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(model.similarity(images, captions), images @ captions.T)


def _reference_item(fragments, bank, memory, lam):
    """One item written out: leaky-clipped scores normalised over the item's fragments, a
    softmax over the filled slots, then the ``ours`` gate
    ``g = σ(W_g[x;c]+b_g)``, ``o = tanh(W_o[x;c]+b_o)``, ``x* = g⊙x + (1−g)⊙o``; mean, L2."""
    n, m = fragments.shape[0], bank.shape[0]
    clipped = [[0.0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            s = float(fragments[i] @ bank[j])
            clipped[i][j] = s if s > 0 else 0.1 * s
    norms = [math.sqrt(sum(clipped[i][j] ** 2 for i in range(n))) for j in range(m)]
    total = torch.zeros(fragments.shape[1], dtype=torch.float64)
    for i in range(n):
        logits = [lam * clipped[i][j] / (norms[j] + 1e-8) for j in range(m)]
        top = max(logits)
        weights = [math.exp(z - top) for z in logits]
        c = sum(w / sum(weights) * bank[j].double() for j, w in enumerate(weights))
        x = fragments[i].double()
        xc = torch.cat([x, c])
        g = torch.sigmoid(memory.gate.weight.double() @ xc + memory.gate.bias.double())
        o = torch.tanh(memory.fuse.weight.double() @ xc + memory.fuse.bias.double())
        total = total + g * x + (1 - g) * o
    mean = total / n
    return mean / (mean.norm() + 1e-8)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_embeddings_match_a_plain_reference(grad):
    model = _filled(2, lambda_image=4.0)
    for name in ("image", "text"):
        assert 0 < int(getattr(model, f"{name}_bank_count")) < 10  # partly filled
    lengths = torch.tensor([4, 1, 6])
    features, tokens = _batch(11, n_images=3, lengths=lengths)
    with torch.set_grad_enabled(grad):
        images = model.encode_images(features)
        captions = model.encode_captions(tokens, lengths)
    with torch.no_grad():
        regions = model.image_encoder(features)
        words, _ = model.text_encoder(tokens, lengths)
    text_bank = model.text_bank[: int(model.text_bank_count)]
    image_bank = model.image_bank[: int(model.image_bank_count)]
    for k in range(3):
        expected = _reference_item(regions[k], text_bank, model.image_memory, 4.0)
        assert (images[k].double() - expected).abs().max() <= 1e-5
    for k, n in enumerate(lengths.tolist()):
        expected = _reference_item(words[k, :n], image_bank, model.text_memory, 9.0)
        assert (captions[k].double() - expected).abs().max() <= 1e-5


def test_an_empty_bank_adds_nothing_and_the_first_batch_trains():
    model = _model().train()
    features, tokens = _batch(0)
    images = model.encode_images(features)
    captions = model.encode_captions(tokens, LENGTHS)
    regions = model.image_encoder(features).mean(dim=1)
    assert torch.allclose(images, regions / regions.norm(dim=-1, keepdim=True), atol=1e-6)
    model.similarity(images, captions).diagonal().sum().backward()
    assert model.image_encoder.fc.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_queue_holds_the_most_recent_fragments_of_earlier_steps():
    model = _model().train()
    regions, words = [], []
    for s in range(3):
        r, w = _step(model, s)
        regions.append(r)
        words.append(w)
        # A step's fragments are staged, and committed when the next step begins.
        assert torch.equal(model.image_staged[: len(r)], r) and int(model.image_staged_count) == 6
    assert int(model.image_bank_count) == 10 and int(model.text_bank_count) == 10
    assert torch.equal(_chronological(model, "image"), torch.cat(regions[:2])[-10:])  # wrapped
    assert torch.equal(_chronological(model, "text"), torch.cat(words[:2]))
    r, w = _step(model, 3)
    assert torch.equal(_chronological(model, "image"), torch.cat(regions)[-10:])
    assert torch.equal(_chronological(model, "text"), torch.cat(words)[-10:])  # wrapped
    assert int(model.image_bank_ptr) == 8 and int(model.text_bank_ptr) == 5
    for name, buffer in model.named_buffers():
        assert not buffer.requires_grad and buffer.grad_fn is None, name

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    features, tokens = _batch(9)
    model.encode_images(features).sum().backward()
    model.encode_captions(tokens, LENGTHS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    copy = _model(seed=1)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    for name in ("image", "text"):
        for part in ("bank", "bank_ptr", "bank_count", "staged", "staged_count"):
            key = f"{name}_{part}"
            assert torch.equal(getattr(copy, key), getattr(model, key)), key
    with torch.no_grad():
        assert torch.equal(
            copy.encode_captions(tokens, LENGTHS), model.encode_captions(tokens, LENGTHS)
        )


def test_captions_of_a_step_do_not_see_its_images():
    """In training, captions attend over the regions of earlier steps only: what the bank
    gives them frozen (eval mode) right after the step's images were encoded."""
    model = _filled(2).train()
    features, tokens = _batch(5)
    model.encode_images(features)
    frozen = copy.deepcopy(model).eval()
    trained = model.encode_captions(tokens, LENGTHS)
    assert torch.allclose(trained, frozen.encode_captions(tokens, LENGTHS), atol=1e-7)
    regions = model.image_encoder(features).reshape(-1, SMALL["embed_dim"])
    assert not any(torch.equal(region, slot) for region in regions for slot in model.image_bank)


def test_learned_bank_trains_and_nothing_is_written():
    model = _model(member_bank="learned", member_pool="attention").train()
    assert not any(k.endswith(("_ptr", "_count", "_staged")) for k in model.state_dict())
    features, tokens = _batch(0)
    sims = model.similarity(model.encode_images(features), model.encode_captions(tokens, LENGTHS))
    (sims.diagonal().sum() - sims.sum() / 2).backward()
    for name in ("image_bank", "text_bank", "region_pool.hidden.weight", "word_pool.score.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


SMALL_RUN = [
    "model.embed_dim=64",
    "model.word_dim=32",
    "model.img_dim=32",
    "model.member_bank_size=256",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.warmup_epochs=1",
    "train.log_every=1",
    "data.vocab_threshold=1",
]


@pytest.mark.parametrize(
    "bank", [["queue", "fragments"], ["kmeans", "residual"], ["learned", "residual"]]
)
def test_trains_far_above_chance_and_resumes_exactly(bank, toy_data, tmp_path):
    kind = [f"model.member_bank={bank[0]}", f"model.member_fusion={bank[1]}"]
    config = load_config("member", [*SMALL_RUN, *kind, "train.epochs=4"])
    train(config, toy_data, tmp_path / "whole", progress=False)
    checkpoint = load_checkpoint(tmp_path / "whole")
    if bank[0] != "learned":
        assert int(checkpoint.model.image_bank_count) == 256
    test_set = PrecompDataset(toy_data, "test", checkpoint.vocab)
    metrics, _, _ = evaluate_model(checkpoint.model, test_set)
    assert metrics["rsum"] > 3 * chance_metrics(25, 125)["rsum"], metrics

    # Stopped after single batches mid-epoch (staged fragments in the checkpoint), then run on.
    budget = load_config("member", [*SMALL_RUN, *kind, "train.epochs=4", "train.max_minutes=1e-9"])
    result = train(budget, toy_data, tmp_path / "cut", progress=False)
    for _ in range(2):
        assert result.stopped_early
        result = train(budget, toy_data, tmp_path / "cut", resume=True, progress=False)
    train(config, toy_data, tmp_path / "cut", resume=True, progress=False)
    whole = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    state = "text_staged" if bank[0] != "learned" else "text_bank"  # the bank's own state
    assert whole.keys() == cut.keys() and state in whole
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"member_bank": "fifo"}, "model.member_bank='fifo' is not one of queue, learned, kmeans"),
        ({"member_fusion": "sum"}, "model.member_fusion='sum' is not one of residual, fragments"),
        (
            {"member_memory": "scaled"},
            "model.member_memory='scaled' is not one of relative, centered, raw",
        ),
        ({"member_gate_scale": 0}, "model.member_gate_scale=0 must be > 0"),
        ({"member_ema": 1.0}, "model.member_ema=1.0 must lie in [0, 1)"),
        ({"member_pool": "max"}, "model.member_pool='max' is not one of mean, attention"),
        ({"member_bank_size": 0}, "model.member_bank_size=0 must be a positive integer"),
        ({"member_bank_size": 2.5}, "model.member_bank_size=2.5 must be a positive integer"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_model("member", **overrides)
    assert message in str(err.value)
    key, value = next(iter(overrides.items()))
    with pytest.raises(ConfigError, match="preset member: model.member_"):
        load_config("member", [f"model.{key}={value}"])


def test_defaults_and_older_configs():
    config = load_config("member").model
    assert (config.member_bank_size, config.member_bank, config.member_pool) == (
        2048,
        "queue",
        "mean",
    )
    assert load_config("vsepp").model.member_bank == "queue"


def _pair(text_pool: str):
    """A fresh residual MEMBER and a VSE++ holding the same encoder weights."""
    torch.manual_seed(3)
    member = build_model("member", **{**SMALL, "member_fusion": "residual", "text_pool": text_pool})
    vsepp = build_model("vsepp", **{**SMALL, "text_pool": text_pool})
    vsepp.image_encoder.load_state_dict(member.image_encoder.state_dict())
    vsepp.text_encoder.load_state_dict(member.text_encoder.state_dict())
    return member, vsepp


@pytest.mark.parametrize("memory", ["relative", "centered", "raw"])
@pytest.mark.parametrize("text_pool", ["last", "mean"])
@pytest.mark.parametrize("bank", ["queue", "kmeans", "learned"])
def test_a_closed_gate_scores_exactly_as_vsepp(bank, text_pool, memory):
    member, vsepp = _pair(text_pool)
    if (bank, memory) != ("queue", "relative"):
        member = build_model(
            "member",
            **{
                **SMALL,
                "member_fusion": "residual",
                "member_bank": bank,
                "member_memory": memory,
                "member_gate_scale": 10.0,  # a scaled closed gate adds zeros all the same
                "text_pool": text_pool,
            },
        )
        member.image_encoder.load_state_dict(vsepp.image_encoder.state_dict())
        member.text_encoder.load_state_dict(vsepp.text_encoder.state_dict())
    member.train()
    for step in range(3):  # the banks fill; the closed gate keeps them out of the score
        features, tokens = _batch(step, n_images=3, lengths=torch.tensor([2, 5, 3]))
        lengths = torch.tensor([2, 5, 3])
        ours = member.similarity(
            member.encode_images(features), member.encode_captions(tokens, lengths)
        )
        theirs = vsepp.similarity(
            vsepp.encode_images(features), vsepp.encode_captions(tokens, lengths)
        )
        assert torch.equal(ours, theirs)
    if bank != "learned":
        assert int(member.text_bank_count) > 0  # not an empty bank's trivial zero
    with torch.no_grad():
        member.image_gate.fill_(0.5)
    features, tokens = _batch(9, n_images=3, lengths=torch.tensor([2, 5, 3]))
    assert not torch.equal(member.encode_images(features), vsepp.encode_images(features))


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("memory", ["relative", "centered", "raw"])
def test_an_open_gate_adds_the_memory_as_written(memory, scale):
    """image = l2(mean of projected regions + g ⊙ m'), caption = l2(GRU state + g ⊙ m'), with
    m' the recalled memory m as is (raw), or m/‖m‖ scaled to the base vector's length
    (relative), or the same for m minus the bank's mean slot (centered); g is the gate
    parameter times member_gate_scale."""
    torch.manual_seed(4)
    member = build_model(
        "member",
        **{
            **SMALL,
            "member_fusion": "residual",
            "member_bank": "learned",
            "member_memory": memory,
            "member_gate_scale": scale,
        },
    ).eval()
    with torch.no_grad():
        member.image_gate.uniform_(-0.5, 0.5)
        member.text_gate.uniform_(-0.5, 0.5)
    features, tokens = _batch(2, n_images=3, lengths=torch.tensor([2, 5, 3]))
    lengths = torch.tensor([2, 5, 3])
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731

    def fused(base, gate, memory_vector, bank):
        if memory == "centered":
            memory_vector = memory_vector - bank.mean(0)
        if memory != "raw":
            memory_vector = unit(memory_vector) * base.norm(dim=-1, keepdim=True)
        return unit(base + scale * gate * memory_vector)

    with torch.no_grad():
        projected = member.image_encoder.fc(features)
        bank = member.bank("text")
        recalled = member.recall(unit(projected), bank, member.config.image_lambda)
        expected = fused(projected.mean(1), member.image_gate, recalled, bank)
        assert torch.allclose(member.encode_images(features), expected, atol=1e-6)
        words, sentence = member.text_encoder(tokens, lengths)
        mask = torch.arange(words.shape[1])[None] < lengths[:, None]
        bank = member.bank("image")
        recalled = member.recall(words, bank, member.config.lambda_softmax, mask)
        expected = fused(sentence, member.text_gate, recalled, bank)
        assert torch.allclose(member.encode_captions(tokens, lengths), expected, atol=1e-6)


def test_the_recalled_memory_matches_a_plain_loop():
    """Each real word attends over the bank (clipped l2 norm over the caption's words, softmax
    over slots with λ); the caption recalls the slots by its words' mean attention."""
    member, _ = _pair("last")
    bank = torch.nn.functional.normalize(torch.randn(7, SMALL["embed_dim"]), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(2, 4, SMALL["embed_dim"]), dim=-1)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    got = member.recall(words, bank, 9.0, mask)
    for k in range(2):
        real = words[k, mask[k]]
        scores = torch.nn.functional.leaky_relu(real @ bank.T, 0.1)
        scores = scores / (scores.norm(dim=0, keepdim=True) + 1e-8)
        weights = torch.softmax(9.0 * scores, dim=1)
        assert torch.allclose(got[k], weights.mean(0) @ bank, atol=1e-6)
    assert torch.equal(member.recall(words, bank[:0], 9.0, mask), torch.zeros(2, 8))


def test_kmeans_update_matches_a_plain_loop():
    gen = torch.Generator().manual_seed(5)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    bank = torch.zeros(4, 3)
    filled = kmeans_update(bank, 0, unit(3, 3), 0.9)  # fills three of four slots
    assert filled == 3
    expected = bank.clone()
    batch = unit(6, 3)
    filled = kmeans_update(bank, filled, batch, 0.9)
    # The loop: the first fragment fills the empty slot, the others go to their nearest.
    expected[3] = batch[0]
    groups: dict[int, list[torch.Tensor]] = {}
    for x in batch[1:]:
        best = max(range(4), key=lambda c: float(x @ expected[c]))
        groups.setdefault(best, []).append(x)
    for c, members in groups.items():
        moved = 0.9 * expected[c] + 0.1 * torch.stack(members).mean(0)
        expected[c] = moved / moved.norm()
    assert filled == 4 and torch.allclose(bank, expected, atol=1e-6)


def _saved_without(model, key: str, tmp_path):
    """``model`` saved as a checkpoint whose config lacks ``model.key`` (as an imram from
    before that key wrote it, sealed again), then loaded."""
    from imram import files
    from imram.checkpoint import save_checkpoint
    from imram.config import Config

    config = Config.from_dict({"model": model.config.to_dict()})
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(26))])
    save_checkpoint(tmp_path / "old", model, config, vocab)
    meta_path = tmp_path / "old" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta.pop(files.PAYLOAD_KEY)
    del meta["config"]["model"][key]
    meta_path.write_text(json.dumps(files.sealed(meta)))
    return load_checkpoint(tmp_path / "old")


def test_a_member_checkpoint_from_before_fusion_options_loads_as_it_was_trained(tmp_path):
    """A checkpoint written before ``model.member_fusion`` existed fused fragments: it loads
    that way (not as today's residual default), scores unchanged."""
    model = _model().eval()
    loaded = _saved_without(model, "member_fusion", tmp_path)
    assert loaded.config.model.member_fusion == "fragments"
    features, tokens = _batch(4)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_images(features), model.encode_images(features))


def test_a_residual_checkpoint_from_before_memory_options_adds_its_memory_raw(tmp_path):
    """A residual MEMBER written before ``model.member_memory`` existed added the recalled
    memory as is: it loads as ``raw`` (not today's ``relative``), scores unchanged."""
    torch.manual_seed(6)
    overrides = {"member_fusion": "residual", "member_bank": "learned", "member_memory": "raw"}
    model = build_model("member", **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        model.image_gate.fill_(0.3)
    loaded = _saved_without(model, "member_memory", tmp_path)
    assert loaded.config.model.member_memory == "raw"
    features, _ = _batch(4)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_images(features), model.encode_images(features))
        model.config.member_memory = "relative"  # the other reading scores differently
        assert not torch.allclose(
            loaded.model.encode_images(features), model.encode_images(features)
        )
