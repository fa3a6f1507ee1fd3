"""Report tables: before/after summaries, per-pass tables, per-layer tables; JSON and Markdown."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    import onnx

    from onnxcomp.auto import AutoResult
    from onnxcomp.calibration import Calibration
    from onnxcomp.changes import Group as DiffGroup
    from onnxcomp.cost import ModelCost
    from onnxcomp.judge import Judge
    from onnxcomp.pipeline import PipelineResult, StepResult
    from onnxcomp.verify import Fidelity


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (SI prefixes)."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}".rstrip()
    return f"{n:.4g} {unit}".rstrip()


def ratio(before: float, after: float) -> str:
    """'before/after' as a compression ratio, e.g. '2.00x'."""
    return f"{before / after:.2f}x" if after else "-"


def summary_rows(
    cost_before: ModelCost,
    cost_after: ModelCost,
    size_before: int,
    size_after: int,
    latency: dict[str, Any] | None,
    result: PipelineResult,
) -> list[list[str]]:
    """Rows of the before/after table: metric, before, after, ratio (before/after)."""
    rows = [
        ["params", human(cost_before.params), human(cost_after.params),
         ratio(cost_before.params, cost_after.params)],
        ["MACs (per sample)", human(cost_before.macs), human(cost_after.macs),
         ratio(cost_before.macs, cost_after.macs)],
        ["file size", human(size_before, "B"), human(size_after, "B"),
         ratio(size_before, size_after)],
    ]
    if latency is not None:
        rows.append([
            f"latency ({latency['provider']}, {latency['threads']} thr, median)",
            f"{latency['before_ms']:.3f} ms",
            f"{latency['after_ms']:.3f} ms",
            f"{latency['speedup']:.2f}x "
            f"(p10 {latency['speedup_p10']:.2f}, p90 {latency['speedup_p90']:.2f})",
        ])
    share = realized(latency, cost_before, cost_after)
    if share is not None:
        rows.append(["realized (speedup / MAC cut)", "-", f"{share:.2f}",
                     "1.00 = every MAC saved is time saved"])
    fid = result.fidelity
    fid_text = f"rel L2 error {fid.rel_l2:.3g}"
    if fid.decision_agreement is not None:
        fid_text += f", decisions kept on {fid.decision_agreement:.1%} of samples"
    if fid.score_agreement is not None:
        fid_text += f", above-threshold scores kept at F1 {fid.score_agreement:.1%}"
    if fid.decision_agreement is None and fid.score_agreement is None and \
            fid.top1_agreement is not None:
        fid_text += f", top-1 agreement {fid.top1_agreement:.1%}"
    rows.append(["fidelity vs original", "-", fid_text + f" ({fid.num_samples} samples)", ""])
    return rows


# A final speedup whose p10-p90 spans more than this share of its median is called noisy.
NOISY_SPREAD = 0.12


def speed_verdict(latency: dict[str, Any], target: float | None) -> tuple[str, bool]:
    """What the final measurement says, and how sure it is: (text, noisy).

    Noisy: the per-round speedups spread wider than ``NOISY_SPREAD`` of their median even
    after the repeats. With a target: met beyond noise (a tenth of the rounds or fewer fell
    under it), met by the median only, or missed.
    """
    median, p10, p90 = latency["speedup"], latency["speedup_p10"], latency["speedup_p90"]
    spread = (p90 - p10) / max(median, 1e-12)
    noisy = spread > NOISY_SPREAD
    text = (f"measured {median:.2f}x over {latency.get('runs', '?')} interleaved rounds "
            f"(p10 {p10:.2f}, p90 {p90:.2f})")
    if noisy:
        text += (f"; timings on this machine were noisy (the rounds spread over "
                 f"{spread:.0%} of the median), so read the median as the figure")
    if target is not None:
        if p10 >= target:
            text += f"; --target-speedup {target:g}: met beyond noise"
        elif median >= target:
            text += (f"; --target-speedup {target:g}: met by the median, not beyond noise (a "
                     f"tenth of the rounds measured under {p10:.2f}x)")
        else:
            text += f"; --target-speedup {target:g}: not met"
            if p90 >= target:
                text += " (within noise: a tenth of the rounds reached it)"
    return text, noisy


def realized(latency: dict[str, Any] | None, cost_before: ModelCost,
             cost_after: ModelCost) -> float | None:
    """Measured speedup over the MAC reduction, when both exist (MACs cut by more than 1 %)."""
    if latency is None or cost_after.macs <= 0 or cost_before.macs <= 1.01 * cost_after.macs:
        return None
    return float(latency["speedup"]) / (cost_before.macs / cost_after.macs)


def summary_table(rows: Sequence[Sequence[str]], title: str) -> Table:
    """A rich table of summary rows."""
    table = Table(title=title)
    for col, justify in (("metric", "left"), ("before", "right"), ("after", "right"),
                         ("ratio", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


def step_table(step: StepResult) -> Table:
    """One pass: applied count, skips grouped by reason, error vs the previous model."""
    rep = step.report
    table = Table(title=f"pass {step.name} ({'lossless' if step.lossless else 'lossy'}, "
                        f"{step.seconds:.1f} s)")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_column("nodes / detail")
    names = ", ".join(c.node for c in rep.applied[:6]) + (" ..." if len(rep.applied) > 6 else "")
    table.add_row("applied", str(len(rep.applied)), names)
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    for s in rep.skipped:
        by_reason[s.reason.value].append(s.node)
    for reason, nodes in sorted(by_reason.items()):
        shown = ", ".join(nodes[:4]) + (" ..." if len(nodes) > 4 else "")
        table.add_row(f"skipped: {reason}", str(len(nodes)), shown)
    table.add_row("rel L2 error vs previous", "", f"{step.fidelity.rel_l2:.3g}")
    for note in rep.notes:
        table.add_row("note", "", note)
    return table


def layer_table(cost: ModelCost, title: str, limit: int | None = None) -> Table:
    """Per-layer params/MACs table (nodes with weights or MACs only)."""
    table = Table(title=title)
    for col in ("node", "op", "output shape", "params", "MACs", "% MACs"):
        table.add_column(col, justify="left" if col in ("node", "op") else "right")
    rows = [n for n in cost.nodes if n.params or n.macs]
    total = cost.macs or 1
    for n in rows[:limit] if limit else rows:
        shape = "x".join(str(d) for d in n.output_shape) if n.output_shape else "?"
        table.add_row(n.name, n.op_type, shape, human(n.params), human(n.macs),
                      f"{100 * n.macs / total:.1f}")
    table.add_row("total", "", "", human(cost.params), human(cost.macs), "100.0",
                  style="bold")
    return table


def auto_table(chosen: AutoResult) -> Table:
    """Every plan ``--auto`` compiled: passes, measured speedup, loss, and which one won."""
    table = Table(title=f"--auto: {chosen.chosen} ({chosen.why})", title_justify="left")
    for header in ("plan", "passes", "speedup (p10-p90)", "loss (metric)", ""):
        table.add_column(header)
    for plan in chosen.plans:
        if plan.error is not None:
            table.add_row(plan.name, "-", "-", "-", f"failed: {plan.error}")
            continue
        passes = " > ".join(s.name for s in plan.steps)
        table.add_row(plan.name, passes,
                      f"{plan.speedup:.2f}x ({plan.p10:.2f}-{plan.p90:.2f})",
                      f"{plan.drop:.4g} ({plan.metric})",
                      "chosen" if plan.name == chosen.chosen else "")
    return table


def many_table(summaries: list[dict[str, Any]]) -> Table:
    """One row per model of ``optimize-many``: passes, params, speedup, loss, time, where."""
    table = Table(title="optimize-many", title_justify="left")
    for header in ("model", "passes", "params", "speedup", "loss (metric)", "seconds",
                   "measured on", ""):
        table.add_column(header)
    for s in summaries:
        if s["error"]:
            table.add_row(Path(s["model"]).name, "-", "-", "-", "-", f"{s['seconds']:.1f}",
                          s["measured_on"], "failed")
            continue
        before, after = s["params"]
        speed = "-" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        table.add_row(Path(s["model"]).name, " > ".join(s["passes"]),
                      f"{human(before)} -> {human(after)}", speed,
                      f"{s['loss']:.4g} ({s['loss_metric']})", f"{s['seconds']:.1f}",
                      s["measured_on"],
                      "synthetic inputs" if s["synthetic_calibration"] else "")
    return table


def eval_table(fid: Fidelity, loss: float, measure: str, samples: int, title: str) -> Table:
    """``onnxcomp eval``: the loss that bounds decisions, then every measure beside it."""
    table = Table(title=f"{title} ({samples} samples)", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("loss (what --max-drop bounds)", f"{loss:.4g} ({measure})", style="bold")
    rows = [("decisions kept", fid.decision_agreement), ("score-set F1", fid.score_agreement),
            ("top-1 agreement", fid.top1_agreement), ("your metric", fid.metric_score)]
    for label, value in rows:
        if value is not None:
            table.add_row(label, f"{value:.2%}")
    if fid.label_accuracy is not None:
        before, after = fid.label_accuracy
        table.add_row("labelled accuracy", f"{before:.2%} -> {after:.2%}")
    if fid.regression_rel_l2 is not None:
        table.add_row("regression outputs, rel. error", f"{fid.regression_rel_l2:.4g}")
    for out in fid.outputs:
        table.add_row(f"output {out.name}, rel. L2 error", f"{out.rel_l2:.4g}")
    return table


def diff_table(groups: Sequence[DiffGroup], title: str) -> Table:
    """``onnxcomp diff``: one row per original node that a pass replaced, changed or removed."""
    table = Table(title=title, title_justify="left")
    for header in ("", "node", "op", "by", "params", "MACs", "error", "now"):
        table.add_column(header)
    for g in groups:
        now = ", ".join(g.after[:3]) + (f" (+{len(g.after) - 3})" if len(g.after) > 3 else "")
        absorbed = [n for n in g.before if n != g.origin]
        table.add_row(g.kind, g.origin + (f" (+ {', '.join(absorbed)})" if absorbed else ""),
                      g.op_type, ", ".join(g.passes) or "-",
                      f"{human(g.params_before)} -> {human(g.params_after)}",
                      f"{human(g.macs_before)} -> {human(g.macs_after)}",
                      "-" if g.error is None else f"{g.error:.3g}", now or "-")
    return table


def heldout(original: onnx.ModelProto, final: onnx.ModelProto, calib: Calibration,
            held: Calibration, budget: float | None, judge: Judge | None = None
            ) -> dict[str, Any]:
    """The final model's loss on held-out data beside the calibration figure.

    A warning when the held-out loss is over ``budget`` (when given) while the calibration
    loss was within it: the compile fit its few samples (data basis, sensitivity), not the
    data.
    """
    from onnxcomp import fidelity
    from onnxcomp.judge import Judge

    on_calib = fidelity.bound(fidelity.Reference.of(original, calib, judge).compare(final))
    # labels belong to the calibration samples, not the held-out ones
    plain = dataclasses.replace(judge or Judge(), labels=None)
    on_held = fidelity.bound(fidelity.Reference.of(original, held, plain).compare(final))
    doc: dict[str, Any] = {
        "calibration": {"drop": on_calib[0], "metric": on_calib[1],
                        "samples": calib.num_samples},
        "heldout": {"drop": on_held[0], "metric": on_held[1], "samples": held.num_samples},
        "text": (f"loss on held-out data: {on_held[0]:.4g} ({on_held[1]}, "
                 f"{held.num_samples} samples); on the calibration data: {on_calib[0]:.4g}"),
    }
    if budget is not None and on_held[0] > budget >= on_calib[0]:
        doc["warning"] = (f"held-out loss {on_held[0]:.4g} is over the budget {budget:g} that "
                          f"the calibration data ({on_calib[0]:.4g}) kept: more or more varied "
                          f"--calib samples help")
        doc["code"] = "heldout_over_budget"
    return doc


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
