"""The Triton kernels of the hash-grid encoding (see ``magic3d.ops.hashgrid_triton``).

Kept in their own file because ``triton.jit`` resolves the helper functions a kernel calls
through its module's globals, so the kernels must be module-level, and importing this module
imports triton. ``hashgrid_triton`` loads it only when the triton backend runs, once per
value of the interpreter flag (``triton.jit`` reads that flag when it decorates).

Only builtins of ``triton.language`` are used, none of its ``@jit`` standard library
(``tl.zeros``, ``tl.zeros_like``, ``tl.sum``, ...): those are decorated once, in whichever
mode was on when triton was first imported, so a kernel calling them breaks in the other
mode (an interpreter test after torch's inductor imported triton, or a compile after an
interpreter test). ``tl.full`` and ``tl.reduce`` with our own combine function do instead.
"""

import triton
import triton.language as tl

# tiny-cuda-nn's coherent-prime hash factors for y and z (x's is 1); uint32 literals in Triton.
PRIME_Y = tl.constexpr(2654435761)
PRIME_Z = tl.constexpr(805459861)


@triton.jit
def add(a, b):
    return a + b


@triton.jit
def level_constants(scales_ptr, meta_ptr, level):
    # meta rows: (resolution, size, first entry, hashed) as int64
    scale = tl.load(scales_ptr + level)  # float64 holding the float32 scale exactly
    res = tl.load(meta_ptr + 4 * level).to(tl.uint32)
    size = tl.load(meta_ptr + 4 * level + 1).to(tl.uint32)
    offset = tl.load(meta_ptr + 4 * level + 2)
    hashed = tl.load(meta_ptr + 4 * level + 3) != 0
    return scale, res, size, offset, hashed


@triton.jit
def axis_cell(x_ptr, rows, mask, d: tl.constexpr, scale):
    xd = tl.load(x_ptr + rows * 3 + d, mask=mask, other=0.0)
    # The twin's one-rounding rule, literally: float64 product (exact), + 0.5, one rounding
    # to the input's precision. A fused float64 multiply-add would give the same bits.
    pos = (xd.to(tl.float64) * scale + 0.5).to(x_ptr.dtype.element_ty)
    cell = tl.floor(pos)
    # Through int64, so cells beyond +-2^31 still wrap like the twin's int64 & 0xFFFFFFFF.
    return pos, pos - cell, cell.to(tl.int64).to(tl.uint32)


@triton.jit
def smooth(frac, SMOOTH: tl.constexpr):
    if SMOOTH:
        return frac * frac * (3.0 - 2.0 * frac)  # same operation order as the twin
    else:
        return frac


@triton.jit
def pick(w, BIT: tl.constexpr):
    if BIT:
        return w
    else:
        return 1.0 - w


@triton.jit
def corner_entry(gx, gy, gz, res, size, offset, BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
                 HASHED: tl.constexpr):
    # uint32 throughout: products and sums wrap modulo 2^32 as tiny-cuda-nn's do.
    cx = gx + BX
    cy = gy + BY
    cz = gz + BZ
    if HASHED:
        # A hashed level's size is 2^T (it is hashed only when res^3 exceeds 2^T), so the
        # modulo is a mask.
        index = (cx ^ (cy * PRIME_Y) ^ (cz * PRIME_Z)) & (size - 1)
    else:
        index = (cx + cy * res + cz * (res * res)) % size
    return index.to(tl.int64) + offset


@triton.jit
def corner_weight(wx, wy, wz, BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr):
    return pick(wz, BZ) * pick(wy, BY) * pick(wx, BX)  # (wz * wy) * wx, the twin's order


@triton.jit
def table_offsets(entry, feats, F: tl.constexpr, INDEX64: tl.constexpr):
    if INDEX64:
        base = entry * F
    else:
        base = entry.to(tl.int32) * F  # the host checked n_params < 2^31
    return base[:, None] + feats[None, :]


@triton.jit
def gather_level(table_ptr, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats,
                 F: tl.constexpr, HASHED: tl.constexpr, INDEX64: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.full((BLOCK, F), 0, wx.dtype)
    for k in tl.static_range(8):
        entry = corner_entry(gx, gy, gz, res, size, offset, k & 1, (k >> 1) & 1, k >> 2, HASHED)
        values = tl.load(table_ptr + table_offsets(entry, feats, F, INDEX64), mask=mask[:, None], other=0.0)
        acc += values * corner_weight(wx, wy, wz, k & 1, (k >> 1) & 1, k >> 2)[:, None]
    return acc


@triton.jit
def scatter_level(grad_table_ptr, grad, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats,
                  F: tl.constexpr, HASHED: tl.constexpr, INDEX64: tl.constexpr):
    for k in tl.static_range(8):
        entry = corner_entry(gx, gy, gz, res, size, offset, k & 1, (k >> 1) & 1, k >> 2, HASHED)
        # The twin's d corner = grad_out * weight, the same float product; only the order
        # of the additions into an entry differs.
        contribution = grad * corner_weight(wx, wy, wz, k & 1, (k >> 1) & 1, k >> 2)[:, None]
        # relaxed: a pure accumulation, nothing is read back, so no fences are needed.
        tl.atomic_add(grad_table_ptr + table_offsets(entry, feats, F, INDEX64),
                      contribution.to(grad_table_ptr.dtype.element_ty), mask=mask[:, None], sem="relaxed")


@triton.jit
def weight_grads_level(table_ptr, grad, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats,
                       F: tl.constexpr, HASHED: tl.constexpr, INDEX64: tl.constexpr):
    # d out / d w_axis: corner k's weight is a product of one factor per axis, w or 1 - w.
    dwx = tl.full(wx.shape, 0, wx.dtype)
    dwy = tl.full(wx.shape, 0, wx.dtype)
    dwz = tl.full(wx.shape, 0, wx.dtype)
    for k in tl.static_range(8):
        entry = corner_entry(gx, gy, gz, res, size, offset, k & 1, (k >> 1) & 1, k >> 2, HASHED)
        values = tl.load(table_ptr + table_offsets(entry, feats, F, INDEX64), mask=mask[:, None], other=0.0)
        g = tl.reduce(values * grad, 1, add)  # cotangent . corner value, (BLOCK,)
        fx = pick(wx, k & 1)
        fy = pick(wy, (k >> 1) & 1)
        fz = pick(wz, k >> 2)
        if k & 1:
            dwx += fz * fy * g
        else:
            dwx -= fz * fy * g
        if (k >> 1) & 1:
            dwy += fz * fx * g
        else:
            dwy -= fz * fx * g
        if k >> 2:
            dwz += fy * fx * g
        else:
            dwz -= fy * fx * g
    return dwx, dwy, dwz


@triton.jit
def dfrac(dw, frac, SMOOTH: tl.constexpr):
    d = dw.to(frac.dtype)
    if SMOOTH:
        return d * (6.0 * frac * (1.0 - frac))  # d/df f^2 (3 - 2f)
    else:
        return d


@triton.jit
def grad_offsets(rows, level, feats, stride_p, stride_c, F: tl.constexpr):
    # Strided, so an expanded cotangent (out.sum(): strides 0) needs no copy; Triton specialises
    # a stride of 1, so the contiguous layout keeps its vector loads.
    return rows[:, None] * stride_p + (level * F + feats[None, :]) * stride_c


@triton.jit
def point_rows(BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    start = tl.program_id(0)
    if INDEX64:
        start = start.to(tl.int64)
    return start * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def forward_kernel(x_ptr, table_ptr, out_ptr, scales_ptr, meta_ptr, n_points,
                   N_LEVELS: tl.constexpr, F: tl.constexpr, SMOOTH: tl.constexpr, INDEX64: tl.constexpr,
                   BLOCK: tl.constexpr):
    level = tl.program_id(1)
    rows = point_rows(BLOCK, INDEX64)
    mask = rows < n_points
    scale, res, size, offset, hashed = level_constants(scales_ptr, meta_ptr, level)
    _, frac_x, gx = axis_cell(x_ptr, rows, mask, 0, scale)
    _, frac_y, gy = axis_cell(x_ptr, rows, mask, 1, scale)
    _, frac_z, gz = axis_cell(x_ptr, rows, mask, 2, scale)
    w_dtype = table_ptr.dtype.element_ty
    wx = smooth(frac_x, SMOOTH).to(w_dtype)
    wy = smooth(frac_y, SMOOTH).to(w_dtype)
    wz = smooth(frac_z, SMOOTH).to(w_dtype)
    feats = tl.arange(0, F)
    if hashed:
        acc = gather_level(table_ptr, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats, F, True, INDEX64,
                           BLOCK)
    else:
        acc = gather_level(table_ptr, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats, F, False, INDEX64,
                           BLOCK)
    out_offsets = rows[:, None] * (N_LEVELS * F) + level * F + feats[None, :]
    tl.store(out_ptr + out_offsets, acc, mask=mask[:, None])


@triton.jit
def backward_table_kernel(x_ptr, grad_out_ptr, grad_table_ptr, scales_ptr, meta_ptr, n_points, grad_stride_p,
                          grad_stride_c,
                          N_LEVELS: tl.constexpr, F: tl.constexpr, SMOOTH: tl.constexpr,
                          INDEX64: tl.constexpr, BLOCK: tl.constexpr):
    level = tl.program_id(1)
    rows = point_rows(BLOCK, INDEX64)
    mask = rows < n_points
    scale, res, size, offset, hashed = level_constants(scales_ptr, meta_ptr, level)
    _, frac_x, gx = axis_cell(x_ptr, rows, mask, 0, scale)
    _, frac_y, gy = axis_cell(x_ptr, rows, mask, 1, scale)
    _, frac_z, gz = axis_cell(x_ptr, rows, mask, 2, scale)
    w_dtype = grad_out_ptr.dtype.element_ty  # the output's dtype is the table's
    wx = smooth(frac_x, SMOOTH).to(w_dtype)
    wy = smooth(frac_y, SMOOTH).to(w_dtype)
    wz = smooth(frac_z, SMOOTH).to(w_dtype)
    feats = tl.arange(0, F)
    grad = tl.load(grad_out_ptr + grad_offsets(rows, level, feats, grad_stride_p, grad_stride_c, F),
                   mask=mask[:, None], other=0.0)
    if hashed:
        scatter_level(grad_table_ptr, grad, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats,
                      F, True, INDEX64)
    else:
        scatter_level(grad_table_ptr, grad, gx, gy, gz, wx, wy, wz, res, size, offset, mask, feats,
                      F, False, INDEX64)


@triton.jit
def backward_points_kernel(x_ptr, table_ptr, grad_out_ptr, grad_x_ptr, scales_ptr, meta_ptr, n_points,
                           grad_stride_p, grad_stride_c,
                           N_LEVELS: tl.constexpr, F: tl.constexpr, SMOOTH: tl.constexpr,
                           INDEX64: tl.constexpr, BLOCK: tl.constexpr):
    rows = point_rows(BLOCK, INDEX64)
    mask = rows < n_points
    w_dtype = table_ptr.dtype.element_ty
    feats = tl.arange(0, F)
    dx = tl.full((BLOCK,), 0, tl.float64)
    dy = tl.full((BLOCK,), 0, tl.float64)
    dz = tl.full((BLOCK,), 0, tl.float64)
    for level in range(N_LEVELS):
        scale, res, size, offset, hashed = level_constants(scales_ptr, meta_ptr, level)
        _, frac_x, gx = axis_cell(x_ptr, rows, mask, 0, scale)
        _, frac_y, gy = axis_cell(x_ptr, rows, mask, 1, scale)
        _, frac_z, gz = axis_cell(x_ptr, rows, mask, 2, scale)
        wx = smooth(frac_x, SMOOTH).to(w_dtype)
        wy = smooth(frac_y, SMOOTH).to(w_dtype)
        wz = smooth(frac_z, SMOOTH).to(w_dtype)
        grad = tl.load(grad_out_ptr + grad_offsets(rows, level, feats, grad_stride_p, grad_stride_c, F),
                       mask=mask[:, None], other=0.0)
        if hashed:
            dwx, dwy, dwz = weight_grads_level(table_ptr, grad, gx, gy, gz, wx, wy, wz, res, size, offset,
                                               mask, feats, F, True, INDEX64)
        else:
            dwx, dwy, dwz = weight_grads_level(table_ptr, grad, gx, gy, gz, wx, wy, wz, res, size, offset,
                                               mask, feats, F, False, INDEX64)
        # d frac / d x = scale, applied in float64 like the twin's autograd through x.to(float64)
        dx += dfrac(dwx, frac_x, SMOOTH).to(tl.float64) * scale
        dy += dfrac(dwy, frac_y, SMOOTH).to(tl.float64) * scale
        dz += dfrac(dwz, frac_z, SMOOTH).to(tl.float64) * scale
    out_dtype = grad_x_ptr.dtype.element_ty
    tl.store(grad_x_ptr + rows * 3, dx.to(out_dtype), mask=mask)
    tl.store(grad_x_ptr + rows * 3 + 1, dy.to(out_dtype), mask=mask)
    tl.store(grad_x_ptr + rows * 3 + 2, dz.to(out_dtype), mask=mask)


@triton.jit
def corners_kernel(x_ptr, pos_ptr, entries_ptr, scales_ptr, meta_ptr, n_points,
                   N_LEVELS: tl.constexpr, INDEX64: tl.constexpr, BLOCK: tl.constexpr):
    # Debug: the positions and corner entries exactly as the kernels above compute them.
    level = tl.program_id(1)
    rows = point_rows(BLOCK, INDEX64)
    mask = rows < n_points
    scale, res, size, offset, hashed = level_constants(scales_ptr, meta_ptr, level)
    pos_x, _, gx = axis_cell(x_ptr, rows, mask, 0, scale)
    pos_y, _, gy = axis_cell(x_ptr, rows, mask, 1, scale)
    pos_z, _, gz = axis_cell(x_ptr, rows, mask, 2, scale)
    pos_base = (rows * N_LEVELS + level) * 3
    tl.store(pos_ptr + pos_base, pos_x, mask=mask)
    tl.store(pos_ptr + pos_base + 1, pos_y, mask=mask)
    tl.store(pos_ptr + pos_base + 2, pos_z, mask=mask)
    entry_base = (rows * N_LEVELS + level) * 8
    for k in tl.static_range(8):
        if hashed:
            entry = corner_entry(gx, gy, gz, res, size, offset, k & 1, (k >> 1) & 1, k >> 2, True)
        else:
            entry = corner_entry(gx, gy, gz, res, size, offset, k & 1, (k >> 1) & 1, k >> 2, False)
        tl.store(entries_ptr + entry_base + k, entry, mask=mask)
