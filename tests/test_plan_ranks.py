"""Plans over torch.distributed ranks (pure, no process group): contiguous stages balanced by
bytes against each rank's budgets, extras (KV cache, logits) and tie duplicates counted, each
stage planned on its rank's own tiers; the rank view, the table and the JSON round trip."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import bigload
from bigload.errors import DeviceMapError, DoesNotFitError
from bigload.plan import DevicePlan, plan_devices
from bigload.plan.types import EVERY_RANK
from bigload.skeleton import init_empty_weights


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.attn = nn.Linear(hidden, hidden)
        self.mlp = nn.Linear(hidden, hidden)


class TinyLM(nn.Module):
    """Embedding, N blocks, norm, head tied to the embedding, a root-level bias."""

    _no_split_modules = ["Block"]

    def __init__(self, blocks: int = 8, hidden: int = 16, vocab: int = 32, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))
        if tied:
            self.head.weight = self.embed.weight


def _model(**kwargs: object) -> TinyLM:
    with init_empty_weights():
        return TinyLM(**kwargs)  # type: ignore[arg-type]


BLOCK = 2 * (16 * 16 + 16) * 4  # bytes of one Block in float32


def _stage_bytes(plan: DevicePlan) -> dict[int, int]:
    out: dict[int, int] = {}
    for u in plan.units:
        if u.rank != EVERY_RANK:
            out[u.rank] = out.get(u.rank, 0) + u.size_bytes + u.extra_bytes
    return out


def _ranks_in_order(plan: DevicePlan) -> list[int]:
    return [u.rank for u in plan.units if u.rank != EVERY_RANK]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_equal_ranks_get_contiguous_balanced_stages(world: int) -> None:
    plan = plan_devices(_model(), world=world, max_memory={"cpu": "1MB"})
    ranks = _ranks_in_order(plan)
    assert ranks == sorted(ranks) and set(ranks) == set(range(world))
    stages = _stage_bytes(plan)
    assert max(stages.values()) - min(stages.values()) <= 2 * BLOCK, stages
    assert plan.world_size == world and len(plan.ranks) == world
    assert plan == plan_devices(_model(), world=world, max_memory={"cpu": "1MB"})  # pure


def test_uneven_budgets_give_uneven_stages() -> None:
    model = _model()
    plan = plan_devices(model, world=2, max_memory=[{"cpu": 3 * BLOCK}, {"cpu": "1MB"}])
    stages = _stage_bytes(plan)
    assert stages[0] <= 3 * BLOCK < stages[1]
    assert {u.placement for u in plan.units} == {"cpu"}  # nothing had to go to disk


def test_a_rank_that_is_short_spills_to_its_own_disk() -> None:
    plan = plan_devices(_model(), world=2, max_memory=[{"cpu": 2 * BLOCK}, {"cpu": 2 * BLOCK}])
    for rank in range(2):
        view = plan.for_rank(rank)
        assert any(u.placement == "disk" for u in view.local_units if u.rank == rank)
        assert view.budgets == {"cpu": 2 * BLOCK}


def test_tied_embedding_and_head_on_different_ranks_are_read_by_both() -> None:
    plan = plan_devices(_model(), world=2, max_memory={"cpu": "1MB"})
    head = next(u for u in plan.units if u.name == "head")
    embed = next(u for u in plan.units if u.name == "embed")
    assert (embed.rank, head.rank) == (0, 1)
    assert head.size_bytes == 32 * 16 * 4 and "reads its own copy" in head.reason
    for rank in range(2):
        view = plan.for_rank(rank)
        assert view.holds("embed.weight") and view.holds("head.weight")
    assert not plan.for_rank(0).holds("blocks.7.attn.weight")
    assert plan.for_rank(1).holds("blocks.7.attn.weight")
    assert plan.for_rank(1).tie_groups[0][0] == "head.weight"  # a member rank 1 holds leads


def test_tensors_of_split_modules_are_on_every_rank() -> None:
    plan = plan_devices(_model(), world=3, max_memory={"cpu": "1MB"})
    bias = next(u for u in plan.units if u.name == "bias")
    assert bias.rank == EVERY_RANK
    assert all(plan.for_rank(r).holds("bias") for r in range(3))


def test_extra_bytes_count_in_the_balance() -> None:
    model = _model(tied=False)
    plain = plan_devices(model, world=2, max_memory={"cpu": "1MB"})
    kv = {f"blocks.{i}": 10 * BLOCK for i in range(4, 8)}  # the last blocks keep a big cache
    heavy = plan_devices(model, world=2, max_memory={"cpu": "1MB"}, extra_bytes=kv)
    assert sum(u.rank == 1 for u in heavy.units) < sum(u.rank == 1 for u in plain.units)
    assert sum(u.extra_bytes for u in heavy.units) == sum(kv.values())
    with pytest.raises(DeviceMapError, match="'nope'"):
        plan_devices(model, world=2, max_memory={"cpu": "1MB"}, extra_bytes={"nope": 1})


def test_rank_budgets_must_match_the_world() -> None:
    with pytest.raises(DeviceMapError, match="2 rank"):
        plan_devices(_model(), world=3, max_memory=[{"cpu": "1MB"}, {"cpu": "1MB"}])
    with pytest.raises(DeviceMapError, match="world=0"):
        plan_devices(_model(), world=0)


def test_too_little_memory_everywhere_without_disk_names_the_rank() -> None:
    with pytest.raises(DoesNotFitError, match="rank [01]"):
        plan_devices(_model(), world=2, max_memory={"cpu": BLOCK, "disk": 0})


def test_a_world_plan_prints_with_a_rank_column_and_round_trips_json() -> None:
    plan = plan_devices(_model(), world=2, max_memory=[{"cpu": "1MB"}, {"cpu": "2MB"}])
    text = str(plan)
    rows = [line.split() for line in text.splitlines()]
    assert "over 2 ranks" in text and ["rank", "device", "units"] == rows[4][:3]
    assert ["all", "cpu", "1"] in [r[:3] for r in rows]  # the root-level bias, on every rank
    assert ["1", "cpu"] in [r[:2] for r in rows]
    again = DevicePlan.from_json(plan.to_json())
    assert again == plan and again.for_rank(1) == plan.for_rank(1)
    data = json.loads(plan.to_json())
    data["units"][1]["rank"] = 5
    with pytest.raises(DeviceMapError, match="outside world_size 2"):
        DevicePlan.from_json(json.dumps(data))


def test_one_process_plans_are_unchanged() -> None:
    plan = plan_devices(_model(), max_memory={"cpu": "1MB"})
    assert plan.world_size == 1 and plan.ranks == () and plan.for_rank(0) is plan
    data = json.loads(plan.to_json())
    data["format"] = "bigload.DevicePlan/2"  # written before ranks existed
    for key in ("world_size", "rank", "ranks"):
        data.pop(key)
    for unit in data["units"]:
        unit.pop("rank"), unit.pop("extra_bytes")
    assert DevicePlan.from_json(json.dumps(data)) == plan


def test_405b_llama_over_4_ranks_of_8_gpus_plans_in_under_a_second() -> None:
    transformers = pytest.importorskip("transformers")
    from bigload import hf

    config = transformers.LlamaConfig(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, torch_dtype="bfloat16")
    model = hf.build_skeleton(config, transformers.LlamaForCausalLM, torch.bfloat16)
    gpus = {i: "80GiB" for i in range(8)}
    start = time.perf_counter()
    plan = hf.plan_model(model, dtype=torch.bfloat16, world=4,
                         max_memory={**gpus, "cpu": "1TiB"})
    text = str(plan)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, seconds
    ranks = _ranks_in_order(plan)
    assert set(ranks) == {0, 1, 2, 3} and ranks == sorted(ranks)
    assert all(u.placement.startswith("cuda:") for u in plan.units if u.rank != EVERY_RANK)
    assert "over 4 ranks" in text
    weights = sum(u.size_bytes for u in plan.units)
    assert 800e9 < weights < 820e9  # 405e9 parameters in bfloat16 (+ the head read twice? no)
    assert bigload.DevicePlan.from_json(plan.to_json()) == plan


def test_cli_plan_world_prints_stages_without_a_process_group(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    from bigload.cli.main import main

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--world", "2", "--max-memory", "cpu=1MB"]) == 0
    text = capsys.readouterr().out
    assert "over 2 ranks" in text
    assert ["1", "cpu"] in [line.split()[:2] for line in text.splitlines()]
    assert main(["plan", str(tmp_path), "--world", "2", "--json", "--max-memory", "cpu=40KB",
                 "--max-memory", "cpu=1MB"]) == 0
    plan = DevicePlan.from_json(capsys.readouterr().out)
    assert plan.world_size == 2 and plan.ranks[0].budgets["cpu"] == 40_000
    assert main(["plan", str(tmp_path), "--world", "3", "--max-memory", "cpu=1MB",
                 "--max-memory", "cpu=1MB"]) == 2  # neither once nor once per rank
