"""inference_worker package."""
