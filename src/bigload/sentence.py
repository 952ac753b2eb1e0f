"""sentence-transformers folders (``modules.json``): the transformer placed by bigload, then the
folder's own pooling and normalisation — a :class:`SentenceEncoder` with an ``encode()``."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ModelResolveError

if TYPE_CHECKING:
    from .hf import LoadOptions

logger = logging.getLogger(__name__)

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_KNOWN = (_TRANSFORMER, _POOLING, _NORMALIZE)
_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")


@dataclass(frozen=True)
class PoolingConfig:
    """Which token poolings to concatenate (sentence-transformers' ``1_Pooling/config.json``)."""

    modes: tuple[str, ...]

    @classmethod
    def from_folder(cls, folder: Path) -> PoolingConfig:
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("pooling_mode"):  # newer writers: a single name
            return cls((_normalise_mode(raw["pooling_mode"]),))
        modes = tuple(m for m in _MODES if raw.get(f"pooling_mode_{m}"))
        return cls(modes or ("mean_tokens",))


def _normalise_mode(name: str) -> str:
    aliases = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens",
               "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "lasttoken": "lasttoken"}
    return aliases.get(name, name)


def pool(tokens: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Token embeddings [batch, seq, dim] and attention mask → sentence embeddings."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    outputs = []
    for mode in modes:
        if mode == "cls_token":
            outputs.append(tokens[:, 0])
        elif mode == "mean_tokens":
            outputs.append((tokens * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            outputs.append((tokens * weights).sum(dim=1) / counts.sqrt())
        elif mode == "max_tokens":
            masked = tokens.masked_fill(weights == 0, -math.inf)
            outputs.append(masked.max(dim=1).values)
        elif mode == "lasttoken":
            last = mask.sum(dim=1).long() - 1
            outputs.append(tokens[torch.arange(tokens.shape[0]), last.clamp(min=0)])
        else:
            raise ModelResolveError(f"pooling mode {mode!r} is not supported by bigload")
    return torch.cat(outputs, dim=-1)


class SentenceEncoder(nn.Module):
    """A sentence-transformers model: ``encode(texts)`` → one embedding per text.

    ``transformer`` is the bigload-placed transformers model (with ``bigload_plan`` and
    ``bigload_report``); pooling and normalisation follow the folder's modules.json.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Any, pooling: PoolingConfig,
                 normalize: bool, max_seq_length: int | None, do_lower_case: bool = False):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case

    @property
    def bigload_plan(self) -> Any:
        return getattr(self.transformer, "bigload_plan", None)

    @property
    def bigload_report(self) -> Any:
        return getattr(self.transformer, "bigload_report", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        tokens = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        embeddings = pool(tokens, attention_mask.to(tokens.device), self.pooling.modes)
        if self.normalize:
            embeddings = nn.functional.normalize(embeddings, p=2, dim=1)
        return embeddings

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings [len(texts), dim] (float32, CPU) of ``texts``, in order."""
        items = [texts] if isinstance(texts, str) else list(texts)
        if self.do_lower_case:
            items = [t.lower() for t in items]
        chunks = []
        for start in range(0, len(items), batch_size):
            batch = self.tokenizer(items[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_seq_length, return_tensors="pt")
            kwargs = {k: v for k, v in batch.items() if k == "token_type_ids"}
            chunks.append(self(batch["input_ids"], batch["attention_mask"], **kwargs).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)


def load_sentence_encoder(folder: Path, options: LoadOptions, *, model_class: Any = None,
                          overrides: Mapping[str, Any] | None = None) -> SentenceEncoder:
    """Load a sentence-transformers folder: its transformer through bigload, then pooling."""
    from transformers import AutoTokenizer

    from .hf import load_transformers_model

    modules = json.loads((folder / "modules.json").read_text())
    by_type = {m.get("type"): m for m in modules}
    unknown = [m.get("type") for m in modules if m.get("type") not in _KNOWN]
    if _TRANSFORMER not in by_type or unknown:
        raise ModelResolveError(
            f"'{folder / 'modules.json'}': bigload supports Transformer, Pooling and Normalize "
            f"modules; found {[m.get('type') for m in modules]}"
        )
    root = folder / by_type[_TRANSFORMER].get("path", "")
    settings = _sentence_settings(root)
    transformer = load_transformers_model(root, options, model_class=model_class,
                                          overrides=overrides)
    pooling = PoolingConfig(("mean_tokens",))
    if _POOLING in by_type:
        pooling = PoolingConfig.from_folder(folder / by_type[_POOLING]["path"])
    tokenizer = AutoTokenizer.from_pretrained(root)
    max_len = settings.get("max_seq_length") or getattr(tokenizer, "model_max_length", None)
    return SentenceEncoder(transformer, tokenizer, pooling, _NORMALIZE in by_type,
                           max_len, bool(settings.get("do_lower_case")))


def _sentence_settings(root: Path) -> dict[str, Any]:
    path = root / "sentence_bert_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
