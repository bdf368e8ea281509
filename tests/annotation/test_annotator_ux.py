"""The annotator page and admin view as Argilla / Label Studio users expect them, in headless Chromium:
Chinese text renders as glyphs, progress and the vote's confirmation sit next to the buttons, the prompt is
labelled with its turns, long answers scroll inside linked panels, the "how much better" scale comes after
the choice, history with a changed vote, and the admin's item browser, import, agreement and disputes.
Screenshots go to ``build/test-artifacts/`` (kept after the run, gitignored)."""

from __future__ import annotations

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
    context.close()
