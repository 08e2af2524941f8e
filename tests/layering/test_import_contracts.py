"""The layering rules of DESIGN.md, kept by import-linter (contracts in pyproject.toml).

``make test`` runs ``lint-imports`` on the tree; these tests show the contracts pass here and
that breaking a rule fails them (on a copy of the tree with one forbidden import added), and
that the ingress side really runs without torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["common", "model", "prefill", "decode", "kvtransfer", "scheduler", "cluster"]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", tree)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_contracts_hold_on_this_tree() -> None:
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("scheduler/policy.py", "import torch", "the scheduler imports no torch"),
        ("model/engine.py", "import ray", "the model knows no Ray"),
        ("model/engine.py", "import scheduler.state", "the model knows no Ray, no scheduler"),
        ("kvtransfer/sender.py", "import prefill.jobs", "kvtransfer knows no stage"),
        ("decode/stage.py", "import prefill.stage", "prefill and decode never import each other"),
        ("prefill/stage.py", "import cluster.config", "the stages never import the cluster"),
        ("common/meter.py", "import torch", "common is plain Python"),
        ("cluster/protocol.py", "import model.engine", "the ingress process imports no torch"),
    ],
)
def test_breaking_a_rule_fails_the_contract(tree_copy: Path, module: str, line: str, contract):
    path = tree_copy / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # a forbidden import\n")
    try:
        out = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert out.returncode != 0
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, out.stdout


def test_ingress_side_imports_no_torch() -> None:
    """The modules an ingress replica loads, and the request data it builds, in a fresh
    interpreter: torch never arrives."""
    code = (
        "import json, sys\n"
        "import cluster.ingress, cluster.protocol, cluster.flow\n"
        "from common.sampling import SamplingParams\n"
        "from prefill.jobs import PrefillJob\n"
        "from decode.jobs import DecodeJob\n"
        "job = PrefillJob('r', [1, 2, 3], SamplingParams(temperature=0.5, seed=3), None)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'triton') if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
