"""The labeling app: the page (static/) and the JSON API it calls, for one annotator.

    tasks = annotate.tasks.read("pairs.jsonl")
    app = create_app(tasks, AnnotatorFile("labels/", "alice", tasks))
    uvicorn.run(app, host="127.0.0.1", port=8100)

    GET  /            the page
    GET  /api/state   {kind, annotator, choices, labels, total, done, item, last}
    POST /api/label   {"id", "choice"} -> the new state; 400 an unknown choice, 409 not the
                      current item (another tab labeled it: the page reloads the state)
    POST /api/undo    removes the last judgment -> the new state (its item is current again);
                      409 when there is none

Items are shown in the task file's order; the current item is the first one not judged, so a
restarted server resumes where the annotator left off and an undone item comes back first.
Errors are `{"error": message}` with their status.

Position bias: with `shuffle_sides`, each pair is shown with its responses swapped for about
half the items, chosen by a hash of (annotator, item id), so the same annotator always sees an
item the same way (after a restart too) and two annotators see different layouts. The page
only knows what it shows: the API speaks of the shown sides ("a" is the left one) and the
server maps them back, so the files always speak of the task file's a and b.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from annotate.store import AnnotatorFile
from annotate.tasks import PREFERENCE, TaskSet

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class LabelRequest(BaseModel):
    id: str
    choice: str


def swapped_sides(annotator: str, item_id: str) -> bool:
    """Whether `annotator` sees the pair `item_id` with b on the left (a fixed coin per pair)."""
    return hashlib.sha256(f"{annotator}\0{item_id}".encode()).digest()[0] & 1 == 1


def _flip(choice: str) -> str:
    return {"a": "b", "b": "a"}.get(choice, choice)


def state(tasks: TaskSet, store: AnnotatorFile, shuffle_sides: bool = False) -> dict:
    """What the page shows: the current item (None when all are judged), progress, the last
    judgment; a and b as shown (swapped for some pairs with `shuffle_sides`)."""
    swapped = (lambda item_id: swapped_sides(store.annotator, item_id)) if shuffle_sides else (lambda item_id: False)
    item = store.next_item()
    shown = None
    if item is not None:
        shown = {"id": item.id, **item.fields}
        if tasks.kind == PREFERENCE and swapped(item.id):
            shown["a"], shown["b"] = item.fields["b"], item.fields["a"]
    last = store.rows[-1] if store.rows else None
    if last is not None:
        last = {"id": last["id"], "choice": _flip(last["choice"]) if swapped(last["id"]) else last["choice"]}
    return {"kind": tasks.kind, "annotator": store.annotator, "choices": list(tasks.choices),
            "labels": list(tasks.labels), "total": len(tasks.items), "done": len(store.rows), "item": shown,
            "last": last}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(tasks: TaskSet, store: AnnotatorFile, *, shuffle_sides: bool = False) -> FastAPI:
    """The app serving `store.annotator`'s page over `tasks`; it closes `store` on shutdown.

    Args:
      tasks: the checked task file (`annotate.tasks.read`).
      store: the annotator's file (`annotate.store.AnnotatorFile` of the same tasks).
      shuffle_sides: show about half of the pairs with b on the left (see the module docstring).
    """
    shuffle_sides = shuffle_sides and tasks.kind == PREFERENCE

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    app = FastAPI(title="lmlab annotate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    items = tasks.by_id()
    turn = threading.Lock()  # a label's check of the current item and its append are one step

    @app.get("/")
    def index():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    @app.get("/health")
    def health():
        return {"status": "ok"}

    # Plain `def` routes run in a thread pool: the file's lock orders concurrent requests.
    @app.get("/api/state")
    def get_state():
        return state(tasks, store, shuffle_sides)

    @app.post("/api/label")
    def label(body: LabelRequest):
        if body.choice not in tasks.choices:
            return _error(400, f"{body.choice!r} is not one of the choices {list(tasks.choices)}")
        if body.id not in items:
            return _error(404, f"item {body.id!r} is not in the task file")
        with turn:
            current = store.next_item()
            if current is None or current.id != body.id:
                shown = "every item is judged" if current is None else f"the current item is {current.id!r}"
                return _error(409, f"item {body.id!r} is not the current item ({shown}); reload")
            flip = shuffle_sides and swapped_sides(store.annotator, current.id)
            store.append(current, _flip(body.choice) if flip else body.choice)
            return state(tasks, store, shuffle_sides)

    @app.post("/api/undo")
    def undo():
        with turn:
            if store.undo() is None:
                return _error(409, "there is no judgment to undo")
            return state(tasks, store, shuffle_sides)

    return app
