"""The annotator page and admin view as Argilla / Label Studio users expect them, in headless Chromium:
Chinese text renders as glyphs, progress and the vote's confirmation sit next to the buttons, the prompt is
labelled with its turns, long answers scroll inside linked panels, the "how much better" scale comes after
the choice, history with a changed vote, and the admin's item browser, import, agreement and disputes.
Screenshots go to ``build/test-artifacts/`` (kept after the run, gitignored)."""

from __future__ import annotations

import time

import pytest

from glmwb.annotation.assign import AssignmentPolicy
from glmwb.annotation.guard import LoginGate
from glmwb.annotation.store import NewItem, NewResponse, Store
from glmwb.ui.annotator import PageConfig
from glmwb.ui.app import ServerSettings, create_app
from tests.annotation.conftest import ThreadServer, artifact, cheap_hasher, make_items, wait_text

pytestmark = pytest.mark.browser

USERS = ("u1", "u2", "u3", "u4", "u5", "u6", "root")
CJK_TURNS = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "一加一等于几？"},
    {"role": "assistant", "content": "等于二。"},
    {"role": "user", "content": "请用中文解释为什么。口"},
]
LONG_A = "\n\n".join(f"A 第{i}行 line {i}" for i in range(300))
LONG_B = "\n\n".join(f"B 第{i}行 line {i}" for i in range(300))
HUGE = ("x" * 99 + "\n") * 20_000  # 2 MB


def password(name: str) -> str:
    return f"{name}-password"


@pytest.fixture(scope="module")
def ux_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ux")
    store = Store(
        f"sqlite:///{tmp / 'annotation.db'}",
        password_hasher=cheap_hasher(),
        policy=AssignmentPolicy(gold_rate=0),
    )
    for name in USERS:
        store.create_annotator(name, password(name), role="admin" if name == "root" else "annotator")
    cjk = NewItem("cjk", CJK_TURNS, [NewResponse(LONG_A, "m-zh"), NewResponse(LONG_B, "m-en")],
                  overlap=10, priority=100.0, shuffle=False)  # fmt: skip
    huge = NewItem("huge", [{"role": "user", "content": "Say a lot"}],
                   [NewResponse(HUGE, "m-big"), NewResponse("short", "m-small")],
                   overlap=10, priority=90.0, shuffle=False)  # fmt: skip
    store.add_items([cjk, huge, *make_items(6, overlap=2)])
    settings = ServerSettings(page=PageConfig(export_dir=tmp / "exports"), gate=LoginGate())
    server = ThreadServer(create_app(store, settings))
    yield store, server.base_url, tmp
    server.stop()
    store.close()


def sign_in(browser, base: str, username: str, viewport=(1280, 800)):
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.on("dialog", lambda d: pytest.fail(f"a dialog opened: {d.message}"))
    page.goto(base)
    page.locator("input[type=password]").wait_for(timeout=30_000)
    page.locator("input[type=text]").first.fill(username)
    page.locator("input[type=password]").fill(password(username))
    page.keyboard.press("Enter")
    page.locator("#answer-A").wait_for(timeout=30_000)
    wait_text(page, "#header", username)
    return context, page


GLYPH_HEIGHTS = """(sel) => {
  const el = document.querySelector(sel);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = getComputedStyle(el).font;
  const h = (ch) => { const m = ctx.measureText(ch); return m.actualBoundingBoxAscent + m.actualBoundingBoxDescent; };
  return {one: h("一"), mouth: h("口"), family: getComputedStyle(el).fontFamily};
}"""


def test_chinese_renders_as_glyphs(ux_site, browser):
    """A missing glyph is one box, the same for every character: with a CJK font, 一 (one stroke) is far
    flatter than 口 (a square); without one, both are the same box."""
    _, base, _ = ux_site
    context, page = sign_in(browser, base, "u1")
    wait_text(page, "#prompt", "一加一等于几")
    g = page.evaluate(GLYPH_HEIGHTS, "#prompt")
    assert "Noto Sans CJK SC" in g["family"], g
    assert g["mouth"] > 0 and g["one"] < 0.4 * g["mouth"], g  # glyphs, not boxes
    page.locator("#prompt").screenshot(path=artifact("chinese_renders_as_glyphs"))
    # and on the page itself: the ink of 一 and 口 drawn in the prompt's font (boxes would have the same)
    page.evaluate(ADD_GLYPHS, "#prompt")
    one, mouth = ink(page.locator("#glyph-one").screenshot()), ink(page.locator("#glyph-mouth").screenshot())
    assert mouth > 0 and one < 0.6 * mouth, (one, mouth)
    context.close()


ADD_GLYPHS = """(sel) => {
  for (const [id, ch] of [["glyph-one", "一"], ["glyph-mouth", "口"]]) {
    const span = document.createElement("span");
    Object.assign(span, {id, textContent: ch});
    Object.assign(span.style, {fontSize: "48px", lineHeight: "1", display: "inline-block", padding: "4px"});
    document.querySelector(sel).appendChild(span);
  }
}"""


def ink(png: bytes) -> int:
    """Dark pixels in a screenshot."""
    import io

    from PIL import Image

    return sum(Image.open(io.BytesIO(png)).convert("L").histogram()[:128])


def box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def test_progress_bar_and_confirmation_next_to_the_buttons(ux_site, browser):
    store, base, _ = ux_site
    context, page = sign_in(browser, base, "u2")
    p = store.progress(store.annotator("u2"))
    assigned = p["votes"] + p["pending"] + p["skipped"] + p["available"]
    assert assigned >= 2  # the two long items at least (regular ones fill up as other tests vote)
    wait_text(page, "#progress", rf"0 / {assigned}")
    item = store.next_task(store.annotator("u2")).item_id
    wait_text(page, "#prompt", "一加一等于几")  # a long item: the buttons stay on screen all the same
    button, viewport = box(page, "#vote-A"), page.viewport_size
    assert button["y"] + button["height"] <= viewport["height"], (button, viewport)
    page.locator("#vote-A").click()
    wait_text(page, "#status", rf"Saved: item {item}, A is better")
    wait_text(page, "#progress", rf"1 / {assigned} done")
    assert page.locator("#progress progress").get_attribute("value") == "1"
    status, button, viewport = box(page, "#status"), box(page, "#vote-A"), page.viewport_size
    assert status["y"] + status["height"] <= viewport["height"], (status, viewport)  # not below the fold
    assert abs(status["y"] - button["y"]) < 80 and status["x"] > button["x"], (status, button)  # beside them
    page.screenshot(path=artifact("progress_bar_and_confirmation"))
    context.close()


SCROLL = """([a, b]) => {
  const x = document.getElementById(a), y = document.getElementById(b);
  return {top: y.scrollTop, range: y.scrollHeight - y.clientHeight, client: x.clientHeight, height: x.scrollHeight};
}"""


def test_prompt_turns_and_linked_scroll(ux_site, browser):
    store, base, _ = ux_site
    context, page = sign_in(browser, base, "u3")
    prompt = wait_text(page, "#prompt", "一加一等于几")
    assert prompt.startswith("Prompt (4 messages)"), prompt[:80]
    roles = page.locator("#prompt .glmwb-role").all_inner_texts()
    assert roles == ["System", "User · turn 1", "Assistant · turn 1", "User · turn 2"], roles
    # the answers scroll inside their panels, side by side; scrolling A scrolls B to the same place
    a, b = box(page, "#scroll-A"), box(page, "#scroll-B")
    assert abs(a["y"] - b["y"]) < 2 and b["x"] > a["x"] + a["width"] - 1
    before = page.evaluate(SCROLL, ["scroll-A", "scroll-B"])
    assert before["top"] == 0 and before["range"] > 1000 and before["client"] < 0.5 * 800
    page.locator("#scroll-A").hover()
    page.mouse.wheel(0, 1500)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        a_top = page.evaluate("document.getElementById('scroll-A').scrollTop")
        now = page.evaluate(SCROLL, ["scroll-A", "scroll-B"])
        if a_top > 0 and abs(now["top"] - a_top) <= 2:
            break
        time.sleep(0.05)
    assert a_top > 0 and abs(now["top"] - a_top) <= 2, (a_top, now)  # same lengths: the same offset
    page.screenshot(path=artifact("prompt_turns_linked_scroll"))
    context.close()


def test_a_2mb_answer_keeps_the_page_one_screen_tall(ux_site, browser):
    _, base, _ = ux_site
    context, page = sign_in(browser, base, "u6")
    wait_text(page, "#prompt", "一加一等于几")
    page.keyboard.press("3")  # next: the item with a 2 MB answer
    wait_text(page, "#prompt", "Say a lot", timeout_s=60)
    huge = page.evaluate(SCROLL, ["scroll-A", "scroll-A"])
    assert huge["height"] > 100_000 and huge["client"] < 0.5 * 800, huge  # all there, inside the panel
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 2 * 800, height
    page.screenshot(path=artifact("two_megabyte_answer"), full_page=True)
    context.close()


def test_how_much_better_comes_after_the_choice_and_keys_skip_it(ux_site, browser):
    store, base, _ = ux_site
    context, page = sign_in(browser, base, "u4")
    assert not page.locator("#strength").is_visible()  # no scale before the choice
    first = store.next_task(store.annotator("u4")).item_id
    page.keyboard.press("1")
    wait_text(page, "#status", rf"Saved: item {first}, A is better")
    assert page.locator("#strength").is_visible()
    assert "How much better is A" in page.locator("#strength").inner_text()
    second = store.next_task(store.annotator("u4")).item_id
    page.keyboard.press("2")  # the keyboard flow goes on: the scale is optional
    wait_text(page, "#status", rf"Saved: item {second}, B is better", timeout_s=60)
    mine = {v.item_id: v for v in store.votes(annotator="u4")}
    assert {mine[first].strength, mine[second].strength} == {None}
    page.locator("#strength").get_by_text("much", exact=True).click()
    wait_text(page, "#status", rf"Saved: item {second}, B is much better")
    page.screenshot(path=artifact("how_much_better_after_the_choice"))
    active = [(v.item_id, v.choice, v.strength) for v in store.votes(annotator="u4")]
    assert active == [(first, "A", None), (second, "B", "strong")]
    history = [(v.item_id, v.choice, v.strength, v.retracted) for v in store.votes(True, annotator="u4")]
    assert (second, "B", None, True) in history  # the vote before the amendment is kept
    page.keyboard.press("3")
    wait_text(page, "#status", r"a tie")
    assert not page.locator("#strength").is_visible()  # no scale after a tie
    context.close()


def test_my_votes_and_changing_a_vote(ux_site, browser):
    from glmwb.annotation.agreement import agreement_report
    from glmwb.annotation.export import export_records

    store, base, _ = ux_site
    context, page = sign_in(browser, base, "u5")
    item = store.next_task(store.annotator("u5")).item_id
    page.keyboard.press("1")
    wait_text(page, "#status", rf"Saved: item {item}, A is better")
    (old,) = [v for v in store.votes(annotator="u5") if v.item_id == item]
    page.get_by_role("tab", name="My votes").click()
    table = wait_text(page, "#history-table", rf"{item}\s+请用中文解释为什么")
    assert "A is better" in table
    page.locator("#change-item input").click()
    page.get_by_role("option", name=f"item {item}:").click()
    page.locator("#change-choice").get_by_text("B is better", exact=True).click()
    page.locator("#change-vote").click()
    wait_text(page, "#change-status", rf"Changed: item {item}, now B is better")
    row = wait_text(page, "#history-table", r"B is better")
    assert "A is better" in row  # the earlier vote is listed
    page.screenshot(path=artifact("my_votes_changed"), full_page=True)
    (new,) = [v for v in store.votes(annotator="u5") if v.item_id == item]
    assert new.choice == "B" and new.vote_id != old.vote_id
    assert (old.vote_id, True) in [(v.vote_id, v.retracted) for v in store.votes(True, annotator="u5")]
    ids = {r["id"] for r in export_records(store, mode="all").rows}
    assert f"vote{new.vote_id}" in ids and f"vote{old.vote_id}" not in ids  # export uses the newest
    assert agreement_report(store.votes(annotator="u5")).labels == {"B": 1}
    context.close()
