"""The engine imports and runs a workflow with torch unimportable (dependencies point away from torch)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.path.insert(0, {tests!r})
import toy_nodes, cli
from engine import Executor, Registry
registry = Registry()
registry.load_module(toy_nodes)
prompt = toy_nodes.build_prompt(("1", "Constant", {{"value": 6}}), ("2", "Multiply", {{"a": ["1", 0], "b": 7}}),
                                ("3", "Output", {{"value": ["2", 0]}}))
result = Executor(registry).execute(prompt)
print(result.status, result.outputs["3"]["value"][0])
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "diffusion", "nodes")))
"""


def test_engine_runs_a_workflow_without_torch():
    tests_dir = str(Path(__file__).parent)
    completed = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests_dir)], capture_output=True,
                               text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert completed.returncode == 0, completed.stderr
    status_line, modules_line = completed.stdout.splitlines()
    assert status_line == "success 42"
    assert json.loads(modules_line.replace("'", '"')) == ["torch"]  # only the blocking placeholder itself
