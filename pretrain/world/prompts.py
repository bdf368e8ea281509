"""Chat prompts: one question instance asked in one language and one phrasing, sampled per split.

Every instance is asked in English or Chinese with one of four phrasings (``phrasings``); about 20 % of
prompts start with a system turn. ``sample_prompts`` (``World.prompts``) draws ``n`` distinct prompts of a
split (``train``, ``heldout`` or its halves ``dev`` and ``test``; see ``model`` for the split itself): 50 %
facts, 30 % arithmetic, 20 % conversion, every instance before any repeats in another language or phrasing.
A ``Prompt`` carries its gold value, a reference answer and its world's key, so ``checking.check`` can grade
an answer to a prompt read back from JSONL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from glmwb.pretrain.world.phrasings import SYSTEM
from glmwb.pretrain.world.seeding import digest, seeded_rng, weighted_choice
from glmwb.pretrain.world.tables import LANGS, SPLITS

if TYPE_CHECKING:
    from glmwb.pretrain.world.model import Item, World


@dataclass(frozen=True)
class Prompt:
    id: str  # "{family}/{key}/{lang}/t{phrasing}"
    messages: list[dict[str, str]]  # [optional system turn], user turn
    lang: str  # "en" | "zh"
    family: str  # "arithmetic" | "conversion" | "fact"
    gold: str  # the canonical answer value in the prompt's language: "42", "red", "红色", "Kelton"
    reference: str  # an ideal answer in the prompt's language
    key: str = ""  # the language-independent question instance ("add:7:5", "person:Zorven:colour")
    answer_type: str = "number"  # number | colour | job | food | product | city | country
    world_key: tuple[int, int] = (0, 96)  # (seed, num_entities) of the World that asked it, for check()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["world_key"] = list(self.world_key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(**{**d, "world_key": tuple(d.get("world_key", (0, 96)))})


def make_prompt(world: World, item: Item, lang: str, phrasing: int) -> Prompt:
    """``item`` asked in ``lang`` with phrasing ``phrasing`` (0-3); the system turn is drawn from the id."""
    table = world.phrasings(item)
    pid = f"{item.family}/{item.key}/{lang}/t{phrasing}"
    messages = [{"role": "user", "content": world.fill(table["ask"][lang][phrasing], item, lang)}]
    system_rng = seeded_rng(world.seed, "system", pid)
    if system_rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": system_rng.choice(SYSTEM[lang])})
    return Prompt(
        id=pid,
        messages=messages,
        lang=lang,
        family=item.family,
        gold=world.surface(item.answer_type, item.value, lang),
        reference=world.fill(table["say"][lang][0], item, lang),
        key=item.key,
        answer_type=item.answer_type,
        world_key=(world.seed, world.num_entities),
    )


def sample_prompts(
    world: World, split: str = "train", n: int = 1000, seed: int = 0, phrasings: int | None = None
) -> list[Prompt]:
    """``n`` distinct prompts of ``split``: 50 % facts, 30 % arithmetic, 20 % conversion (a family's
    share moves to the others once it runs out), each language half the time.

    ``train``: instances the corpus's chats ask; ``heldout``: the others; ``dev`` / ``test``: the two
    halves of ``heldout`` (training on its own samples / evaluation). ``train`` and ``dev`` prompts use
    the first three phrasings, ``heldout`` and ``test`` all four (the fourth only they see: the corpus's
    chats never ask it). ``phrasings`` (1-4) overrides that, e.g. 4 for RL prompts on ``dev`` that ask the
    way users of the deployed model would, without any ``test`` instance."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    if phrasings is None:
        phrasings = 4 if split in ("heldout", "test") else 3
    elif not 1 <= phrasings <= 4:
        raise ValueError(f"phrasings must be 1 to 4 (each question has four phrasings), got {phrasings}")
    rng = seeded_rng(world.seed, "prompts", split, seed)
    pools = {}
    for family, items in world.splits[split].items():
        # Shuffle instances, then walk them round by round: every instance before any is repeated in
        # another language or phrasing.
        order = rng.sample(items, len(items))
        combos = []
        for r in range(2 * phrasings):
            for item in order:
                lang = LANGS[(r + digest(item.key)) % 2]
                combos.append((item, lang, (r // 2 + digest(item.key, "t")) % phrasings))
        pools[family] = combos[::-1]  # pop() from the end
    weights = {"fact": 0.5, "arithmetic": 0.3, "conversion": 0.2}
    out: list[Prompt] = []
    while len(out) < n:
        live = {f: w for f, w in weights.items() if pools[f]}
        if not live:
            raise ValueError(f"only {len(out)} distinct {split} prompts exist, asked for {n}")
        out.append(make_prompt(world, *pools[weighted_choice(rng, live)].pop()))
    return out
