"""The ``index.html`` of a compare report: one self-contained page (plus the PNGs beside it).

It opens with the verdict (what to use and why, with the caveats), then the command that
reproduces the run, the overall ranking, and one section per task with every column, the full
hyperparameters of every row and the plots. Readable on a phone: a viewport meta, tables in
horizontal scroll containers, images never wider than the screen.
"""

from __future__ import annotations

import html
import re
import shlex
from typing import Any

from .report import _mode, _overall_cols, _sweep_cols, _task_cols, fmt, table_title
from .verdict import verdict

__all__ = ["render_html", "reproduce_command"]

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:1em 1.2em 3em;max-width:1500px;
 color:#222;line-height:1.45;-webkit-text-size-adjust:100%}
h1{font-size:1.6em;margin:0.3em 0}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
.verdict{background:#f4f8ff;border:1px solid #c9dcf5;border-left:5px solid #3b7dd8;border-radius:4px;padding:0.6em 1em;
 margin:1em 0}
.verdict p{margin:0.45em 0}.verdict .caveats{color:#5a4100}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%;margin:0.5em 0 1em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap;vertical-align:top}
th{white-space:normal;min-width:3.5em;vertical-align:bottom}
td.l,th.l{text-align:left}td.wrap{white-space:normal;min-width:10em;max-width:40em}
th{background:#f3f3f3;position:sticky;top:0}
tr.unranked td{color:#888}
img{max-width:100%;height:auto;border:1px solid #eee;display:block;margin:0.5em 0}
pre{background:#f6f6f6;border:1px solid #e3e3e3;padding:0.6em;white-space:pre-wrap;overflow-wrap:anywhere;
 font-size:90%}
.small{color:#666;font-size:90%}
code{font-size:92%;overflow-wrap:anywhere}
details.hp{margin:0.5em 0 1em}details.hp summary{cursor:pointer;font-weight:600}details.hp li{margin:0.3em 0}
@media (max-width:700px){body{padding:0.6em 0.7em 2em;font-size:15px}td,th{padding:2px 5px}h1{font-size:1.35em}}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _table(cols: list[Any], row_class: list[str] | None = None) -> str:
    """A table in a scroll container (wide tables scroll sideways on a phone, never squeeze)."""
    th = "".join(f"<th class='{'l' if c.left else ''}'>{_e(c.head)}</th>" for c in cols)
    n = max((len(c.cells) for c in cols), default=0)
    body = []
    for i in range(n):
        cls = f" class='{row_class[i]}'" if row_class and row_class[i] else ""
        tds = "".join(
            f"<td class='{'l' if c.left else ''}{' wrap' if c.head == 'note' else ''}'>"
            f"{_e(c.cells[i])}</td>" for c in cols)
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<div class='scroll'><table><thead><tr>{th}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"


def _img(src: str, alt: str) -> str:
    """A plot scaled to the page; on a phone a tap opens it full size."""
    return f"<a href='{_e(src)}'><img src='{_e(src)}' alt='{_e(alt)}' loading='lazy'></a>"


def reproduce_command(result: dict[str, Any]) -> tuple[str, bool]:
    """The shell command that reproduces the run, and whether it is exact.

    The runner records the argv (``command_line``); an older result only has its config, from
    which the command is rebuilt (not exact: a user task is known only by its name)."""
    if result.get("command_line"):
        return str(result["command_line"]), True
    if isinstance(result.get("command"), list) and result["command"]:
        return shlex.join(str(a) for a in result["command"]), True
    cfg = result.get("config", {})
    argv = ["optimkit", "compare"]
    tasks = cfg.get("task_specs") or cfg.get("tasks") or []
    if tasks:
        argv += ["--tasks", *tasks]
    if cfg.get("optimizers"):
        argv += ["--optimizers", *cfg["optimizers"]]
    for key, flag in (("steps", "--steps"), ("seeds", "--seeds"), ("budget", "--budget")):
        if cfg.get(key) is not None:
            argv += [flag, str(cfg[key])]
    if cfg.get("lr_sweep"):
        argv.append("--lr-sweep")
    if cfg.get("quick"):
        argv.append("--quick")
    if cfg.get("device") and cfg["device"] != "cpu":
        argv += ["--device", str(cfg["device"])]
    return shlex.join(argv), False


def _verdict_html(result: dict[str, Any]) -> str:
    v = verdict(result)

    def para(text: str) -> str:
        # the verdict marks its pick with **x**; everything else is escaped text
        body, _, cav = text.partition(" Caveats: ")
        out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(body))
        if cav:
            out += f" <span class='caveats'><strong>Caveats:</strong> {_e(cav)}</span>"
        return f"<p>{out}</p>"

    paras = "".join(para(p) for p in v["text"].split("\n\n") if p) or "<p>No task ran: nothing to recommend.</p>"
    return f"<section class='verdict' id='verdict'><h2 style='border:0;margin:0.2em 0'>Verdict</h2>{paras}</section>"


def _hparams_list(entry: dict[str, Any]) -> str:
    """Every row's full hyperparameters (all constructor arguments), as a wrapping list: a table
    column of long argument lists is unreadable on a phone."""
    rows = entry.get("results", [])
    if not rows:
        return ""
    items = []
    for r in rows:
        hp = r.get("hyperparameters")
        if not isinstance(hp, dict):
            hp = {"lr": r.get("lr"), **(r.get("args") or {})}
        text = ", ".join(f"{k}={fmt(v, 4) if isinstance(v, float) else v}" for k, v in hp.items()) or "—"
        kind = f" <span class='small'>({_e(r['kind'])})</span>" if r.get("kind") else ""
        items.append(f"<li><strong>{_e(r.get('optimizer'))}</strong>{kind}: <code>{_e(text)}</code></li>")
    return ("<details class='hp'><summary>Hyperparameters of every row (every constructor argument)</summary>"
            f"<ul>{''.join(items)}</ul></details>")


def render_html(result: dict[str, Any], files: dict[str, str], x_axis: str = "step") -> str:
    """The whole page as a string (``files``: what :func:`write_report` wrote, by key)."""
    cfg = result.get("config", {})
    mode = _mode(result)
    title = result.get("title") or ("Out-of-the-box comparison (default hyperparameters only)" if mode == "default"
                                    else "Tuned comparison")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>optimkit compare: {_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>optimkit compare</h1><p><strong>{_e(title)}</strong></p>",
        _verdict_html(result),
    ]
    facts = [f"optimkit {_e(result.get('optimkit_version', '?'))}", f"torch {_e(result.get('torch_version', '?'))}"]
    if result.get("optuna_version"):
        facts.append(f"optuna {_e(result['optuna_version'])}")
    facts += [f"started {_e(result.get('created', '?'))}", f"device {_e(cfg.get('device', '?'))}",
              f"{_e(cfg.get('seeds', '?'))} seed(s)"]
    if cfg.get("budget"):
        facts.append(f"budget {_e(cfg['budget'])} trial(s) per optimizer ({_e(cfg.get('sampler') or 'sampler')})")
    if cfg.get("jobs"):
        facts.append(f"{_e(cfg['jobs'])} worker(s)")
    if isinstance(result.get("wall_time_s"), (int, float)):
        facts.append(f"wall time {result['wall_time_s']:.1f} s")
    links = ["<a href='results.json'>results.json</a> (every number)"]
    if "trials_csv" in files:
        links.append("<a href='trials.csv'>trials.csv</a> (every trial)")
    parts.append(f"<p class='small'>{'; '.join(facts)}. Data: {', '.join(links)}.</p>")
    if result.get("complete") is False:
        parts.append("<p><strong>Incomplete:</strong> this report was rendered before every planned trial finished; "
                     "run the same command again to continue.</p>")
    cmd, exact = reproduce_command(result)
    parts.append("<h2>Reproduce</h2>" + ("" if exact else "<p class='small'>Rebuilt from the recorded "
                                         "configuration (the original command line was not recorded).</p>")
                 + f"<pre><code>{_e(cmd)}</code></pre>")
    notes = [f"warning: {w}" for w in result.get("warnings") or []]
    notes += [f"failed: {f.get('task')} · {f.get('optimizer')} seed {f.get('seed')}: {f.get('error')}"
              + (f" (at {f['where']})" if f.get("where") else "") for f in result.get("failures") or []]
    if notes:
        parts.append("<h2>Warnings and failures</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes[:50]) + "</ul>")
    if result.get("overall"):
        by_profile = any(r.get("profile_area") is not None for r in result["overall"])
        how = ("ranked by the area under the steps-to-target performance profile (1 = fastest on every task), "
               "then by mean rank" if by_profile else "mean rank over tasks (lower is better)")
        parts += ["<h2>Overall ranking</h2>",
                  f"<p class='small'>{how}; a task ranks by its validation metric, ties by validation loss; diverged "
                  "or failed runs are never ranked.</p>", _table(_overall_cols(result))]
    if "profile" in files:
        parts.append(_img(files["profile"], "performance profiles"))
    for name, entry in result.get("tasks", {}).items():
        parts.append(f"<h2 id='task-{_slug(name)}'>{_e(name)}</h2>")
        info = ", ".join(f"{k}: {v}" for k, v in (entry.get("info") or {}).items())
        parts.append(f"<p>{_e(table_title(result, name).split(': ', 1)[-1])}; {fmt(entry.get('n_params'))} parameters. "
                     f"<span class='small'>{_e(info)}</span></p>")
        cols = _task_cols(entry, mode)
        ranks = cols[0].cells
        parts.append(_table(cols, ["unranked" if r == "—" else "" for r in ranks]))
        if f"loss_{name}" in files:
            what = "training seconds (evaluation excluded)" if x_axis == "wall" else "steps"
            parts.append(f"<p class='small'>Curves of the ranked rows against {what}; line = seed mean, band = "
                         "min-max over seeds; markers and line styles tell overlapping optimizers apart.</p>"
                         + _img(files[f"loss_{name}"], f"loss curves of {name}"))
        grid = cfg.get("lr_sweep") or cfg.get("sampler") == "grid"
        if entry.get("sweeps") and (grid or not any(r.get("kind") == "best" for r in entry.get("results", []))):
            parts.append("<h3>Learning-rate sweep</h3>" + _table(_sweep_cols(entry)))
        parts.append(_hparams_list(entry))
    if "lr_sweep" in files:
        parts.append("<h2>Sensitivity to the tuned value</h2><p class='small'>Final validation loss of every point "
                     "tried; a flat curve means the optimizer is forgiving.</p>"
                     + _img(files["lr_sweep"], "lr sensitivity"))
    if "prodigy_d" in files:
        parts.append("<h2>Prodigy's step-size estimate</h2><p class='small'>d grows from d0 until it matches the "
                     "distance the weights have to travel; the effective lr is lr x d.</p>"
                     + _img(files["prodigy_d"], "Prodigy d"))
    skipped = [f"optimizer {k}: {v}" for k, v in (result.get("skipped_optimizers") or {}).items()]
    skipped += [f"task {k}: {v}" for k, v in (result.get("unavailable_tasks") or {}).items()]
    if skipped:
        parts.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in skipped) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
