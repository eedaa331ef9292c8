"""The module a rewritten attention calls: ``SiteAttention`` holds one site, the user's mask_fn and
the Layouts built for it, and calls ``fxsparse.sparse_attention`` (or PyTorch's SDPA where mask_fn
keeps the site dense)."""
from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import masks, op, reference
from .layout import EMPTY, Layout, block_mask, layout_from_kinds, resolve_mask
from .match import AttentionSite
from .op import kernel_layout, sparse_attention

_MISSING = object()


class SiteError(ValueError, RuntimeError):
    """A site cannot run as asked; the message names the site and says what to do."""


class SiteAttention(nn.Module):
    """One rewritten attention: mask_fn(site) -> Layout, built once per (q_len, kv_len).

    A site keeps the layouts of its ``MAX_LAYOUTS`` most recent (q_len, kv_len) pairs (least
    recently used first out; ``clear()`` drops them all). Each layout's flat table tensor is a
    non-persistent buffer (``layout_<q>x<kv>``), so ``.to(device)`` moves it with the model and
    the state_dict is unchanged. Calls with at most ``SMALL_Q`` queries (decoding with a KV cache)
    run PyTorch's SDPA with mask_fn's mask as a token mask: exact, and no layout per step.
    """

    MAX_LAYOUTS = 8
    SMALL_Q = 16

    def __init__(self, site: AttentionSite, mask_fn: Callable):
        super().__init__()
        self.site = site
        self.mask_fn = mask_fn
        self.owner = ""  # path of the module whose forward calls this site
        self.options = None  # fxsparse.KernelOptions for the op, or None
        # True: the model's own mask among the site's inputs (HuggingFace's padding or document masks, a
        # causal mask built as a tensor) also removes the blocks it masks entirely from the layout, so they
        # are skipped, not computed and masked (``_fold_mask_bias``; exact, and nothing is read back to
        # the host). False: the mask stays an additive bias over every block mask_fn keeps.
        self.skip_padding = True
        self.mask_folded = False  # whether a call has had blocks of its layout removed by the model's mask (report)
        self._layouts: OrderedDict = OrderedDict()  # (q_len, kv_len) -> None (dense) | (buffer, block, density, Layout)
        # the Layouts calls run, made once rather than per call: buffer name -> Layout over that buffer
        # (rebuilt when `.to()` replaces the buffer), and, for a traced call where mask_fn keeps the site
        # dense or the queries are few, (q_len, kv_len, device, head dim <= 64) -> the kernels' Layout
        self._run_layouts: dict = {}
        self.recorder = None  # fxsparse.calibrate: called with (site, q, k, bias, scale, causal) before each call
        self.uid = _register(self)

    def __setstate__(self, state):  # a copy (deepcopy, pickle) is a site of its own in the registry
        super().__setstate__(state)
        self.__dict__.setdefault("_run_layouts", {})
        self.__dict__.setdefault("mask_folded", False)
        self.uid = _register(self)

    @property
    def status(self) -> str:
        return "dense" if self._layouts.get((self.site.q_len, self.site.kv_len), _MISSING) is None else "rewritten"

    def built(self):
        """(block_size, density) of the layout at the site's latest lengths, or None."""
        entry = self._layouts.get((self.site.q_len, self.site.kv_len))
        return None if entry is None else entry[1:3]

    def current_layout(self) -> Optional[Layout]:
        """The Layout this site runs at its latest lengths (for reports and pictures), or None."""
        entry = self._layouts.get((self.site.q_len, self.site.kv_len))
        if entry is None:
            return None
        name, block, _, built = entry
        if name is None:  # few queries: the site keeps a token mask
            return Layout.from_mask(built, block)
        return dataclasses.replace(built, data=getattr(self, name))

    def clear(self) -> None:
        """Forget every layout built so far (they are built again on demand)."""
        for entry in self._layouts.values():
            if entry is not None and entry[0] is not None:
                delattr(self, entry[0])
        self._layouts.clear()
        self._run_layouts.clear()

    def extra_repr(self) -> str:
        return f"{self.site.name!r}, kind={self.site.kind!r}"

    def forward(self, q, k, v, bias=None, scale=None, causal=False, mask=None):
        # mask: the model's mask as SDPA takes it (attn_mask): an additive one joins the bias; a bool one
        # (True = may attend) stays apart (or beside a bias that is nothing but it made additive) and is
        # made additive only where a call needs it: a fold into the layout (`skip_padding`) drops it
        if self.training and self.site.dropout > 0:
            raise SiteError(
                f"{self.site.where}: attention dropout p={self.site.dropout} is active in training mode; the sparse "
                "op has no dropout: set the attention dropout to 0, or keep this site dense (mask_fn returns None)"
            )
        rank, lead = q.dim(), q.shape[:-3]
        if mask is not None and mask.dtype != torch.bool:
            bias, mask = (mask if bias is None else bias + mask), None
        if mask is not None and q.dim() != 4:  # the op's [B, H, N, D] form reshapes an additive bias only
            bias, mask = _additive(bias, mask, q), None
        q, k, v, bias = _as_4d(q, k, v, bias)
        if op.is_traced(q, k, v, bias, mask):  # compiled, exported or transformed: one opaque op, any length
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            out = torch.ops.fxsparse.site_attention(q, k, v, bias, mask, scale, bool(causal), self.uid)[0]
            return _from_4d(out, rank, lead)
        if self.recorder is not None:
            self.recorder(self.site, q, k, _additive(bias, mask, q), scale, causal)
        shape = (q.shape[-2], k.shape[-2])
        entry = self._layouts.get(shape, _MISSING)
        if entry is _MISSING:
            entry = self._prepare(q, k, v)
        try:
            if entry is None:
                out = _dense_attention(q, k, v, _additive(bias, mask, q), scale, causal)
            elif entry[0] is None:  # few queries: the token mask on SDPA
                out = _dense_attention(q, k, v, _mask_bias(entry[3], _additive(bias, mask, q), q), scale, causal)
            else:
                name, _, _, built = entry  # the tables come from the buffer, which follows .to(device)
                layout, bias = self._with_mask(self._buffer_layout(name, built), q, bias, mask)
                out = sparse_attention(q, k, v, layout, scale=scale, bias=bias, causal=causal, options=self.options)
        except (ValueError, TypeError) as err:
            if isinstance(err, SiteError):
                raise
            raise SiteError(f"{self.site.where}: {err}") from err
        return _from_4d(out, rank, lead)

    def traced_layout(self, q, k, v, bias, mask):
        """(layout, bias) of a call through the site op (compiled or exported): the kernels' Layout with
        the model's mask folded in where `skip_padding` allows it, and the bias left to apply."""
        return self._with_mask(self.kernel_layout_for(q, k, v), q, bias, mask)

    def _with_mask(self, layout: Layout, q, bias, mask):
        """(layout, bias) of a call given the model's mask as `bias` and / or `mask` (see `forward`)."""
        if self.skip_padding:
            folded = _fold_mask_bias(layout, bias, mask, like=q)
            if folded[0] is not layout and not self.mask_folded:  # set once: a module attribute costs per call
                self.mask_folded = True
            return folded
        return layout, _additive(bias, mask, q)

    def kernel_layout_for(self, q, k, v) -> Layout:
        """The Layout the kernels walk for these inputs, whatever mask_fn said (dense: all blocks)."""
        shape = (q.shape[-2], k.shape[-2])
        entry = self._layouts.get(shape, _MISSING)
        if entry is _MISSING:
            entry = self._prepare(q, k, v)
        if entry is not None and entry[0] is not None:
            return self._buffer_layout(entry[0], entry[3])
        # kept dense, or few queries (SDPA with the token mask when eager): built once per shape and device
        dim = max(q.shape[-1], v.shape[-1])  # the kernels' tiles follow the wider of the two head dims
        key = (*shape, str(q.device), dim <= op.KERNEL_BLOCK)
        layout = self._run_layouts.get(key)
        if layout is None:
            built = Layout.dense(*shape, device=q.device) if entry is None else Layout.from_mask(entry[3].to(q.device))
            layout = self._run_layouts[key] = kernel_layout(built, dim)
        return layout

    def _buffer_layout(self, name: str, built: Layout) -> Layout:
        """The kernel Layout ``built`` over the tables in buffer ``name`` (which follow ``.to(device)``)."""
        data = getattr(self, name)
        layout = self._run_layouts.get(name)
        if layout is None or layout.data is not data:
            layout = self._run_layouts[name] = dataclasses.replace(built, data=data)
        return layout

    @torch.compiler.disable
    def _prepare(self, q, k, v):
        """First call at these lengths: ask mask_fn, check it, build the Layout."""
        return self.prepare(q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], q.device, v.shape[3])

    def prepare(self, num_heads, num_kv_heads, q_len, kv_len, head_dim, device, value_dim=None):
        site = dataclasses.replace(self.site, num_heads=num_heads, num_kv_heads=num_kv_heads, q_len=q_len,
                                   kv_len=kv_len, head_dim=head_dim)
        self.site = site
        key = (q_len, kv_len)
        if key in self._layouts:
            self._layouts.move_to_end(key)
            return self._layouts[key]
        layout = _layout_from(self.mask_fn, site)
        entry = None
        if layout is not None and q_len <= self.SMALL_Q:
            entry = (None, layout.block_size, layout.density, layout.to_mask().to(device))
        elif layout is not None:
            name = f"layout_{q_len}x{kv_len}"
            tables = kernel_layout(layout, max(head_dim, value_dim or head_dim))  # what the kernels walk; the report shows mask_fn's layout
            self.register_buffer(name, _on_device(tables.data, device), persistent=False)
            entry = (name, layout.block_size, layout.density, dataclasses.replace(tables, data=tables.data[:0]))
        self._layouts[key] = entry
        while len(self._layouts) > self.MAX_LAYOUTS:
            (old_q, old_kv), old = self._layouts.popitem(last=False)
            if old is not None and old[0] is not None:
                delattr(self, old[0])
                self._run_layouts.pop(old[0], None)
            for run_key in [x for x in self._run_layouts if isinstance(x, tuple) and x[:2] == (old_q, old_kv)]:
                del self._run_layouts[run_key]
        return entry


# ------------------------------------------------------------------------------ the site as one op
# Under a compiler (torch.compile of a transformed model, fxsparse.backend with dynamic shapes) a
# site is one opaque op that finds its layout when it runs: lengths may be symbolic while tracing.
_SITES: "weakref.WeakValueDictionary[int, SiteAttention]" = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def _register(site: "SiteAttention") -> int:
    uid = next(_NEXT)
    _SITES[uid] = site
    return uid


def _site(uid: int) -> "SiteAttention":
    site = _SITES.get(uid)
    if site is None:
        raise RuntimeError(f"fxsparse: the site module with id {uid} no longer exists (the model that held it was "
                           "deleted); compile the model again")
    return site


@torch.library.custom_op("fxsparse::site_attention", mutates_args=())
def _site_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
             mask: Optional[torch.Tensor], scale: float, causal: bool, site: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = _site(site)
    layout, bias = s.traced_layout(q, k, v, bias, mask)
    return op.layout_forward(q, k, v, layout, scale=scale, bias=bias, causal=causal, options=s.options)


@_site_op.register_fake
def _(q, k, v, bias, mask, scale, causal, site):
    b, h, nq, _ = q.shape
    dv = v.shape[-1]
    out = q.new_empty_strided((b, h, nq, dv), (nq * h * dv, dv, h * dv, 1))
    return out, q.new_empty(b, h, 2, nq, dtype=reference.acc_dtype(q))


@torch.library.custom_op("fxsparse::site_attention_backward", mutates_args=())
def _site_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], scale: float,
                      causal: bool, site: int, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    s = _site(site)
    layout, bias = s.traced_layout(q, k, v, bias, mask)  # what the forward ran (a dropped bias: None)
    dq, dk, dv, dbias = op.layout_backward(dout, q, k, v, out, lse, layout, scale=scale, bias=bias, causal=causal,
                                           bias_grad=bias_grad, options=s.options)
    dbias = dbias if dbias is not None else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias


@_site_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, mask, scale, causal, site, bias_grad):
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias_grad else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dbias)


def _site_setup(ctx, inputs, output):
    q, k, v, bias, mask, scale, causal, site = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], bias, mask)
    ctx.scale, ctx.causal, ctx.site = scale, causal, site
    ctx.bias_grad = bias is not None and bias.requires_grad


def _site_backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, mask = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.fxsparse.site_attention_backward(
        dout, q, k, v, out, lse, bias, mask, ctx.scale, ctx.causal, ctx.site, ctx.bias_grad)
    return dq, dk, dv, (dbias if ctx.bias_grad else None), None, None, None, None


torch.library.register_autograd("fxsparse::site_attention", _site_backward, setup_context=_site_setup)


_ON_DEVICE: OrderedDict = OrderedDict()  # (id of tables, device) -> (tables, their copy there); 32 at most


def _on_device(data, device):
    """One copy on ``device`` of a layout's tables, shared by every site whose mask_fn returned the
    same (cached) layout: a 12-layer model holds one copy, and per-call work keyed by the tables
    (``_fold_mask_bias``) is done once for all its layers."""
    device = torch.device(device)
    if data.device == device:
        return data
    key = (id(data), str(device))
    hit = _ON_DEVICE.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    moved = data.to(device)
    _ON_DEVICE[key] = (data, moved)
    while len(_ON_DEVICE) > 32:
        _ON_DEVICE.popitem(last=False)
    return moved


def capturing(t: torch.Tensor) -> bool:
    """Whether work on t's device is being captured into a CUDA graph: per-call results must then be
    computed inside the capture, not reused from before it (a replay runs only the captured kernels)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


FOLD_CACHE_SIZE = 4  # runtime masks whose folded layouts are kept (least recently used out first)
_FOLDED: OrderedDict = OrderedDict()  # (id of the mask or the tensor it views, ...) -> (weak refs to that and to
# the layout's tables or None, layout, bias dropped)


def _fold_mask_bias(layout: Layout, bias, mask=None, like=None):
    """(layout, bias) for a call given the model's own mask (padding, packed documents, a causal mask
    built as a tensor): the blocks that mask removes entirely leave the layout, so they are skipped,
    not computed and masked. Only for masks shared by every head.

    ``bias``: an additive bias, or None. ``mask``: the model's bool mask (True = may attend; SDPA's
    bool ``attn_mask``), given alone (``bias`` None) or with ``bias`` being nothing but it made
    additive.
    * Where mask_fn keeps every pair (the site is sparse only by the model's mask: density 1), a 4-D
      ``mask`` replaces the layout by its exact layout, and no bias is left.
    * Otherwise the bias stays and the layout loses the blocks where every entry is masked (at or
      below half the dtype's minimum): in the blocks left the bias masks as before, and a skipped block
      adds exactly nothing (exp of the minimum is 0). With a sparse layout only a bool ``mask`` does
      this: its masked entries are -inf, so a query row whose visited keys are all masked gives 0
      either way; a float bias at the dtype's minimum gives such a row the mean of those keys, so it
      is folded only where the layout keeps every pair (where a query row with no unmasked key keeps
      all its blocks, and gives what it gave without the fold).
    Either way the result is the unfolded call's. Where a bool mask cannot be folded it is returned
    made additive (in ``like``'s dtype).

    Built on the device with a fixed number of vectorised steps and nothing read back to the host
    (``masks.key_padding_layout``'s tables for masks that do not vary along the queries, one reshape
    and reductions for others), once per mask tensor and layout tables: every layer of a model gets the
    same mask, and sites whose mask_fn gave the same layout share its tables (`_on_device`), so the
    result is kept (keyed by the identity of the tensor, or of the tensor it views, with where in it,
    its shape, strides and version, and, for a sparse layout, by the identity of its tables; checked
    against weak references to those tensors, so a new tensor that reuses a freed one's identity is
    folded afresh and nothing is kept alive). A traced site (the site op) folds its mask when the op
    runs. While a CUDA graph is captured nothing is kept or reused: the fold's kernels must be in the
    graph, so that a replay with new mask data folds that data.
    """
    source = mask if mask is not None and mask.dtype == torch.bool and mask.dim() == 4 else None
    held = bias if source is None else source
    if held is None or held.dim() != 4 or held.shape[-1] != layout.shape[1]:
        return layout, _additive(bias, mask, like)
    every_pair = layout.density == 1.0 and _keeps_every_pair(layout)  # a window inside one partial block has density 1
    if not every_pair and source is None:
        return layout, _additive(bias, mask, like)
    exact = every_pair and source is not None
    if capturing(held):
        folded, dropped = _fold(layout, held, exact)
    else:
        # a view made per layer of one mask (nn.MultiheadAttention's key padding, unsqueezed at every layer)
        # is the same mask: keyed by the tensor it views, where in it, and its version
        anchor = held if held._base is None else held._base
        tables = None if every_pair else layout.data  # the folded layout keeps the sparse layout's blocks
        key = (id(anchor), held.data_ptr(), tuple(held.shape), held.stride(), held._version, source is None,
               layout.block_size, tuple(layout.shape), None if tables is None else (id(tables), tables._version))
        hit = _FOLDED.get(key)
        if hit is not None and hit[0]() is anchor and (tables is None or hit[1]() is tables):
            _FOLDED.move_to_end(key)
            folded, dropped = hit[2], hit[3]
        else:
            folded, dropped = _fold(layout, held, exact)
            # neither the mask nor the tables are kept alive
            _FOLDED[key] = (weakref.ref(anchor), None if tables is None else weakref.ref(tables), folded, dropped)
            while len(_FOLDED) > FOLD_CACHE_SIZE:
                _FOLDED.popitem(last=False)
    return folded, None if dropped else _additive(bias, mask, like)


def _additive(bias, mask, like):
    """The bias a call applies: ``bias``, or the bool ``mask`` made additive when no bias is given."""
    return bias if bias is not None or mask is None else _bool_mask_bias(mask, like)


_LAST_BIAS: dict = {}  # the last bool mask made additive (`reuse_last`'s cache)


def _bool_mask_bias(mask, like):
    """A bool mask (True = may attend) as an additive bias of ``like``'s dtype (0 or -inf); eager calls
    reuse the last one made (`reuse_last`)."""
    return reuse_last(_LAST_BIAS, (mask,), lambda: _to_bias(mask, like), like.dtype)


def reuse_last(cache: dict, tensors: tuple, build: Callable, *extra):
    """``build()``, or what it returned last time for these tensors: every layer of a model passes the
    same mask, and gets one conversion of it (and one fold of that). Keyed by each tensor's storage,
    version, shape, strides and device, plus ``extra``; the tensors are held, so their storage is not
    reused meanwhile. Nothing is reused under a compiler (no data_ptr; it dedups the work itself) nor
    into a CUDA graph (the work must be captured, so that a replay converts new data). ``cache``
    holds one entry."""
    given = [t for t in tensors if t is not None]
    if op.is_traced(*given) or any(capturing(t) for t in given):
        return build()
    key = tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.device)
                for t in tensors) + extra
    if cache.get("key") != key:
        cache.update(key=key, value=build(), held=tensors)
    return cache["value"]


def _to_bias(mask, like):
    return like.new_zeros(()).expand(mask.shape).masked_fill(~mask, float("-inf"))


_EVERY_PAIR: "weakref.WeakKeyDictionary[Layout, bool]" = weakref.WeakKeyDictionary()


def _keeps_every_pair(layout: Layout) -> bool:
    """Whether ``layout``'s mask is all True, read once per Layout object (a site keeps its own): a
    block density of 1 counts a partial block whole, whatever its element mask holds. Checked a few
    block rows at a time (at most 16M mask elements)."""
    got = _EVERY_PAIR.get(layout)
    if got is None:
        got = not bool((layout.kinds == EMPTY).any())
        nqb = layout.num_blocks[0]
        step = max(1, (1 << 24) // (layout.block_size * layout.shape[1] * layout.batch * layout.num_heads))
        for start in range(0, nqb, step) if got else ():
            rows = block_mask(layout.data, layout.batch, layout.num_heads, layout.block_size, layout.shape,
                              start, min(start + step, nqb))
            if not bool(rows.all()):
                got = False
                break
        _EVERY_PAIR[layout] = got
    return got


def _fold(layout: Layout, held, exact: bool) -> tuple:
    """(the folded layout, whether the model's mask `held` is left out of the bias): `_fold_mask_bias`;
    ``exact``: `held` is a bool mask, whose exact layout replaces the site's."""
    nq, nk = layout.shape
    bs = layout.block_size
    try:
        keep = masks.mask_keep(held, nq, "the site's mask")
    except ValueError:
        return layout, False
    if keep.dim() == 4 and keep.shape[1] > 1:
        return layout, False  # per-head masks stay a bias
    nan = float("nan")  # the density of a per-call layout is not computed: it would be read back to the host
    if exact:  # the exact layout of the mask, and no bias
        if keep.dim() == 2:
            tables = masks.key_padding_tables(keep, nq, bs)
        else:
            tables = masks.block_tables(keep.expand(-1, -1, nq, -1), bs)
        return layout_from_kinds(*tables, bs, (nq, nk), density=nan, causal=False), True
    # the bias stays: drop the blocks where it masks everything; a row with no unmasked key keeps them all
    nqb, nkb = layout.num_blocks
    keep = keep | ~keep.any(-1, keepdim=True)
    if keep.dim() == 2:
        padded = keep.new_zeros(keep.shape[0], nkb * bs)
        padded[:, :nk] = keep
        visit = padded.view(-1, 1, 1, nkb, bs).any(-1)  # [B, 1, 1, NKB]
    else:
        padded = keep.new_zeros(keep.shape[0], 1, nqb * bs, nkb * bs)
        padded[:, :, :nq, :nk] = keep.expand(-1, -1, nq, -1)
        visit = padded.view(-1, 1, nqb, bs, nkb, bs).any(-1).any(-2)  # [B, 1, NQB, NKB]
    kinds = torch.where(visit, layout.kinds, EMPTY).to(torch.int8)
    mask_id = torch.where(visit, layout.mask_id, -1).to(torch.int32)
    return layout_from_kinds(kinds, mask_id, layout.bits, bs, (nq, nk), density=nan, causal=layout.causal), False


def _mask_bias(mask, bias, like):
    """A token mask [B|1, H|1, Nq, Nk] (True = may attend) added to an additive bias."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    base = like.new_zeros(()) if bias is None else bias
    return torch.where(mask, base, torch.tensor(float("-inf"), dtype=like.dtype, device=like.device))


def _as_4d(q, k, v, bias):
    """q, k, v as [B, H, N, D] (the op's form) from [N, D], [B*H, N, D] (bmm-style) or [..., H, N, D]."""
    if q.dim() == 4:
        return q, k, v, bias
    if q.dim() < 4:
        extra = 4 - q.dim()
        fix = (lambda t: t.reshape(*t.shape[:-2], *([1] * extra), *t.shape[-2:])) if q.dim() == 3 else (
            lambda t: t.reshape(*([1] * extra), *t.shape))
        if bias is not None and bias.dim() == q.dim():
            bias = fix(bias)
        return fix(q), fix(k), fix(v), bias
    if bias is not None and bias.dim() > 4:
        bias = bias.expand(*q.shape[:-1], k.shape[-2]).flatten(0, -4)
    return q.flatten(0, -4), k.flatten(0, -4), v.flatten(0, -4), bias


def _from_4d(out, rank: int, lead):
    """The op's [B, H, N, D] output back in the site's own form (see _as_4d)."""
    if rank == 4:
        return out
    if rank == 3:  # [B*H, N, D]
        return out.squeeze(1)
    if rank == 2:  # [N, D]
        return out[0, 0]
    return out.reshape(*lead, *out.shape[1:])


def _dense_attention(q, k, v, bias, scale, causal):
    """A site that mask_fn keeps dense runs PyTorch's fused attention (flash or memory-efficient on
    a GPU), as fast as the model was before; the site's bias and causality stay in force."""
    mask = bias
    if causal and bias is not None:  # SDPA takes one or the other: fold causality into the bias
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = torch.where(keep, bias, float("-inf"))
    if mask is not None:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and bias is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _layout_from(mask_fn, site: AttentionSite) -> Optional[Layout]:
    """mask_fn(site), checked, as a Layout (or None for dense): a Layout, a bool token mask, a pattern
    or a FlexAttention mask_mod, as ``fxsparse.layout.resolve_mask`` takes them."""
    try:
        mask = mask_fn(site)
    except Exception as err:
        raise SiteError(f"{site.where}: mask_fn raised {type(err).__name__}: {err}") from err
    try:
        return resolve_mask(mask, q_len=site.q_len, kv_len=site.kv_len, num_heads=site.num_heads,
                            where=f"{site.where}: mask_fn")
    except (ValueError, TypeError) as err:
        raise SiteError(str(err)) from err


def is_transformed(module: nn.Module) -> bool:
    return hasattr(module, "fxsparse_skipped") or any(isinstance(x, SiteAttention) for x in module.modules())


def site_modules(module: nn.Module) -> list[SiteAttention]:
    return [x for x in module.modules() if isinstance(x, SiteAttention)]
