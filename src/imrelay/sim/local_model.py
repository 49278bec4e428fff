"""A tiny local model, built on the spot: for trying ``type: local`` and for tests, offline.

:func:`build_tiny_model` writes a model directory in Hugging Face layout, as
``save_pretrained`` writes one, without downloading anything: a byte-level BPE tokenizer is
trained on a few hundred built-in English and Chinese words (the ``tokenizers`` library), wrapped
as a ``PreTrainedTokenizerFast`` with a ChatML-style chat template, and saved beside a GPT-2
causal language model of one layer with random weights (a few hundred kilobytes).

The answers are gibberish, but they are made of words: the output layer is rescaled so that
tokens that decode to printable, whole characters are far likelier than special tokens,
whitespace or partial UTF-8 bytes. So greedy decoding never stops early (an answer is always
``max_tokens`` long) and sampling almost never does. Weights come from a seeded generator: the
same seed builds the same model.

Needs the optional extra ``imrelay[local]`` (torch and transformers) and ``tokenizers``.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

__all__ = ["CHAT_TEMPLATE", "CORPUS_WORDS", "build_tiny_model"]

CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The ChatML-style template the tiny tokenizer carries (Qwen's layout, without tools)."""

_CORPUS: Final = (
    "the a an and or but if then when where why how what who which this that these those "
    "is are was were be been being have has had do does did will would can could should may "
    "might must shall i you he she it we they me him her us them my your his its our their "
    "hello world model answer question message reply gateway server client token stream "
    "robot group chat user system assistant help please thanks sorry yes no okay good bad "
    "time day week month year today tomorrow yesterday morning evening night hour minute "
    "data file code test build run deploy config error warning info debug trace metric log "
    "quick brown fox jumps over lazy dog red green blue black white small large fast slow "
    "one two three four five six seven eight nine ten hundred thousand first last next "
    "你 好 世 界 模 型 回 答 问 题 消 息 机 器 人 群 聊 天 用 户 系 统 助 手 谢 请 "
    "是 的 不 了 在 有 我 他 她 们 这 那 个 上 下 大 小 中 文 字 今 明 昨 早 晚 "
    "你好 世界 模型 回答 问题 消息 机器人 群聊 聊天 用户 系统 助手 谢谢 今天 明天"
)
CORPUS_WORDS: Final = tuple(_CORPUS.split())
"""The words the tokenizer is trained on."""

_UNKNOWN: Final = "<unk>"
_TEXT_END: Final = "<|endoftext|>"  # begins a text, pads a batch
_TURN_END: Final = "<|im_end|>"  # ends a chat turn: the end of an answer
_SPECIAL_TOKENS: Final = (_UNKNOWN, _TEXT_END, "<|im_start|>", _TURN_END)
_VOCAB_SIZE: Final = 512
_WORD_LOGIT_SCALE: Final = 40.0

ImportModule = Callable[[str], ModuleType]


def build_tiny_model(
    directory: str | pathlib.Path,
    *,
    seed: int = 0,
    chat_template: bool = True,
    n_positions: int = 4096,
    import_module: ImportModule = importlib.import_module,
) -> pathlib.Path:
    """Write a tiny random-weight causal LM and its tokenizer to ``directory``.

    Args:
        directory: where to write (created if missing); existing files of the same names are
            replaced.
        seed: seeds the weights; the tokenizer is the same for every seed.
        chat_template: give the tokenizer :data:`CHAT_TEMPLATE`; without one, a backend must
            build the prompt itself.
        n_positions: the longest sequence (prompt and answer) the model accepts.
        import_module: imports ``torch``, ``transformers`` and ``tokenizers`` (injected by
            tests).

    Returns:
        The directory, holding ``config.json``, ``generation_config.json``,
        ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and, with a chat
        template, ``chat_template.jinja``.
    """
    torch = import_module("torch")
    transformers = import_module("transformers")
    target = pathlib.Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(import_module("tokenizers"), transformers)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(target))
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=32,
        n_positions=n_positions,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    _favour_words(torch, model, tokenizer)
    model.save_pretrained(str(target))
    return target


def _build_tokenizer(tokenizers: Any, transformers: Any) -> Any:
    """Train a byte-level BPE tokenizer on :data:`CORPUS_WORDS` and wrap it for transformers."""
    pre = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=_UNKNOWN))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each word alone and in a few running sentences, so pairs across spaces are learnt too.
    lines = [
        *CORPUS_WORDS,
        *(" ".join(CORPUS_WORDS[i : i + 12]) for i in range(0, len(CORPUS_WORDS), 6)),
    ]
    tokenizer.train_from_iterator(lines, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=_UNKNOWN,
        bos_token=_TEXT_END,
        eos_token=_TURN_END,
        pad_token=_TEXT_END,
    )


def _favour_words(torch: Any, model: Any, tokenizer: Any) -> None:
    """Scale up the output rows of word tokens; zero those of the others (see module doc)."""
    weight = model.lm_head.weight
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for token_id in range(weight.shape[0]):
            text = tokenizer.decode([token_id])
            wordlike = (
                token_id not in special
                and text.strip() != ""
                and text.isprintable()
                and "\ufffd" not in text  # a lone byte of a multi-byte character
            )
            weight[token_id].mul_(_WORD_LOGIT_SCALE if wordlike else 0.0)
