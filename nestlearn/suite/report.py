"""From per-run records to per-task rows (mean +- std over seeds), tables and results.md."""

from __future__ import annotations

from typing import Any

from nestlearn.suite.experiment import Experiment, TaskRow
from nestlearn.suite.params import param_flags
from nestlearn.suite.stats import mean_std
from nestlearn.suite.table import Table, render_md
from nestlearn.tasks import LANGUAGES

SHORT = {"accuracy": "acc", "sequence_accuracy": "seq acc", "bits_per_byte": "bits/byte", "loss": "loss",
         "perplexity": "ppl"}
LOWER_IS_BETTER = ("bits_per_byte", "loss", "perplexity", "forgetting")


def _ms(values: list[float]) -> dict[str, float] | None:
    got = mean_std(values)
    return None if got is None else {"mean": got[0], "std": got[1], "n": len(values)}


def aggregate(exp: Experiment, records: dict[str, dict[str, Any]], counts: dict[str, int]) -> list[dict[str, Any]]:
    """One entry per task: its rows (one per spec) with every metric's mean/std/n over seeds."""
    flags = param_flags(counts, exp.params)
    out = []
    for t in exp.tasks:
        rows = []
        for s in exp.specs:
            recs = [records.get(f"{t.label}/{s.label}/seed{k}") for k in exp.seeds]
            done = [r for r in recs if r is not None and r.get("status") == "done"]
            diverged = [r for r in recs if r is not None and r.get("status") == "diverged"]
            row: dict[str, Any] = {"spec": s.label, "params": counts.get(s.label), "seeds": len(exp.seeds),
                                   "done": len(done), "diverged": len(diverged),
                                   "diverged_at": [r.get("diverged_step") for r in diverged],
                                   "dead_at": [r["dead_since"] for r in done if r.get("dead_since") is not None]}
            if t.kind == "continual":
                domains = list(dict.fromkeys(d for r in done for d in r.get("forgetting", {})))
                row["forgetting"] = {d: _ms([r["forgetting"][d] for r in done
                                             if r.get("forgetting", {}).get(d) is not None]) for d in domains}
                row["value"] = _ms([sum(v for v in r["forgetting"].values()) / len(r["forgetting"])
                                    for r in done if r.get("forgetting")
                                    and all(v is not None for v in r["forgetting"].values())])
            else:
                row["value"] = _ms([r["value"] for r in done if r.get("value") is not None])
                row["lengths"] = {str(f): _ms([r["lengths"][str(f)][t.metric] for r in done
                                               if t.metric in r.get("lengths", {}).get(str(f), {})])
                                  for f in t.eval_lengths}
            row["flags"] = _flags(row, flags.get(s.label))
            expected = (t.steps or 0) * exp.budget.batch * t.seq_len
            if any(r.get("tokens") != expected for r in done):  # equal tokens per row is the contract
                row["flags"].append("unequal tokens")
            rows.append(row)
        out.append({"task": t.label, "name": t.name, "metric": t.metric, "kind": t.kind,
                    "lower_is_better": t.metric in LOWER_IS_BETTER, "eval_lengths": list(t.eval_lengths),
                    "steps": t.steps, "batch": exp.budget.batch, "seq_len": t.seq_len, "rows": rows})
    return out


def _flags(row: dict[str, Any], params_flag: str | None) -> list[str]:
    f = []
    if params_flag:
        f.append(params_flag)
    if row["diverged"]:
        steps = ",".join(str(s) for s in row["diverged_at"])
        f.append(f"{row['diverged']} diverged@{steps}")
    if row.get("dead_at"):  # finished, but learned nothing from these steps on (DeadRunWatch)
        f.append(f"{len(row['dead_at'])} dead@{','.join(str(s) for s in row['dead_at'])}")
    missing = row["seeds"] - row["done"] - row["diverged"]
    if missing:
        f.append(f"{row['seeds'] - missing}/{row['seeds']} seeds")
    return f


def fmt_count(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def fmt_ms(v: dict[str, float] | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v["n"] < 2:
        return f"{v['mean']:.{digits}f}"
    return f"{v['mean']:.{digits}f}±{v['std']:.{digits}f}"


def tables(exp: Experiment, agg: list[dict[str, Any]]) -> list[Table]:
    out = []
    tol = f"±{exp.params.tolerance:.0%} of the {'first spec' if exp.params.reference == 'first' else 'median'}"
    for t, task in zip(agg, exp.tasks, strict=True):
        tokens = (t["steps"] or 0) * t["batch"] * t["seq_len"]
        seeds = f"{len(exp.seeds)} seed{'s' if len(exp.seeds) != 1 else ''}"
        notes = [f"mean ± sample std over {seeds}; {tokens:,} training tokens per run "
                 f"({t['steps']} steps x {t['batch']} x {t['seq_len']}); flagged: params outside {tol}."]
        if exp.budget.carry_state:
            notes.append("state carried across batches (carry_state): every evaluation started its held-out rows "
                         "from the state the training stream carried then.")
        if t["kind"] == "continual":
            cols, rows = _continual_table(t)
            notes.append("forgetting % = 100 (best perf right after learning the domain - perf at the end) / "
                         "best; perf = accuracy, or 8 - bits/byte for text (nestlearn/tasks/continual.py).")
        else:
            cols, rows = _metric_table(t, task)
            if task.eval_lengths:
                what = {"niah": " (the haystack grows)", "mqar": " (pairs as the task's options say)"}.get(
                    task.name, " (unseen string lengths: f/2 L < n <= f L)" if task.name in LANGUAGES else "")
                notes.append(f"{SHORT.get(t['metric'], t['metric'])}@fL: the final model on rows f x "
                             f"{t['seq_len']} bytes long{what}.")
        arrow = "lower is better" if t["lower_is_better"] else "higher is better"
        align = ["l"] + ["r"] * (len(cols) - 2) + ["l"]
        out.append(Table(f"{t['task']} ({t['metric']}, {arrow})", cols, rows, align, notes))
    return out


def _metric_table(t: dict[str, Any], task: TaskRow) -> tuple[list[str], list[list[str]]]:
    short = SHORT.get(t["metric"], t["metric"])
    extra = [f for f in task.eval_lengths if f != 1]
    cols = ["spec", "params", short, *[f"{short}@{f}L" for f in extra], "flag"]
    rows = []
    for r in t["rows"]:
        rows.append([r["spec"], fmt_count(r["params"]), fmt_ms(r["value"]),
                     *[fmt_ms(r["lengths"].get(str(f))) for f in extra], ", ".join(r["flags"])])
    return cols, rows


def _continual_table(t: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    domains = list(dict.fromkeys(d for r in t["rows"] for d in r.get("forgetting", {})))
    cols = ["spec", "params", *[f"{d} %" for d in domains], "mean %", "flag"]
    rows = []
    for r in t["rows"]:
        fg = r.get("forgetting", {})
        rows.append([r["spec"], fmt_count(r["params"]), *[fmt_ms(fg.get(d), 1) for d in domains],
                     fmt_ms(r["value"], 1), ", ".join(r["flags"])])
    return cols, rows


def results_md(exp: Experiment, agg: list[dict[str, Any]], records: dict[str, dict[str, Any]],
               plots: list[str]) -> str:
    done = [r for r in records.values() if r.get("status") in ("done", "diverged")]
    devices = sorted({str(r.get("device")) for r in done})
    dates = sorted(str(r.get("date")) for r in done)
    commands = list(dict.fromkeys(str(r.get("command")) for r in done))
    wall = sum(float(r.get("wall_s") or 0.0) for r in done)
    head = [f"# {exp.name}: results", ""]
    if exp.description:
        head += [exp.description.strip(), ""]
    head += [f"- experiment file: `{exp.file}`",
             f"- command: {', '.join(f'`{c}`' for c in commands) or '-'}",
             f"- device: {', '.join(devices) or '-'}; torch {', '.join(sorted({str(r.get('torch')) for r in done}))}",
             f"- dates: {dates[0] if dates else '-'} .. {dates[-1] if dates else '-'}; "
             f"{len(done)} runs, {wall / 60:.1f} min of training and evaluation", ""]
    body = render_md(tables(exp, agg))
    pics = ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] if plots else []
    return "\n".join(head) + "\n" + body + "\n".join(pics) + "\n"
