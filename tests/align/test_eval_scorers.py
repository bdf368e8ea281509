"""align/evals: each scorer against known answers on the real benchmark files (../shared/data), lm-eval
and our own scorer agreeing on the same answers, IFEval's checks on hand-made cases, and the sandbox."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from glmwb.align.evals import sandbox
from glmwb.align.evals.tasks import GSM8K, HumanEval, IFEval, Item, MultipleChoice, humaneval_program
from glmwb.rewards.rules import RuleContext, gsm8k

# ../shared/data beside the checkout (CI), or where GLMWB_SHARED_DATA points
DATA = Path(
    os.environ.get("GLMWB_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "eval_gsm8k").is_dir(), reason="../shared/data is not beside the checkout"
)


def _wrong(answer: str) -> str:
    """The gold solution with its final number changed (the working is left as it is)."""
    return re.sub(r"#### (.*)$", lambda m: f"#### {int(m.group(1).replace(',', '')) + 1}", answer)


@needs_data
def test_gsm8k_gold_scores_all_and_corrupted_none_and_both_scorers_agree() -> None:
    task = GSM8K(DATA / "eval_gsm8k" / "test.jsonl")
    items = task.load()
    assert len(items) == 1319
    # gold and corrupted answers in one lm-eval pass: ids g/<i> and w/<i>
    both = [Item(f"g/{it.id}", it.messages, it.ref) for it in items] + [
        Item(f"w/{it.id}", it.messages, it.ref) for it in items
    ]
    answers = {f"g/{it.id}": it.ref["answer"] for it in items} | {
        f"w/{it.id}": _wrong(it.ref["answer"]) for it in items
    }
    rows = task.score(both, answers)
    gold = [rows[f"g/{it.id}"] for it in items]
    bad = [rows[f"w/{it.id}"] for it in items]
    assert task.aggregate(gold) == {"correct": 1.0, "flexible": 1.0}
    assert task.aggregate(bad) == {"correct": 0.0, "flexible": 0.0}
    # our rule (rewards/rules.py, used as a GRPO / PPO reward) agrees with lm-eval item by item, including on
    # answers that are neither gold nor a clean wrong number
    odd = {
        "a": "So the answer is 18.",
        "b": "#### 1,000",
        "c": "#### $18.",
        "d": "no number",
        "e": "18\n#### 17",
    }
    subset = items[:1] * len(odd)
    probe = [Item(k, it.messages, {**it.ref, "answer": "x\n#### 18" if k != "b" else "x\n#### 1000"})
             for k, it in zip(odd, subset, strict=True)]  # fmt: skip
    lm = task.score(probe, odd)
    for it in probe:
        ours = gsm8k(odd[it.id], RuleContext(gold=it.ref["answer"]))
        assert bool(ours) == bool(lm[it.id]["flexible"]), (it.id, odd[it.id], ours, lm[it.id])


@needs_data
def test_humaneval_canonical_solutions_all_pass_and_broken_ones_fail() -> None:
    task = HumanEval(DATA / "eval_humaneval" / "HumanEval.jsonl.gz", workers=2)
    items = task.load()
    assert len(items) == 164
    t0 = time.time()
    canon = task.score(items, {it.id: it.ref["canonical_solution"] for it in items})
    assert [i for i, r in canon.items() if r["correct"] != 1.0] == []
    # broken: the body replaced by a wrong return, on a sample of 24 problems
    sample = items[::7]
    broken = task.score(sample, {it.id: "    return None\n" for it in sample})
    assert all(r["correct"] == 0.0 for r in broken.values())
    assert time.time() - t0 < 60


def test_humaneval_program_takes_a_chat_answer_or_a_continuation() -> None:
    problem = {"prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}  # fmt: skip
    chat = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert sandbox.run_python(humaneval_program(problem, chat)).passed
    assert sandbox.run_python(humaneval_program(problem, "    return a + b\n")).passed
    assert not sandbox.run_python(humaneval_program(problem, "    return a - b\n")).passed


# -- the sandbox -------------------------------------------------------------------------------------------


def test_sandbox_kills_an_infinite_loop_at_the_limit() -> None:
    t0 = time.time()
    r = sandbox.run_python("while True:\n    pass\n", sandbox.Limits(timeout=1.0))
    assert r.status == "timeout" and time.time() - t0 < 5


def test_sandbox_refuses_writing_outside_its_folder_and_allows_inside(tmp_path) -> None:
    target = tmp_path / "outside.txt"
    r = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "failed" and not target.exists()
    assert sandbox.run_python(
        "open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n"
    ).passed


def test_sandbox_has_no_network() -> None:
    r = sandbox.run_python(
        "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n"
    )
    assert r.status == "failed"


@pytest.mark.skipif(sandbox.isolation() == "none", reason="no network namespace here (unshare refused)")
def test_the_network_namespace_itself_blocks_sockets() -> None:
    """Below the audit hook: a plain Python in the wrapper cannot reach any address."""
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('1.1.1.1', 80))\n    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n"
    out = subprocess.run([*sandbox._wrapper(sandbox.isolation()), sandbox.interpreter(), "-I", "-S", "-c", code],
                         capture_output=True, text=True, timeout=20)  # fmt: skip
    assert out.stdout.startswith("refused"), out


def _sandboxed_processes_left(wait: float = 5.0) -> int:
    """Processes still running the sandbox's prelude (after up to ``wait`` seconds for the kernel to reap)."""
    deadline = time.time() + wait
    while True:
        n = 0
        for entry in Path("/proc").iterdir():
            try:
                n += entry.name.isdigit() and b"sys.addaudithook(_hook)" in (entry / "cmdline").read_bytes()
            except OSError:
                pass
        if n == 0 or time.time() > deadline:
            return n
        time.sleep(0.1)


def test_sandbox_survives_a_fork_bomb_and_a_memory_hog() -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.time()
    r = sandbox.run_python(bomb, sandbox.Limits(timeout=1.5))
    assert r.status in ("timeout", "failed") and time.time() - t0 < 8
    assert _sandboxed_processes_left() == 0  # every copy the bomb made is gone
    assert sandbox.run_python("x = bytearray(8 * 1024**3)\n").status == "failed"
    assert sandbox.run_python("open('big', 'wb').write(b'x' * (4 << 20))\n").status == "failed"
    assert sandbox.run_python("assert 1 + 1 == 2\n").passed  # and the machine still runs the next program


# -- IFEval: lm-eval's checkers on hand-made cases of each instruction type in the file ----------------------

IFEVAL_CASES = [
    # (instruction id, kwargs, an answer that follows it, one that does not)
    ("punctuation:no_comma", {}, "I like tea and cake.", "I like tea, and cake."),
    ("change_case:english_lowercase", {}, "this is a plain english sentence about the weather today.",
     "This is a plain English sentence about the weather today."),
    ("change_case:english_capital", {}, "THIS IS A PLAIN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
     "THIS IS A PLAIN ENGLISH SENTENCE ABOUT the weather today."),
    ("detectable_format:title", {}, "<<A Poem>>\nRoses.", "A Poem\nRoses."),
    ("startend:quotation", {}, '"Hello there."', "Hello there."),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, "Done. Is there anything else?", "Done."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and *b*", "*a* only"),
    ("detectable_format:json_format", {}, '{"a": 1}', "a = 1"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "two words", "one two three four five six"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "One. Two. Three.", "Only one."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "Only one."),
    ("keywords:existence", {"keywords": ["river"]}, "The river runs.", "The sea."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "All good.", "All bad."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat and cat", "one cat"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zoo zebra", "zoo"),
    ("language:response_language", {"language": "en"}, "This is plainly an English sentence about the weather.",
     "Dies ist eindeutig ein deutscher Satz über das Wetter heute."),
    ("detectable_content:number_placeholders", {"num_placeholders": 1}, "Send it to [address].", "Send it."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only one answer."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Perhaps."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nintro\nSection 2\nbody", "Section 1\nintro"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "BIG and LOUD", "BIG"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Start here.\n\nThen finish.", "Start here.\n\nNow finish."),
]  # fmt: skip


@needs_data
def test_ifeval_hand_made_cases_cover_the_file_and_each_check_tells_right_from_wrong() -> None:
    import json

    used = {
        i
        for line in (DATA / "eval_ifeval" / "input_data.jsonl").open()
        for i in json.loads(line)["instruction_id_list"]
    }
    covered = {c[0] for c in IFEVAL_CASES}
    repeat = {"combination:repeat_prompt"}  # its check needs the prompt text itself: tested below
    assert used - covered - repeat == set(), "instruction types in the file without a hand-made case"
    task = IFEval()
    items, answers = [], {}
    for k, (iid, kwargs, good, bad) in enumerate(IFEVAL_CASES):
        for tag, text in (("good", good), ("bad", bad)):
            ref = {"key": k, "prompt": "Answer.", "instruction_id_list": [iid], "kwargs": [kwargs]}
            items.append(Item(f"{k}/{tag}", (), ref))
            answers[f"{k}/{tag}"] = text
    ref = {"key": 99, "prompt": "Say hi. Repeat the request first.", "instruction_id_list": ["combination:repeat_prompt"],
           "kwargs": [{"prompt_to_repeat": "Say hi."}]}  # fmt: skip
    items += [Item("rp/good", (), ref), Item("rp/bad", (), ref)]
    answers |= {"rp/good": "Say hi. Hi!", "rp/bad": "Hi!"}
    rows = task.score(items, answers)
    wrong = [i for i, r in rows.items() if r["correct"] != (1.0 if i.endswith("good") else 0.0)]
    assert wrong == [], [(i, answers[i]) for i in wrong]


def test_multiple_choice_reads_the_first_option_letter(tmp_path) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}\n'
                    '{"question": "天空是什么颜色？", "A": "蓝色", "B": "绿色", "C": "红色", "D": "黑色", "answer": "A"}\n')  # fmt: skip
    task = MultipleChoice(path)
    items = task.load()
    assert [it.ref["gold"] for it in items] == ["B", "A"]
    rows = task.score(items, {"0": "B. 4", "1": "答案是 B"})
    assert [rows["0"]["correct"], rows["1"]["correct"]] == [1.0, 0.0]


@needs_data
def test_gsm8k_shots_are_earlier_turns_and_ifeval_ids_are_its_keys() -> None:
    items = GSM8K(DATA / "eval_gsm8k" / "test.jsonl", limit=3, shots=2).load()
    roles = [m["role"] for m in items[0].messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert items[0].messages[1]["content"].rstrip().split("#### ")[-1].isdigit()  # a solved training problem
    ifeval = IFEval(DATA / "eval_ifeval" / "input_data.jsonl").load()
    assert len(ifeval) == 541 and len({it.id for it in ifeval}) == 541


@pytest.mark.parametrize("mode", ["nobody", "none"])
def test_the_fallback_modes_still_refuse_and_kill(mode, tmp_path) -> None:
    """Where unshare is refused: root still drops to nobody; any user keeps the limits and the audit hook."""
    if mode == "nobody" and os.geteuid() != 0:
        pytest.skip("the nobody mode is root's")
    target = tmp_path / "outside.txt"
    assert sandbox.run_python(f"open({str(target)!r}, 'w').write('x')\n", mode=mode).status == "failed"
    assert not target.exists()
    assert (
        sandbox.run_python("while True:\n    pass\n", sandbox.Limits(timeout=1.0), mode=mode).status
        == "timeout"
    )
    assert (
        sandbox.run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), 2)\n", mode=mode).status
        == "failed"
    )
    assert sandbox.run_python("assert 1 + 1 == 2\n", mode=mode).passed
