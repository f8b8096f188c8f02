"""Rendering of a Report: a text table (rich when installed) and a density plot."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _tensor_rows(report: Report, include_dense_activations: bool) -> list[list[str]]:
    rows = []
    for t in report.tensors:
        if t.kind == "activation" and t.density >= 1.0 and not include_dense_activations:
            continue
        rows.append(
            [
                t.name + (f" (= {', '.join(t.aliases)})" if t.aliases else ""),
                t.kind,
                "x".join(map(str, t.shape)),
                _fmt(t.density_given, ".1%"),
                f"{t.density:.1%}",
                # pruned = zeroing it changes no output: index math the plan made dead, too
                "empty (all zero or unused)" if t.pattern == "empty" else t.pattern,
            ]
        )
    return rows


def _node_rows(report: Report) -> list[list[str]]:
    rows = []
    for n in report.nodes:
        if n.impl == "dense" and n.latency_ms is None and n.flops_dense == 0:
            continue
        rows.append(
            [
                n.name,
                n.weight or "-",
                n.target,
                n.impl,
                _fmt(n.latency_ms),
                _fmt(n.dense_latency_ms),
                f"{n.flops_sparse / max(n.flops_dense, 1):.1%}" if n.flops_dense else "-",
                n.reason or "-",
            ]
        )
    return rows


TENSOR_HEAD = ["tensor", "kind", "shape", "given", "propagated", "pattern"]
NODE_HEAD = ["node", "weight", "target", "impl", "ms", "dense ms", "flops kept", "why"]


def render_text(report: Report, include_dense_activations: bool = False) -> str:
    tensors = _tensor_rows(report, include_dense_activations)
    nodes = _node_rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain(tensors, nodes, report.summary())
    buf = io.StringIO()
    console = Console(file=buf, width=140, force_terminal=False, color_system=None)
    t1 = Table(title="Sparsity (non-dense activations only)", title_justify="left")
    for h in TENSOR_HEAD:
        t1.add_column(h, overflow="fold")
    for r in tensors:
        t1.add_row(*r)
    t2 = Table(title="Plan (matmul-like and non-dense nodes)", title_justify="left")
    for h in NODE_HEAD:
        t2.add_column(h, overflow="fold")
    for r in nodes:
        t2.add_row(*r)
    console.print(t1)
    console.print(t2)
    console.print(report.summary())
    return buf.getvalue()


def _plain(tensors: list[list[str]], nodes: list[list[str]], summary: str) -> str:
    def table(head: list[str], rows: list[list[str]]) -> str:
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
        ]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])

    return f"{table(TENSOR_HEAD, tensors)}\n\n{table(NODE_HEAD, nodes)}\n\n{summary}\n"


def plot_densities(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [t for t in report.tensors if t.kind == "parameter" and len(t.shape) >= 2]
    names = [t.name for t in params]
    given = [t.density_given if t.density_given is not None else 1.0 for t in params]
    after = [t.density for t in params]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], given, width=0.4, label="given")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after propagation")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title("Weight density per layer: given vs propagated", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
