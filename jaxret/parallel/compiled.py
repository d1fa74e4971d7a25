"""What a compiled (SPMD-partitioned) program does on one device, read from its HLO text.

`compiled.cost_analysis()` counts a while loop's body once, whatever its trip count, so it
cannot tell a loop that divides its work over the devices from one that repeats it. These
helpers walk the optimized HLO instead: matmul FLOPs through fusions, calls and loops
(× XLA's `known_trip_count`), and the collectives with their operand shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cache

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "all-reduce-start",
    "all-gather-start",
    "collective-permute-start",
)


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each operand/result
    count: int  # how many times it runs (loop trip counts multiplied in)

    def largest(self, floating: bool = True) -> int:
        """Elements of the largest (floating-point) array it moves."""
        sizes = [math.prod(d) for t, d in self.shapes if not floating or t.startswith(("f", "bf"))]
        return max(sizes, default=0)


class HloProgram:
    def __init__(self, text: str):
        self.computations: dict[str, list[str]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():
            m = _COMPUTATION.match(line.strip())
            if m:
                current = m.group(1)
                self.computations[current] = []
                if line.startswith("ENTRY"):
                    self.entry = current
                continue
            if line.strip() == "}":
                current = None
            elif current is not None:
                self.computations[current].append(line)

    def _shapes(self, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        out = {}
        for line in self.computations[name]:
            m = _INSTRUCTION.match(line)
            if m:
                s = _SHAPE.search(m.group(2))
                if s:
                    out[m.group(1)] = (s.group(1), _dims(s.group(2)))
        return out

    def _calls(self, line: str) -> list[tuple[str, int]]:
        """(called computation, multiplicity) of an instruction."""
        out = []
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        body = re.search(r"body=%([\w.\-]+)", line)
        if body:
            out.append((body.group(1), int(trip.group(1)) if trip else 1))
        for key in ("calls", "to_apply", "true_computation", "false_computation"):
            for m in re.finditer(rf"{key}=%([\w.\-]+)", line):
                if key == "to_apply" and not re.search(r" (call|fusion)\(", line):
                    continue  # reducers and comparators: scalar work
                out.append((m.group(1), 1))
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
            out += [(b.strip().lstrip("%"), 1) for b in branches.group(1).split(",")]
        return out

    @cache  # noqa: B019 - one program, a handful of computations
    def dot_flops(self, name: str | None = None) -> float:
        """Matmul FLOPs (2 · output · contraction) of one execution of computation `name`."""
        name = name or self.entry
        shapes = self._shapes(name)
        total = 0.0
        for line in self.computations[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            if m.group(3) == "dot":
                out = _SHAPE.search(m.group(2))
                lhs = re.match(r"\s*%([\w.\-]+)", m.group(4))
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                if out and lhs and contract and lhs.group(1) in shapes:
                    lhs_dims = shapes[lhs.group(1)][1]
                    k = math.prod(lhs_dims[i] for i in _dims(contract.group(1)))
                    total += 2.0 * math.prod(_dims(out.group(2))) * k
            for callee, times in self._calls(line):
                if callee in self.computations:
                    total += times * self.dot_flops(callee)
        return total

    def collectives(self, name: str | None = None, times: int = 1) -> list[Collective]:
        name = name or self.entry
        out = []
        for line in self.computations[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            if m.group(3) in _COLLECTIVES:
                shapes = tuple((t, _dims(d)) for t, d in _SHAPE.findall(m.group(2)))
                out.append(Collective(m.group(3).removesuffix("-start"), shapes, times))
            for callee, n in self._calls(line):
                if callee in self.computations:
                    out += self.collectives(callee, times * n)
        return out


def program(compiled: object) -> HloProgram:
    """The optimized HLO of a `jax.jit(...).lower(...).compile()` result."""
    return HloProgram(compiled.as_text())
