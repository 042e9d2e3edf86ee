"""Recommend, score, similar and popular over a loaded artifact (no HTTP; :mod:`.app` wraps it).

Ids in and out are the dataset's own strings. Bad input raises :class:`ServeError` with the HTTP
status it maps to and a message naming the problem. Recommendations are computed as
:func:`mbrec.evaluate.recommend` computes them: one scoring call per batch of users (a GEMM
for ``dot`` scorers), the exclusion list set to ``-inf`` with one indexed assignment, ``topk``;
so a served answer equals ``mbrec recommend`` for the same run.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import torch

from mbrec.evaluate import chunk_size, csr_rows_coords
from mbrec.serving.artifact import Artifact
from mbrec.serving.scorers import Scorer, build_scorer

#: longest user or item id a request may carry (longer ones are refused, not looked up)
MAX_ID_LENGTH = 1024
EXCLUDE_CHOICES = ("seen", "none")
FALLBACK_CHOICES = ("none", "popular")


class ServeError(Exception):
    """A request the service refuses: ``status`` (4xx), a short ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _names(values: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(v if len(v) <= 40 else v[:40] + "...") for v in values[:limit])
    return shown + (f" and {len(values) - limit:,} more" if len(values) > limit else "")


class Engine:
    """An artifact ready to answer: id maps, torch scorers, exclusion lists, popularity."""

    def __init__(self, artifact: Artifact, *, memory_mb: float = 256.0) -> None:
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.artifact_id = artifact.artifact_id
        self.user_ids, self.item_ids = artifact.user_ids, artifact.item_ids
        self.n_users, self.n_items = len(self.user_ids), len(self.item_ids)
        self._user_index = {u: k for k, u in enumerate(self.user_ids.tolist())}
        self._item_index = {i: k for k, i in enumerate(self.item_ids.tolist())}
        self.behaviors: list[str] = list(self.manifest["behaviors"])
        self.scored: list[str] = list(self.manifest["scored_behaviors"])
        self.target: str = self.manifest["target"]
        self.scorers: dict[str, Scorer] = {b: build_scorer(s) for b, s in artifact.scorers.items()}
        self.exclude = artifact.exclude
        self.popularity = artifact.popularity
        arange = np.arange(self.n_items)
        self.popular_order = {b: np.lexsort((arange, -p)) for b, p in self.popularity.items()}
        self._unit: dict[str, torch.Tensor] = {}
        self._item_json = np.array([json.dumps(i, ensure_ascii=False) for i in self.item_ids.tolist()], dtype=object)
        self._templates: dict[int, str] = {}
        self.step = chunk_size(self.n_items, memory_mb)

    # -- validation -------------------------------------------------------------------------
    def behavior(self, behavior: str | None) -> str:
        """The behavior to rank for (default the target); one the model does not score is refused."""
        if behavior is None or behavior == "":
            return self.target
        if behavior not in self.scored:
            known = "" if behavior not in self.behaviors else f" (a behavior of the dataset, but the {self.manifest['model']} model does not rank it)"
            raise ServeError(422, "unknown_behavior", f"unknown behavior {behavior[:80]!r}{known}; this service ranks {self.scored}")
        return behavior

    def check_k(self, k: int, n: int | None = None, what: str = "items") -> None:
        n = self.n_items if n is None else n
        if k < 1:
            raise ServeError(422, "bad_k", f"k must be at least 1, got {k}")
        if k > n:
            raise ServeError(422, "bad_k", f"k = {k:,} is more than the {n:,} {what} of this model")

    @staticmethod
    def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
        if value not in choices:
            raise ServeError(422, f"bad_{name}", f"{name} must be one of {list(choices)}, got {value[:80]!r}")

    @staticmethod
    def check_id(value: str, what: str) -> None:
        if len(value) > MAX_ID_LENGTH:
            raise ServeError(422, "id_too_long", f"a {what} id of {len(value):,} characters is longer than the "
                                                 f"{MAX_ID_LENGTH:,} allowed")

    def user_rows(self, users: Sequence[str]) -> np.ndarray:
        """Row of each user id, -1 for an unknown one."""
        for u in users:
            self.check_id(u, "user")
        get = self._user_index.get
        return np.fromiter((get(u, -1) for u in users), dtype=np.int64, count=len(users))

    def item_row(self, item: str) -> int:
        self.check_id(item, "item")
        row = self._item_index.get(item)
        if row is None:
            raise ServeError(404, "unknown_item", f"unknown item {item[:80]!r}")
        return row

    # -- ranking ----------------------------------------------------------------------------
    def top_k(self, rows: np.ndarray, behavior: str, k: int, exclude: bool) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item rows and scores of user ``rows`` (``-1`` / ``-inf`` where fewer than
        ``k`` items are left after the exclusion list)."""
        scorer, mask = self.scorers[behavior], self.exclude[behavior] if exclude else None
        items = np.empty((len(rows), k), dtype=np.int64)
        scores = np.empty((len(rows), k), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(rows), self.step):
                chunk = rows[s : s + self.step]
                sc = scorer.score(torch.from_numpy(chunk)).float()
                if mask is not None:
                    r, c = csr_rows_coords(mask, chunk)
                    sc[torch.from_numpy(r), torch.from_numpy(c)] = -math.inf
                top_s, top_i = torch.topk(sc, k, dim=1)
                top_i = torch.where(torch.isfinite(top_s), top_i, torch.full_like(top_i, -1))
                items[s : s + len(chunk)] = top_i.numpy()
                scores[s : s + len(chunk)] = top_s.numpy()
        return items, scores

    def _item_template(self, n: int) -> str:
        """``[{"item":%s,"score":%r,"rank":1},...]`` for ``n`` items (cached)."""
        t = self._templates.get(n)
        if t is None:
            t = "[" + ",".join('{"item":%s,"score":%r,"rank":' + str(r + 1) + "}" for r in range(n)) + "]"
            self._templates[n] = t
        return t

    def _answers_json(self, users: Sequence[str], behavior: str, items: np.ndarray, scores: np.ndarray,
                      fallback: str | None) -> list[str]:
        """One JSON object per user (text): the item ids come JSON-encoded from a table built
        at load, the scores as Python float reprs (shortest round trip), through one ``%``
        per user: about twice as fast as building and encoding dicts for a 1,000-user batch."""
        n, k = items.shape
        counts = (items >= 0).sum(1).tolist()
        cells = np.empty((n, 2 * k), dtype=object)
        cells[:, 0::2] = self._item_json[np.maximum(items, 0)]
        cells[:, 1::2] = scores.astype(np.float64)
        head = ',"behavior":' + json.dumps(behavior) + ',"fallback":' + json.dumps(fallback) + ',"items":'
        return ['{"user":' + json.dumps(u) + head + self._item_template(c) % tuple(row[: 2 * c]) + "}"
                for u, row, c in zip(users, cells.tolist(), counts)]

    def recommend_json(self, users: Sequence[str], behavior: str | None = None, k: int = 10, exclude: str = "seen",
                       fallback: str = "none") -> str:
        """:meth:`recommend` as JSON text (what the service sends)."""
        self.check_choice("exclude", exclude, EXCLUDE_CHOICES)
        self.check_choice("fallback", fallback, FALLBACK_CHOICES)
        b = self.behavior(behavior)
        self.check_k(k)
        rows = self.user_rows(users)
        unknown = np.flatnonzero(rows < 0)
        if len(unknown) and fallback != "popular":
            missing = [users[i] for i in unknown]
            raise ServeError(404, "unknown_user", f"unknown user{'s' if len(missing) > 1 else ''} {_names(missing)} "
                             "(not in the trained model; pass fallback=popular for the most popular items)")
        known = np.flatnonzero(rows >= 0)
        out: list[str] = [""] * len(users)
        if len(known):
            items, scores = self.top_k(rows[known], b, k, exclude == "seen")
            for pos, ans in zip(known.tolist(), self._answers_json([users[i] for i in known], b, items, scores, None)):
                out[pos] = ans
        if len(unknown):
            top = self.popular_order[b][:k]
            pop = self.popularity[b][top].astype(np.float64)
            n = len(unknown)
            answers = self._answers_json([users[i] for i in unknown], b, np.tile(top, (n, 1)), np.tile(pop, (n, 1)), "popular")
            for pos, ans in zip(unknown.tolist(), answers):
                out[pos] = ans
        return "[" + ",".join(out) + "]"

    def recommend(self, users: Sequence[str], behavior: str | None = None, k: int = 10, exclude: str = "seen",
                  fallback: str = "none") -> list[dict[str, Any]]:
        """One answer per user, in order: ``{"user", "behavior", "fallback", "items": [{"item",
        "score", "rank"}]}``. Unknown users are refused (404), or with ``fallback="popular"``
        answered with the behavior's most popular items (``"fallback": "popular"``; the score is
        the item's training count)."""
        return json.loads(self.recommend_json(users, behavior, k, exclude, fallback))

    def score(self, user: str, items: Sequence[str], behavior: str | None = None) -> dict[str, Any]:
        """The model's scores of ``items`` for ``user``; ``seen``: the item is on the user's
        exclusion list (``recommend`` never returns it)."""
        b = self.behavior(behavior)
        row = int(self.user_rows([user])[0])
        if row < 0:
            raise ServeError(404, "unknown_user", f"unknown user {user[:80]!r}")
        for i in items:
            self.check_id(i, "item")
        missing = [i for i in items if i not in self._item_index]
        if missing:
            raise ServeError(404, "unknown_item", f"unknown item{'s' if len(missing) > 1 else ''} {_names(missing)}")
        cols = np.fromiter((self._item_index[i] for i in items), dtype=np.int64, count=len(items))
        with torch.no_grad():
            values = self.scorers[b].score(torch.tensor([row])).float()[0, torch.from_numpy(cols)].tolist()
        mask = self.exclude[b]
        seen = (np.isin(cols, mask.indices[mask.indptr[row] : mask.indptr[row + 1]]) if mask is not None
                else np.zeros(len(cols), dtype=bool)).tolist()
        return {"user": user, "behavior": b,
                "scores": [{"item": i, "score": s, "seen": z} for i, s, z in zip(items, values, seen)]}

    def _unit_items(self, behavior: str) -> torch.Tensor:
        unit = self._unit.get(behavior)
        if unit is None:
            v = self.scorers[behavior].item_vectors.float()
            unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self._unit[behavior] = unit
        return unit

    def similar(self, item: str, k: int = 10, behavior: str | None = None) -> dict[str, Any]:
        """The ``k`` items whose representations (of ``behavior``'s scorer) have the largest
        cosine similarity with ``item``'s, the item itself left out."""
        b = self.behavior(behavior)
        row = self.item_row(item)
        self.check_k(k, self.n_items - 1, "other items")
        unit = self._unit_items(b)
        with torch.no_grad():
            sims = unit[row] @ unit.T
            sims[row] = -math.inf
            top_s, top_i = torch.topk(sims, k)
        names = self.item_ids[top_i.numpy()].tolist()
        return {"item": item, "behavior": b,
                "items": [{"item": i, "score": s, "rank": r + 1} for r, (i, s) in enumerate(zip(names, top_s.tolist()))]}

    def info(self) -> dict[str, Any]:
        return {"artifact_id": self.artifact_id, **self.manifest}
