"""The `sdgraph` command, in-process through cli.main and once as the installed console script."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import cli
from toy_nodes import build_prompt

TOY_NODES = str(Path(__file__).with_name("toy_nodes.py"))
NODES = ["--no-default-nodes", "--nodes", TOY_NODES]
SDGRAPH = Path(sys.executable).with_name("sdgraph")

WORKFLOW = build_prompt(("1", "Constant", {"value": 3}), ("2", "Slow", {"value": ["1", 0], "ticks": 5}),
                        ("3", "ToText", {"value": ["2", 0], "upper": False}),
                        ("4", "SaveText", {"text": ["3", 0], "filename": "result.txt"}),
                        ("5", "Output", {"value": ["1", 0]}))


@pytest.fixture
def workflow(tmp_path):
    def write(content=WORKFLOW, name="workflow.json"):
        path = tmp_path / name
        path.write_text(json.dumps(content))
        return str(path)
    return write


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "out"


def run_cli(*args):
    return cli.main([*args[:1], *NODES, *args[1:]])


def test_validate_prints_ok_for_a_valid_workflow(workflow, capsys):
    assert run_cli("validate", workflow()) == 0
    assert capsys.readouterr().out == "ok\n"


def test_validate_prints_every_error_and_exits_1(workflow, capsys):
    broken = {**WORKFLOW, "1": {"class_type": "Constant", "inputs": {"value": 5000}},
              "3": {"class_type": "ToText", "inputs": {"value": ["2", 0], "upper": "maybe"}}}
    assert run_cli("validate", workflow(broken)) == 1
    assert capsys.readouterr().out.splitlines() == [
        "Prompt outputs failed validation: 2 node(s) have errors",
        "node 1 (Constant): value_bigger_than_max: value: 5000 is bigger than max 1000",
        "node 3 (ToText): invalid_input_type: upper: 'maybe' is not a valid BOOLEAN"]


def test_validate_json_prints_comfyui_error_answer(workflow, capsys):
    assert run_cli("validate", workflow(build_prompt(("1", "Output", {}))), "--json") == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["node_errors"]["1"]["errors"][0]["type"] == "required_input_missing"


def test_ui_format_file_is_converted_with_the_node_schemas(workflow, capsys):
    ui = {"version": 0.4, "links": [], "nodes": [
        {"id": 3, "type": "Output", "mode": 0, "inputs": [], "outputs": [], "widgets_values": []}]}
    assert run_cli("validate", workflow(ui), "--json") == 1
    answer = json.loads(capsys.readouterr().out)
    # The converted node keeps its id; its missing required input is reported as for an API prompt.
    assert answer["node_errors"]["3"]["errors"][0]["type"] == "required_input_missing"


def test_unreadable_json_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{nope")
    assert run_cli("validate", str(tmp_path / "bad.json")) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_run_reports_output_paths_and_shows_progress(workflow, out_dir, capsys):
    assert run_cli("run", workflow(), "--output-dir", str(out_dir)) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"4: {out_dir / 'result.txt'}", '5: {"value": [3]}']
    assert (out_dir / "result.txt").read_text() == "3"
    assert "executing 2 (Slow)" in captured.err
    assert "5/5" in captured.err


def test_run_set_overrides_inputs_parsing_json_then_strings(workflow, out_dir, capsys):
    assert run_cli("run", workflow(), "--output-dir", str(out_dir), "--set", "1.value=42",
                   "--set", "4.filename=named.txt") == 0
    assert (out_dir / "named.txt").read_text() == "42"


@pytest.mark.parametrize("override, message", [
    ("9.value=1", "no node '9' in the workflow"),
    ("1.vlaue=1", "node 1 (Constant) has no input 'vlaue'; its inputs are value"),
    ("value=1", "expected NODE_ID.INPUT=VALUE"),
])
def test_run_set_rejects_unknown_nodes_and_inputs(workflow, capsys, override, message):
    assert run_cli("run", workflow(), "--set", override) == 2
    assert message in capsys.readouterr().err


def test_run_json_prints_a_machine_readable_summary(workflow, out_dir, capsys):
    assert run_cli("run", workflow(), "--output-dir", str(out_dir), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "success" and summary["error"] is None
    assert summary["outputs"]["4"]["files"] == [str(out_dir / "result.txt")]
    assert summary["outputs"]["5"] == {"ui": {"value": [3]}, "files": []}
    assert summary["executed"] == ["1", "2", "3", "4", "5"]
    assert set(summary["timings"]) == {"1", "2", "3", "4", "5"}


def test_run_failure_exits_1_with_the_node_error(workflow, capsys):
    failing = build_prompt(("1", "Fail", {"message": "kaput"}), ("2", "Output", {"value": ["1", 0]}))
    assert run_cli("run", workflow(failing)) == 1
    err = capsys.readouterr().err
    assert "node 1 (Fail) failed: RuntimeError: kaput" in err
    assert "Traceback" in err
    assert run_cli("run", workflow(failing), "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["status"], summary["error"]["node_id"], summary["error"]["type"]) == (
        "error", "1", "execution_error")


def test_run_of_an_invalid_workflow_exits_1_with_its_errors(workflow, capsys):
    assert run_cli("run", workflow(build_prompt(("1", "Output", {}))), "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "invalid"
    assert summary["node_errors"]["1"]["errors"][0]["type"] == "required_input_missing"


def test_run_of_a_file_that_is_not_a_prompt_object_exits_1_with_invalid_prompt(workflow, capsys):
    assert run_cli("run", workflow([1, 2])) == 1
    assert "Invalid prompt: the prompt must be a JSON object of nodes, got list" in capsys.readouterr().err


def test_run_target_runs_only_that_output(workflow, out_dir, capsys):
    assert run_cli("run", workflow(), "--output-dir", str(out_dir), "--target", "5", "--json") == 0
    assert json.loads(capsys.readouterr().out)["executed"] == ["1", "5"]
    assert not out_dir.exists()


ODD_UI_NODES = """
from engine import Int, NodeResult, node

@node(output_node=True)
def Elsewhere(value: Int(0)) -> NodeResult:
    return NodeResult(ui={"images": [{"filename": "x.png", "subfolder": "", "type": "cloud"}]})
"""


def test_run_shows_ui_entries_of_an_unknown_folder_type_instead_of_crashing(workflow, tmp_path, capsys):
    (tmp_path / "odd_nodes.py").write_text(ODD_UI_NODES)
    prompt = workflow(build_prompt(("1", "Elsewhere", {"value": 1})))
    assert cli.main(["run", prompt, "--no-default-nodes", "--nodes", str(tmp_path / "odd_nodes.py")]) == 0
    assert capsys.readouterr().out == '1: {"images": [{"filename": "x.png", "subfolder": "", "type": "cloud"}]}\n'


def test_nodes_lists_schemas(capsys):
    assert run_cli("nodes", "Constant", "Concat") == 0
    assert capsys.readouterr().out.splitlines() == [
        "Constant (Integer constant)  [toy]", "  value: INT default=0 min=-1000 max=1000", "  -> value: INT",
        "Concat  [toy]", "  a: STRING default=", "  b: STRING default=", "  ?separator: STRING default=",
        "  -> text: STRING"]


def test_nodes_json_is_object_info(capsys, registry):
    assert run_cli("nodes", "--json") == 0
    listed = json.loads(capsys.readouterr().out)

    def without_module(info):  # loaded by path here, so the module name differs
        return {name: {k: v for k, v in entry.items() if k != "python_module"} for name, entry in info.items()}
    assert without_module(listed) == without_module(json.loads(json.dumps(registry.object_info())))


def test_nodes_rejects_unknown_class(capsys):
    assert run_cli("nodes", "Nope") == 2
    assert "unknown node classes: Nope" in capsys.readouterr().err


def test_node_modules_from_environment(monkeypatch, capsys):
    monkeypatch.setenv(cli.NODE_MODULES_ENV, TOY_NODES)
    assert cli.main(["nodes", "--no-default-nodes", "Add"]) == 0
    assert capsys.readouterr().out.startswith("Add  [toy]")


def test_unloadable_node_module_is_a_usage_error(capsys):
    assert cli.main(["nodes", "--no-default-nodes", "--nodes", "no_such_module_xyz"]) == 2
    assert "cannot load node module 'no_such_module_xyz'" in capsys.readouterr().err


def test_default_nodes_package_loads_even_when_empty(capsys):
    assert cli.main(["nodes", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_serve_hands_settings_host_port_and_allowed_hosts_to_the_server(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("server")
    fake.serve = lambda settings, host, port, registry, allow_hosts, **options: calls.append(
        (settings, host, port, len(registry), allow_hosts))
    monkeypatch.setitem(sys.modules, "server", fake)
    assert run_cli("serve", "--port", "9000", "--output-dir", str(tmp_path), "--device", "cpu",
                   "--allow-host", "sd.example") == 0
    settings, host, port, node_count, allowed = calls[0]
    assert (host, port, settings.output_dir, settings.device, node_count) == ("127.0.0.1", 9000, tmp_path, "cpu", 23)
    assert allowed == ["sd.example"]


def test_console_script_runs_a_workflow(workflow, out_dir):
    completed = subprocess.run([str(SDGRAPH), "run", workflow(), *NODES, "--output-dir", str(out_dir),
                                "--set", "1.value=8"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[0] == f"4: {out_dir / 'result.txt'}"
    assert (out_dir / "result.txt").read_text() == "8"


def png_with_text(path, **texts):
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value, zip=key == "workflow")
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return str(path)


def test_run_replays_the_prompt_stored_in_a_png(tmp_path, out_dir, capsys):
    image = png_with_text(tmp_path / "ComfyUI_00001_.png", prompt=json.dumps(WORKFLOW),
                          workflow=json.dumps({"nodes": [], "links": [], "note": "ünïcode"}))
    assert run_cli("run", image, "--output-dir", str(out_dir)) == 0
    assert (out_dir / "result.txt").read_text() == "3"


def test_png_without_a_prompt_is_a_usage_error(tmp_path, capsys):
    image = png_with_text(tmp_path / "plain.png", comment="hello")
    assert run_cli("validate", image) == 2
    assert "this PNG carries neither 'prompt' nor 'workflow' metadata" in capsys.readouterr().err


def test_run_with_some_outputs_invalid_runs_the_rest_and_exits_1(workflow, out_dir, capsys):
    mixed = {**WORKFLOW, "6": {"class_type": "Output", "inputs": {}}}
    assert run_cli("run", workflow(mixed), "--output-dir", str(out_dir), "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["status"], summary["failed_outputs"]) == ("success", ["6"])
    assert (out_dir / "result.txt").read_text() == "3"


def test_node_options_also_work_before_the_subcommand(capsys):
    assert cli.main(["--no-default-nodes", "--nodes", TOY_NODES, "nodes", "Add"]) == 0
    assert capsys.readouterr().out.startswith("Add  [toy]")
