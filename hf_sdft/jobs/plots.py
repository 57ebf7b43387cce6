"""PNG figures of a recovery run, drawn on Agg canvases (no pyplot, no global backend).

Every figure is ``FIGSIZE`` inches at ``DPI``: ``PIXELS`` (width, height) pixels. A function
whose data is missing writes nothing and returns ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

FIGSIZE = (8.0, 4.5)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
LOSS_PARTS = {"ce_loss": "CE", "kd_loss": "KD", "cka_loss": "CKA (1 − mean CKA)"}


def _stride(n: int, most: int = 16) -> int:
    """Tick stride that labels at most ``most`` of ``n`` positions."""
    return max(1, -(-n // most))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays PIXELS
    return path


def plot_cka_per_layer(cka_before: dict, cka_after: dict, output_dir: str | Path) -> Path | None:
    """``cka_per_layer.png``: per-layer student↔teacher CKA before and after recovery
    (``{layer: cka}`` dicts, keys int or str, as in ``sdft_stats.json``)."""
    if not cka_before or not cka_after:
        return None
    before, after = ({int(k): float(v) for k, v in d.items()} for d in (cka_before, cka_after))
    layers = sorted(before)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(layers, [before[i] for i in layers], "o-", label="degraded (before)")
    ax.plot(layers, [after.get(i, float("nan")) for i in layers], "s-", label="recovered (after)")
    ax.set(xlabel="layer", ylabel="linear CKA to the teacher", title="Per-layer CKA, before vs after recovery")
    ax.set_xticks(layers[:: _stride(len(layers))])
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(output_dir) / "cka_per_layer.png")


def plot_cka_history(history: Sequence[dict], output_dir: str | Path) -> Path | None:
    """``cka_history.png``: heatmap of per-layer CKA (rows) at each measured step (columns).

    ``history``: :func:`hf_sdft.cka.measure.cka_history` entries (layer keys int or str).
    """
    if not history:
        return None
    rows = [{int(k): float(v) for k, v in entry["layers"].items()} for entry in history]
    layers = sorted(rows[0])
    steps = [entry["step"] for entry in history]
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow([[row.get(i, float("nan")) for row in rows] for i in layers], aspect="auto", origin="lower",
                      cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="linear CKA to the teacher")
    xs, ys = range(0, len(steps), _stride(len(steps))), range(0, len(layers), _stride(len(layers)))
    ax.set_xticks(xs, [str(steps[j]) for j in xs])
    ax.set_yticks(ys, [str(layers[j]) for j in ys])
    ax.set(xlabel="training step", ylabel="layer", title="Per-layer CKA during recovery")
    return _save(fig, Path(output_dir) / "cka_history.png")


def plot_loss_curves(log_history: Sequence[dict], output_dir: str | Path) -> Path | None:
    """``loss_curves.png``: the logged training loss parts (CE, KD, CKA) over steps."""
    curves = {
        key: [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        for key in LOSS_PARTS
    }
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    for key, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, label=LOSS_PARTS[key])
    ax.set(xlabel="training step", ylabel="loss (per token)", title="Recovery loss parts")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(output_dir) / "loss_curves.png")


def plot_study_scatter(points: Sequence[dict], output_dir: str | Path) -> Path | None:
    """``study_scatter.png``: mean CKA (x) against held-out perplexity (y) of every study point
    (:mod:`hf_sdft.jobs.study`: ``{"arm", "seed", "step", "cka_mean", "ppl", ...}``), coloured by arm."""
    if not points:
        return None
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    for arm in dict.fromkeys(p["arm"] for p in points):
        mine = [p for p in points if p["arm"] == arm]
        ax.scatter([p["cka_mean"] for p in mine], [p["ppl"] for p in mine], label=arm,
                   marker="*" if arm == "degraded" else "o", s=120 if arm == "degraded" else 24, alpha=0.8)
    ax.set(xlabel="mean linear CKA to the teacher", ylabel="held-out perplexity",
           title="Alignment vs perplexity, every arm, seed and measured step")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(output_dir) / "study_scatter.png")


def plot_study_layers(points: Sequence[dict], output_dir: str | Path) -> Path | None:
    """``study_layers.png``: per arm (one panel each), every layer's CKA over the measured steps,
    averaged over seeds; step 0 is the degraded student."""
    start = next((p for p in points if p["arm"] == "degraded"), None)
    arms = list(dict.fromkeys(p["arm"] for p in points if p["arm"] != "degraded"))
    if start is None or not arms:
        return None
    layers = sorted(start["cka"], key=int)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    for ax, arm in zip(axes, arms):
        steps = sorted({p["step"] for p in points if p["arm"] == arm})
        for layer in layers:
            means = [sum(vals) / len(vals) for vals in
                     ([p["cka"][layer] for p in points if p["arm"] == arm and p["step"] == s] for s in steps)]
            ax.plot([0, *steps], [start["cka"][layer], *means], marker=".", label=f"layer {layer}")
        ax.set(title=arm, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("linear CKA to the teacher")
    axes[-1].legend(fontsize="small")
    fig.suptitle("Per-layer CKA during recovery (mean over seeds)")
    return _save(fig, Path(output_dir) / "study_layers.png")
