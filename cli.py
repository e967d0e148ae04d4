"""The `sdgraph` command: validate and run API-format workflows, list node types, serve the HTTP API.

    sdgraph validate WORKFLOW.json
    sdgraph run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--output-dir DIR] [--json] ...
    sdgraph nodes [--json] [CLASS ...]
    sdgraph serve [--listen 127.0.0.1] [--port 8188] [--auth-token T] [--database PATH] [folder options]

Node types come from the `nodes` package plus every `--nodes MODULE` (a dotted name, a `.py` file or a
package folder; repeatable) and the comma-separated SDGRAPH_NODE_MODULES variable: that is also how
custom nodes are installed. `--models-dir` may be given several times: models are looked for in the
folders in the order given (the first is where new ones belong). Exit status: 0 success, 1 invalid
workflow or failed run, 2 bad usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from engine import Executor, Registry, ResultCache, RunSettings, import_node_module, validate_prompt
from engine.events import Event, Executing, Progress
from engine.executor import ExecutionResult
from engine.workflow import PromptFormatError, WorkflowDocument, load_workflow_document

WORKFLOW_HELP = "workflow JSON (API or UI format), a POST /prompt body, or a PNG with its prompt or workflow embedded"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
NODE_MODULES_ENV = "SDGRAPH_NODE_MODULES"
AUTH_TOKEN_ENV = "SDGRAPH_AUTH_TOKEN"


class UsageError(Exception):
    """A problem with the command line or its files, reported as one message with exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        default_nodes = not (args.no_default_nodes or args.global_no_default_nodes)
        registry = load_registry([*args.global_nodes, *args.nodes], default_nodes=default_nodes)
        return args.handler(args, registry)
    except UsageError as problem:
        print(f"sdgraph: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdgraph: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `sdgraph nodes | head`: the reader left, nothing more to say
        sys.stderr.close()
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nodes", action="append", default=[], metavar="MODULE",
                        help="also load node types from MODULE (dotted name, .py file or package folder)")
    common.add_argument("--no-default-nodes", action="store_true",
                        help="do not load the built-in `nodes` package (only --nodes modules)")
    folders = argparse.ArgumentParser(add_help=False)
    folders.add_argument("--models-dir", type=Path, action="append", default=None, metavar="DIR",
                         help="model folders, ComfyUI's layout (default: models); repeat for more roots, "
                              "searched in the order given")
    folders.add_argument("--input-dir", type=Path, default=Path("input"), help="input images (default: input)")
    folders.add_argument("--output-dir", type=Path, default=Path("output"), help="saved outputs (default: output)")
    folders.add_argument("--temp-dir", type=Path, default=Path("temp"), help="previews (default: temp)")
    folders.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                         help="where models run (default: auto)")
    folders.add_argument("--preview", choices=["auto", "none", "latent2rgb"], default="auto",
                         help="live sampler previews (default: auto)")

    parser = argparse.ArgumentParser(prog="sdgraph", description="Run ComfyUI-format Stable Diffusion workflows.")
    # The node options work before the subcommand too (`sdgraph --nodes pack run wf.json`).
    parser.add_argument("--nodes", dest="global_nodes", action="append", default=[], metavar="MODULE",
                        help=argparse.SUPPRESS)
    parser.add_argument("--no-default-nodes", dest="global_no_default_nodes", action="store_true",
                        help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, help_text, parents in SUBCOMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  parents=[common, folders] if parents == "folders" else [common])
        ARGUMENTS.get(name, lambda _: None)(sub)
        sub.set_defaults(handler=handler)
    return parser


def load_registry(extra_modules: Sequence[str], default_nodes: bool = True) -> Registry:
    registry = Registry()
    from_env = [m.strip() for m in os.environ.get(NODE_MODULES_ENV, "").split(",") if m.strip()]
    for reference in ["nodes"] * default_nodes + [*from_env, *extra_modules]:
        try:
            registry.load_module(import_node_module(reference))
        except (ImportError, ValueError) as problem:
            raise UsageError(f"cannot load node module {reference!r}: {problem}") from problem
    return registry


def settings_from(args: argparse.Namespace) -> RunSettings:
    models_dirs = args.models_dir or [Path("models")]
    return RunSettings(models_dir=models_dirs[0], extra_models_dirs=tuple(models_dirs[1:]), input_dir=args.input_dir,
                       output_dir=args.output_dir, temp_dir=args.temp_dir, device=args.device, preview=args.preview)


def read_workflow(path: Path, registry: Registry) -> WorkflowDocument:
    """API JSON, UI-format JSON (converted with the registry's schemas) or a PNG with embedded metadata."""
    try:
        return load_workflow_document(path, registry)
    except PromptFormatError as problem:
        raise UsageError(str(problem)) from problem


# --- validate ---------------------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace, registry: Registry) -> int:
    result = validate_prompt(read_workflow(args.workflow, registry).prompt, registry, settings=settings_from(args))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    problems = result.messages()
    if not args.json:
        print("\n".join(problems) if problems else "ok")
    return EXIT_OK if not problems else EXIT_FAILED


# --- run --------------------------------------------------------------------------------------------------

def apply_overrides(prompt: dict[str, Any], overrides: Sequence[str], registry: Registry) -> dict[str, Any]:
    """Apply `NODE_ID.INPUT=VALUE` settings; VALUE is JSON when it parses as JSON, else a plain string."""
    if not isinstance(prompt, dict):
        return prompt  # not a prompt at all: validation names the problem
    prompt = {node_id: {**body, "inputs": dict(body.get("inputs", {}))} if isinstance(body, dict) else body
              for node_id, body in prompt.items()}
    for override in overrides:
        target, equals, raw = override.partition("=")
        node_id, dot, input_name = target.rpartition(".")
        if not equals or not dot or not node_id or not input_name:
            raise UsageError(f"--set {override!r}: expected NODE_ID.INPUT=VALUE")
        body = prompt.get(node_id)
        if not isinstance(body, dict):
            raise UsageError(f"--set {override!r}: no node {node_id!r} in the workflow (nodes: {', '.join(prompt)})")
        node_type = registry.get(body.get("class_type", ""))
        known = set(body["inputs"]) | set(node_type.inputs if node_type else ())
        if input_name not in known:
            raise UsageError(f"--set {override!r}: node {node_id} ({body.get('class_type')}) has no input "
                             f"{input_name!r}; its inputs are {', '.join(sorted(known)) or 'none'}")
        try:
            body["inputs"][input_name] = json.loads(raw)
        except json.JSONDecodeError:
            body["inputs"][input_name] = raw
    return prompt


class ProgressDisplay:
    """Node lines and a progress bar on stderr, driven by execution events."""

    def __init__(self, workflow: dict[str, Any], stream: TextIO) -> None:
        from tqdm import tqdm
        self._tqdm = tqdm
        self.workflow = workflow
        self.stream = stream
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Executing):
            self._close()
            if event.node is not None:
                class_type = self.workflow.get(event.node, {}).get("class_type", "?")
                print(f"executing {event.node} ({class_type})", file=self.stream, flush=True)
        elif isinstance(event, Progress):
            if self.bar is None:
                self.bar = self._tqdm(total=event.max, file=self.stream, leave=False, unit="step",
                                      desc=f"node {event.node}")
            self.bar.total = event.max
            self.bar.n = event.value
            self.bar.refresh()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def output_files(result: ExecutionResult, settings: RunSettings) -> dict[str, list[str]]:
    """The files each node's `ui` output names (`{"filename", "subfolder", "type"}` entries), as paths."""
    files: dict[str, list[str]] = {}
    for node_id, ui in result.outputs.items():
        for entries in ui.values():
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and "filename" in entry:
                    try:
                        folder = settings.folder_for(entry.get("type", "output"))
                    except ValueError:  # not one of our folders: the ui data is shown as it is
                        continue
                    path = folder / entry.get("subfolder", "") / entry["filename"]
                    files.setdefault(node_id, []).append(str(path))
    return files


def run_summary(result: ExecutionResult, settings: RunSettings, seconds: float) -> dict[str, Any]:
    files = output_files(result, settings)
    error = None
    if result.status == "invalid":
        error = result.validation.to_json()
    elif result.error is not None:
        error = {"type": result.error.type, **result.error.data()}
    return {"status": result.status, "prompt_id": result.prompt_id,
            "outputs": {node_id: {"ui": ui, "files": files.get(node_id, [])} for node_id, ui in result.outputs.items()},
            "executed": list(result.executed), "cached": list(result.cached),
            "timings": {node_id: round(s, 6) for node_id, s in result.timings.items()},
            "total_seconds": round(seconds, 6), "error": error,
            "failed_outputs": list(result.validation.failed_outputs),
            "node_errors": result.validation.to_json()["node_errors"]}


def cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    settings = settings_from(args)
    document = read_workflow(args.workflow, registry)
    prompt = apply_overrides(document.prompt, args.set, registry)
    executor = Executor(registry, settings=settings)
    if not args.json:
        executor.subscribe(ProgressDisplay(prompt, sys.stderr))
    started = time.perf_counter()
    # The UI workflow rides along as ComfyUI's extra_pnginfo, so saved images can be reopened in an editor.
    extra_data = {"extra_pnginfo": {"workflow": document.ui_workflow}} if document.ui_workflow else None
    result = executor.execute(prompt, targets=args.target or None, extra_data=extra_data)
    summary = run_summary(result, settings, time.perf_counter() - started)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_run(result, summary)
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    # Valid outputs run even when others fail validation (as in ComfyUI), but the run still counts as failed.
    return EXIT_OK if result.ok and not result.validation.failed_outputs else EXIT_FAILED


def print_run(result: ExecutionResult, summary: dict[str, Any]) -> None:
    for line in result.validation.messages():
        print(line, file=sys.stderr)
    if result.error is not None:
        error = result.error.data()
        print(f"node {error['node_id']} ({error['node_type']}) failed: "
              f"{error.get('exception_type', 'interrupted')}: {error.get('exception_message', '')}", file=sys.stderr)
        print("".join(error.get("traceback", [])), end="", file=sys.stderr)
    for node_id, output in summary["outputs"].items():
        for path in output["files"]:
            print(f"{node_id}: {path}")
        if not output["files"]:
            print(f"{node_id}: {json.dumps(output['ui'], default=str)}")
    if result.ok:
        print(f"done in {summary['total_seconds']:.2f} s ({len(result.executed)} executed, "
              f"{len(result.cached)} cached)", file=sys.stderr)


# --- nodes ------------------------------------------------------------------------------------------------

def cmd_nodes(args: argparse.Namespace, registry: Registry) -> int:
    unknown = [name for name in args.classes if name not in registry]
    if unknown:
        raise UsageError(f"unknown node classes: {', '.join(unknown)}")
    info = registry.object_info(settings_from(args))
    chosen = {name: info[name] for name in (args.classes or info)}
    if args.json:
        print(json.dumps(chosen, indent=2))
        return EXIT_OK
    if not chosen:
        print("no node types registered")
    for name, entry in chosen.items():
        print(describe_node(entry))
    return EXIT_OK


def describe_node(entry: dict[str, Any]) -> str:
    title = entry["name"] + (f" ({entry['display_name']})" if entry["display_name"] != entry["name"] else "")
    lines = [f"{title}  [{entry['category'] or 'uncategorised'}]" + ("  output node" if entry["output_node"] else "")]
    for group in ("required", "optional"):
        for name, spec in entry["input"].get(group, {}).items():
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 else {}
            shown = {k: v for k, v in options.items() if k in ("default", "min", "max", "step")}
            if isinstance(spec[0], list):
                shown["options"] = spec[0] if len(spec[0]) <= 8 else spec[0][:8] + ["..."]
            suffix = " ".join(f"{k}={v}" for k, v in shown.items())
            lines.append(f"  {'' if group == 'required' else '?'}{name}: {kind} {suffix}".rstrip())
    for output_type, output_name in zip(entry["output"], entry["output_name"]):
        lines.append(f"  -> {output_name}: {output_type}")
    return "\n".join(lines)


# --- serve ------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace, registry: Registry) -> int:
    import server  # the HTTP layer loads aiohttp; only `serve` needs it
    serve: Callable[..., Any] | None = getattr(server, "serve", None)
    if serve is None:
        raise UsageError("this build's server.py has no serve() function")
    settings = settings_from(args)
    executor = None if args.cache_size is None else Executor(registry, cache_of_size(args.cache_size), settings)
    # The model manager (nodes/runtime.py, when the built-in nodes have one) releases models on POST /free.
    free_models = getattr(sys.modules.get("nodes.runtime"), "free_models", None)
    chosen = {"database": args.database, "auth_token": args.auth_token or None, "executor": executor,
              "free_models": free_models if callable(free_models) else None}
    # Only what was chosen: serve() has its own defaults for the rest.
    result = serve(settings, host=args.listen, port=args.port, registry=registry, allow_hosts=args.allow_host,
                   **{name: value for name, value in chosen.items() if value is not None})
    return EXIT_OK if result is None else int(result)


SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def cache_of_size(size: str) -> ResultCache:
    """`--cache-size`: a byte budget for cached node results such as `8G` or `512M` (binary units);
    `0` turns caching off. Without the option, the engine's default (the most recent 1024 results)."""
    text = size.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:] in SIZE_UNITS else ""
    try:
        amount = float(text[:len(text) - len(unit)])
    except ValueError:
        raise UsageError(f"--cache-size {size!r}: expected a size such as 8G, 512M or 0") from None
    if not math.isfinite(amount) or amount < 0:
        raise UsageError(f"--cache-size {size!r} must be a finite size, not negative")
    budget = int(amount * SIZE_UNITS[unit])
    return ResultCache(max_entries=0) if budget == 0 else ResultCache(max_entries=None, max_bytes=budget)


def _validate_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
    sub.add_argument("--json", action="store_true", help="print the errors as ComfyUI's JSON answer")


def _run_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
    sub.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (VALUE parsed as JSON when possible, else a string)")
    sub.add_argument("--target", action="append", default=[], metavar="NODE_ID",
                     help="run only this output node and its ancestors (repeatable)")
    sub.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")


def _nodes_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("classes", nargs="*", metavar="CLASS", help="only these node classes")
    sub.add_argument("--json", action="store_true", help="print the /object_info JSON")


def _serve_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--listen", "--host", dest="listen", default="127.0.0.1", metavar="ADDRESS",
                     help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes it to the network)")
    sub.add_argument("--port", type=int, default=8188)
    sub.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_ENV), metavar="TOKEN",
                     help=f"require 'Authorization: Bearer TOKEN' on every route (default: ${AUTH_TOKEN_ENV})")
    sub.add_argument("--database", type=Path, default=None, metavar="PATH",
                     help="the SQLite file keeping queue and history (default: .sdgraph-queue.sqlite3 in "
                          "the output folder)")
    sub.add_argument("--cache-size", default=None, metavar="SIZE",
                     help="memory budget for cached node results, e.g. 8G (0: no caching)")
    sub.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="also answer requests for this host name (a loopback server refuses other names)")


# name, handler, help, which shared options: the table to extend with new subcommands.
SUBCOMMANDS = [
    ("validate", cmd_validate, "check a workflow and print every error, or 'ok'", "folders"),
    ("run", cmd_run, "run a workflow and print where its outputs went", "folders"),
    ("nodes", cmd_nodes, "list node types with their schemas", "folders"),
    ("serve", cmd_serve, "serve ComfyUI's HTTP and websocket API", "folders"),
]
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "validate": _validate_arguments, "run": _run_arguments, "nodes": _nodes_arguments, "serve": _serve_arguments,
}

if __name__ == "__main__":
    sys.exit(main())
