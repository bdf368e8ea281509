"""A stand-in for THUDM's glm-4-9b-chat-hf tokenizer folder, built in a second with no download: GLM-4's
fourteen added tokens at GLM-4's own ids (151329 ``<|endoftext|>`` ... 151338 ``<|observation|>``, then the
image / video tokens), GLM-4's official chat template, eos = pad = ``<|endoftext|>``, left padding. Only the
ordinary vocabulary is small: the tiny test corpus's BPE, at ids 0..~790, then unused filler entries up to
151328, so that every id the code reads has to come from the tokenizer (no id of ours is 151329).

``OFFICIAL_GLM4_TEMPLATE`` is the chat template of glm-4-9b-chat's ``tokenizer_config.json`` (also shipped in
glm-4-9b-chat-hf): its text for function tools, system / user / assistant / observation messages, ``metadata``
and the generation prompt, transcribed so the golden tests can render it through ``transformers`` beside
ours. Its three built-in tools (python, simple_browser, cogview; long fixed Chinese texts) are left out: our
template refuses them, so no test renders them.
"""

from __future__ import annotations

import json
from pathlib import Path

# glm-4-9b-chat's chat template, function-tool branch (the `{% elif tool['type'] == 'python' %}` ...
# `cogview` branches of the original are cut at the `{% endif %}` they end with).
OFFICIAL_GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n"
    "# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# GLM-4's added tokens in id order from 151329 (glm-4-9b-chat-hf's tokenizer.json); its model vocabulary is
# 151,552 (padded past the last token).
GLM4_FIRST_SPECIAL_ID = 151329
GLM4_ADDED_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
)  # fmt: skip
GLM4_VOCAB_SIZE = 151552
GLM4_IDS = {t: GLM4_FIRST_SPECIAL_ID + i for i, t in enumerate(GLM4_ADDED_TOKENS)}


def build_glm4_tokenizer(folder: str | Path) -> Path:
    """Write the stand-in tokenizer folder (see the module docstring) and return its path."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from glmwb.pretrain.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from tests.conftest import tiny_corpus

    trained = train_tokenizer(tiny_corpus(), vocab_size=800, show_progress=False)
    spec = json.loads(trained.backend_tokenizer.to_str())
    regular = sorted(
        (t for t in spec["model"]["vocab"] if t not in SPECIAL_TOKENS), key=spec["model"]["vocab"].get
    )
    vocab = {t: i for i, t in enumerate(regular)}
    # fillers no merge can produce (the BPE only makes tokens its merges name), so text never encodes to them
    vocab.update({f"<unused_{i}>": i for i in range(len(regular), GLM4_FIRST_SPECIAL_ID)})
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in GLM4_IDS.items()
    ]  # fmt: skip
    backend = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in GLM4_ADDED_TOKENS if t != "<|endoftext|>"],
        padding_side="left",
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        chat_template=OFFICIAL_GLM4_TEMPLATE,
    )
    assert [tok.convert_tokens_to_ids(t) for t in GLM4_ADDED_TOKENS] == list(GLM4_IDS.values())
    folder = Path(folder)
    tok.save_pretrained(folder)
    return folder
