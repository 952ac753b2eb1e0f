"""A model path or id to a local folder: a folder, a cached id, or an id fetched from the Hub
(only the files the load reads)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import (
    ModelResolveError,
    UnsupportedArgumentError,
)
from .options import HubSource, read_json

logger = logging.getLogger(__name__)


def resolve_model_path(
    path_or_id: str | os.PathLike,
    *,
    subfolder: str = "",
    source: HubSource | None = None,
    trust_remote_code: bool | None = None,
    progress: bool | None = None,
) -> Path:
    """A local folder with config.json (or modules.json), or the local snapshot of a Hub model
    id, fetched if missing (:mod:`bigload.hub`; only from the cache with ``local_files_only`` or
    ``HF_HUB_OFFLINE=1``). ``subfolder`` is a folder inside either."""
    source = source or HubSource()
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        _check_local_revision(path, source.revision)
        return _model_folder(path / subfolder)
    if path.exists():
        raise ModelResolveError(f"'{path.resolve()}' is a file; pass the model's folder")
    from ..hub import fetch_model

    snapshot = fetch_model(str(path_or_id), subfolder=subfolder, revision=source.revision,
                           token=source.token, cache_dir=source.cache_dir,
                           local_files_only=source.local_files_only,
                           force_download=source.force_download,
                           trust_remote_code=bool(trust_remote_code), progress=progress)
    return _model_folder(snapshot / subfolder)


def _model_folder(path: Path) -> Path:
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ModelResolveError(
            f"'{path.resolve()}' has no config.json: bigload.load needs a transformers model "
            "folder (config.json + weights). For a bare checkpoint use "
            "bigload.load_checkpoint_and_dispatch(model, path, ...)."
        )
    return path.resolve()


def _check_local_revision(path: Path, revision: str | None) -> None:
    if revision not in (None, "main"):
        raise UnsupportedArgumentError(
            f"revision={revision!r} names a version on the Hugging Face Hub, but '{path.resolve()}'"
            " is a local folder, which has one version. Pass the model id ('org/name') to load "
            "that revision, or drop revision=.")


def transformer_folder(folder: Path) -> Path:
    """The folder holding the transformers model: ``folder``, or for a sentence-transformers
    folder (``modules.json``) the first module folder whose config.json is a transformers
    config (has a ``model_type``), whatever the module's type is called."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return folder
    for module in read_json(modules):
        candidate = folder / module.get("path", "")
        config = candidate / "config.json"
        if config.is_file() and "model_type" in read_json(config):
            return candidate
    raise ModelResolveError(
        f"'{modules}' names no module holding a transformers model (a folder whose "
        "config.json has a model_type); load it with bigload.load, which lets "
        "sentence-transformers assemble it.")
