"""Statistics, verdicts and the report of the alignment study (:mod:`hf_sdft.jobs.study`).

Two fractions describe where a run ends, both 0 at the degraded student and 1 at the teacher:

- R, performance recovery: (ppl_degraded − ppl) / (ppl_degraded − ppl_teacher);
- A, alignment recovery: (CKA − CKA_degraded) / (1 − CKA_degraded), on the mean CKA over layers.

An arm *recovered* when its mean R over seeds is at least ``RECOVERED`` and *realigned* when its
mean A is at least ``REALIGNED``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from hf_sdft.jobs.correlation import bootstrap_interval, partial_correlation, pearson, spearman
from hf_sdft.jobs.evaluation import recovery_ratio
from hf_sdft.jobs.plots import plot_study_layers, plot_study_scatter
from hf_sdft.jobs.study_arms import ARMS

RECOVERED = 0.2
REALIGNED = 0.2
NEGLIGIBLE_R = 0.01  # a change of R this small counts as none, however small the seed spread
NATURAL_ARMS = ("ce", "kd", "kd+cka")  # arms that train outputs and geometry together
# (intervention arm, recovered, realigned) → what it says about the claim that realignment drives recovery
READINGS = {
    ("head-kd", True, False): "recovery without realignment: realigning the layers is not necessary for this much recovery",
    ("head-kd", False, False): "with the geometry frozen, output matching did not recover: consistent with realignment "
                               "being needed",
    ("head-kd", True, True): "CKA moved although the decoder layers were frozen: check the measured layers",
    ("head-kd", False, True): "CKA moved although the decoder layers were frozen: check the measured layers",
    ("cka", True, True): "realignment with recovery: pushing the geometry alone recovered performance",
    ("cka", False, True): "realignment without recovery: raising CKA is not sufficient for recovery",
    ("cka", True, False): "recovery without much realignment, from the CKA loss alone",
    ("cka", False, False): "the CKA loss alone moved neither CKA nor perplexity much",
}
TITLE = "Alignment study: does CKA track recovery, and does it cause it?"


def alignment_ratio(cka_degraded: float, cka: float) -> float | None:
    """A = (CKA − CKA_degraded) / (1 − CKA_degraded); None when the degraded student is already at 1."""
    gap = 1.0 - cka_degraded
    return None if gap <= 1e-12 else (cka - cka_degraded) / gap


def _spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of the non-None ``values``."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def _with_interval(statistic, *columns, resamples: int) -> dict:
    try:
        value = statistic(*columns)
    except ValueError as err:  # too few points for this statistic
        return {"value": None, "ci95": None, "n": len(columns[0]), "why": str(err)}
    low, high = bootstrap_interval(statistic, *columns, resamples=resamples)
    return {"value": value, "ci95": [low, high], "n": len(columns[0])}


def correlations(points: list[dict], resamples: int) -> dict:
    """Between mean CKA and perplexity over ``points``: Spearman and Pearson, partial Spearman
    with the held-out KD loss held fixed, and Spearman per layer, each with a 95% bootstrap interval."""
    cka = [p["cka_mean"] for p in points]
    ppl = [p["ppl"] for p in points]
    kd = [p["kd"] for p in points]
    layers = sorted(points[0]["cka"], key=int)
    return {
        "n_points": len(points),
        "spearman": _with_interval(spearman, cka, ppl, resamples=resamples),
        "pearson": _with_interval(pearson, cka, ppl, resamples=resamples),
        "partial_spearman_given_kd": _with_interval(partial_correlation, cka, ppl, kd, resamples=resamples),
        "spearman_kd_ppl": _with_interval(spearman, kd, ppl, resamples=resamples),
        "per_layer_spearman": {
            layer: _with_interval(spearman, [p["cka"][layer] for p in points], ppl, resamples=resamples)
            for layer in layers
        },
    }


def summarise_arms(points: list[dict], teacher_ppl: float) -> dict:
    """Per arm, over seeds, at the last measured step: perplexity, R, mean CKA, A and held-out KD."""
    degraded = next(p for p in points if p["arm"] == "degraded")
    last_step = defaultdict(int)
    for p in points:
        last_step[p["arm"], p["seed"]] = max(last_step[p["arm"], p["seed"]], p["step"])
    finals = defaultdict(list)
    for p in points:
        if p["arm"] != "degraded" and p["step"] == last_step[p["arm"], p["seed"]]:
            finals[p["arm"]].append(p)
    return {arm: {
        "seeds": [p["seed"] for p in ends],
        "ppl": _spread([p["ppl"] for p in ends]),
        "R": _spread([recovery_ratio(teacher_ppl, degraded["ppl"], p["ppl"]) for p in ends]),
        "cka_mean": _spread([p["cka_mean"] for p in ends]),
        "A": _spread([alignment_ratio(degraded["cka_mean"], p["cka_mean"]) for p in ends]),
        "kd": _spread([p["kd"] for p in ends]),
    } for arm, ends in finals.items()}


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def _interval(stat: dict) -> str:
    if stat["value"] is None:
        return "n/a"
    low, high = stat["ci95"]
    return f"{stat['value']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _excludes_zero(stat: dict) -> bool:
    return stat["value"] is not None and (stat["ci95"][0] > 0 or stat["ci95"][1] < 0)


def verdicts(arms: dict, stats: dict) -> list[str]:
    """Plain-words findings: one per intervention arm present, the regulariser's effect, and the
    correlation (with and without the KD loss held fixed)."""
    out = []
    for name in ("head-kd", "cka"):
        if name not in arms or arms[name]["R"]["mean"] is None:
            continue
        r, a = arms[name]["R"], arms[name]["A"]
        recovered, realigned = r["mean"] >= RECOVERED, (a["mean"] or 0.0) >= REALIGNED
        what = (f"{name} recovered R = {_fmt(r, 2)} with alignment A = {_fmt(a, 2)} "
                f"(mean CKA {_fmt(arms[name]['cka_mean'], 4)})")
        out.append(f"{what}: {READINGS[name, recovered, realigned]}.")
    for name in NATURAL_ARMS:  # a natural arm that recovered while its CKA fell: recovery against realignment
        if name in arms and None not in (arms[name]["R"]["mean"], arms[name]["A"]["mean"]) \
                and arms[name]["R"]["mean"] >= RECOVERED and arms[name]["A"]["mean"] < 0:
            out.append(f"{name} recovered R = {_fmt(arms[name]['R'], 2)} while its CKA fell (A = "
                       f"{_fmt(arms[name]['A'], 2)}): recovery with the geometry moving away from the teacher's.")
    if "kd" in arms and "kd+cka" in arms and None not in (arms["kd"]["R"]["mean"], arms["kd+cka"]["R"]["mean"]):
        dr = arms["kd+cka"]["R"]["mean"] - arms["kd"]["R"]["mean"]
        dc = arms["kd+cka"]["cka_mean"]["mean"] - arms["kd"]["cka_mean"]["mean"]
        noise = max(arms["kd"]["R"]["std"] or 0.0, arms["kd+cka"]["R"]["std"] or 0.0)
        effect = ("within the seed spread" if abs(dr) <= max(noise, NEGLIGIBLE_R)
                  else "better" if dr > 0 else "worse")
        out.append(f"The CKA regulariser on top of KD changed mean CKA by {dc:+.3f} and R by {dr:+.3f} "
                   f"({effect}; seed spread of R ±{noise:.3f}).")
    overall, partial = stats["all"]["spearman"], stats["all"]["partial_spearman_given_kd"]
    if overall["value"] is not None:
        tracks = ("higher CKA goes with lower perplexity" if overall["value"] < 0 and _excludes_zero(overall) else
                  "higher CKA goes with higher perplexity" if _excludes_zero(overall) else
                  "no clear association")
        line = f"Across all {stats['all']['n_points']} points, Spearman(mean CKA, perplexity) = {_interval(overall)}: {tracks}"
        if partial["value"] is not None:
            direction = "lower" if partial["value"] < 0 else "higher"
            line += (f"; with the held-out KD loss held fixed, {_interval(partial)}: " +
                     (f"at equal output match, higher CKA goes with {direction} perplexity" if _excludes_zero(partial)
                      else "CKA adds nothing once the output match is known"))
        out.append(line + ".")
    return out


def analyse(points: list[dict], teacher_ppl: float, settings: dict, resamples: int = 2000) -> dict:
    """The study's result: every point, per-arm summaries, statistics over all points and over the
    natural arms (ce, kd, kd+cka) alone, and the verdicts."""
    arms = summarise_arms(points, teacher_ppl)
    stats = {"all": correlations(points, resamples)}
    natural = [p for p in points if p["arm"] in ("degraded", *NATURAL_ARMS)]
    if len(natural) < len(points):
        stats["natural_arms"] = correlations(natural, resamples)
    return {"settings": settings, "teacher_ppl": teacher_ppl, "points": points, "arms": arms, "statistics": stats,
            "verdicts": verdicts(arms, stats)}


def _stats_rows(stats: dict) -> list[str]:
    rows = ["| points | n | Spearman ρ [95% CI] | Pearson r [95% CI] | partial ρ given KD [95% CI] | "
            "Spearman(KD, ppl) |", "|---|---|---|---|---|---|"]
    for name, s in stats.items():
        rows.append(f"| {name.replace('_', ' ')} | {s['n_points']} | {_interval(s['spearman'])} | {_interval(s['pearson'])} "
                    f"| {_interval(s['partial_spearman_given_kd'])} | {_interval(s['spearman_kd_ppl'])} |")
    return rows


def report_markdown(result: dict, figures: dict[str, str] | None = None, *, title: str = TITLE, level: int = 1,
                    note: str | None = None) -> str:
    """``study.md``: settings, the per-arm table, the correlations, the verdicts and the figures
    (``{caption: image path}``); ``title`` at heading ``level``, sections one level below, ``note``
    a paragraph under the title."""
    s, arms, stats = result["settings"], result["arms"], result["statistics"]
    degraded = next(p for p in result["points"] if p["arm"] == "degraded")
    section = "#" * (level + 1)
    lines = [
        f"{'#' * level} {title}", "", *([note, ""] if note else []),
        f"Model `{s['model']}`, degradation {s['degradation'].get('kind')}; {s['max_steps']} steps of "
        f"{s['batch']} per run, learning rate {s['learning_rate']}, seeds {s['seeds']}, measured at steps "
        f"{s['measure_steps']} on {s['eval_items']} held-out blocks or examples (CKA on the first {s['probe_items']}). "
        f"Teacher perplexity {result['teacher_ppl']:.2f}; degraded {degraded['ppl']:.2f} with mean CKA "
        f"{degraded['cka_mean']:.4f}.", "",
        "R: fraction of the perplexity gap closed; A: fraction of the CKA gap to 1 closed (mean ± std over seeds).", "",
        "| arm | what trains | perplexity | R | mean CKA | A | held-out KD (nats/token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        lines.append(f"| {name} | {ARMS[name].description} | {_fmt(a['ppl'], 2)} | {_fmt(a['R'])} | "
                     f"{_fmt(a['cka_mean'], 4)} | {_fmt(a['A'])} | {_fmt(a['kd'], 4)} |")
    lines += ["", f"{section} Correlation of mean CKA with perplexity", "",
              "Over every measured point (the degraded start once, then each arm and seed at each measured step); "
              "negative ρ means higher CKA goes with lower perplexity. Intervals: percentile bootstrap over points.", "",
              *_stats_rows(stats), "", "Per layer (all points): " + ", ".join(
                  f"layer {k} {_interval(v)}" for k, v in stats["all"]["per_layer_spearman"].items()), "",
              f"{section} Verdicts", "", *[f"- {v}" for v in result["verdicts"]], ""]
    for title, name in (figures or {}).items():
        lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


def write_report(result: dict, output_dir: str | Path) -> Path:
    """``study.md`` and its figures (``study_scatter.png``, ``study_layers.png``) in ``output_dir``."""
    output_dir = Path(output_dir)
    figures = {}
    for title, path in (("mean CKA vs perplexity", plot_study_scatter(result["points"], output_dir)),
                        ("per-layer CKA trajectories", plot_study_layers(result["points"], output_dir))):
        if path is not None:
            figures[title] = path.name
    path = output_dir / "study.md"
    path.write_text(report_markdown(result, figures))
    return path
