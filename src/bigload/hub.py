"""Model ids from the Hugging Face Hub: the local snapshot, with the files a load reads
downloaded into the user's cache through huggingface_hub (its token, cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, progress bars). Only what the load needs is fetched: configs and tokenizer
files, the index and the weight shards it names (safetensors; ``.bin`` only without them; no
onnx/flax/tf/gguf), and for sentence-transformers repositories its module folders.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import HubError, ModelResolveError

logger = logging.getLogger(__name__)

# small files a load may read: configs, tokenizers, chat templates
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# weight files, in transformers' order of preference: (index, single file)
WEIGHT_CHOICES = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))
# folders of other backends inside sentence-transformers repositories
OTHER_BACKENDS = ("onnx", "openvino")


def _huggingface_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as err:
        raise ModelResolveError(
            "a model id ('org/name') is fetched with huggingface_hub, which is not installed: "
            "pip install 'bigload[hf]', or pass a folder path"
        ) from err
    return huggingface_hub


def fetch_model(
    model_id: str,
    *,
    subfolder: str = "",
    revision: str | None = None,
    token: bool | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    trust_remote_code: bool = False,
    progress: bool | None = None,
) -> Path:
    """The local snapshot folder of ``model_id`` at ``revision`` holding what a load of it
    (in ``subfolder``) reads, downloading what the cache lacks. Offline (``HF_HUB_OFFLINE=1``
    or ``local_files_only``) nothing is requested: the cached snapshot or a HubError."""
    hub = _huggingface_hub()
    _check_model_id(hub, model_id)
    if local_files_only or offline(hub):
        return cached_snapshot(model_id, subfolder=subfolder, revision=revision,
                               cache_dir=cache_dir, why=_offline_reason(local_files_only))
    try:
        return _download(hub, model_id, subfolder=subfolder, revision=revision, token=token,
                         cache_dir=cache_dir, force_download=force_download,
                         trust_remote_code=trust_remote_code, progress=progress)
    except hub.errors.HfHubHTTPError as err:
        if not _unreachable(err):
            raise _hub_error(err, model_id, revision) from err
        return _from_cache_after(err, model_id, subfolder, revision, cache_dir)
    except _network_errors(hub) as err:
        return _from_cache_after(err, model_id, subfolder, revision, cache_dir)


def _check_model_id(hub: Any, model_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        if model_id.count("/") > 1:
            raise ValueError("a model id has at most one '/'")
        validate_repo_id(model_id)
    except ValueError as err:  # huggingface_hub's HFValidationError is a ValueError
        raise ModelResolveError(
            f"'{model_id}' is neither an existing folder nor a model id ('org/name'): {err}"
        ) from err


def offline(hub: Any) -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it at import or as the environment says now."""
    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(hub.constants.HF_HUB_OFFLINE) or now


def _offline_reason(local_files_only: bool) -> str:
    return "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"


def _endpoint(hub: Any) -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or hub.constants.ENDPOINT


def _download(hub: Any, model_id: str, *, subfolder: str, revision: str | None,
              token: bool | str | None, cache_dir: str | os.PathLike | None,
              force_download: bool, trust_remote_code: bool, progress: bool | None) -> Path:
    endpoint = _endpoint(hub)
    info = hub.HfApi(endpoint=endpoint, token=token).model_info(model_id, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    tqdm_class = _silent_tqdm() if progress is False else None

    def fetch(name: str, at: str | None = None) -> Path:
        return Path(hub.hf_hub_download(
            model_id, name, revision=at or info.sha, cache_dir=cache_dir, token=token,
            force_download=force_download, endpoint=endpoint, tqdm_class=tqdm_class))

    first = _first_file(files, subfolder)
    # by the revision's name once, so that the cache records it (refs/<revision>)
    snapshot = _snapshot_of(fetch(first, revision or "main"), first)
    needed = needed_files(files, subfolder=subfolder, trust_remote_code=trust_remote_code,
                          read_json=lambda name: _read(fetch(name)))
    logger.info("%s@%s: %d file(s) for the load (of %d in the repository)", model_id,
                info.sha, len(needed), len(files))
    for name in needed:
        fetch(name)
    return snapshot


def _first_file(files: list[str], subfolder: str) -> str:
    for name in ("modules.json", "config.json"):
        path = posixpath.join(subfolder, name) if subfolder else name
        if path in files:
            return path
    where = f" in '{subfolder}'" if subfolder else ""
    raise ModelResolveError(
        f"the repository has no config.json or modules.json{where}: bigload.load needs a "
        "transformers or sentence-transformers model")


def _snapshot_of(path: Path, name: str) -> Path:
    return path.parents[len(Path(name).parts) - 1]


def _read(path: Path) -> Any:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


# --- which files -------------------------------------------------------------------------------
def needed_files(
    files: Iterable[str], *, subfolder: str = "", trust_remote_code: bool = False,
    read_json: Callable[[str], Any],
) -> list[str]:
    """The files of a repository listing that a load of ``subfolder`` reads. ``read_json``
    opens a file of the listing (modules.json and shard indexes are read to choose)."""
    by_folder: dict[str, list[str]] = {}
    for name in files:
        by_folder.setdefault(posixpath.dirname(name), []).append(posixpath.basename(name))
    root = subfolder.strip("/")
    folders = [root]
    if "modules.json" in by_folder.get(root, []):
        folders += _module_folders(by_folder, root, read_json(posixpath.join(root, "modules.json")))
    out: list[str] = []
    for folder in folders:
        names = by_folder.get(folder, [])
        out += [posixpath.join(folder, n) for n in _configs(names, trust_remote_code)]
        out += [posixpath.join(folder, n) for n in _weights(folder, names, read_json)]
    return list(dict.fromkeys(out))


def _module_folders(by_folder: dict[str, list[str]], root: str, modules: list[dict]) -> list[str]:
    """The folders of a sentence-transformers repository's modules, with their subfolders (a
    Router keeps its routes there), except those of other backends."""
    out = []
    for module in modules:
        path = posixpath.normpath(posixpath.join(root, module.get("path", "")))
        if path in (root, ".") or path.startswith("../"):
            continue
        out += [f for f in by_folder if (f == path or f.startswith(path + "/"))
                and not set(f.split("/")) & set(OTHER_BACKENDS)]
    return sorted(set(out))


def _configs(names: list[str], trust_remote_code: bool) -> list[str]:
    suffixes = CONFIG_SUFFIXES + ((".py",) if trust_remote_code else ())
    return [n for n in names if n.endswith(suffixes) and not n.endswith(".index.json")]


def _weights(folder: str, names: list[str], read_json: Callable[[str], Any]) -> list[str]:
    """The weights transformers would read in ``folder``: an index and its shards, else the
    single file, safetensors first; else any safetensors (sentence-transformers modules)."""
    for index, single in WEIGHT_CHOICES:
        if index in names:
            shards = sorted(set(read_json(posixpath.join(folder, index))["weight_map"].values()))
            return [index, *shards]
        if single in names:
            return [single]
    return [n for n in names if n.endswith(".safetensors")]


# --- the cache, and errors ---------------------------------------------------------------------
def cached_snapshot(model_id: str, *, subfolder: str = "", revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, why: str = "") -> Path:
    """The cached snapshot of ``model_id`` at ``revision`` (no request), or a HubError."""
    hub = _huggingface_hub()
    for name in ("modules.json", "config.json"):
        path = posixpath.join(subfolder, name) if subfolder else name
        found = hub.try_to_load_from_cache(model_id, path, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return _snapshot_of(Path(found), path)
    cache = cache_dir or hub.constants.HF_HUB_CACHE
    raise HubError(
        f"'{model_id}'{_at(revision)} is not in the Hugging Face cache ({cache}) and nothing may "
        f"be downloaded ({why}). Download it once online (unset HF_HUB_OFFLINE, drop "
        "local_files_only), or pass a local folder."
    )


def _from_cache_after(err: Exception, model_id: str, subfolder: str, revision: str | None,
                      cache_dir: str | os.PathLike | None) -> Path:
    why = f"the Hub could not be reached: {type(err).__name__}: {err}"
    folder = cached_snapshot(model_id, subfolder=subfolder, revision=revision,
                             cache_dir=cache_dir, why=why)
    logger.warning("%s; using the cached snapshot %s", why, folder)
    return folder


# the transport errors of the HTTP clients huggingface_hub versions use: (module, class names)
NETWORK_ERRORS = (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                  ("requests", ("ConnectionError", "Timeout")))


def _network_errors(hub: Any) -> tuple[type[BaseException], ...]:
    """No connection: the HTTP client's transport errors, and huggingface_hub's own."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError,
                                        hub.errors.LocalEntryNotFoundError]
    for module_name, names in NETWORK_ERRORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, n) for n in names if hasattr(module, n)]
    return tuple(found)


def _unreachable(err: Exception) -> bool:
    response = getattr(err, "response", None)
    return response is not None and response.status_code >= 500


def _hub_error(err: Exception, model_id: str, revision: str | None) -> HubError:
    name = type(err).__name__
    if name == "RevisionNotFoundError":
        what = (f"revision {revision!r} is not in '{model_id}': check the branch, tag or commit "
                "(the repository's 'Files and versions')")
    elif name == "GatedRepoError":
        what = (f"'{model_id}' is gated: accept its terms on the Hub, then log in "
                "(`hf auth login`) or pass token=")
    elif name == "RepositoryNotFoundError":
        what = (f"'{model_id}' is not a model repository on the Hub, or it is private and the "
                "token cannot read it: check the id, or log in (`hf auth login`) / pass token=")
    else:
        what = f"the Hub refused '{model_id}'{_at(revision)} ({name}: {err})"
    return HubError(what + ".")


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""
