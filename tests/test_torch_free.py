"""The numpy backend in processes where torch cannot be imported gives the torch backend's tokens.

Torch is made unavailable by a sitecustomize on PYTHONPATH that swaps the standard PathFinder for
one that never finds `torch`: `import torch` raises ModuleNotFoundError and find_spec("torch") is
None, exactly as on a device without the wheel. It also leaves files next to itself: active-<pid>
(the blocker ran in that process) and blocked-<pid> (that process tried to import torch).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tpi
from tpi.errors import pip_install

TESTS_DIR = Path(__file__).parent
TORCH_BLOCKER = '''
import os, sys
from importlib.machinery import PathFinder
from pathlib import Path

_HERE = Path(__file__).parent
(_HERE / f"active-{os.getpid()}").touch()


class _NoTorchPathFinder(PathFinder):
    """PathFinder that never finds torch: the process behaves as if torch were not installed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            with open(_HERE / f"blocked-{os.getpid()}", "a") as f:
                f.write(name + "\\n")
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_NoTorchPathFinder if f is PathFinder else f for f in sys.meta_path]
'''
# Everything a torch-free worker imports (tpi join --backend numpy).
WORKER_MODULES = (
    "tpi.model.config", "tpi.model.rope", "tpi.model.transformer", "tpi.master.shard", "tpi.quant.formats", "tpi.quant.kernels",
    "tpi.model.layers_numpy", "tpi.model.layers_ggml", "tpi.model.backends", "tpi.model.weights", "tpi.worker", "tpi.cli", "tpi.transport.link",
    "tpi.transport.protocol", "tpi.scheduler.store", "tpi.scheduler.prefetch", "tpi.scheduler.window",
    "tpi.formats", "tpi.master.generate",
)
GREEDY_STEPS = 12


def greedy_tokens(path, backend: str, prompt: list[int], steps: int = GREEDY_STEPS, engine=None,
                  source=None) -> list[int]:
    """Prefill then greedy decode one token at a time on a single-device engine (or the given one).

    source: the model at path already opened by tpi.formats.open_model (reused: opening SmolLM2 takes seconds).
    """
    if engine is None:
        from tpi.devices.slicing import plan_shards
        from tpi.model.backends import make_layers
        from tpi.formats import open_model
        from tpi.master.engine import Engine
        from tpi.model.transformer import ResidentWeights, Transformer
        from tpi.master.shard import iter_rank_blocks

        source = open_model(str(path)) if source is None else source
        cfg = source.config
        context = len(prompt) + steps
        (shard,) = plan_shards(cfg, [1.0])
        layers = make_layers(backend, cfg, shard, context, None)
        blocks, embed = {}, None
        for key, (blk,) in iter_rank_blocks(source, cfg, [shard]):
            if key == "globals":
                embed = blk.pop("embed")
            blocks[key] = layers.to_runtime(blk)
        engine = Engine(cfg, None, Transformer(cfg, layers, ResidentWeights(blocks)), embed, context)
    logits = engine.forward(prompt, 0)[-1]
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        logits = engine.forward(out[-1:], len(prompt) + len(out) - 1)[-1]
    return out


@pytest.fixture
def blocker_dir(tmp_path: Path) -> Path:
    d = tmp_path / "no_torch"
    d.mkdir()
    (d / "sitecustomize.py").write_text(TORCH_BLOCKER)
    return d


def blocked_env(blocker_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_without_torch(blocker_dir: Path, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=blocked_env(blocker_dir), capture_output=True,
                          text=True, timeout=timeout, cwd=TESTS_DIR)


def torch_free_greedy(blocker_dir: Path, path, prompt: list[int]) -> list[int]:
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from test_torch_free import greedy_tokens\n"
        f"tokens = greedy_tokens({str(path)!r}, 'numpy', {prompt!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(tokens))\n"
    )
    r = run_without_torch(blocker_dir, code)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_blocker_makes_torch_unavailable_and_only_torch_free_backends_remain(blocker_dir):
    code = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch imported')\n"
        "from tpi.quant.kernels import available_backends, get_backend, KernelBackendError\n"
        "assert available_backends() in (['numpy'], ['ggml', 'numpy']), available_backends()\n"
        "try:\n    get_backend('torch')\nexcept KernelBackendError as e:\n    print(e)\n"
    )
    r = run_without_torch(blocker_dir, code)
    assert r.returncode == 0, r.stderr
    assert "install torch" in r.stdout


def test_worker_modules_import_without_torch(blocker_dir):
    code = "import sys\n" + "".join(f"import {m}\n" for m in WORKER_MODULES) + "assert 'torch' not in sys.modules\n"
    r = run_without_torch(blocker_dir, code)
    assert r.returncode == 0, r.stderr
    assert not list(blocker_dir.glob("blocked-*")), "a worker module tried to import torch"
    assert list(blocker_dir.glob("active-*"))


def test_torch_backend_without_torch_names_the_extra_to_install(blocker_dir, tiny_gguf):
    code = (
        "from tpi.model.backends import make_layers\nfrom tpi.formats import open_model\n"
        "from tpi.devices.slicing import plan_shards\nfrom tpi.errors import TpiError\n"
        f"cfg = open_model({str(tiny_gguf('tiny_qwen2_q4_0_tied'))!r}).config\n"
        "try:\n    make_layers('torch', cfg, plan_shards(cfg, [1.0])[0], 16, None)\n"
        "except TpiError as e:\n    print(e)\n"
    )
    r = run_without_torch(blocker_dir, code)
    assert r.returncode == 0, r.stderr
    assert pip_install("all") in r.stdout and "'tpi[" not in r.stdout


def test_install_hints_name_this_checkout_never_the_pypi_name():
    """PyPI's 'tpi' is another project: `pip install 'tpi[all]'` would install it, so hints name this tree."""
    root = Path(tpi.__file__).resolve().parents[1]
    assert pip_install("worker-fast") == f"pip install '{root}[worker-fast]'"


NEAR_TIE = 0.05  # logits; numpy (f32) and torch (bf16 activations) differ by up to ~0.02 on these models


def forced_choices(path, backend: str, prompt: list[int], forced: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, top-2 margin) of each step when `forced` follows the prompt (teacher forcing)."""
    logits = single_device_logits(path, backend, prompt + forced[:-1])[len(prompt) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return logits.argmax(-1), top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("variant", ["tiny_qwen2_q4_0_tied", "tiny_llama_q4_1_tied"])
def test_torch_free_numpy_decode_gives_the_torch_backends_greedy_tokens(variant, blocker_dir, tiny_gguf):
    """Same tokens as torch wherever torch's choice is clear of a near-tie (tiny_qwen2's first step
    is one: a top-2 gap of 0.016 that the numpy backend's exact f32 sums may break the other way)."""
    pytest.importorskip("torch")
    path = tiny_gguf(variant)
    prompt = [1, 17, 42, 99, 5, 250, 300, 7]
    without_torch = torch_free_greedy(blocker_dir, path, prompt)
    assert without_torch == greedy_tokens(path, "numpy", prompt)  # same maths, another process
    torch_tokens = greedy_tokens(path, "torch", prompt)
    _, margins = forced_choices(path, "torch", prompt, torch_tokens)
    choices, _ = forced_choices(path, "numpy", prompt, torch_tokens)
    clear = margins >= NEAR_TIE
    assert clear.sum() >= GREEDY_STEPS - 2, "too many near-ties for the comparison to mean anything"
    np.testing.assert_array_equal(choices[clear], np.asarray(torch_tokens)[clear])
    same_until = int(np.argmin(clear)) if not clear.all() else GREEDY_STEPS
    assert without_torch[:same_until] == torch_tokens[:same_until]
    assert not list(blocker_dir.glob("blocked-*"))


@pytest.fixture(scope="module")
def smollm2_torch_greedy(smollm2, smollm2_source, smollm2_chat_tokens) -> list[int]:
    """The torch backend's greedy tokens on SmolLM2's chat prompt (single device), shared by two tests."""
    pytest.importorskip("torch")
    return greedy_tokens(smollm2, "torch", smollm2_chat_tokens, source=smollm2_source)


@pytest.mark.slow
def test_torch_free_numpy_decode_on_smollm2_gives_the_torch_backends_tokens(blocker_dir, smollm2,
                                                                            smollm2_chat_tokens, smollm2_torch_greedy):
    without_torch = torch_free_greedy(blocker_dir, smollm2, smollm2_chat_tokens)
    assert without_torch == smollm2_torch_greedy


def group_run(model, prompt: list[int], tmp_path: Path, backend: str, ratios=None) -> tuple[np.ndarray, list[int], int]:
    """Master (this process, `backend`) plus one local numpy worker: prompt logits, greedy tokens, worker pid."""
    from tpi.master import GroupOptions, start_group

    group = start_group(GroupOptions(
        model=str(model), local_workers=1, worker_backend="numpy", backend=backend, host="127.0.0.1",
        context=len(prompt) + GREEDY_STEPS + 4, ratios=ratios, config_dir=tmp_path / "config",
        cache_dir=tmp_path / "cache", join_timeout_s=120, threads=1,
    ))
    try:
        (proc,) = group.procs
        logits = group.engine.forward(prompt, 0, all_positions=True)
        return logits, greedy_tokens(None, backend, prompt, engine=group.engine), proc.pid
    finally:
        group.close()


def assert_torch_free(blocker_dir: Path, pid: int) -> None:
    assert (blocker_dir / f"active-{pid}").exists(), "the worker ran without the torch blocker"
    assert not (blocker_dir / f"blocked-{pid}").exists(), "the worker tried to import torch"


def single_device_logits(path, backend: str, prompt: list[int]) -> np.ndarray:
    sys.path.insert(0, str(TESTS_DIR))
    from test_layers_numpy import build_engine

    return build_engine(path, backend).forward(prompt, 0, all_positions=True)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.slow
def test_numpy_master_and_torch_free_worker_give_single_device_tokens_on_tiny_qwen2(
        blocker_dir, tiny_gguf, tmp_path, monkeypatch):
    path = tiny_gguf("tiny_qwen2_q4_0_tied")  # one KV head: replicated on both ranks
    prompt = [1, 17, 42, 99, 5, 250, 300, 7]
    monkeypatch.setenv("PYTHONPATH", blocked_env(blocker_dir)["PYTHONPATH"])  # the local worker inherits it
    logits, tokens, pid = group_run(path, prompt, tmp_path, "numpy", ratios=(0.5, 0.5))
    monkeypatch.undo()
    assert_torch_free(blocker_dir, pid)
    assert rel_err(logits, single_device_logits(path, "numpy", prompt)) < 2e-5
    assert tokens == greedy_tokens(path, "numpy", prompt)


@pytest.mark.slow
def test_torch_master_and_torch_free_worker_match_single_device_torch_on_tiny_qwen2(
        blocker_dir, tiny_gguf, tmp_path, monkeypatch):
    """Mixed precision (bf16 master share, f32 worker share): logits within torch's bf16 tolerance.

    Tokens are not compared here: random tiny weights have near-ties (measured: a top-2 gap of
    0.001 that bf16 rounds to an exact tie), which mixed precision may break either way.
    """
    pytest.importorskip("torch")
    path = tiny_gguf("tiny_qwen2_q4_0_tied")
    prompt = [1, 17, 42, 99, 5, 250, 300, 7]
    monkeypatch.setenv("PYTHONPATH", blocked_env(blocker_dir)["PYTHONPATH"])
    logits, _, pid = group_run(path, prompt, tmp_path, "torch", ratios=(0.5, 0.5))
    monkeypatch.undo()
    assert_torch_free(blocker_dir, pid)
    assert rel_err(logits, single_device_logits(path, "torch", prompt)) < 6e-2


@pytest.mark.slow
def test_torch_master_and_torch_free_worker_give_single_device_tokens_on_smollm2(
        blocker_dir, smollm2, smollm2_chat_tokens, smollm2_torch_greedy, tmp_path, monkeypatch):
    single = smollm2_torch_greedy
    # SmolLM2's first answer token is a near-tie (DESIGN §8) that mixed precision may flip: force
    # the single device's choice, then the continuations must agree.
    prompt = smollm2_chat_tokens + single[:1]
    monkeypatch.setenv("PYTHONPATH", blocked_env(blocker_dir)["PYTHONPATH"])
    _, tokens, pid = group_run(smollm2, prompt, tmp_path, "torch")
    monkeypatch.undo()
    assert_torch_free(blocker_dir, pid)
    assert tokens[: len(single) - 1] == single[1:]
