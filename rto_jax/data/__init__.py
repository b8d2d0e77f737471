"""Data: row formats (formats.py), tokenization/collation to the CONTRACT layout (tokenize.py),
loading from the hub or local files and a resumable batch iterator (loader.py)."""

from rto_jax.data.formats import (
    FORMATS,
    FormatError,
    PreferenceExample,
    SFTExample,
    get_format,
    parse_rows,
    tldr_prompt,
)
from rto_jax.data.loader import (
    BatchIterator,
    default_config,
    from_config,
    load,
    load_examples,
    load_preference,
    load_prompts,
    load_sft,
    load_table,
    pad_batch,
    train_eval_split,
)
from rto_jax.data.tokenize import (
    PREFERENCE_KEYS,
    PROMPT_KEYS,
    SFT_KEYS,
    DataStats,
    collate,
    collate_prompts,
    encode_prompts,
    encode_responses,
    prompt_only,
    special_ids,
    start_tokens,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)
