"""sdgraph's graph engine: node declaration, validation, execution and caching. Imports no torch.

The public surface, for nodes, the server and the CLI:
- declare nodes: `node`, `Int`, `Float`, `String`, `Boolean`, `Combo`, `Socket`, `Hidden`, `NodeResult`,
  `ExecutionContext`, `Interrupted`, `ALWAYS_RERUN`
- know them: `Registry` (`object_info()`, `load_module()`), `import_node_module`
- check and run prompts: `validate_prompt`, `Executor`, `ResultCache`, `RunSettings`, events in `engine.events`
"""
from engine.cache import ResultCache
from engine.context import ExecutionContext, Interrupted, RunSettings
from engine.executor import ExecutionResult, Executor
from engine.schema import ALWAYS_RERUN, NodeResult, NodeType, Output, Registry, import_node_module, node
from engine.types import Boolean, Combo, Float, Hidden, Int, Socket, String
from engine.validate import ValidationResult, validate_prompt

__all__ = [
    "ALWAYS_RERUN", "Boolean", "Combo", "ExecutionContext", "ExecutionResult", "Executor", "Float", "Hidden",
    "Int", "Interrupted", "NodeResult", "NodeType", "Output", "Registry", "ResultCache", "RunSettings", "Socket",
    "String", "ValidationResult", "import_node_module", "node", "validate_prompt",
]
