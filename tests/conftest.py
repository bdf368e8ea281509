"""Shared pytest fixtures: small, fast, built from nothing outside the repository."""

from __future__ import annotations

import itertools
import os

import torch

# Triton kernels run on a CPU under Triton's interpreter, which must be chosen before triton is first
# imported (transformers' model files and torch._dynamo import it), so it is set here, first of all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Iterator

import pytest

# A small bilingual corpus for the tiny tokenizer: English and Chinese sentences, mixed text, numbers,
# code-ish JSON, and rendered GLM chats (so the special tokens occur in the training text).
_EN = [
    "The quick brown fox jumps over the lazy dog.",
    "A reward model scores two answers and the better one is chosen.",
    "Preference data trains the policy with DPO or PPO.",
    "How is the weather in Beijing today? It is sunny and warm.",
    "Please write a short poem about the sea and the moon.",
    "The model answers the question, then the user asks another one.",
    "Numbers like 12, 345 and 2024 appear in text too.",
]
_ZH = [
    "今天北京的天气很好，阳光明媚。",
    "奖励模型给两个回答打分，选出更好的一个。",
    "我们用偏好数据训练策略模型。",
    "请写一首关于大海和月亮的短诗。",
    "模型回答了问题，然后用户又问了一个问题。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "人工智能助手可以调用工具来查询天气。",
]
_MIXED = [
    "GLM-4 是一个中英双语模型 (bilingual model)。",
    "用户说 hello，助手回答 你好！😀",
    '{"city": "北京", "unit": "celsius", "days": 3}',
]
_CHATS = [
    "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\n{q}<|assistant|>\n{a}",
    "[gMASK]<sop><|user|>\n{q}<|assistant|>get_weather\n"
    '{{"city": "北京"}}<|observation|>\n{{"temp": 20}}<|assistant|>\n{a}',
]


def tiny_corpus(repeats: int = 20) -> Iterator[str]:
    """Yield the tiny bilingual corpus ``repeats`` times (BPE needs repeated pairs to learn merges)."""
    questions = _EN[:3] + _ZH[:3]
    answers = _EN[3:] + _ZH[3:]
    for _ in range(repeats):
        yield from _EN
        yield from _ZH
        yield from _MIXED
        for template, (q, a) in itertools.product(_CHATS, zip(questions, answers, strict=False)):
            yield template.format(q=q, a=a)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 800) with GLM's special tokens and chat template.

    Trained in well under a second, saved with ``save_pretrained`` and loaded back with
    ``AutoTokenizer`` (so tests use what users load); its folder is ``tiny_tokenizer.name_or_path``.
    """
    from transformers import AutoTokenizer

    from glmwb.pretrain.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(
        tiny_corpus(), vocab_size=800, show_progress=False, model_max_length=1024
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def glm4_tokenizer_folder(tmp_path_factory):
    """A folder like THUDM's glm-4-9b-chat-hf tokenizer: GLM-4's special tokens at 151329..151342, GLM-4's
    official chat template, eos = pad = <|endoftext|> (tests/glm4_fixture.py; built in about a second)."""
    from tests.glm4_fixture import build_glm4_tokenizer

    return build_glm4_tokenizer(tmp_path_factory.mktemp("glm4_tokenizer"))


@pytest.fixture(scope="session")
def glm4_tokenizer(glm4_tokenizer_folder):
    """The glm-4-9b-chat-hf stand-in as loaded as is (its official template), with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(glm4_tokenizer_folder)
