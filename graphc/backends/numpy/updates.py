"""The numpy backend's optimizer updates: many parameters in one pass, in place.

A training step ends with one small elementwise program per parameter (Adam: a dozen ops over the
parameter, its gradient and its two moments). Run node by node, that is a dozen numpy calls per
parameter, each writing a new array. Here, parameters whose update programs are the same (same
ops, same scalars: all weights of an Adam step, say) form a group, and the group's program runs
once over flat buffers that hold every member end to end, the way PyTorch's multi-tensor
("foreach") optimizers do:

- each operand of the program that has the parameter's shape (the parameter, each state slot, the
  gradient) is a *lane*: one flat buffer, with a view of it per member;
- gradients are written straight into their views by the steps that compute them;
- parameters and optimizer state are adopted: the arrays passed in are copied into their views
  the first time, and the views are handed back as the updated values (`new W`), so from the
  second step on nothing is copied and every update is written in place (and, given its views
  back, a run returns no `new W`: like the compiled backends', the arrays passed in hold it);
- the program runs as lines of the plan's generated step function (numpy_backend.py);
- the program's intermediates live in a few flat buffers reused once dead.

Only updates are grouped: nodes of the parameter's shape whose every consumer is another node of
the same update (or the output of the update, as the train step's contract names it). Everything
else runs as before.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from graphc.backends.numpy.calls import UFUNCS
from graphc.ir import OPS
from graphc.ir.contract import Update
from graphc.ir.node import Node


class UpdateGroup:
    """Parameters sharing one update program, and the flat buffers it runs over."""

    def __init__(self, members: list[_Update], order: list[Node]):
        first = members[0]
        self.members = [m.param for m in members]
        self.cone = {i for m in members for i in m.cone}
        sizes = [int(np.prod(order[m.slot].type.shape)) for m in members]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        total = int(offsets[-1])

        def views(flat: np.ndarray) -> list[np.ndarray]:
            return [flat[a:b].reshape(order[m.slot].type.shape)
                    for m, a, b in zip(members, offsets[:-1], offsets[1:])]

        # Lanes: flat buffers and their per-member views. Loads (params, state) are adopted;
        # computed lanes (gradients) are written by their steps or copied (`computed`).
        self.lanes: list[np.ndarray] = []
        self.lane_views: list[list[np.ndarray]] = []
        self.adopted: list[tuple[np.ndarray, int]] = []              # (view, load slot)
        self.computed: list[tuple[np.ndarray, int]] = []            # (view, computing slot)
        for lane, (kind, _) in enumerate(first.lanes):
            flat = np.zeros(total, order[first.leaves[lane]].type.dtype.numpy)
            member_views = views(flat)
            self.lanes.append(flat)
            self.lane_views.append(member_views)
            slots = [m.leaves[lane] for m in members]
            if kind == "load":
                self.adopted.extend(zip(member_views, slots))
            else:
                self.computed.extend(zip(member_views, slots))
        self.new_views = [(view, m.roots[suffix]) for suffix, lane in first.root_lanes
                          for view, m in zip(self.lane_views[lane], members)]
        # Every slot the update reads: its lanes' sources and its scalars.
        scalars = [k for *_, operands in first.program for kind, k in operands if kind == "scalar"]
        self.reads = list(dict.fromkeys([slot for m in members for slot in m.leaves] + scalars))
        self.steps, self.temps, self.finals = _flat_program(first, total)

    def source(self, prefix: str, copied: list[tuple[np.ndarray, int]], scope: dict) -> list[str]:
        """The update as lines of the plan's generated step function (numpy_backend), whose
        locals `v<slot>` hold the plan's values; what the lines name is bound in `scope`, under
        names starting with `prefix`. Params and state are copied into their lanes only when
        they are other arrays (the first step), which sets the local `adopted` False; `copied`:
        computed lanes whose steps could not write into their views. Looping over the calls
        instead would cost a tenth of the update."""
        lines = []
        for k, (view, slot) in enumerate(self.adopted):      # `adopted` is set False by a copy
            scope[f"{prefix}a{k}"] = view
            lines.append(f"if v{slot} is not {prefix}a{k}: "
                         f"copyto({prefix}a{k}, v{slot}, casting='same_kind'); adopted = False")
        for k, (view, slot) in enumerate(copied):
            scope[f"{prefix}c{k}"] = view
            lines.append(f"copyto({prefix}c{k}, v{slot})")
        buffers = {"lane": self.lanes, "tmp": self.temps}
        for p, (fn, refs, (out_kind, out), attrs) in enumerate(self.steps):
            scope[f"{prefix}f{p}"] = partial(fn, **attrs) if attrs else fn
            scope[f"{prefix}o{p}"] = buffers[out_kind][out]
            args = []
            for k, (kind, ref) in enumerate(refs):
                if kind == "scalar":
                    args.append(f"v{ref}")
                else:
                    scope[f"{prefix}b{p}_{k}"] = buffers[kind][ref]
                    args.append(f"{prefix}b{p}_{k}")
            lines.append(f"{prefix}f{p}({', '.join(args)}, out={prefix}o{p})")
        for k, (lane, tmp) in enumerate(self.finals):   # roots that could not be written in place
            scope[f"{prefix}l{k}"], scope[f"{prefix}t{k}"] = self.lanes[lane], self.temps[tmp]
            lines.append(f"copyto({prefix}l{k}, {prefix}t{k})")
        return lines


@dataclass
class _Update:
    """One parameter's update program in canonical form: equal programs compare equal."""
    param: str
    slot: int                         # the parameter's load
    cone: list[int]                   # the program's nodes (slots), in program order
    signature: tuple
    leaves: list[int]                 # lane k is read from slot leaves[k]
    lanes: list[tuple]                # lane k: ("load", slot key) or ("computed", dtype)
    roots: dict[str, int]             # slot key ("" the parameter, "exp_avg") -> its root's slot
    root_lanes: list[tuple[str, int]]  # (slot key, the lane its root replaces)
    program: list[tuple]              # (op, attrs, dtype, operand refs), refs: ("node", k),
                                      # ("lane", k) or ("scalar", slot)


def find_update_groups(order: list[Node], inputs: list[tuple[int, ...]],
                       outputs: list[tuple[str, int]], loads: dict[str, int],
                       updates: Sequence[tuple[Update, Node, Node]] = ()) -> list[UpdateGroup]:
    """The update groups of a graph: its contract's updates (as `bind_updates` binds them to
    the graph) of each parameter (its own, its optimizer slots', its running statistic's) taken
    together. `loads`: name -> slot of every param and state load."""
    consumers: list[list[int]] = [[] for _ in order]
    for i, ins in enumerate(inputs):
        for j in dict.fromkeys(ins):
            consumers[j].append(i)
    output_slots: dict[int, list[str]] = {}
    for name, i in outputs:
        output_slots.setdefault(i, []).append(name)
    params = {order[s].attr["name"] for s in loads.values() if order[s].op == "param"}
    slot_of = dict(outputs)
    targets: dict[str, dict[str, int]] = {}     # param -> {slot key: root slot}
    owned: dict[str, dict[str, str]] = {}       # param -> {load name: slot key}
    for u, _, _ in updates:
        if u.param in params:
            targets.setdefault(u.param, {})[u.slot or ""] = slot_of[u.output]
            owned.setdefault(u.param, {})[u.target] = u.slot or ""
    found = []
    for param, roots in targets.items():
        update = _canonical(param, loads, roots, owned[param], order, inputs, consumers,
                            output_slots)
        if update is not None:
            found.append(update)
    by_program: dict[tuple, list[_Update]] = {}
    for u in found:
        by_program.setdefault(u.signature, []).append(u)
    return [UpdateGroup(members, order) for members in by_program.values()]


def _canonical(param, loads, roots, owned, order, inputs, consumers, output_slots) -> _Update | None:
    slot = loads[param]
    shape, root_set = order[slot].type.shape, set(roots.values())
    if shape == ():
        return None          # a 0-d parameter: its update is a few scalar ops, left as they are

    def candidate(i: int) -> bool:
        node = order[i]
        op = OPS[node.op]
        return op.kind == "elementwise" and op.numpy_out and node.type.shape == shape

    # The cone: same-shape elementwise nodes above the roots whose consumers are all in it.
    cone: set[int] = set()
    stack = list(root_set)
    while stack:
        i = stack.pop()
        if i in cone or not candidate(i):
            continue
        cone.add(i)
        stack.extend(inputs[i])
    if not root_set <= cone:
        return None
    changed = True
    while changed:
        changed = False
        for i in list(cone):
            outside_use = any(c not in cone for c in consumers[i]) or (
                i in output_slots and i not in root_set)
            if outside_use and i not in root_set:
                cone.discard(i)
                changed = True
            elif i in root_set and (any(c not in cone for c in consumers[i])
                                    or len(output_slots.get(i, ())) != 1):
                return None      # an update read by something else: leave it alone
    # Canonical walk: roots by slot key, operands depth first.
    local: dict[int, int] = {}
    program: list[tuple] = []
    leaves: list[int] = []
    lanes: list[tuple] = []
    lane_of: dict[int, int] = {}

    def ref(j: int):
        if j in cone:
            return ("node", local[j])
        node = order[j]
        if node.type.shape == ():
            return ("scalar", j)
        if node.type.shape != shape:
            raise _NotGroupable
        if j not in lane_of:
            lane_of[j] = len(leaves)
            leaves.append(j)
            name = node.attr["name"] if node.op in ("param", "state") else None
            if name in owned:
                lanes.append(("load", owned[name]))
            else:
                lanes.append(("computed", node.type.dtype))
        return ("lane", lane_of[j])

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            k, done = stack.pop()
            if k in local or k not in cone:
                continue
            if done:
                node = order[k]
                operands = tuple(ref(j) for j in inputs[k])
                local[k] = len(program)
                program.append((node.op, node.attrs, node.type.dtype, operands))
                continue
            stack.append((k, True))
            for j in reversed(inputs[k]):
                if j in cone and j not in local:
                    stack.append((j, False))

    try:
        for suffix in sorted(roots):
            visit(roots[suffix])
        root_lanes = []
        target_of = {key: name for name, key in owned.items()}
        for suffix in sorted(roots):
            load = loads[target_of[suffix]]
            if load not in lane_of:          # the old value is not read: still its lane
                ref(load)
            root_lanes.append((suffix, lane_of[load]))
    except _NotGroupable:
        return None
    signature = (order[slot].type.dtype, tuple(program), tuple(lanes),
                 tuple((s, local[roots[s]]) for s in sorted(roots)), tuple(root_lanes))
    return _Update(param, slot, sorted(cone, key=lambda k: local[k]), signature, leaves, lanes,
                   dict(roots), root_lanes, program)


class _NotGroupable(Exception):
    pass


def _flat_program(u: _Update, total: int):
    """The update as calls over flat buffers: (fn, operand refs, out ref, attrs), a ref being
    ("lane", k), ("tmp", k) or ("scalar", slot). Buffers are reused as soon as what they hold is
    read for the last time, the way the hand-written update works in place: a root writes into
    the lane it replaces, and until then that lane (once its old value is dead) and the gradient
    lanes hold intermediates. A root whose lane is still busy goes to a temporary, copied over
    at the end."""
    program = u.program
    local_of = {slot: k for k, slot in enumerate(u.cone)}
    root_lane = {local_of[u.roots[suffix]]: lane for suffix, lane in u.root_lanes}
    root_step = {lane: p for p, lane in root_lane.items()}
    last_read: dict[tuple, int] = {}
    for p, (_, _, _, operands) in enumerate(program):
        for r in operands:
            last_read[r] = p
    temps: list[np.ndarray] = []
    holds: dict[tuple, tuple | None] = {("lane", k): ("lane", k) for k in range(len(u.lanes))}
    held: dict[int, tuple] = {}              # local node -> the buffer holding its value
    # A computed lane holds its gradient's dtype; a load lane, once its root may write there,
    # the root's. (A load lane no root replaces is never free: None.)
    dtype_of = {("lane", k): (lane[1].numpy if lane[0] == "computed" else None)
                for k, lane in enumerate(u.lanes)}
    dtype_of |= {("lane", lane): program[local][2].numpy for local, lane in root_lane.items()}

    def free(buffer: tuple, dtype: np.dtype, until: int) -> bool:
        """May `buffer` take a value of `dtype` read last at step `until`?"""
        if holds[buffer] is not None:
            return False
        if buffer[0] == "tmp":
            return temps[buffer[1]].dtype == dtype
        lane = buffer[1]
        if lane in root_step:                # a load lane: free until its root writes there
            return root_step[lane] >= until and dtype_of[buffer] == dtype
        return dtype_of[buffer] == dtype

    steps, finals = [], []
    for p, (op_name, attrs, dtype, operands) in enumerate(program):
        refs = tuple(held[k] if kind == "node" else (kind, k) for kind, k in operands)
        for r, buffer in zip(operands, refs):            # what dies here frees its buffer
            if r[0] != "scalar" and last_read[r] == p and not (r[0] == "node" and r[1] in root_lane):
                holds[buffer] = None
        want = dtype.numpy
        lane = root_lane.get(p)
        if lane is not None:
            out = ("lane", lane) if holds[("lane", lane)] is None else None
            until = len(program)
        else:
            until = last_read.get(("node", p), p)
            out = next((b for b in holds if b[0] == "lane" and free(b, want, until)), None)
            out = out or next((b for b in holds if b[0] == "tmp" and free(b, want, until)), None)
        if out is None:
            out = next((b for b in holds if b[0] == "tmp" and free(b, want, until)), None)
            if out is None:
                temps.append(np.empty(total, want))
                out = ("tmp", len(temps) - 1)
            if lane is not None:
                finals.append((lane, out[1]))
        holds[out] = ("node", p)
        held[p] = out
        fn = UFUNCS[op_name] if op_name in UFUNCS and not attrs else OPS[op_name].numpy
        steps.append((fn, refs, out, dict(attrs)))
    return steps, temps, finals

