"""The Admin tab's task import: comparison items from a file on the server, as ``glmwb annotation add-tasks``
makes them (``annotation.tasks.items_from_sources``: the same validation, the same one-line errors):

- an answers file: JSONL rows ``{"prompt" | "messages", "responses": [...]}`` (``--responses``);
- prompts (a JSONL file, a saved ``datasets`` folder, or ``world[:split[:n]]``) and one or more model folders
  to sample answers from (``--prompts --model``), with the default sampling settings.

The path is a file or folder under the page's import folder (``PageConfig.import_dir``, ``glmwb annotation
annotate --import-dir``; default ``runs/annotation_imports``): the page accepts no uploads (Gradio's upload
route is refused), and a path outside that folder is refused, so the page never reads other files of the
server. Admins only, like the CLI, which needs the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from glmwb.annotation.records import PreferenceDataError
from glmwb.annotation.store import AnnotatorInfo, Store, StoreError
from glmwb.pretrain.errors import ConfigError

SOURCES = ("answers file", "prompts + model folders")


@dataclass
class ImportView:
    source: gr.Radio
    path: gr.Textbox
    models: gr.Textbox
    per_item: gr.Number
    overlap: gr.Number
    batch: gr.Textbox
    button: gr.Button
    status: gr.Markdown


def import_section() -> ImportView:
    with gr.Accordion("Import tasks", open=False, elem_id="import-accordion"):
        source = gr.Radio(list(SOURCES), value=SOURCES[0], label="source", elem_id="import-source")
        path = gr.Textbox(label="file or folder on the server (answers: JSONL or datasets folder; prompts: "
                          "JSONL, datasets folder, world:train:50)", elem_id="import-path")  # fmt: skip
        models = gr.Textbox(label="model folders, one per line (prompts + model folders only)", lines=2,
                            elem_id="import-models")  # fmt: skip
        with gr.Row():
            per_item = gr.Number(2, label="answers per item (2-4)", precision=0, minimum=2, maximum=4)
            overlap = gr.Number(3, label="votes per item", precision=0, minimum=1, maximum=100)
            batch = gr.Textbox(label="batch name (optional)", elem_id="import-batch")
        button = gr.Button("Import", elem_id="import-button")
        status = gr.Markdown(elem_id="import-status")
    return ImportView(source, path, models, per_item, overlap, batch, button, status)


class ImportHandlers:
    def __init__(
        self,
        store: Store,
        view: ImportView,
        admin_only: Callable[[gr.Request], AnnotatorInfo],
        import_dir: Path | str = "runs/annotation_imports",
    ):
        self.store, self.v, self.admin_only = store, view, admin_only
        self.import_dir = Path(import_dir)

    def outside(self, path: str) -> str | None:
        """Why ``path`` may not be read (outside the import folder, after links and ``..``), or None."""
        if path.startswith("world"):
            return None
        root = self.import_dir.resolve()
        if Path(path).resolve().is_relative_to(root):
            return None
        return f"Not imported: {path} is outside the import folder {root}; put the file there first."

    def run(self, source: str, path: str, models: str, per_item: float, overlap: float, batch: str,
            request: gr.Request) -> str:  # fmt: skip
        from glmwb.annotation.tasks import items_from_sources

        self.admin_only(request)
        path = (path or "").strip()
        folders = tuple(line.strip() for line in (models or "").splitlines() if line.strip())
        if not path:
            return "Not imported: give a file (or folder) on the server."
        if (refused := self.outside(path)) is not None:
            return refused
        try:
            by_source = {"responses": path} if source == SOURCES[0] else {"prompts": path, "models": folders}
            items = items_from_sources(**by_source, per_item=int(per_item or 2), overlap=int(overlap or 3),
                                       batch=(batch or "").strip())  # fmt: skip
            ids = self.store.add_items(items)
        except (ConfigError, StoreError, PreferenceDataError, FileNotFoundError) as e:
            return f"Not imported: {e}"
        return f"Added {len(ids)} items from {path}."

    def wire(self) -> None:
        v = self.v
        v.button.click(self.run, [v.source, v.path, v.models, v.per_item, v.overlap, v.batch], [v.status],
                       api_visibility="private")  # fmt: skip
