"""bench/profile_decode.py: runs in --smoke mode and its breakdown adds up.

Not a timed test: it checks the profile's structure (shares summing to the whole, llama.cpp as the anchor) and one
fact the profile must show per backend: on torch the matmul calls per decoded token are 4 per layer
(q|k|v, o, gate|up, down) plus the output layer; on ggml a group of one decodes as one graph per
token. Either changes if the decode path gains or loses a call.
"""
from __future__ import annotations

import re

import pytest

from test_bench_smoke import assert_well_formed, run_bench


@pytest.mark.slow
def test_profile_smoke_breaks_decode_down_by_kernel():
    pytest.importorskip("torch")
    out = run_bench("profile_decode.py", "--smoke", "--backends", "torch", timeout=300)
    n_layers = int(re.search(r"### Profile \(torch\): \S+ \((\d+) layers\)", out).group(1))
    (header, rows), = assert_well_formed(out)
    by_name = {r[0]: r for r in rows}
    matmuls = [r for name, r in by_name.items() if "matmul" in name and r[1] != "-"]
    assert sum(int(r[1]) for r in matmuls) == 4 * n_layers + 1  # + the output layer (int4, int8 or dense)
    parts = [r for name, r in by_name.items() if not name.startswith(("tpi total", "llama.cpp"))]
    shares = sum(float(r[3].rstrip("%")) for r in parts)
    assert shares == pytest.approx(100, abs=len(parts))  # each share is rounded to 1%
    assert by_name["llama.cpp total (anchor, own process)"][3] == "1.00x"


@pytest.mark.slow
def test_ggml_profile_smoke_runs_a_decode_step_as_one_graph():
    from tpi.quant.ggml_lib import ggml_available

    if not ggml_available()[0]:
        pytest.skip("ggml not loadable here")
    out = run_bench("profile_decode.py", "--smoke", "--backends", "ggml", timeout=300)
    assert re.search(r"### Profile \(ggml\): \S+ \((\d+) layers\)", out)
    (header, rows), = assert_well_formed(out)
    by_name = {r[0]: r for r in rows}
    whole = next(r for name, r in by_name.items() if name.startswith("whole-step graph"))
    assert whole[1] == "1"  # calls per decoded token
    assert not any(name.startswith(("attention graphs", "MLP graphs")) for name in by_name)  # no per-block graphs
    parts = [r for name, r in by_name.items() if not name.startswith(("tpi total", "llama.cpp"))]
    assert sum(float(r[3].rstrip("%")) for r in parts) == pytest.approx(100, abs=len(parts))
