"""Which line of Python made each kernel of a profile: the source map of XLA's optimized HLO.

A profiler trace names each kernel by its HLO instruction (`hlo_op`, e.g.
`loop_add_fusion.12`), which says what kind of work it is but not which part of the model
asked for it. XLA's HLO dump (`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`) keeps,
for every instruction, the JAX op name (`transpose(jvp(...))` marks the backward) and a
stack frame id into tables of file names, function names and locations at the top of the
module text. This reads those tables so a profile can be summed by source line.

By hand because no library reads the text dump's stack-frame tables (xprof's op profile
shows op names, not lines, and needs the xplane from the same run).

    env = dump_env(DIR)                # a train.py run's environment: dump its train step
    sources = read_sources(DIR)        # then {(module, hlo_op): Source}
    lookup(sources, module, hlo_op)    # a trace event's Source, or None
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

DUMP_FLAGS = "--xla_dump_to={dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re={module}"

_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_META = re.compile(r"metadata=\{([^}]*)\}")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
# Frames in these files are skipped for the next one up: every Pallas kernel is launched
# from launch.py, whose line says nothing about which kernel it is.
HELPER_FILES = ("launch.py", "vma.py")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_ROW = re.compile(r"^(\d+) (.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")


@dataclasses.dataclass(frozen=True)
class Source:
    file: str       # the file's base name, e.g. "moe.py"
    line: int
    function: str   # e.g. "moe_dropless.<locals>.experts"
    # fwd; bwd (a transpose: autodiff's backward); recompute (a checkpoint's forward run
    # again in the backward); ? (no op name)
    phase: str
    caller: str = ""  # the function that called `function` (shared helpers: whose call)
    # For a fusion: the functions of the instructions fused into it, most frequent first
    # (a fusion is named after its root, but holds the work of every op XLA fused in).
    contents: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line} {self.function}" + (
            f" < {self.caller}" if self.caller else "")

    def label(self) -> str:
        return f"{self.phase} {self.where()}"


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


def _phase(op_name: str | None) -> str:
    if op_name is None:
        return "?"
    if "rematted_computation" in op_name:
        return "recompute"
    return "bwd" if "transpose(" in op_name else "fwd"


def parse_module(text: str) -> tuple[str, dict[str, Source]]:
    """(module name, {instruction name: Source}) of one optimized HLO module's text. An
    instruction with no stack frame (made by XLA itself) is left out, unless it is a fusion
    of ops that have one (then it is named after the ops it holds, line 0)."""
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

    def loc_of(frame_id):
        return locs.get(frames.get(frame_id, {}).get("file_location_id", -1))

    def parent(frame_id):
        # The text dump prints a frame's parent id plus one; 0 means none.
        p = frames.get(frame_id, {}).get("parent_frame_id", 0) - 1
        return p if p > 0 and p != frame_id else None

    def resolve(frame_id):
        """The innermost frame outside the kernel-launch helpers, and its caller's name."""
        seen = set()
        while frame_id and frame_id not in seen:
            seen.add(frame_id)
            loc = loc_of(frame_id)
            if loc and files.get(loc.get("file_name_id")) not in HELPER_FILES:
                up = parent(frame_id)
                caller_loc = loc_of(up) if up else None
                caller = (funcs.get(caller_loc.get("function_name_id"), "") if caller_loc
                          else "")
                return loc, caller
            frame_id = parent(frame_id)
        return None, ""

    out, members, calls, computation = {}, {}, {}, None
    for line in lines:
        head_c = _COMPUTATION.match(line)
        if head_c:
            computation = head_c.group(1)
            continue
        m = _NAME.match(line)
        if not m:
            continue
        callee = _CALLS.search(line)
        if callee:
            calls[m.group(1)] = callee.group(1)
        meta = _META.search(line)
        frame = _FRAME.search(meta.group(1)) if meta else None
        op_name = _OP_NAME.search(meta.group(1)) if meta else None
        loc, caller = resolve(int(frame.group(1))) if frame else (None, "")
        if not loc:
            continue
        src = Source(files.get(loc.get("file_name_id"), "?"), loc.get("line", 0),
                     funcs.get(loc.get("function_name_id"), "?"),
                     _phase(op_name.group(1) if op_name else None), caller)
        out[m.group(1)] = src
        members.setdefault(computation, []).append(src)
    for op, callee in calls.items():
        held = members.get(callee)
        if not held:
            continue
        counts = collections.Counter(f"{s.file} {s.function}" for s in held)
        label = " + ".join(k for k, _ in counts.most_common(3))
        if op not in out:  # a fusion XLA gave no metadata: named after what it holds
            top = collections.Counter(held).most_common(1)[0][0]
            out[op] = dataclasses.replace(top, line=0, caller="")
        out[op] = dataclasses.replace(out[op], contents=label)
    return module, out


def dump_env(dump_dir: str, module: str = "train_step") -> dict:
    """Environment for a run that dumps its optimized HLO (module names matching `module`)
    into dump_dir, keeping the XLA_FLAGS already set."""
    flags = DUMP_FLAGS.format(dir=dump_dir, module=module)
    return {"XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip()}


def read_sources(dump_dir: str) -> dict[tuple[str, str], Source]:
    """{(module, instruction): Source} over every optimized module text in `dump_dir`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        with open(path) as f:
            module, table = parse_module(f.read())
        out.update({(module, op): src for op, src in table.items()})
    return out


def lookup(sources: dict, module: str, op: str) -> Source | None:
    """The Source of a trace event's (hlo_module, hlo_op). A module name in the trace may
    carry a suffix the dump lacks (jit_train_step(12)), so the prefix before '(' is tried."""
    return sources.get((module, op)) or sources.get((module.split("(")[0], op))
