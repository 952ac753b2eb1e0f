"""sentence-transformers folders, built by sentence-transformers itself, weights by bigload.

The library reads ``modules.json`` and constructs every module with its own code, whatever the
module types are called. Each transformers model a module asks for (its
``AutoModel.from_pretrained(...)``, ``AutoModelForSequenceClassification...``) is built on meta
and loaded by bigload instead — planned, loaded, offloaded, reported — through a hook on
``PreTrainedModel.from_pretrained`` that is active only in the loading thread, during the load.
The small modules (Pooling, Dense, Normalize, a Router's routing...) load eagerly with the
library's own code: they hold kilobytes to megabytes.

The object returned is the library's own (``SentenceTransformer``, ``CrossEncoder``,
``SparseEncoder``...). It is told that a device map places its transformers models
(``model_kwargs["device_map"]``), so it leaves them where bigload put them and moves only its
small modules. ``model.bigload_plan`` / ``model.bigload_report`` are those of its first
transformers model; each model keeps its own (``model[0].auto_model.bigload_plan``). Several
transformers models (a Router) share ``max_memory``: each is planned in what the ones before
it left.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .devices import parse_max_memory, placement_str
from .errors import ModelResolveError, UnsupportedArgumentError
from .hf.build import model_config
from .hf.options import ACCEPTED_ARGUMENTS, HubSource, LoadOptions, read_json
from .hf.pretrained import load_pretrained
from .hf.resolve import resolve_model_path
from .hf_args import refuse_unknown, translate_kwargs

logger = logging.getLogger(__name__)

# arguments of the sentence-transformers classes that bigload.load sets itself
_CONTROLLED = {
    "model_name_or_path": "pass the folder or model id as bigload.load's first argument",
    "modules": "the modules come from the folder's modules.json",
    "device": "bigload places the model: pass device_map= and max_memory=",
    "backend": "bigload loads the torch weights; load onnx/openvino backends with "
               "sentence-transformers itself",
    "cache_folder": "pass cache_dir=",
    "use_auth_token": "pass token=",
}


def _sentence_transformers() -> Any:
    try:
        import sentence_transformers
    except ImportError as err:
        raise ModelResolveError(
            "a sentence-transformers folder (modules.json) loads with sentence-transformers: "
            "pip install sentence-transformers"
        ) from err
    return sentence_transformers


def st_class(model_class: Any) -> type | None:
    """The sentence-transformers model class ``model_class`` names (a class or its name), or
    None when it names something else (a transformers class or task)."""
    if isinstance(model_class, str):
        try:
            model_class = getattr(_sentence_transformers(), model_class, None)
        except ModelResolveError:
            return None
    if isinstance(model_class, type) and issubclass(model_class, nn.Module) and \
            model_class.__module__.startswith("sentence_transformers."):
        return model_class
    return None


def names_transformers_class(model_class: Any) -> bool:
    """``model_class`` names a transformers class or task: the folder's transformers model is
    then loaded alone, without the sentence-transformers modules around it."""
    return model_class is not None and st_class(model_class) is None


def load_sentence_transformers(
    folder: Path, options: LoadOptions, *, model_class: Any = None,
    init_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The folder as sentence-transformers builds it (``model_class``, else the type its
    config_sentence_transformers.json names), every transformers model in it loaded by bigload
    with ``options``. ``init_kwargs`` go to the class (``prompts``, ``truncate_dim``...)."""
    cls = st_class(model_class) if model_class is not None else _saved_class(folder)
    kwargs = _init_kwargs(cls, dict(init_kwargs or {}), options)
    loads = _Loads(options)
    with _transformers_loaded_by(loads):
        model = cls(str(folder), **kwargs)
    _attach(model, loads.models)
    return model


def _saved_class(folder: Path) -> type:
    st = _sentence_transformers()
    saved = folder / "config_sentence_transformers.json"
    name = read_json(saved).get("model_type") if saved.is_file() else None
    cls = st_class(name or "SentenceTransformer")
    if cls is None:
        raise ModelResolveError(
            f"'{saved}' names model_type {name!r}, which sentence-transformers "
            f"{st.__version__} does not have; pass model_class=SentenceTransformer (or another "
            "class of the library) to choose one.")
    return cls


def _init_kwargs(cls: type, given: dict[str, Any], options: LoadOptions) -> dict[str, Any]:
    refused = {name: _CONTROLLED[name] for name in given if name in _CONTROLLED}
    if refused:
        raise UnsupportedArgumentError("bigload.load sets these itself: " + "; ".join(
            f"{name} ({why})" for name, why in refused.items()) + ".")
    params = [p for p in inspect.signature(cls.__init__).parameters
              if p != "self" and p not in _CONTROLLED]
    unknown = [name for name in given if name not in params]
    refuse_unknown(unknown, [*list(ACCEPTED_ARGUMENTS), *params], f"arguments of {cls.__name__}")
    model_kwargs = dict(given.pop("model_kwargs", None) or {})
    # a device map makes the library leave its transformers models where bigload put them
    model_kwargs["device_map"] = options.device_map if options.device_map is not None else "cpu"
    if options.dtype is not None:
        model_kwargs["dtype"] = options.dtype  # the library reads it (its bf16-on-CPU notice)
    # the folder is local by now (bigload fetched it): the library needs no Hub request
    return {**given, "model_kwargs": model_kwargs, "local_files_only": True,
            "trust_remote_code": bool(options.trust_remote_code)}


# --- the hook: the transformers models of the pipeline, loaded by bigload ---------------------
@dataclass
class _Loads:
    """What the hook loads for one sentence-transformers load, and the budget they used."""

    options: LoadOptions
    models: list[nn.Module] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)

    def load(self, cls: Any, path: str | os.PathLike, kwargs: dict[str, Any]) -> nn.Module:
        config = kwargs.pop("config", None)
        renamed, rest = translate_kwargs(kwargs)
        given = {**rest, **renamed}
        refuse_unknown([k for k in given if k not in list(ACCEPTED_ARGUMENTS)],
                       list(ACCEPTED_ARGUMENTS), f"from_pretrained arguments bigload honours "
                       f"(loading {cls.__name__} for sentence-transformers)")
        subfolder = given.get("subfolder") or ""
        folder = self._folder(path, subfolder, given)
        if config is None or isinstance(config, (str, os.PathLike)):
            config = model_config(folder, config, trust_remote_code=self.options.trust_remote_code)
        model = load_pretrained(cls, folder, config, self._options(given, subfolder))
        self.models.append(model)
        for where, size in model.bigload_report.bytes_per_device.items():  # type: ignore[union-attr]
            self.used[where] = self.used.get(where, 0) + size
        return model

    def _folder(self, path: str | os.PathLike, subfolder: str, given: dict[str, Any]) -> Path:
        if Path(path).is_dir():  # the library resolved it; its revision is not ours to check
            return resolve_model_path(path, subfolder=subfolder)
        source = HubSource(given.get("revision"), given.get("token"), given.get("cache_dir"),
                           bool(given.get("local_files_only")), bool(given.get("force_download")))
        return resolve_model_path(path, subfolder=subfolder, source=source,
                                  trust_remote_code=self.options.trust_remote_code,
                                  progress=self.options.progress)

    def _options(self, given: dict[str, Any], subfolder: str) -> LoadOptions:
        """bigload.load's own choices first; then what the module asks for (its saved
        model_kwargs: dtype, attn_implementation...)."""
        o = self.options
        return replace(
            o,
            dtype=o.dtype if o.dtype is not None else given.get("dtype"),
            attn_implementation=o.attn_implementation or given.get("attn_implementation"),
            ignore_mismatched_sizes=o.ignore_mismatched_sizes or bool(
                given.get("ignore_mismatched_sizes")),
            key_mapping=o.key_mapping or given.get("key_mapping"),
            max_memory=_remaining(o.max_memory, self.used),
            offload_dir=(Path(o.offload_dir) / subfolder if o.offload_dir is not None
                         and subfolder else o.offload_dir),
        )


def _remaining(max_memory: Mapping[Any, int | str] | None,
               used: Mapping[str, int]) -> Mapping[Any, int | str] | None:
    """The budgets left after the models already loaded (given budgets only: measured free
    memory already counts them)."""
    if max_memory is None or not used:
        return max_memory
    return {placement_str(p): max(0, size - used.get(placement_str(p), 0))
            for p, size in parse_max_memory(max_memory).items()}


_LOCAL = threading.local()
_LOCK = threading.Lock()
_HOOK: dict[str, Any] = {"users": 0, "original": None}


def _hooked_from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *model_args: Any,
                            **kwargs: Any) -> Any:
    loads: _Loads | None = getattr(_LOCAL, "loads", None)
    if loads is None:  # another thread, or no bigload load running: transformers' own
        return _HOOK["original"].__func__(cls, pretrained_model_name_or_path, *model_args,
                                          **kwargs)
    if model_args:
        raise UnsupportedArgumentError(
            f"{cls.__name__}.from_pretrained got positional model arguments {model_args!r}; "
            "bigload builds the model from its config only.")
    return loads.load(cls, pretrained_model_name_or_path, kwargs)


@contextmanager
def _transformers_loaded_by(loads: _Loads) -> Iterator[None]:
    """While active (in this thread), ``PreTrainedModel.from_pretrained`` loads through
    ``loads``; other threads get transformers' own."""
    from transformers import PreTrainedModel

    with _LOCK:
        if _HOOK["users"] == 0:
            _HOOK["original"] = PreTrainedModel.__dict__["from_pretrained"]
            PreTrainedModel.from_pretrained = classmethod(_hooked_from_pretrained)
        _HOOK["users"] += 1
    _LOCAL.loads = loads
    try:
        yield
    finally:
        _LOCAL.loads = None
        with _LOCK:
            _HOOK["users"] -= 1
            if _HOOK["users"] == 0:
                PreTrainedModel.from_pretrained = _HOOK["original"]


# --- the returned object -----------------------------------------------------------------------
def _attach(model: nn.Module, loaded: list[nn.Module]) -> None:
    if not loaded:
        logger.info("%s holds no transformers model; sentence-transformers loaded it as is",
                    type(model).__name__)
    first = loaded[0] if loaded else None
    model.bigload_plan = getattr(first, "bigload_plan", None)
    model.bigload_report = getattr(first, "bigload_report", None)
