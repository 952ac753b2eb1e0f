"""Every exception bigload raises: one base class, one small class per failure.

Messages say what failed, which object (fqn, absolute path), expected vs found, and what to do.
Errors that collect several problems keep them in ``.problems`` and show the first 10.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 10


def format_problems(lines: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Indent ``lines`` and cut the list after ``limit`` entries with '… and N more'."""
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  … and {len(lines) - limit} more")
    return "\n".join(shown)


class BigloadError(Exception):
    """Base class of every error bigload raises on purpose."""


# --- devices and sizes -------------------------------------------------------------------------
class DeviceError(BigloadError, ValueError):
    """A device name that cannot be parsed, or a device that is not available here."""


class DtypeError(BigloadError, ValueError):
    """A dtype that cannot be parsed, or one that cannot be used where it was given."""


class SizeError(BigloadError, ValueError):
    """A memory size ('24GiB', '500MB', bytes) that cannot be parsed, or a malformed budget."""


# --- meta tensors and materialisation --------------------------------------------------------
class MetaTensorError(BigloadError, ValueError):
    """A tensor is on ``meta`` (holds no data) and no value or policy says what it should hold."""


class ShapeMismatchError(BigloadError, ValueError):
    """A value's shape differs from the shape of the tensor it should fill."""


class NoInitError(MetaTensorError):
    """``missing='init'`` was asked for a tensor whose module has no initialisation of its own."""


class SkeletonError(BigloadError):
    """A model cannot be used as a skeleton (for example its non-persistent buffers are meta)."""


# --- checkpoints -------------------------------------------------------------------------------
class CheckpointError(BigloadError):
    """Base class of problems with checkpoint files."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist, or a folder holds no checkpoint files."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, corrupted, or its header lies about its contents."""


class CheckpointChangedError(CorruptCheckpointError):
    """A checkpoint file changed (replaced, rewritten, truncated, removed) after it was indexed:
    its size, times, inode or header differ from what ``read_index`` recorded. Nothing of it is
    served; call ``read_index`` (or load the model) again."""


class CheckpointIndexError(CheckpointError):
    """A shard index (``*.index.json``) is inconsistent with the shards it names."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file or folder cannot be read: no read permission, a name the filesystem
    refuses (too long, a NUL byte), not a regular file (a FIFO, a device, a socket), or an I/O
    error. The message names the path and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks for something unsafe: a path escaping its folder, or a pickle that
    ``torch.load(weights_only=True)`` refuses."""


class CheckpointMismatchError(BigloadError, ValueError):
    """The model and the checkpoint disagree (missing, unexpected, mismatched tensors).

    ``problems`` holds every problem found; nothing was loaded when this is raised.
    """

    def __init__(self, message: str, problems: Sequence[object] = ()):
        super().__init__(message)
        self.problems = list(problems)


class MissingWeightsError(CheckpointMismatchError):
    """Tensors of the model are not in the checkpoint and the policy is ``missing='error'``."""


# --- planning ----------------------------------------------------------------------------------
class DeviceMapError(BigloadError, ValueError):
    """A device map is malformed: unknown names, tensors left out, or an unsupported layout."""


class DoesNotFitError(BigloadError):
    """The model does not fit into the given memory budgets."""


# --- dispatch and offload ----------------------------------------------------------------------
class OffloadError(BigloadError):
    """An offload folder cannot be used (stale, foreign, or half written) or written."""


class OffloadedParameterError(BigloadError, RuntimeError):
    """An operation on an offloaded parameter that would silently lose data (in-place edits of
    disk-tier weights, backward through offloaded weights)."""


class DispatchError(BigloadError, RuntimeError):
    """A model cannot be dispatched as asked (for example ``.to()`` on a dispatched model)."""


# --- transformers integration ------------------------------------------------------------------
class ModelResolveError(BigloadError):
    """A model path or id cannot be resolved to a folder with a config and weights."""


class UnknownTensorError(BigloadError, KeyError):
    """A tensor name that names no parameter or buffer of the module."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedArgumentError(BigloadError, ValueError, TypeError):
    """An argument bigload does not take (an unknown name), or one accepted for another
    library's signature (``from_pretrained``, accelerate) whose behaviour bigload does not
    offer; the message says why and what to use instead. A TypeError as well, as Python's own
    error for an unexpected keyword is."""


class RemoteCodeError(ModelResolveError):
    """A model needs code from its folder or repository (``auto_map``) and
    ``trust_remote_code=True`` was not given."""


class HubError(ModelResolveError):
    """A model id cannot be fetched from the Hugging Face Hub: no such repository or revision,
    no access, or offline and not in the local cache."""


# --- several ranks (torch.distributed) ---------------------------------------------------------
class DistributedError(BigloadError, RuntimeError):
    """A multi-rank load or call cannot go on: the process group, the ranks' agreement, or a
    value the ranks exchange."""


class RankMismatchError(DistributedError):
    """The ranks were launched differently: another checkpoint, other versions, another plan,
    or other inputs to the same call. Raised on every rank, before any weight is read (or
    before the call runs)."""

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = list(ranks)


class RankFailedError(DistributedError):
    """Another rank raised, died or stopped answering; ``rank`` is that rank and ``message``
    its error (or what is known of its end). Every surviving rank raises it."""

    def __init__(self, rank: int | None, message: str):
        who = f"rank {rank}" if rank is not None else "another rank"
        super().__init__(f"{who} failed: {message}")
        self.rank = rank
        self.message = message
