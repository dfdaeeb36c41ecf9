"""Episodes: environments driven by the model's turns, with tools (see docs/envs.md).

    env = envs.make_env(config, count_tokens=lambda s: len(tokenizer.encode(s)))
    messages = env.reset(problem)
    new_messages, reward, done, info = env.step(model_turn)

envs.parse_tool_calls(turn) reads Hermes/Qwen <tool_call> tags and Llama 3 JSON calls.
"""

from rlax_tpu.envs.base import Environment, EnvLimits, Infra, TaskEnv, ToolEnv
from rlax_tpu.envs.registry import ENVS, make_env
from rlax_tpu.envs.tool_calls import ParsedTurn, ToolCall, ToolCallError, format_call, parse_tool_calls
from rlax_tpu.envs.tools import Tool, Toolbox, ToolError

__all__ = ["ENVS", "EnvLimits", "Environment", "Infra", "ParsedTurn", "TaskEnv", "Tool", "ToolCall",
           "ToolCallError", "ToolEnv", "ToolError", "Toolbox", "format_call", "make_env", "parse_tool_calls"]
