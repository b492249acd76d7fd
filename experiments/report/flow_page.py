"""The information-flow page (``vlm-lens flow``): knockout curves with the critical layer, a table per sample, and
``report.json`` with every number behind them."""

from __future__ import annotations

from pathlib import Path

from vlm_lens.experiments.report.charts import flow_chart
from vlm_lens.experiments.report.page import fmt, named, paragraph, table, write_report

EXPLAIN = ("Each curve blocks one flow of attention, 'A->B' (the positions of role B may not attend to those of role A), "
           "in a window of {window} consecutive decoder layers starting at the x value, and shows the relative change of "
           "the probability of the answer's first token at the last prompt position (0 % = the flow is not needed there; "
           "-100 % = the answer is gone). Roles: image = image tokens, question = the prompt's other tokens but the last, "
           "last = the last prompt position. The dashed line is the median critical layer of the same answers "
           "(where the correct lens first reads them), on the decoder layer whose output it is.")  # fmt: skip


def sections(result: dict, n_rows: int = 20) -> list[tuple[str, list]]:
    agg = result["aggregate"]
    crit = agg["critical_layer"]
    median_crit = None if crit is None else crit["median"]
    window, starts = result["window"], result["window_starts"]
    figures = [named(flow_chart(starts, window, agg["mean"], median_crit,
                                f"{result['model']}: mean change over {agg['n']} samples"), "flow_mean"),
               named(flow_chart(starts, window, agg["median"], median_crit,
                                f"{result['model']}: median change"), "flow_median")]  # fmt: skip
    cost = result["cost"]
    summary = (f"{agg['n']} samples, {len(result['flows'])} flows, windows of {window} decoder layers starting at "
               f"{starts[0]}..{starts[-1]}: {cost['forwards_per_sample']} forwards per sample "
               f"({cost['seconds_per_sample']} s per sample here, batches of {cost['batch_size']})."
               + ("" if crit is None else f" Critical layer: median {crit['median']} (quartiles {crit['q1']}-{crit['q3']},"
                                          f" {crit['n']} answers)."))  # fmt: skip
    headers = ["sample", "question", "answer", "P(answer)", "critical"] + [f"{f}: largest drop" for f in result["flows"]]
    rows = []
    for row in result["samples"][:n_rows]:
        drops = []
        for flow in result["flows"]:
            values = row["relative_change"][flow]
            worst = min(range(len(values)), key=lambda w: values[w])
            drops.append(f"{100 * values[worst]:.0f} % at {starts[worst]}")
        rows.append([row["name"], row["question"], row["answer_token"], fmt(row["baseline_prob"]),
                     fmt(row["critical_layer"])] + drops)  # fmt: skip
    return [("Where the image enters", [paragraph(summary), paragraph(EXPLAIN.format(window=window)), *figures]),
            (f"Samples (first {min(n_rows, len(result['samples']))})", [table(headers, rows)])]


def write(result: dict, out_dir: str | Path, png: bool = True) -> dict:
    """``out_dir/report.html`` and ``report.json`` (the result), with PNGs of the curves when a browser is present."""
    return write_report(Path(out_dir), f"vlm-lens flow · {result['model']}", sections(result), result, png=png)
