"""Human-readable tables of metrics (rows: split x behavior, columns: metrics)."""

from __future__ import annotations

from typing import Any, Mapping


def metrics_table(metrics: Mapping[str, Any], splits: tuple[str, ...] = ("valid", "test")) -> str:
    """A fixed-width table of ``metrics["valid"]`` / ``metrics["test"]`` per behavior, followed by
    the most-popular baseline's rows on the same splits when ``metrics`` has them."""
    rows: list[tuple[str, str, Mapping[str, float]]] = []
    for split in splits:
        for behavior, vals in (metrics.get(split) or {}).items():
            rows.append((split, behavior, vals))
    for split in splits:
        for behavior, vals in ((metrics.get("most_popular") or {}).get(split) or {}).items():
            rows.append((f"{split} (most-popular)", behavior, vals))
    if not rows:
        return "(no metrics)"
    names = [k for k in rows[0][2] if k != "n_users"]
    order = {m: i for i, m in enumerate(("HR", "NDCG", "Recall", "Precision", "MRR"))}
    names.sort(key=lambda k: (int(k.split("@")[1]) if "@" in k else 0, order.get(k.split("@")[0], 9)))
    head = ["split", "behavior", "users"] + names
    body = [
        [s, b, f"{int(v.get('n_users', 0)):,}"] + [f"{v.get(n, float('nan')):.4f}" for n in names]
        for s, b, v in rows
    ]
    widths = [max(len(str(r[c])) for r in [head] + body) for c in range(len(head))]
    fmt = lambda r: "  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    return "\n".join(lines)
