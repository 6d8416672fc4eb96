"""What `zinspect info` and `zinspect validate` print: rich tables for people, plain dicts
(for `--json`) for scripts. rich is imported only when something is printed for a person."""

from __future__ import annotations

import os

from zinspect.core.fmt import SHOWN_CHARS, shown

#: a finding's message, where and hint quote names: room for a few of them
MESSAGE_CHARS = 600


def _safe(text: object, limit: int = SHOWN_CHARS) -> str:
    """A checkpoint string for rich: control characters escaped, shortened, markup escaped."""
    from rich.markup import escape

    return escape(shown(text, limit))


def _or_unknown(value) -> str:
    return "?" if value is None else str(value)


def _group_of(ckpt, p) -> int | None:
    """Optimizer param group of a param; a tied alias has its owner's, a frozen one none."""
    if p.tied_to is not None:
        owner = ckpt.params.get(p.tied_to)
        p = owner if owner is not None else p
    return None if p.frozen else p.group


def output_bytes(ckpt, numels: list[int] | None = None) -> int:
    """Bytes an fp32 merge writes: the one size rule of `info`, the app and the merge preview
    (it is `plan_merge(ckpt).total_bytes`). Every param name is written, a tied alias as a
    tensor of its own, at 4 bytes an element (16-bit masters and frozen values are upcast);
    every buffer keeps its dtype (a buffer named like a param is written in its place).
    `numels`: each param's numel, in order, when the caller has them."""
    from zinspect.core.params import column

    params = ckpt.params
    if numels is None:
        numels = column(params, "numel")
    replaced = sum(params[name].numel for name in ckpt.buffers if name in params)
    return 4 * (sum(numels) - replaced) + sum(b.nbytes for b in ckpt.buffers.values())


def totals(ckpt, columns: dict[str, list] | None = None) -> dict:
    """Counts and sizes of a checkpoint, shared by `zinspect info` and the app's Overview.
    A tied alias counts once, as tied, whether or not its owner is frozen; `output_bytes` is
    what the merge writes (tied aliases and buffers included). (`columns`: the params'
    `report_json._param_columns`, when the caller has them: 297k params' attributes are not free.)"""
    from itertools import compress, repeat
    from operator import and_, is_, not_

    from zinspect.core.params import column

    columns = columns or {k: column(ckpt.params, k) for k in ("numel", "frozen", "tied_to")}
    numels, n = columns["numel"], len(columns["numel"])
    numel = sum(numels)
    trainable_numel, frozen_numel, trainable, frozen, tied = numel, 0, n, 0, 0
    if columns["tied_to"].count(None) != n or any(columns["frozen"]):  # (else: all trainable)
        # at C speed (300k params): owner = not tied; trainable = owner and not frozen
        owner = list(map(is_, columns["tied_to"], repeat(None)))
        is_trainable = list(map(and_, owner, map(not_, columns["frozen"])))
        is_frozen = list(map(and_, owner, map(not_, is_trainable)))
        numel = sum(compress(numels, owner))
        trainable_numel, frozen_numel = sum(compress(numels, is_trainable)), sum(compress(numels, is_frozen))
        trainable, frozen, tied = sum(is_trainable), sum(is_frozen), n - sum(owner)
    buf_bytes = sum(b.nbytes for b in ckpt.buffers.values())
    return {
        "params": n,
        "trainable": trainable,
        "frozen": frozen,
        "tied": tied,
        "buffers": len(ckpt.buffers),
        "numel": numel,
        "trainable_numel": trainable_numel,
        "frozen_numel": frozen_numel,
        "fp32_bytes": numel * 4,  # the params' own elements, each tied pair counted once
        "buffer_bytes": buf_bytes,
        "output_bytes": output_bytes(ckpt, numels),
        "files": len(ckpt.files),
        "file_bytes": sum(f.size for f in ckpt.files),
    }


def optimizer_json(ckpt) -> dict:
    """The optimizer's step, hyper-parameters per param group, per-param state keys and loss
    scaler, from the lowest rank's optimizer file (its pickle only)."""
    from zinspect.core.optimizer import read_optimizer

    return read_optimizer(ckpt).to_json()


def peft_summary(ckpt) -> dict | None:
    from zinspect.core import peft

    return peft.summary(ckpt)


_KIND_ORDER = {"model": 0, "optim": 1}


def _sorted_files(ckpt):
    """Model states first, then optimizer files, each by rank (a number, not its spelling)."""
    return sorted(ckpt.files, key=lambda f: (_KIND_ORDER.get(f.kind, 2), f.mp_rank or 0,
                                             -1 if f.rank is None else f.rank, f.name))


def console(stderr: bool = False):
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con.width = 120  # piped or redirected: room for full file names
    return con


_SEV_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _counts_text(counts: dict) -> str:
    parts = []
    for sev in ("error", "warning", "info"):
        n = counts.get(sev, 0)
        word = sev if n == 1 else ("info" if sev == "info" else sev + "s")
        style = _SEV_STYLE[sev] if n else "dim"
        parts.append(f"[{style}]{n} {word}[/]")
    return ", ".join(parts)


def human_info(ckpt) -> None:
    from rich import box
    from rich.table import Table

    from zinspect.core import fmt
    from zinspect.core.model import short_dtype

    con = console()
    t = totals(ckpt)
    other = [x for x in ckpt.tags if x != ckpt.tag]

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("path", _safe(ckpt.path))
    others = f"   [dim](other tags: {_safe(ellipsis([shown(x, 40) for x in other], 6))})[/]" \
        if other else ""
    summary.add_row("tag", _safe(ckpt.tag) + others)
    summary.add_row("ZeRO stage", _or_unknown(ckpt.stage))
    summary.add_row("world size", _or_unknown(ckpt.world_size or None))
    summary.add_row("layout", _safe(ckpt.layout))
    axes = {a: n for a, n in ckpt.topology.sizes.items() if n > 1}
    if len(axes) > 1 or set(axes) - {"dp"}:
        summary.add_row("parallel", " × ".join(f"{a} {n}" for a, n in axes.items()))
    if ckpt.features:
        summary.add_row("features", ", ".join(ckpt.features))
    summary.add_row("dtype", f"{short_dtype(ckpt.dtype)} training, "
                             f"{short_dtype(ckpt.master_dtype)} masters")
    summary.add_row("DeepSpeed", _safe(ckpt.ds_version or "?"))
    summary.add_row("params", f"{fmt.count(t['params'])} names: {fmt.count(t['trainable'])} "
                              f"trainable, {fmt.count(t['frozen'])} frozen, "
                              f"{fmt.count(t['tied'])} tied")
    summary.add_row("elements", f"{fmt.count(t['numel'])} ({fmt.short_count(t['numel'])}; "
                                f"{fmt.short_count(t['trainable_numel'])} trainable, "
                                f"{fmt.short_count(t['frozen_numel'])} frozen)")
    summary.add_row("fp32 output", f"{fmt.size(t['output_bytes'])}: what `merge` writes "
                                   f"({fmt.count(t['params'])} params, {t['buffers']} buffers)")
    summary.add_row("on disk", f"{fmt.size(t['file_bytes'])} in {t['files']} files")
    adapter = peft_summary(ckpt)
    if adapter is not None:
        from zinspect.core import peft

        summary.add_row("PEFT", _safe(peft.describe(adapter), 300))
    _optimizer_rows(ckpt, summary)
    summary.add_row("findings", _counts_text(ckpt.counts()))
    con.print(summary)

    files = Table(title="files", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("rank", "right"), ("kind", "left"), ("file", "left"),
                      ("size", "right"), ("status", "left")):
        files.add_column(col, justify=just)
    rows = _sorted_files(ckpt)
    for f in _fold(rows, 24, 8, 4):
        if f is None:
            files.add_row("", "", f"[dim]... {len(rows) - 12} more[/]", "", "")
            continue
        status = f"[red]{_safe(f.error)}[/]" if f.error else (
            f"[dim]{f.format}[/]" if f.format else "[dim]-[/]")
        files.add_row("" if f.rank is None else str(f.rank), f.kind, _safe(f.name),
                      fmt.size(f.size), status)
    con.print(files)

    if ckpt.groups:
        groups = Table(title="param groups", title_justify="left", box=box.SIMPLE_HEAD,
                       pad_edge=False)
        for col, just in (("group", "right"), ("opt group", "right"), ("params", "right"),
                          ("elements", "right"), ("master", "left"), ("per rank", "right"),
                          ("padding", "right")):
            groups.add_column(col, justify=just)
        for g in _fold(ckpt.groups, 16, 8, 4):
            if g is None:
                groups.add_row("", "", f"[dim]... {len(ckpt.groups) - 12} more[/]", "", "", "",
                               "")
                continue
            parts = list(g.partition_numel.values())
            per_rank = (fmt.count(parts[0]) if len(set(parts)) == 1 else
                        f"{fmt.count(min(parts))}..{fmt.count(max(parts))}") if parts else "-"
            groups.add_row(str(g.index), str(g.param_group), str(len(g.params)),
                           fmt.count(g.numel), short_dtype(g.dtype), per_rank,
                           fmt.count(sum(g.padding.values())))
        con.print(groups)
    if ckpt.errors:
        con.print(f"[bold red]{len(ckpt.errors)} error(s)[/]: run [bold]zinspect validate "
                  f"{_safe(_quote(str(ckpt.path)))}[/] for what is wrong and what to do")


def _optimizer_rows(ckpt, summary) -> None:
    """`optimizer  AdamW (ZeRO-1/2), step 2; lr 0.01, betas (0.9, 0.95), ...` and, for a
    scaled (fp16) run, the loss scale and the steps it skipped."""
    from zinspect.core.optimizer import read_optimizer, scaler_line, summary_line

    opt = read_optimizer(ckpt)
    summary.add_row("optimizer", _safe(summary_line(opt), 300))
    scale = scaler_line(opt)
    if scale is not None:
        summary.add_row("loss scale", _safe(scale, 300))


def _fold(items: list, limit: int, head: int, tail: int) -> list:
    """All of `items` when short, else the first and last few around a None marker."""
    items = list(items)
    if len(items) <= limit:
        return items
    return items[:head] + [None] + items[-tail:]


def ellipsis(names: list[str], n: int) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


def validate_json(ckpt) -> dict:
    return {"ok": not ckpt.errors, "path": str(ckpt.path), "tag": ckpt.tag,
            "counts": ckpt.counts(), "findings": [f.to_json() for f in ckpt.findings]}


def human_validate(ckpt, verbose: bool = False) -> None:
    con = console()
    con.print(f"[bold]{_safe(ckpt.path)}[/]  (tag {_safe(ckpt.tag)}, "
              f"ZeRO-{_or_unknown(ckpt.stage)}, world size {_or_unknown(ckpt.world_size)})")
    folded = 0 if verbose else sum(1 for f in ckpt.findings if f.cause)
    for sev in ("error", "warning", "info"):
        items = [f for f in ckpt.findings if f.severity == sev and (verbose or not f.cause)]
        if not items:
            continue
        con.print()
        word = sev if len(items) == 1 or sev == "info" else sev + "s"
        con.print(f"[{_SEV_STYLE[sev]}]{len(items)} {word}[/]")
        by_code: dict[str, list] = {}
        for f in items:
            by_code.setdefault(f.code, []).append(f)
        for code, group in by_code.items():
            listed = group if verbose or len(group) <= 5 else group[:3]
            for f in listed:
                con.print(f"  [{_SEV_STYLE[sev]}]{_safe(f.code)}[/]  {_safe(f.message, MESSAGE_CHARS)}")
                where = f.where()
                if where:
                    con.print(f"      [dim]where:[/] {_safe(where, MESSAGE_CHARS)}")
                if f.hint:
                    con.print(f"      [dim]hint:[/]  {_safe(f.hint, MESSAGE_CHARS)}")
            if len(listed) < len(group):
                con.print(f"  [dim]... and {len(group) - len(listed)} more {_safe(code)} "
                          f"(--verbose or --json lists them all)[/]")
    if folded:
        con.print(f"  [dim]{folded} knock-on finding(s) of the files above are folded under "
                  "them (--verbose or --json lists them)[/]")
    con.print()
    if ckpt.errors:
        con.print(f"[bold red]not mergeable as is[/]: {_counts_text(ckpt.counts())}")
    else:
        con.print(f"[bold green]ok[/]: {_counts_text(ckpt.counts())}")

