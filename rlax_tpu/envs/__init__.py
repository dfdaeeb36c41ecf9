"""Episodes: environments driven by the model's turns, with tools (see docs/envs.md).

    env = envs.make_env(config, count_tokens=lambda s: len(tokenizer.encode(s)))
    messages = env.reset(problem)
    new_messages, reward, done, info = env.step(model_turn)

envs.parse_tool_calls(turn) reads Hermes/Qwen <tool_call> tags and Llama 3 JSON calls.
envs.Episode keeps an episode's tokens (model tokens as sampled, environment turns rendered once).
"""

from rlax_tpu.envs.base import Environment, EnvLimits, Infra, TaskEnv, ToolEnv
from rlax_tpu.envs.episode import EnvTurnRenderer, Episode, EpisodeError, episode_prompt
from rlax_tpu.envs.registry import ENVS, make_env
from rlax_tpu.envs.tool_calls import ParsedTurn, ToolCall, ToolCallError, format_call, parse_tool_calls
from rlax_tpu.envs.tools import Tool, Toolbox, ToolError

__all__ = ["ENVS", "EnvLimits", "EnvTurnRenderer", "Environment", "Episode", "EpisodeError", "Infra", "ParsedTurn",
           "TaskEnv", "Tool", "ToolCall", "ToolCallError", "ToolEnv", "ToolError", "Toolbox", "episode_prompt",
           "format_call", "make_env", "parse_tool_calls"]
