"""The Triton z-buffer fill (magic3d.ops.raster_triton) against its torch twin, key for key.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy arithmetic, about
4 ms a program), so the scenes are small: a few hundred to ~1000 programs of 64 pixels each.
The same comparisons at full size, and the gradients, run on CUDA (marked gpu).

Every comparison is exact: the kernel repeats the twin's operations in the same order with
FMA contraction off, so the int64 keys (depth bits << 32 | face id) must be identical.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from magic3d.data.cameras import mvp, orbit_cameras
from magic3d.ops import raster_triton
from magic3d.ops.raster import (
    _EMPTY_KEY,
    _FACE_MASK,
    Rasterizer,
    _face_setup,
    _fill_zbuffer,
    _uv_sphere,
    _zbuffer_backend,
    antialias,
    interpolate,
    rasterize,
)

needs_triton = pytest.mark.skipif(
    not raster_triton.triton_available(),
    reason="triton is not importable here (pip install -e '.[triton]' runs these in its CPU interpreter)",
)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's CPU interpreter for this test only (read when the kernel is built and run)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _homogeneous(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)


def _keys(pos: torch.Tensor, faces: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The z-buffer of the torch twin and of the Triton kernel (raw int64 keys)."""
    out = []
    for backend in ("torch", "triton"):
        zbuf = torch.full((pos.shape[0] * h * w,), _EMPTY_KEY, dtype=torch.int64, device=pos.device)
        # A small chunk makes the twin split the faces over several chunks too.
        _fill_zbuffer(pos, faces, h, w, zbuf, chunk_pairs=h * w, backend=backend)
        out.append(zbuf)
    return out[0], out[1]


def _assert_same_zbuffer(pos, faces, h, w) -> torch.Tensor:
    ref, fast = _keys(pos, faces, h, w)
    differ = int((ref != fast).sum())
    assert differ == 0, f"{differ} of {ref.numel()} pixels differ"
    return torch.where(ref == _EMPTY_KEY, -1, ref & _FACE_MASK).view(pos.shape[0], h, w)


def _random_scene(generator: torch.Generator, batch: int, n_vertices: int, n_faces: int,
                  dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clip-space triangles: mostly in front (w in [0.3, 1.3]), sizes up to the screen."""
    pos = torch.randn(batch, n_vertices, 4, generator=generator, dtype=dtype)
    pos[..., 3] = pos[..., 3].abs() * 0.5 + 0.3
    faces = torch.randint(0, n_vertices, (n_faces, 3), generator=generator)
    return pos, faces


# ----------------------------------------------------------------------------- interpreter


@needs_triton
def test_random_triangles_in_a_batch(interpret: None) -> None:
    generator = torch.Generator().manual_seed(0)
    pos, faces = _random_scene(generator, batch=3, n_vertices=40, n_faces=30)
    ids = _assert_same_zbuffer(pos, faces, 12, 20)
    assert (ids >= 0).any() and not torch.equal(ids[0], ids[1])  # the images differ per batch


@needs_triton
def test_float64_positions(interpret: None) -> None:
    generator = torch.Generator().manual_seed(1)
    pos, faces = _random_scene(generator, batch=1, n_vertices=30, n_faces=20, dtype=torch.float64)
    assert (_assert_same_zbuffer(pos, faces, 16, 16) >= 0).any()


@needs_triton
def test_depth_ties_go_to_the_lower_face_id(interpret: None) -> None:
    # Face 2 duplicates face 0 (bit-identical depths) and face 3 is coplanar with it but a
    # different triangle; listing the duplicate later must not let it win.
    pos = torch.tensor([[[-0.9, -0.8, 0.2, 1.0], [0.8, -0.7, 0.2, 1.0], [0.1, 0.9, 0.2, 1.0],
                         [-0.5, 0.6, 0.2, 1.0], [0.7, 0.5, 0.2, 1.0]]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 1], [0, 1, 2], [0, 4, 2]])
    ids = _assert_same_zbuffer(pos, faces, 16, 16)
    assert (ids == 0).any() and not (ids == 2).any()


@needs_triton
def test_faces_partly_behind_the_camera(interpret: None) -> None:
    # A floor triangle passing under and behind the camera (one vertex with w < 0, one with
    # w = 0 exactly): its box is the whole screen, 4 tiles at 16 x 16.
    cams = orbit_cameras(1, 10.0, 2.0, 60.0, 16, 16)
    world = torch.tensor([[-1.0, -3.0, -0.3], [-1.0, 3.0, -0.3], [6.0, 0.0, -0.3]])
    clip = _homogeneous(world) @ mvp(cams)[0].T
    assert (clip[:, 3] < 0).any() and (clip[:, 3] > 0).any()
    on_eye_plane = torch.tensor([[0.3, -0.2, 0.0, 0.0], [-0.6, 0.4, 0.5, 1.0], [0.7, 0.6, 0.1, 0.8]])
    pos = torch.cat([clip, on_eye_plane])[None]
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    ids = _assert_same_zbuffer(pos, faces, 16, 16)
    assert (ids == 0).any() and (ids == 1).any()


@needs_triton
def test_faces_larger_than_one_tile_and_a_watertight_mesh(interpret: None) -> None:
    # A triangle covering most of 32 x 32 (about 16 tiles) behind a small sphere mesh whose
    # shared edges must agree bit for bit between the two backends.
    verts, sphere = _uv_sphere(120, torch.device("cpu"))
    cams = orbit_cameras(2, 20.0, 1.6, 45.0, 32, 32)
    clip = torch.einsum("bij,vj->bvi", mvp(cams), _homogeneous(verts))
    big = torch.tensor([[-3.0, -3.0, 0.9, 1.0], [3.0, -3.0, 0.9, 1.0], [0.0, 3.0, 0.9, 1.0]])
    pos = torch.cat([clip, big.expand(2, 3, 4)], dim=1)
    faces = torch.cat([sphere, torch.tensor([[0, 1, 2]]) + verts.shape[0]])
    setup = _face_setup(pos, faces, 32, 32)
    assert int(setup.counts.max()) > 10 * raster_triton.BLOCK
    ids = _assert_same_zbuffer(pos, faces, 32, 32)
    assert (ids == sphere.shape[0]).any() and ((ids >= 0) & (ids < sphere.shape[0])).any()


@needs_triton
def test_empty_scenes(interpret: None) -> None:
    # No faces; faces all outside the frustum; a face too small to hold a pixel centre.
    pos = torch.tensor([[[2.0, 2.0, 0.0, 1.0], [3.0, 2.0, 0.0, 1.0], [2.0, 3.0, 0.0, 1.0],
                         [0.01, 0.01, 0.0, 1.0], [0.02, 0.01, 0.0, 1.0], [0.01, 0.02, 0.0, 1.0]]])
    for faces in (torch.zeros(0, 3, dtype=torch.long), torch.tensor([[0, 1, 2]]),
                  torch.tensor([[0, 1, 2], [3, 4, 5]])):
        assert (_assert_same_zbuffer(pos, faces, 8, 8) < 0).all()
        rast = rasterize(pos, faces, (8, 8), backend="triton")
        assert (rast.face_id < 0).all() and (rast.depth == 0).all()


@needs_triton
def test_rasterize_outputs_are_identical(interpret: None) -> None:
    generator = torch.Generator().manual_seed(2)
    pos, faces = _random_scene(generator, batch=2, n_vertices=30, n_faces=16)
    ref = rasterize(pos, faces, (12, 12), backend="torch")
    fast = Rasterizer("triton").rasterize(pos, faces, (12, 12))
    assert torch.equal(fast.face_id, ref.face_id)
    assert torch.equal(fast.depth, ref.depth) and torch.equal(fast.uv, ref.uv)


@needs_triton
def test_the_cuda_build_has_no_fused_multiply_add(monkeypatch: pytest.MonkeyPatch) -> None:
    # The interpreter never fuses, so only the real compiler can show what the GPU runs:
    # cross-compile for sm_90 (no GPU needed) with the launch options fill_zbuffer uses.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"zbuf_ptr": "*i64", "data_ptr": "*fp32", "ints_ptr": "*i64", "counts_ptr": "*i64",
                 "tile_face_ptr": "*i32", "tile_first_ptr": "*i64", "xs_ptr": "*fp32",
                 "ys_ptr": "*fp32", "h": "i32", "w": "i32", "BLOCK": "constexpr"}
    source = ASTSource(raster_triton._kernel(False), signature, constexprs={"BLOCK": raster_triton.BLOCK})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=raster_triton.LAUNCH_OPTIONS).asm["ptx"]
    assert "atom.global" in ptx and ".min.s64" in ptx  # the z-buffer update is a 64-bit atomic min
    assert ptx.count("mul.rn.f32") == 9  # 6 edge products + 3 depth products, none contracted
    assert "fma" not in ptx


# ----------------------------------------------------------------------------- errors, auto


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pos = torch.tensor([[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2]])
    expected = (ValueError, "CUDA") if raster_triton.triton_available() else (ImportError, "triton")
    with pytest.raises(expected[0], match=expected[1]):
        rasterize(pos, faces, (4, 4), backend="triton")
    with pytest.raises(ValueError, match="nvdiffrast"):
        rasterize(pos, faces, (4, 4), backend="nvdiffrast")  # type: ignore[arg-type]
    # auto never needs triton on CPU
    assert torch.equal(rasterize(pos, faces, (4, 4)).face_id, rasterize(pos, faces, (4, 4), backend="torch").face_id)


def test_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raster_triton, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter needs triton too
    with pytest.raises(ImportError, match="pip install triton"):
        Rasterizer("triton")
    with pytest.raises(ImportError, match="pip install triton"):
        rasterize(torch.rand(3, 4), torch.tensor([[0, 1, 2]]), (4, 4), backend="triton")
    assert _zbuffer_backend("auto", torch.device("cuda"), torch.float32) == "torch"


def test_auto_picks_triton_for_float_cuda_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raster_triton, "triton_available", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _zbuffer_backend("auto", cuda, torch.float32) == "triton"
    assert _zbuffer_backend("auto", cuda, torch.float64) == "triton"
    assert _zbuffer_backend("auto", cuda, torch.float16) == "torch"  # half stays with the twin
    assert _zbuffer_backend("auto", cpu, torch.float32) == "torch"
    if _nvdiffrast_absent():
        assert Rasterizer("auto").resolve_backend(cuda) == "triton"  # nvdiffrast would come first
    assert Rasterizer("auto").resolve_backend(cpu) == "torch"
    assert Rasterizer("torch").resolve_backend(cuda) == "torch"
    with pytest.raises(ValueError, match="float32 or float64"):
        _zbuffer_backend("triton", cuda, torch.bfloat16)


def _nvdiffrast_absent() -> bool:
    from magic3d.ops.raster import _import_nvdiffrast

    return _import_nvdiffrast() is None


def test_the_module_imports_without_triton() -> None:
    # A fresh interpreter where `import triton` fails: the rasteriser imports and runs on torch.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from magic3d.ops import raster, raster_triton\n"
        "assert not raster_triton.triton_available()\n"
        "pos = torch.tensor([[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]])\n"
        "rast = raster.Rasterizer('auto').rasterize(pos, torch.tensor([[0, 1, 2]]), (4, 4))\n"
        "assert (rast.face_id == 0).any()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- CUDA


def _sphere_scene(device: torch.device, batch: int = 8, n_faces: int = 100_000, res: int = 512):
    verts, faces = _uv_sphere(n_faces, device)
    cams = orbit_cameras(batch, 20.0, 1.6, 45.0, res, res).to(device)
    return torch.einsum("bij,vj->bvi", mvp(cams), _homogeneous(verts)), faces


@pytest.mark.gpu
@needs_triton
def test_cuda_sphere_100k_faces_batch_8() -> None:
    pos, faces = _sphere_scene(torch.device("cuda"))
    ids = _assert_same_zbuffer(pos, faces, 512, 512)
    assert (ids >= 0).float().mean() > 0.1


@pytest.mark.gpu
@needs_triton
def test_cuda_random_100k_faces_batch_8() -> None:
    # Random small triangles around the view plus some crossing the eye plane (w <= 0) and some
    # covering the screen: every kind of box at full size.
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(8, 100_000, 1, 4, generator=generator) * torch.tensor([0.8, 0.8, 0.5, 0.3])
    offsets = torch.randn(8, 100_000, 3, 4, generator=generator) * 0.02
    pos = (centres + offsets).reshape(8, -1, 4)
    pos[..., 3] += 1.0
    pos[:, :300, 3] -= 1.0  # the first 100 faces straddle w = 0
    pos[:, 300:360, :2] *= 60.0  # the next 20 are far larger than the screen
    faces = torch.arange(pos.shape[1]).view(-1, 3)
    ids = _assert_same_zbuffer(pos.cuda(), faces.cuda(), 512, 512)
    assert (ids >= 0).any()


@pytest.mark.gpu
@needs_triton
def test_cuda_gradients_match_between_torch_and_triton() -> None:
    device = torch.device("cuda")
    clip, faces = _sphere_scene(device)
    colours = torch.rand(clip.shape[1], 3, generator=torch.Generator().manual_seed(4)).to(device)
    cotangent = torch.rand(8, 512, 512, 3, generator=torch.Generator().manual_seed(5)).to(device)

    def run(backend: str):
        raster = Rasterizer(backend)  # type: ignore[arg-type]
        c = clip.detach().clone().requires_grad_(True)
        rast = raster.rasterize(c, faces, (512, 512))
        rgb = raster.antialias(raster.interpolate(colours, rast, faces), rast, c, faces)
        mask = raster.antialias(rast.mask, rast, c, faces)
        ((rgb * cotangent).sum() + mask.sum()).backward()
        return rast.face_id, rgb.detach(), c.grad

    ids_ref, rgb_ref, grad_ref = run("torch")
    ids, rgb, grad = run("triton")
    assert torch.equal(ids, ids_ref)
    # Same face ids, so the same torch ops run on the same values; only the order differs in
    # which antialias's index_add (CUDA atomics) adds up to 4 blends into one pixel: float32
    # sums of O(1) terms, a few ulps of 1.
    torch.testing.assert_close(rgb, rgb_ref, rtol=0, atol=1e-6)
    # The backward accumulates each vertex's gradient from ~100 pixel terms with CUDA atomics,
    # in an order that varies from run to run (one backend run twice differs too): up to ~100
    # ulps of the terms, about 1e-5 of the largest gradient; 1e-4 leaves a 10x margin.
    scale = float(grad_ref.abs().max())
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4 * scale)
