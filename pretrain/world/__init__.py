"""The embedded default world: a small bilingual (English / Chinese) synthetic world with checkable answers.

Everything the default loop needs without data from elsewhere starts here: a pretraining corpus, chat
prompts split into train / held-out (dev / test), candidate answers of known quality and an answer checker.
Stdlib only, deterministic by seed (``seeding``). The simulated annotators that label pairs of these answers
live with the preference store, in ``annotation.annotators``. User-facing description: docs/world.md.

tables.py     families, languages, splits, name syllables, answer vocabularies, attributes, operations, units
phrasings.py  question phrasings and answer sentences per question spec and language, filler, refusals
seeding.py    SHA-256-seeded random draws
model.py      Entity, Item (a question instance), World (indexes, split, writing values), make_world
prompts.py    Prompt, sampling a split's prompts
responses.py  Response, candidate answers of each kind (KINDS), minimal pairs (CONTRAST_KINDS)
corpus.py     the pretraining documents (CHAT_MIX)
checking.py   Check, check, on_topic, detect_language, find_numbers
cli.py        python -m glmwb.pretrain.world --out DIR
"""

from glmwb.pretrain.world.checking import check, on_topic
from glmwb.pretrain.world.model import World, make_world
from glmwb.pretrain.world.prompts import Prompt

__all__ = ["Prompt", "World", "check", "make_world", "on_topic"]
