"""Engine vs transformers on a GGUF checkpoint (e.g. SmolLM2-135M-Instruct), greedy, one dtype.

    python scripts/engine_parity.py --gguf PATH [--dtype bfloat16|float32] [--new_tokens 32]

Loads the file with our loader and with transformers (``gguf_file=``), generates greedily from
the same token prompts with our engine and with ``generate``, and prints one JSON object: the
largest |logit| difference at the prompts' last tokens, how many leading tokens agree per
prompt, and how many sequences agree exactly. In float32 (matmuls at "highest" precision) they
are expected to agree exactly; in bfloat16 two implementations round differently, so greedy
paths may part after a near-tie; the leading agreement says how soon. Runs on any backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["What is 12 times 7?", "Name three colors of the rainbow.", "Write a haiku about rain.",
           "Explain photosynthesis in one sentence."]


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--new_tokens", type=int, default=32)
    a = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    from inference_worker.engine import Engine, SamplingParams
    from rlax_tpu import models

    if a.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d, name = os.path.split(os.path.abspath(a.gguf))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=getattr(torch, a.dtype)).to(device).eval()
    model, cfg = models.load(a.gguf, dtype=a.dtype)
    eos = tok.eos_token_id
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for c in PROMPTS]
    expected, logit_diff = [], 0.0
    for p in prompts:
        x = torch.tensor([p], device=device)
        with torch.no_grad():
            ref_logits = hf(x).logits[0, -1].float().cpu().numpy()
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=a.new_tokens,
                              eos_token_id=eos, pad_token_id=eos)
        ours = np.asarray(jax.jit(lambda m, t: m(t))(model, np.asarray([p], np.int32))[0, -1], np.float32)
        logit_diff = max(logit_diff, float(np.abs(ours - ref_logits).max()))
        new = out[0, len(p):].tolist()
        expected.append(new[: new.index(eos) + 1] if eos in new else new)
    max_seq_len = -(-(max(map(len, prompts)) + a.new_tokens) // 16) * 16
    engine = Engine(model, cfg, max_batch=len(prompts), max_seq_len=max_seq_len, max_prefill_batch=len(prompts),
                    decode_chunk=a.new_tokens, max_decode_chunk=a.new_tokens, page_size=16, num_pages=0)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens, n=1,
                                                   stop_token_ids=(eos,)))
    got = [o[0].tokens for o in outs]
    lead = [leading_agreement(g, e) for g, e in zip(got, expected, strict=True)]
    print(json.dumps(dict(
        dtype=a.dtype, backend=jax.default_backend(), torch_device=device, prompts=len(prompts),
        new_tokens=a.new_tokens, max_abs_logit_diff_last_prompt_token=logit_diff,
        leading_tokens_agreeing=lead, reference_lengths=[len(e) for e in expected],
        exact_sequences=sum(g == e for g, e in zip(got, expected, strict=True)), seconds=time.time() - t0)))


if __name__ == "__main__":
    main()
