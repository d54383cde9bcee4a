"""Which line of Python made each kernel of a profile: the source map of XLA's optimized HLO.

A profiler trace names each kernel by its HLO instruction (`hlo_op`, e.g.
`loop_add_fusion.12`), which says what kind of work it is but not which part of the model
asked for it. XLA's HLO dump (`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`) keeps,
for every instruction, the JAX op name (`transpose(jvp(...))` marks the backward) and a
stack frame id into tables of file names, function names and locations at the top of the
module text. This reads those tables so a profile can be summed by source line.

By hand because no library reads the text dump's stack-frame tables (xprof's op profile
shows op names, not lines, and needs the xplane from the same run).

    sources = read_sources(DIR)        # {(module, hlo_op): Source}
    lookup(sources, module, hlo_op)    # a trace event's Source, or None
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

DUMP_FLAGS = "--xla_dump_to={dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re={module}"

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_ROW = re.compile(r"^(\d+) (.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")


@dataclasses.dataclass(frozen=True)
class Source:
    file: str       # the file's base name, e.g. "moe.py"
    line: int
    function: str   # e.g. "moe_dropless.<locals>.experts"
    backward: bool  # the op is part of a transpose (autodiff's backward)
    # For a fusion: the functions of the instructions fused into it, most frequent first
    # (a fusion is named after its root, but holds the work of every op XLA fused in).
    contents: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line} {self.function}"

    def label(self) -> str:
        return f"{'bwd' if self.backward else 'fwd'} {self.where()}"


def _tables(lines: list[str]) -> dict[str, dict[int, str]]:
    """The FileNames / FunctionNames / FileLocations / StackFrames tables: id -> row text."""
    out, current = {}, None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = out.setdefault(line, {})
            continue
        m = _ROW.match(line)
        if current is not None and m:
            current[int(m.group(1))] = m.group(2)
        elif current is not None:
            current = None
    return out


def parse_module(text: str) -> tuple[str, dict[str, Source]]:
    """(module name, {instruction name: Source}) of one optimized HLO module's text. An
    instruction without a stack frame (made by XLA itself) is left out."""
    lines = text.splitlines()
    head = re.match(r"HloModule ([\w.\-]+)", lines[0] if lines else "")
    module = head.group(1) if head else "?"
    t = _tables(lines)
    files = {i: os.path.basename(v.strip('"')) for i, v in t.get("FileNames", {}).items()}
    funcs = {i: v.strip('"') for i, v in t.get("FunctionNames", {}).items()}
    locs = {i: dict((k, int(v)) for k, v in _FIELDS.findall(row))
            for i, row in t.get("FileLocations", {}).items()}
    frames = {i: dict((k, int(v)) for k, v in _FIELDS.findall(row))
              for i, row in t.get("StackFrames", {}).items()}
    out, members, calls, computation = {}, {}, {}, None
    for line in lines:
        head_c = _COMPUTATION.match(line)
        if head_c:
            computation = head_c.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        callee = _CALLS.search(line)
        if callee:
            calls[m.group(1)] = callee.group(1)
        frame = _FRAME.search(m.group(2))
        op_name = _OP_NAME.search(m.group(2))
        loc = locs.get(frames.get(int(frame.group(1)), {}).get("file_location_id", -1)) \
            if frame else None
        if not loc:
            continue
        src = Source(files.get(loc.get("file_name_id"), "?"), loc.get("line", 0),
                     funcs.get(loc.get("function_name_id"), "?"),
                     "transpose(" in (op_name.group(1) if op_name else ""))
        out[m.group(1)] = src
        members.setdefault(computation, []).append(f"{src.file} {src.function}")
    for op, callee in calls.items():
        if op in out and members.get(callee):
            counts = collections.Counter(members[callee])
            label = " + ".join(k for k, _ in counts.most_common(3))
            out[op] = dataclasses.replace(out[op], contents=label)
    return module, out


def read_sources(dump_dir: str) -> dict[tuple[str, str], Source]:
    """{(module, instruction): Source} over every optimized module text in `dump_dir`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        with open(path) as f:
            module, table = parse_module(f.read())
        out.update({(module, op): src for op, src in table.items()})
        out.update({("*", op): src for op, src in table.items()})  # any module's name
    return out


def lookup(sources: dict, module: str, op: str) -> Source | None:
    """The Source of a trace event's (hlo_module, hlo_op). A module name in the trace may
    carry a suffix the dump lacks (jit_train_step(12)), so the prefix before '(' is tried,
    then the op in any dumped module (the dump is filtered to the train step's module)."""
    return (sources.get((module, op)) or sources.get((module.split("(")[0], op))
            or sources.get(("*", op)))
