"""The PyTorch peers of our benchmark: transformers' Llama and TRL's `DPOTrainer`, built for a benchmark shape.

benchmarks/torch_rows.py times these against our rows; this module only builds the external projects'
objects (calling the installed `transformers`, `tokenizers`, `datasets` and `trl`). A `shape` is one
entry of `benchmarks.workloads.SHAPES`: ``vocab_size``, ``hidden_size``, ``intermediate_size``,
``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``rope_theta``, ``norm_eps``,
``tie_word_embeddings``.
"""

from __future__ import annotations

import torch

__all__ = ["ValueModel", "causal_lm", "llama_config", "trl_dpo_trainer", "word_level_tokenizer"]


def llama_config(shape: dict, *, pad_token_id: int, **extra):
    """transformers' `LlamaConfig` of `shape`: default RoPE, SDPA attention, no BOS/EOS ids, 4096 positions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        rms_norm_eps=shape["norm_eps"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
        **extra,
    )


def causal_lm(shape: dict, *, pad_token_id: int, seed: int = 0):
    """transformers' `LlamaForCausalLM` of `shape`, float32, random init after `torch.manual_seed(seed)`.

    Called as ``model(input_ids=[B, T], logits_to_keep=K).logits`` -> ``[B, K, V]``.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape, pad_token_id=pad_token_id)).float()


class ValueModel(torch.nn.Module):
    """transformers' `LlamaModel` + a bias-free scalar head on every position: our ScalarHeadModel.

    ``forward(input_ids [B, T]) -> [B, T]`` values (critic) or scores (reward model, read at the last token).
    Initialised from torch's current RNG state (no seeding here).
    """

    def __init__(self, shape: dict, *, pad_token_id: int):
        from transformers import LlamaModel

        super().__init__()
        config = llama_config(shape, pad_token_id=pad_token_id)
        self.model = LlamaModel(config)
        self.head = torch.nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids):
        return self.head(self.model(input_ids=input_ids).last_hidden_state)[..., 0]


def word_level_tokenizer(vocab_size: int, *, first_token: int, pad_id: int, eos_id: int):
    """A transformers fast tokenizer over words ``t{first_token}`` .. ``t{vocab_size - 1}``, one word one id.

    ``<pad>`` is `pad_id` (also the unknown token), ``<eos>`` is `eos_id`; words split on whitespace. So a
    text row of N words tokenizes to exactly N ids, which lets TRL see the lengths of our benchmark rows.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": pad_id, "<eos>": eos_id, **{f"t{i}": i for i in range(first_token, vocab_size)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def trl_dpo_trainer(model, ref_model, tokenizer, examples, *, pairs, steps, out_dir, callbacks=(), beta=0.1):
    """TRL's `DPOTrainer` (sigmoid loss, reference model run in the step) on text `examples`, on CPU.

    `examples` are ``{"prompt", "chosen", "rejected"}`` dicts; `pairs` preference pairs per step (a batch
    of 2 * pairs sequences), `steps` optimizer steps; AdamW lr 1e-5, beta2 0.95, gradient-norm clip 1.0,
    constant schedule, no truncation, no logging or checkpoints (`out_dir` is TRL's output folder).
    Raises ModuleNotFoundError when `trl` is not installed.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=pairs,
        max_steps=steps,
        learning_rate=1e-5,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        beta=beta,
        max_length=None,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
