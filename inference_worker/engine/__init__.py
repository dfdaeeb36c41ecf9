"""The inference engine: KV cache, continuous batching over fixed slots, and sampling."""

from inference_worker.engine.engine import FINISH_REASONS, Completion, Engine, EngineError
from inference_worker.engine.sampling import SamplingError, SamplingParams

__all__ = ["FINISH_REASONS", "Completion", "Engine", "EngineError", "SamplingError", "SamplingParams"]
