"""The policy core stays plain Python so a simulator can reuse it: no torch, no Ray."""

import json
import subprocess
import sys


def test_core_modules_import_neither_torch_nor_ray():
    code = (
        "import json, sys; import scheduler, scheduler.policy, scheduler.planner, "
        "common.prefix, scheduler.estimate; "
        "print(json.dumps(sorted(m for m in ('torch', 'ray') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
