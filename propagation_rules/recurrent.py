"""Recurrent layers: lstm, gru, rnn_tanh, rnn_relu (every layer, both directions, biases,
LSTM projections, padded and packed inputs), and their one-step cells (lstm_cell, gru_cell,
rnn_tanh_cell, rnn_relu_cell).

Per layer and direction, with G gate blocks of H rows each (LSTM: i, f, g, o; GRU: r, z, n;
RNN: one), a cell unit is *dead* when its state is zero at every step whatever the inputs:

* LSTM: c_t = f * c_{t-1} + i * tanh(g) and h_t = W_hr (o * tanh(c_t)) (W_hr = identity without
  projections): unit j is dead if c_0[j] is zero and its g row gets nothing — every weight of
  the row meets a zero input feature or a zero previous output, and both biases are pruned;
  then c_t[j] = 0 and o * tanh(0) = 0 exactly. An output unit is zero when every live cell
  reaches it through a pruned W_hr weight.
* GRU: h_t = (1 - z) * n + z * h_{t-1}: unit j is dead if h_0[j] is zero and its n row gets
  nothing (input part, b_in, and the recurrent part W_hn h + b_hn).
* RNN: h_t = act(W_ih x + b_ih + W_hh h_{t-1} + b_hh), act(0) = 0: unit j is dead if its row
  gets nothing.

"Gets nothing" needs the previous outputs that stay zero, which needs the dead units: the dead
set is the greatest fixpoint. Dead units are pruned in the outputs (the sequence, h_n, c_n) and
every weight of theirs is unused. Backward, the used units are the least fixpoint of "read by
the output, by h_n / c_n, or by a used unit's gate rows through a kept recurrent weight"; all
gate rows of a used unit are used, a weight is used where its row is used and its input can be
nonzero, and an input feature (of the layer, i.e. of the layer below's output) is used where a
used row reads it through a kept weight. Exact per unit: masks that vary along time or batch
are taken as their union (an element of a recurrent state depends on every earlier step).
A cell is one step: the same reasoning per (sample, unit), exact per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule

from ._util import bool_mm, full, is_mask

aten = torch.ops.aten

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _features(m: Mask) -> Mask:
    """Per feature (last dim): kept anywhere along time and batch."""
    return m.reshape(-1, m.shape[-1]).any(dim=0) if m.dim() > 1 else m


@dataclass
class _Cell:
    """The parameter masks of one layer and direction (None where absent)."""

    w_ih: Mask
    w_hh: Mask
    b_ih: Mask | None
    b_hh: Mask | None
    w_hr: Mask | None

    def bias(self) -> Mask:
        """Rows whose bias (either of the two) can be nonzero."""
        out = full(self.w_ih.shape[:1], False)
        for b in (self.b_ih, self.b_hh):
            if b is not None:
                out = out | b
        return out


def _cells(params: tuple[Mask, ...], has_biases: bool, layers: int, dirs: int) -> list[_Cell]:
    per = len(params) // (layers * dirs)
    base = 4 if has_biases else 2
    proj = per == base + 1
    cells = []
    for k in range(layers * dirs):
        p = params[k * per : (k + 1) * per]
        b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
        cells.append(_Cell(p[0], p[1], b_ih, b_hh, p[base] if proj else None))
    return cells


def _reach(w: Mask, live: Mask) -> Mask:
    """Per row of ``w``: does some kept weight meet a ``live`` column."""
    return (w & live).any(dim=1)


def _outputs_of(cell: _Cell, live_cells: Mask) -> Mask:
    """Output units that can be nonzero, from the live cell units (through W_hr if any)."""
    return _reach(cell.w_hr, live_cells) if cell.w_hr is not None else live_cells


def _dead(kind: str, cell: _Cell, xin: Mask, h0: Mask, c0: Mask | None) -> tuple[Mask, Mask]:
    """(dead cell units, zero output units): the greatest fixpoint."""
    g = GATES[kind]
    hidden = cell.w_ih.shape[0] // g
    rows_x = _reach(cell.w_ih, xin) | cell.bias()
    if kind == "lstm":
        sel = slice(2 * hidden, 3 * hidden)  # the g (cell input) gate
        start = ~c0
    elif kind == "gru":
        sel = slice(2 * hidden, 3 * hidden)  # the n (new gate)
        start = ~h0
    else:
        sel = slice(0, hidden)
        start = full((hidden,), True)
    dead = start & ~rows_x[sel]
    while True:
        zero_out = ~_outputs_of(cell, ~dead)
        h_nz = ~zero_out | h0  # the previous output: h_0 at the first step
        new = dead & ~_reach(cell.w_hh[sel], h_nz)
        if torch.equal(new, dead):
            return dead, zero_out
        dead = new


def _used(
    kind: str, cell: _Cell, dead: Mask, zero_out: Mask, h0: Mask, out_used: Mask, c_used: Mask
) -> tuple[Mask, Mask, Mask]:
    """(used gate rows, used output units, used cell units): the least fixpoint."""
    g = GATES[kind]
    h_nz = ~zero_out | h0
    live = ~dead
    used_out = out_used.clone()
    while True:
        if cell.w_hr is not None:
            used_cells = live & ((cell.w_hr & used_out[:, None]).any(dim=0) | c_used)
        else:
            used_cells = live & (used_out | c_used)
        rows = used_cells.repeat(g)
        reads = (cell.w_hh & rows[:, None]).any(dim=0) & h_nz
        new = used_out | reads
        if torch.equal(new, used_out):
            return rows, used_out, used_cells
        used_out = new


def _expand_features(features: Mask, like: Mask) -> Mask:
    return features.expand(like.shape)


def _recurrent(call: Call, kind: str, data: str) -> Refined:
    x = call.inputs[data]
    params = call.inputs["params"]
    if not is_mask(x) or not all(is_mask(p) for p in params) or x.numel() == 0:
        return Refined()
    layers, dirs = call.params["num_layers"], 2 if call.params["bidirectional"] else 1
    cells = _cells(params, call.params["has_biases"], layers, dirs)
    hx = call.inputs["hx"]
    h0_all, c0_all = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    if not is_mask(h0_all) or (kind == "lstm" and not is_mask(c0_all)):
        return Refined()
    outs = call.outputs
    out_mask, hn_mask = outs[0], outs[1]
    cn_mask = outs[2] if kind == "lstm" else None

    def per_unit(m: Mask | None, k: int) -> Mask | None:
        return None if m is None else _features(m[k])

    # forward, bottom-up: dead units of every layer and direction
    xin = _features(x)
    inputs_of: list[Mask] = []
    dead: list[tuple[Mask, Mask]] = []
    for layer in range(layers):
        inputs_of.append(xin)
        nz = []
        for d in range(dirs):
            k = layer * dirs + d
            dc, zo = _dead(kind, cells[k], xin, per_unit(h0_all, k), per_unit(c0_all, k))
            dead.append((dc, zo))
            nz.append(~zo)
        xin = torch.cat(nz)

    # backward, top-down: used units, rows, weights and input features
    used_above = _features(out_mask)
    param_used: list[Mask | None] = [None] * len(params)
    per = len(params) // (layers * dirs)
    h0_used = [None] * (layers * dirs)
    c0_used = [None] * (layers * dirs)
    x_used = None
    for layer in reversed(range(layers)):
        xin = inputs_of[layer]
        feats_used = full(xin.shape, False)
        outs_per_dir = used_above.chunk(dirs)
        for d in range(dirs):
            k = layer * dirs + d
            cell, (dc, zo) = cells[k], dead[k]
            h0 = per_unit(h0_all, k)
            out_used = outs_per_dir[d] | per_unit(hn_mask, k)
            c_used = per_unit(cn_mask, k) if cn_mask is not None else full(dc.shape, False)
            rows, used_out, used_cells = _used(kind, cell, dc, zo, h0, out_used, c_used)
            h_nz = ~zo | h0
            masks = [rows[:, None] & xin, rows[:, None] & h_nz[None, :]]
            if cell.b_ih is not None:
                masks += [rows, rows]
            if cell.w_hr is not None:
                masks.append(used_out[:, None] & ~dc[None, :])
            for i, m in enumerate(masks):
                param_used[k * per + i] = m.expand(params[k * per + i].shape)
            feats_used |= (cell.w_ih & rows[:, None]).any(dim=0)
            reads = (cell.w_hh & rows[:, None]).any(dim=0)
            if kind == "gru":
                reads = reads | used_cells  # z * h_{t-1} reads the unit's own state
            h0_used[k] = reads
            c0_used[k] = used_cells
        used_above = feats_used
        x_used = feats_used
    # dead units' outputs are zero; everything else can be nonzero
    top = [~dead[(layers - 1) * dirs + d][1] for d in range(dirs)]
    out_fwd = _expand_features(torch.cat(top), out_mask)
    hn_fwd = torch.stack([_expand_features(~zo, hn_mask[k]) for k, (_, zo) in enumerate(dead)])
    fwd: tuple = (out_fwd, hn_fwd)
    h0_in = torch.stack([_expand_features(u, h0_all[k]) for k, u in enumerate(h0_used)])
    if kind == "lstm":
        cn_fwd = torch.stack([_expand_features(~dc, cn_mask[k]) for k, (dc, _) in enumerate(dead)])
        fwd = (*fwd, cn_fwd)
        c0_in = torch.stack([_expand_features(u, c0_all[k]) for k, u in enumerate(c0_used)])
        hx_used: Mask | tuple = (h0_in, c0_in)
    else:
        hx_used = h0_in
    return refine(
        out=fwd,
        **{data: _expand_features(x_used, x)},
        hx=hx_used,
        params=tuple(param_used),
    )


def _cell(call: Call, kind: str) -> Refined:
    """One step, per (sample, unit): out[b, j] is zero when the unit's state starts at zero
    (LSTM: c; GRU: h) and its cell-input row gets nothing for that sample (RNN: its row)."""
    x, w_ih, w_hh = call.inputs["input"], call.inputs["w_ih"], call.inputs["w_hh"]
    hx = call.inputs["hx"]
    h, c = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    if not all(is_mask(m) for m in (x, w_ih, w_hh, h)) or (kind == "lstm" and not is_mask(c)):
        return Refined()
    if x.dim() != 2 or h.dim() != 2:
        return Refined()  # ATen's cells take (batch, features); nn.*Cell adds the batch dim
    g = GATES[kind]
    hidden = w_ih.shape[0] // g
    bias = full((w_ih.shape[0],), False)
    for name in ("b_ih", "b_hh"):
        if is_mask(call.inputs.get(name)):
            bias = bias | call.inputs[name]
    rows_nz = bool_mm(x, w_ih.t()) | bool_mm(h, w_hh.t()) | bias
    if kind == "rnn_tanh" or kind == "rnn_relu":
        dead = ~rows_nz
    else:
        dead = ~(c if kind == "lstm" else h) & ~rows_nz[:, 2 * hidden : 3 * hidden]
    outs = call.outputs
    used = outs[0] if len(outs) == 1 else outs[0] | outs[1]
    used = used & ~dead
    rows = used.repeat(1, g)  # (B, G*H): every gate row of a used unit
    reads_h = bool_mm(rows, w_hh)
    h_used = reads_h | used if kind == "gru" else reads_h  # GRU: z * h reads its own state
    back = {
        "input": bool_mm(rows, w_ih),
        "w_ih": bool_mm(rows.t(), x),
        "w_hh": bool_mm(rows.t(), h),
        "b_ih": rows.any(dim=0) if is_mask(call.inputs.get("b_ih")) else None,
        "b_hh": rows.any(dim=0) if is_mask(call.inputs.get("b_hh")) else None,
    }
    fwd = ~dead
    back["hx"] = (h_used, used) if kind == "lstm" else h_used
    return refine(out=(fwd, fwd) if kind == "lstm" else fwd, **back)


def _make(kind: str, data: str):
    def rule(call: Call) -> Refined:
        return _recurrent(call, kind, data)

    rule.__name__ = f"recurrent[{kind}]"
    return rule


def _make_cell(kind: str):
    def rule(call: Call) -> Refined:
        return _cell(call, kind)

    rule.__name__ = f"recurrent_cell[{kind}]"
    return rule


for _kind in GATES:
    _packet = getattr(aten, _kind)
    register_rule(_packet.input, name=f"recurrent[{_kind}]")(_make(_kind, "input"))
    register_rule(_packet.data, name=f"recurrent[{_kind}]")(_make(_kind, "data"))
    _cell_op = getattr(aten, f"{_kind}_cell")
    register_rule(_cell_op, name=f"recurrent_cell[{_kind}]")(_make_cell(_kind))
