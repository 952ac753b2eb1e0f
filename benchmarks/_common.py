"""Shared pieces of the benchmark harness: model sizes, synthetic checkpoints, page-cache control.

Nothing here measures anything; ``run.py`` orchestrates and ``_worker.py`` measures one load in
its own process. Only the standard library is imported at module level, so that the runner and the
raw-read floor start without torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "_work"  # gitignored: checkpoints, offload folders, raw results
CHECKPOINT_FORMAT_VERSION = 1  # bump to invalidate cached checkpoints
RESULT_MARKER = "BENCH_JSON "  # the worker's one result line starts with this
READ_CHUNK_BYTES = 16 * 1024 * 1024
PAGE_BYTES = mmap.PAGESIZE


# ---------------------------------------------------------------------------------------------
# model sizes


@dataclass(frozen=True)
class LlamaShape:
    """The knobs of a Llama-shaped config; everything else is LlamaConfig's default."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000

    def param_count(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q,o + k,v + mlp + 2 norms
        return 2 * v * h + self.num_hidden_layers * per_layer + h  # untied embed+head, final norm

    def config_kwargs(self) -> dict:
        return dict(asdict(self), tie_word_embeddings=False, max_position_embeddings=2048)


SIZES: dict[str, LlamaShape] = {
    "100MB": LlamaShape(512, 1408, 13, 8, 8, vocab_size=8000),  # ~50M params, --quick
    "1GB": LlamaShape(1024, 2816, 34, 16, 16),  # ~0.50B params
    "3GB": LlamaShape(2048, 5632, 27, 16, 16),  # ~1.52B params
}


def checkpoint_key(shape: LlamaShape, shard: str) -> str:
    blob = json.dumps([CHECKPOINT_FORMAT_VERSION, asdict(shape), shard], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_checkpoint(size: str, *, shard: str = "500MB", log=print) -> Path:
    """Return a cached folder with a random-weight Llama checkpoint (bf16, sharded safetensors)."""
    return make_llama_checkpoint(SIZES[size], size, shard=shard, log=log)


def make_llama_checkpoint(
    shape: LlamaShape, label: str, *, shard: str = "500MB", log=print
) -> Path:
    """A cached random-weight Llama checkpoint of ``shape`` (bf16, sharded safetensors), in
    ``_work/ckpt/llama-<label>-<hash of the shape>``."""
    folder = WORK_DIR / "ckpt" / f"llama-{label}-{checkpoint_key(shape, shard)}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    log(f"making checkpoint {folder.name} ({shape.param_count() / 1e9:.3f}B params) ...")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(**shape.config_kwargs(), dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size=shard)
    del model
    for path in tree_files(tmp):  # dirty pages cannot be evicted: write them back now
        fsync(path)
    tmp.rename(folder)  # atomic: a half-written checkpoint is never found in the cache
    return folder


def fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def total_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def tree_files(folder) -> list[Path]:
    if folder is None or not Path(folder).exists():
        return []
    return [p for p in Path(folder).rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------
# safetensors headers: which byte ranges of which file hold which tensor


def safetensors_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """tensor name -> (absolute file offset, length) from the header alone."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {
        name: (base + meta["data_offsets"][0], meta["data_offsets"][1] - meta["data_offsets"][0])
        for name, meta in header.items()
        if name != "__metadata__"
    }


def placement_of(name: str, device_map: dict) -> str:
    """The device a tensor's owning module is mapped to (longest matching module prefix)."""
    best, best_len = None, -1
    for module, device in device_map.items():
        if (module == "" or name == module or name.startswith(module + ".")) and len(
            module
        ) > best_len:
            best, best_len = device, len(module)
    return str(best)


def disk_ranges(folder: Path, device_map: dict | None) -> dict[Path, list[tuple[int, int]]]:
    """Byte ranges of checkpoint tensors mapped to disk; whole files when the map is unknown."""
    out: dict[Path, list[tuple[int, int]]] = {}
    for path in checkpoint_files(folder):
        if device_map is None:
            out[path] = [(0, path.stat().st_size)]
            continue
        ranges = [
            r for n, r in safetensors_ranges(path).items() if placement_of(n, device_map) == "disk"
        ]
        if ranges:
            out[path] = ranges
    return out


# ---------------------------------------------------------------------------------------------
# page cache: evict, warm, measure residency

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (clean file pages are dropped)
MADV_POPULATE_READ = 22  # Linux >= 5.14: map these pages (resident ones: no I/O)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _page_span(offset: int, length: int) -> tuple[int, int]:
    start = offset - offset % PAGE_BYTES
    end = -(-(offset + length) // PAGE_BYTES) * PAGE_BYTES
    return start, end - start


class _Mapping:
    """A fresh read-only shared mapping of a whole file and its mincore() residency vector."""

    def __init__(self, path: Path):
        self.size = Path(path).stat().st_size
        self.pages = -(-self.size // PAGE_BYTES)
        fd = os.open(path, os.O_RDONLY)
        try:
            self.addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)  # the mapping keeps the file
        if self.addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")

    def residency(self) -> bytes:
        vec = (ctypes.c_ubyte * self.pages)()
        if _libc.mincore(ctypes.c_void_p(self.addr), self.size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bytes(vec)

    def page_runs(self, ranges, vec: bytes):
        """(first page, end page) runs of resident pages inside the ranges."""
        for offset, length in ranges:
            start, span = _page_span(offset, length)
            lo, hi = start // PAGE_BYTES, min(self.pages, (start + span) // PAGE_BYTES)
            for m in re.finditer(rb"[^\x00]+", vec[lo:hi]):
                yield lo + m.start(), lo + m.end()

    def madvise(self, first_page: int, end_page: int, advice: int) -> int:
        addr = ctypes.c_void_p(self.addr + first_page * PAGE_BYTES)
        return _libc.madvise(addr, (end_page - first_page) * PAGE_BYTES, advice)

    def close(self) -> None:
        _libc.munmap(ctypes.c_void_p(self.addr), self.size)


def fadvise_dontneed(path: Path, ranges=None) -> None:
    """Drop clean page-cache pages of ``path`` (whole file, or its (offset, length) ranges)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ranges or [(0, 0)]:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _own_file_mappings(paths: set[str]):
    """(address, length, file offset, path) of this process's mappings of the given files."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() in paths:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                yield lo, hi - lo, int(parts[2], 16), parts[5].strip()


def pageout_own_mappings(ranges: dict[Path, list[tuple[int, int]]]) -> None:
    """madvise(MADV_PAGEOUT) this process's mapped pages of the ranges.

    A page that a process has mapped (an mmap-backed weight) cannot be dropped by
    posix_fadvise, so it is first unmapped from our page tables and reclaimed.
    """
    by_path = {str(Path(p).resolve()): r for p, r in ranges.items()}
    for addr, length, map_off, path in _own_file_mappings(set(by_path)):
        for offset, size in by_path[path]:
            lo, hi = max(offset, map_off), min(offset + size, map_off + length)
            if lo < hi:
                start, span = _page_span(addr + lo - map_off, hi - lo)
                _libc.madvise(ctypes.c_void_p(start), span, MADV_PAGEOUT)


def pageout_ranges(path: Path, ranges) -> None:
    """Reclaim exactly the resident pages of the ranges.

    posix_fadvise(DONTNEED) skips a large page-cache folio that is only partly inside a range
    (on this kernel a quarter of an every-other-tensor selection stayed cached). MADV_PAGEOUT
    splits such folios, but only acts on mapped pages: so map the file, map its resident pages
    in the ranges (MADV_POPULATE_READ, no I/O since they are resident), page them out.
    """
    m = _Mapping(path)
    try:
        for first, end in m.page_runs(ranges, m.residency()):
            if m.madvise(first, end, MADV_POPULATE_READ) == 0:
                m.madvise(first, end, MADV_PAGEOUT)
    finally:
        m.close()


def evict(ranges: dict[Path, list[tuple[int, int]]], *, own_mappings: bool = False) -> None:
    """Drop the ranges from the page cache: write back dirty pages (an offload folder just
    written), reclaim our own mapped pages if asked, reclaim the rest exactly, then
    posix_fadvise(DONTNEED) for whatever is left."""
    for path in ranges:
        fsync(path)
    if own_mappings:
        pageout_own_mappings(ranges)
    for path, rs in ranges.items():
        if Path(path).stat().st_size:
            pageout_ranges(path, rs)
        fadvise_dontneed(path, rs)


def resident_bytes(path: Path, ranges=None) -> int:
    """Bytes of ``path`` (or of its ranges) in the page cache (mincore on a fresh mapping)."""
    if Path(path).stat().st_size == 0:
        return 0
    m = _Mapping(path)
    try:
        runs = m.page_runs(ranges or [(0, m.size)], m.residency())
        return sum(end - first for first, end in runs) * PAGE_BYTES
    finally:
        m.close()


def resident_fraction(ranges: dict[Path, list[tuple[int, int]]]) -> float | None:
    total = sum(n for rs in ranges.values() for _, n in rs)
    if total == 0:
        return None
    try:
        got = sum(resident_bytes(p, rs) for p, rs in ranges.items())
    except OSError:
        return None
    return min(1.0, got / total)


def whole(paths) -> dict[Path, list[tuple[int, int]]]:
    return {Path(p): [(0, Path(p).stat().st_size)] for p in paths}


def raw_read(paths) -> int:
    """Read every byte of the files into one reusable 16 MiB buffer; the read floor."""
    buf = bytearray(READ_CHUNK_BYTES)
    view = memoryview(buf)
    done = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                done += n
    return done
