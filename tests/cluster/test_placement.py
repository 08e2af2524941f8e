"""Instances land on the nodes whose resources they ask for (two fake nodes, own Ray).

``ray.cluster_utils.Cluster`` needs a Ray of its own, so the check runs in a subprocess and the
session's shared Ray is left alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_check(script: str, model_dir: Path) -> dict:
    """Run a check script of this folder in its own process; its last stdout line, as JSON."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pools_follow_their_resources(tiny_model_dir):
    result = _run_check("placement_check.py", tiny_model_dir)
    by_role: dict[str, list[list[str]]] = {}
    for inst in result["instances"]:
        assert inst["state"] == "serving"
        by_role.setdefault(inst["role"], []).append(inst["node_ids"])
    assert by_role["prefill"] == [[result["prefill_node"]]]
    assert by_role["decode"] == [[result["decode_node"]]]
    # each rank's bundle holds one unit of its pool's resource
    assert result["available"]["pool-prefill"] == 3.0
    assert result["available"]["pool-decode"] == 3.0


def test_expert_parallel_instance_spans_two_nodes_and_serves(tiny_model_dir):
    """One colocated instance of two ranks, one per node: both ranks serve, each a request of
    its own, with the offline single-rank engine's greedy tokens."""
    from model.engine import Engine

    result = _run_check("multinode_check.py", tiny_model_dir)
    (inst,) = result["instances"]
    assert inst["state"] == "serving" and inst["num_ranks"] == 2
    assert sorted(inst["node_ids"]) == sorted(result["nodes"])  # a rank on each node
    from tests.cluster.multinode_check import MAX_TOKENS, PROMPTS

    reference = Engine.load(tiny_model_dir)
    expected = [reference.generate([p], MAX_TOKENS)[0] for p in PROMPTS]
    assert [result["outputs"][u] for u in sorted(result["outputs"])] == expected
