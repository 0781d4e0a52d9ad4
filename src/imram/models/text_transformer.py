"""A pretrained transformer as the caption encoder (``model.text_encoder: minilm``).

The transformer's last-layer state of every word piece → Linear → d → L2 is one word
fragment, masked like the GRU's; the sentence vector (VSE++'s ``text_pool: last``) is the
projected mean of the pieces' states, the pooling all-MiniLM-L6-v2 was trained with. Weights
come from the installed package (:func:`~imram.data.wordpiece.pretrained_dir`).

Frozen (``model.freeze_text``), the transformer runs in eval mode without autograd, so a
caption's states never change: :class:`TokenStates` keeps them per caption, computed once and
cached beside the precomp by :func:`cache_token_states`, so training pays the transformer once,
not every epoch. Fine-tuned, it trains at ``train.text_lr``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from imram import files
from imram.data.precomp import pad_captions
from imram.data.wordpiece import pretrained_dir
from imram.errors import ConfigError, DataError
from imram.models.encoders import FragmentProjection, l2norm, length_mask, masked_mean

logger = logging.getLogger(__name__)


def load_transformer(name: str) -> nn.Module:
    """The pretrained transformer of text encoder ``name`` (a ``transformers`` BertModel
    without its pooler), weights read from the installed package, in eval mode."""
    from transformers import BertConfig, BertModel

    folder = pretrained_dir(name)
    config = BertConfig.from_json_file(str(folder / "config.json"))
    model = BertModel(config, add_pooling_layer=False)
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise DataError(
            f"{folder / 'model.safetensors'}: does not fit its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


class TokenStates:
    """Frozen transformer states of known captions, looked up by their piece ids.

    ``states [T, H]`` holds every caption's pieces one after another, ``offsets [N+1]`` where
    each caption starts, ``ids [T]`` its pieces (the lookup key).
    """

    def __init__(self, states: Tensor, ids: np.ndarray, offsets: np.ndarray) -> None:
        self.states = states
        self._rows: dict[bytes, int] = {}
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            self._rows.setdefault(ids[start:stop].astype(np.int64).tobytes(), start)

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, tokens: Tensor, lengths: Tensor) -> Tensor | None:
        """States ``[B, L, H]`` (zeros past each length) of a padded batch, or None unless
        every caption is known."""
        cpu = tokens.detach().to("cpu", torch.int64).numpy()
        lens = lengths.detach().cpu().tolist()
        starts = [self._rows.get(cpu[b, :n].tobytes()) for b, n in enumerate(lens)]
        if any(s is None for s in starts):
            return None
        mask = length_mask(torch.as_tensor(lens), tokens.shape[1])
        index = torch.tensor(starts)[:, None] + torch.arange(tokens.shape[1])[None]
        index = torch.where(mask, index, 0)
        out = self.states[index.reshape(-1)].reshape(*tokens.shape, -1)
        return out.masked_fill(~mask[..., None], 0.0).to(tokens.device)


class TransformerTextEncoder(FragmentProjection):
    """Word pieces → pretrained transformer → Linear (+ residual MLP) → d → L2 per piece (zeros
    past length)."""

    def __init__(
        self,
        name: str,
        embed_dim: int,
        frozen: bool,
        mlp: bool = False,
        tuned_layers: int = 0,
        dropout: float = 0.0,
    ) -> None:
        transformer = load_transformer(name)
        super().__init__(transformer.config.hidden_size, embed_dim, mlp, dropout)
        self.name = name
        self.transformer = transformer
        self.frozen = frozen
        layers = self.transformer.encoder.layer
        if not 0 <= tuned_layers <= len(layers):
            raise ConfigError(
                f"model.text_tuned_layers={tuned_layers}: {name} has {len(layers)} layers"
            )
        # Frozen below ``split`` (the states there are cached); the layers from it on train.
        self.split = len(layers) - tuned_layers if frozen else 0
        self.transformer.requires_grad_(not frozen)
        for layer in layers[self.split :]:
            layer.requires_grad_(True)
        self.cache: TokenStates | None = None
        self.forwards = 0  # transformer forward passes run (the cache's tests count them)

    @property
    def tuned(self) -> nn.ModuleList:
        """The transformer layers trained above the frozen, cached part (empty: none)."""
        return self.transformer.encoder.layer[self.split :] if self.frozen else nn.ModuleList()

    def train(self, mode: bool = True) -> TransformerTextEncoder:
        """Train mode, except a frozen transformer's frozen part, which stays in eval (no
        dropout), so its states are fixed and can be cached."""
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
            self.tuned.train(mode)
        return self

    def frozen_states(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """States ``[B, L, H]`` where the frozen part ends (the last layer's when nothing is
        tuned) of a padded batch, the cache's when known, zero past each length."""
        mask = length_mask(lengths.to(tokens.device), tokens.shape[1])
        if self.frozen and self.cache is not None:
            cached = self.cache.lookup(tokens, lengths)
            if cached is not None:
                return cached
        self.forwards += 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.transformer(
                input_ids=tokens,
                attention_mask=mask.long(),
                output_hidden_states=bool(self.tuned),
            )
        states = out.hidden_states[self.split] if self.tuned else out.last_hidden_state
        return states.masked_fill(~mask[..., None], 0.0)

    def token_states(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Last-layer states ``[B, L, H]`` of a padded batch, zero past each length: the
        frozen part's (cached when known), then the tuned layers."""
        states = self.frozen_states(tokens, lengths)
        if not self.tuned:
            return states
        mask = length_mask(lengths.to(tokens.device), tokens.shape[1])
        # An additive mask over the keys, [B, 1, 1, L]: padding is never attended.
        bias = torch.zeros(mask.shape, dtype=states.dtype, device=states.device)
        bias = bias.masked_fill(~mask, torch.finfo(states.dtype).min)[:, None, None, :]
        for layer in self.tuned:
            states = layer(states, bias)
            states = states[0] if isinstance(states, tuple) else states
        return states.masked_fill(~mask[..., None], 0.0)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Unit piece vectors ``[B, L, d]`` (zeros past each length) and the sentence vector
        ``[B, d]``: the projection of the pieces' mean state."""
        if lengths.numel() and int(lengths.min()) < 1:
            raise ValueError("every caption needs at least one token")
        states = self.token_states(tokens, lengths)
        mask = length_mask(lengths.to(tokens.device), tokens.shape[1])
        words = l2norm(self.project(states)).masked_fill(~mask[..., None], 0.0)
        return words, self.project(masked_mean(states, mask))

    def fingerprint(self) -> str:
        """SHA-256 of the frozen part's weights (all of them when nothing is tuned): equal
        fingerprints give equal :meth:`frozen_states`, whatever the tuned layers learned."""
        digest = hashlib.sha256(self.name.encode())
        tuned = {f"encoder.layer.{i}." for i in range(self.split, self.split + len(self.tuned))}
        for key, value in sorted(self.transformer.state_dict().items()):
            if any(key.startswith(prefix) for prefix in tuned):
                continue
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


@torch.no_grad()
def compute_token_states(
    encoder: TransformerTextEncoder, ids: np.ndarray, offsets: np.ndarray, batch: int = 256
) -> Tensor:
    """Frozen-part states ``[T, H]`` of every caption (pieces ``ids[offsets[n]:offsets[n+1]]``),
    batched in length order so that padding costs little."""
    lengths = np.diff(offsets)
    hidden = encoder.transformer.config.hidden_size
    out = torch.zeros(int(offsets[-1]), hidden)
    device = next(encoder.parameters()).device
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch):
        members = order[start : start + batch]
        tokens, lens = pad_captions([ids[offsets[n] : offsets[n + 1]] for n in members])
        states = encoder.frozen_states(tokens.to(device), lens.to(device)).float().cpu()
        for row, n in enumerate(members):
            out[offsets[n] : offsets[n + 1]] = states[row, : lengths[n]]
    return out


def cache_token_states(
    encoder: TransformerTextEncoder, splits: Sequence[tuple[Path, np.ndarray, np.ndarray]]
) -> TokenStates:
    """Attach to a frozen ``encoder`` the states of every caption of ``splits`` (each: a
    captions file, its piece ids and offsets), read from or written to a cache file beside
    the captions, named by a hash of the pieces and of the transformer's weights: a change of
    either gives a new file, and a stale one is removed. A folder that cannot be written
    keeps the states in memory only."""
    weights = encoder.fingerprint()
    parts, all_ids, all_offsets, base = [], [], [0], 0
    for captions, ids, offsets in splits:
        digest = hashlib.sha256(weights.encode())
        digest.update(ids.astype(np.int32).tobytes())
        digest.update(offsets.astype(np.int64).tobytes())
        # The frozen part's depth names the file, so caches for other depths live side by side.
        stem = captions.name.removesuffix(".txt")
        depth = f".layer{encoder.split}" if encoder.tuned else ""
        prefix = f"{stem}.{encoder.name}{depth}-"
        path = captions.parent / "cache" / f"{prefix}{digest.hexdigest()[:16]}.safetensors"
        parts.append(_states_file(encoder, path, prefix, ids, offsets))
        all_ids.append(ids)
        all_offsets.extend((offsets[1:] + base).tolist())
        base += int(offsets[-1])
    states = torch.cat(parts) if parts else torch.zeros(0, 1)
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int32)
    encoder.cache = TokenStates(states, ids, np.asarray(all_offsets, dtype=np.int64))
    return encoder.cache


def _states_file(
    encoder: TransformerTextEncoder, path: Path, prefix: str, ids: np.ndarray, offsets: np.ndarray
) -> Tensor:
    if path.is_file():
        try:
            states = load_file(str(path))["states"]
            if states.shape[0] == int(offsets[-1]):
                return states
        except Exception as err:  # a damaged cache is recomputed, never trusted
            logger.warning("%s: unreadable token-state cache (%s); recomputing it", path, err)
    states = compute_token_states(encoder, ids, offsets)
    try:
        path.parent.mkdir(exist_ok=True)
        for stale in path.parent.glob(f"{prefix}*.safetensors"):
            stale.unlink()
        with files.atomic_output(path) as tmp:
            save_file({"states": states.contiguous()}, str(tmp))
    except OSError as err:
        logger.warning("%s: cannot write the token-state cache (%s); kept in memory", path, err)
    return states
