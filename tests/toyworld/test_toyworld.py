"""Toy world: SDF shapes, sphere-traced renders with the text-to-3D cameras, dataset shards."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.data.cameras import (
    CameraRanges,
    look_at_c2w,
    orbit_cameras,
    sample_random_cameras,
    view_index,
    view_suffix,
)
from magic3d.toyworld.dataset import (
    ToyWorldSpec,
    ground_truth_views,
    load_shards,
    render_dataset,
    render_to_shards,
    sample_params,
    save_shards,
)
from magic3d.toyworld.render import (
    BACKGROUND_MODES,
    background_images,
    render_shape,
    sample_backgrounds,
)
from magic3d.toyworld.shapes import (
    BOUNDING_RADIUS,
    COLOURS,
    COMPOSITES,
    PRIMITIVES,
    SHAPES,
    WORLD_SCALE,
    caption,
    get_colour,
    get_shape,
    occupancy,
    surface_points,
)
from magic3d.types import CameraBatch, Shading

IDS = [s.name for s in SHAPES]


def _front_back(size: int = 32, elevation: float = 20.0) -> CameraBatch:
    return orbit_cameras(2, elevation, 1.6, 50.0, size, size)  # azimuth 0 (front), 180 (back)


def _flat(batch: int) -> Shading:
    return Shading(mode="lambertian", ambient=torch.ones(batch))


def test_registry_sizes_and_names() -> None:
    assert len(PRIMITIVES) >= 6
    assert sum(s.asymmetric for s in COMPOSITES) >= 4
    assert len(COLOURS) >= 6
    assert len(set(IDS)) == len(IDS)
    assert len({c.name for c in COLOURS}) == len(COLOURS)
    assert all(0.0 <= v <= 1.0 for c in COLOURS for v in c.rgb)
    with pytest.raises(ValueError, match="unknown shape"):
        get_shape("teapot")


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_sdf_inside_outside_and_bounded(shape) -> None:
    grid = torch.linspace(-BOUNDING_RADIUS, BOUNDING_RADIUS, 41)
    points = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    d = shape.sdf(points)
    assert d.shape == (points.shape[0],)
    inside = points[d.argmin()]
    assert shape.sdf(inside[None]).item() < 0.0 and occupancy(shape, inside[None]).item()
    # Everything lies inside the bounding sphere that sphere tracing starts from.
    dirs = torch.nn.functional.normalize(torch.randn(2000, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert bool((shape.sdf(dirs * BOUNDING_RADIUS) > 0).all())
    # Far away: clearly outside. The true distance is >= 3 - 0.6; composites are lower bounds
    # of it (intersections), allowed to be 20 % loose.
    assert bool((shape.sdf(dirs * 3.0) > 0.8 * 2.4).all())
    # Objects fill the view as text-to-3D cameras expect: some part reaches radius 0.35.
    assert points[d < 0].norm(dim=-1).max() > 0.35


@pytest.mark.parametrize("shape", PRIMITIVES, ids=[s.name for s in PRIMITIVES])
def test_primitive_sdf_is_a_distance(shape) -> None:
    g = torch.Generator().manual_seed(1)
    points = (torch.rand(20000, 3, generator=g) * 2 - 1) * BOUNDING_RADIUS
    points = points[shape.sdf(points).abs() < 0.05].requires_grad_(True)
    (grad,) = torch.autograd.grad(shape.sdf(points).sum(), points)
    norm = grad.norm(dim=-1)
    # Exact SDFs have |grad| = 1 almost everywhere; float32 autograd of sqrt/divisions is good
    # to ~1e-4. Points exactly on a medial axis (kinks, measure zero) may differ: allow 1%.
    good = (norm - 1.0).abs() < 1e-3
    assert points.shape[0] > 500
    assert good.float().mean() > 0.99


def test_sphere_sdf_matches_analytic_distance() -> None:
    points = torch.randn(100, 3)
    sphere = get_shape("sphere")
    # Exact formula (modelled radius 0.45, scaled with the world); 1e-6 is float32 rounding of
    # a norm of O(1) values.
    expected = points.norm(dim=-1) - 0.45 * WORLD_SCALE
    torch.testing.assert_close(sphere.sdf(points), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sphere", "torus", "house"])
def test_surface_points_lie_on_surface(name: str) -> None:
    shape = get_shape(name)
    pts = surface_points(shape, 500, torch.Generator().manual_seed(0))
    again = surface_points(shape, 500, torch.Generator().manual_seed(0))
    assert pts.shape == (500, 3)
    assert torch.equal(pts, again)
    assert shape.sdf(pts).abs().max() < 1e-3  # the function's own acceptance tolerance
    if name == "sphere":
        radius = 0.45 * WORLD_SCALE
        torch.testing.assert_close(pts.norm(dim=-1), torch.full((500,), radius), atol=1e-3, rtol=0)
        # Roughly uniform by area: the mean of points on a sphere is near its centre
        # (500 uniform points: std of the mean ~ 0.585 / sqrt(3 * 500) ~ 0.015; allow 4 sigma).
        assert pts.mean(0).norm() < 0.06


def test_front_and_back_views_differ_only_for_asymmetric_shapes() -> None:
    cams = _front_back()
    for shape in SHAPES:
        out = render_shape(shape, cams, (0.8, 0.3, 0.2), _flat(2))
        changed = ((out.rgb[0] - out.rgb[1]).abs().amax(-1) > 0.1).float().mean().item()
        if shape.asymmetric:
            # Measured 1.4 % (snowman: only its small face differs) to 5.7 % (house, chair) of a
            # 32x32 view; symmetric shapes give exactly 0, so 0.5 % (5 pixels) separates them.
            assert changed > 0.005, shape.name
        else:
            # Primitives are symmetric under a half turn about z: the two renders are mirror-free
            # copies, equal up to rounding of the ray directions (no pixel changes by 0.1).
            assert changed == 0.0, shape.name


def test_house_door_is_on_the_front() -> None:
    out = ground_truth_views("house", "red", _front_back(48), shading=_flat(2), supersample=1)
    door = (out.region == 1) & (out.mask[..., 0] > 0)
    below_roof = torch.zeros_like(door)
    below_roof[:, 30:] = True  # the lower part of the image: the walls, not the dark chimney
    assert (door & below_roof)[0].sum() > 10  # front: the door is visible
    assert (door & below_roof)[1].sum() == 0  # back: no door


def test_sphere_silhouette_area_matches_projected_disk() -> None:
    size, distance, fovy_deg = 32, 1.6, 50.0
    cams = orbit_cameras(1, 10.0, distance, fovy_deg, size, size)
    out = render_shape(get_shape("sphere"), cams, (1.0, 1.0, 1.0), supersample=4)
    focal = 0.5 * size / math.tan(math.radians(fovy_deg) / 2)
    # The silhouette is the cone tangent to the sphere: half-angle asin(r / d).
    radius_px = focal * math.tan(math.asin(0.45 * WORLD_SCALE / distance))
    expected = math.pi * radius_px**2
    # 4x4 supersampling leaves a coverage error ~ perimeter x 1/16 px x O(1) ~ 4 px^2 of ~300;
    # 2 % covers it.
    assert abs(out.mask.sum().item() - expected) / expected < 0.02


def test_sphere_depth_and_normals_are_exact_at_the_centre() -> None:
    cams = orbit_cameras(1, 30.0, 1.7, 40.0, 16, 16)
    out = render_shape(get_shape("sphere"), cams, (1.0, 1.0, 1.0))
    # The four central pixels' rays pass within a few degrees of the centre; depth is the ray
    # distance to the sphere, 1.7 - 0.585 at the axis and at most ~1e-2 more off-axis.
    centre = out.depth[0, 7:9, 7:9, 0]
    assert bool(((centre - (1.7 - 0.45 * WORLD_SCALE)).abs() < 1e-2).all())
    n = out.normal[0, 7:9, 7:9]
    axis = cams.position[0] / cams.position[0].norm()
    assert bool(((n * axis).sum(-1) > 0.99).all())


def test_flat_lit_pixels_equal_the_colour_and_lambertian_uses_light() -> None:
    cams = orbit_cameras(2, 20.0, 1.6, 50.0, 16, 16)
    rgb = get_colour("orange").rgb
    flat = render_shape(get_shape("cube"), cams, rgb, _flat(2), supersample=2)
    albedo_mode = render_shape(get_shape("cube"), cams, rgb, Shading("albedo", torch.ones(2)), supersample=2)
    centre = flat.rgb[:, 6:10, 6:10].reshape(-1, 3)
    # Ambient 1 means colour x 1 exactly: only float rounding of the pooling (1e-6).
    torch.testing.assert_close(centre, torch.tensor(rgb).expand_as(centre), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.rgb, albedo_mode.rgb, atol=1e-6, rtol=0)
    # With no ambient light, the sphere's pixel facing a headlight is fully lit and the rim dark.
    sphere = render_shape(get_shape("sphere"), cams, (1.0, 1.0, 1.0), Shading("lambertian", torch.zeros(2)))
    assert sphere.rgb[0, 8, 8].min() > 0.95  # n.l ~ cos(few degrees) at the centre
    assert sphere.rgb[0][sphere.mask[0, ..., 0] > 0].min() < 0.5  # grazing at the rim


def test_composite_is_fg_over_background() -> None:
    cams = orbit_cameras(3, 20.0, 2.0, 60.0, 16, 16)
    params = sample_backgrounds(3, ("varied",), None, torch.Generator().manual_seed(0))
    bg = background_images(params, 16, 16)
    out = render_shape(get_shape("duck"), cams, (0.2, 0.4, 0.9), background=bg, supersample=2)
    empty = out.mask[..., 0] == 0
    torch.testing.assert_close(out.rgb[empty], bg[empty], atol=0, rtol=0)
    full = out.mask[..., 0] == 1
    assert full.any() and empty.any()
    assert bool(((out.mask > 0) & (out.mask < 1)).any())  # supersampled edges are fractional
    assert torch.equal(out.background, bg)


def test_backgrounds_by_mode() -> None:
    params = sample_backgrounds(200, BACKGROUND_MODES, None, torch.Generator().manual_seed(0))
    images = background_images(params, 8, 8)
    assert images.shape == (200, 8, 8, 3)
    assert images.min() >= 0 and images.max() <= 1
    for mode, value in (("white", 1.0), ("black", 0.0), ("grey", 0.5)):
        sel = params.mode == BACKGROUND_MODES.index(mode)
        assert sel.any()
        assert bool((images[sel] == value).all())
    solid = images[params.mode == BACKGROUND_MODES.index("solid")]
    assert bool((solid == solid[:, :1, :1]).all())  # one colour per image
    varied = images[params.mode == BACKGROUND_MODES.index("varied")]
    assert bool((varied.flatten(1).std(-1) > 1e-3).all())  # not flat
    with pytest.raises(ValueError, match="background modes"):
        sample_backgrounds(2, ("checkerboard",))


def test_dataset_is_deterministic_in_the_seed_and_independent_of_batching() -> None:
    spec = ToyWorldSpec(image_size=16, supersample=1)
    a = render_dataset(spec, 12, seed=0, batch_size=12)
    b = render_dataset(spec, 12, seed=0, batch_size=5)
    c = render_dataset(spec, 12, seed=1, batch_size=12)
    assert a.images.dtype == torch.uint8 and a.images.shape == (12, 16, 16, 3)
    assert a.masks.shape == (12, 16, 16, 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert a.captions == b.captions and torch.equal(a.shape_id, b.shape_id)
    assert not torch.equal(a.images, c.images)
    assert a.captions != c.captions


def test_captions_follow_labels_and_camera_views() -> None:
    spec = ToyWorldSpec(image_size=8, supersample=1, shapes=("cube", "house"), colours=("red", "orange"))
    params = sample_params(spec, 40, seed=3)
    batch = render_dataset(spec, 40, seed=3)
    views = view_index(params.cameras.elevation, params.cameras.azimuth)
    assert torch.equal(batch.view_id, views)
    assert set(batch.view_id.tolist()) >= {0, 1, 2}
    assert set(batch.shape_id.tolist()) <= {SHAPES.index(get_shape("cube")), SHAPES.index(get_shape("house"))}
    for text, s, c, v in zip(batch.captions, batch.shape_id, batch.colour_id, batch.view_id):
        shape, colour = batch.shape_names[s], batch.colour_names[c]
        assert text == caption(shape, colour, view_suffix(v))
        assert text.startswith("an orange " if colour == "orange" else f"a {colour} ")
    no_views = render_dataset(ToyWorldSpec(image_size=8, supersample=1, view_captions=False), 4, seed=0)
    assert all("view" not in t for t in no_views.captions)


def test_spec_cameras_default_to_the_text_to_3d_ranges() -> None:
    spec = ToyWorldSpec(image_size=8)
    assert spec.ranges == CameraRanges()
    params = sample_params(spec, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    reference = sample_random_cameras(CameraRanges(), 64, 8, 8, g)
    # Same sampler, same seed: the same set of cameras, in shuffled order.
    assert torch.allclose(params.cameras.azimuth.sort().values, reference.azimuth.sort().values)
    with pytest.raises(ValueError, match="unknown colour"):
        ToyWorldSpec(colours=("mauve",))


def test_shards_round_trip(tmp_path) -> None:
    spec = ToyWorldSpec(image_size=8, supersample=1)
    batch = render_dataset(spec, 10, seed=2)
    files = save_shards(batch, tmp_path / "a", shard_size=4, spec=spec)
    assert len(files) == 3
    loaded = load_shards(tmp_path / "a")
    for key in ("images", "masks", "shape_id", "colour_id", "view_id", "elevation", "azimuth", "distance", "fovy"):
        assert torch.equal(getattr(loaded, key), getattr(batch, key)), key
    assert loaded.captions == batch.captions
    assert loaded.shape_names == batch.shape_names
    render_to_shards(spec, 10, tmp_path / "b", seed=2, shard_size=6, batch_size=3)
    assert torch.equal(load_shards(tmp_path / "b").images, batch.images)
    with pytest.raises(FileNotFoundError):
        load_shards(tmp_path / "empty")


def test_renders_follow_camera_conventions() -> None:
    # A camera on +y looking at the origin has image-right = -x (OpenGL look-at with +z up),
    # so the arrow (pointing +x, fins at -x) shows its head left of its fins.
    eye = torch.tensor([[0.0, 1.8, 0.0]])
    cams = CameraBatch(
        c2w=look_at_c2w(eye),
        fovy=torch.tensor([math.radians(50.0)]),
        elevation=torch.zeros(1),
        azimuth=torch.tensor([math.pi / 2]),
        distance=torch.tensor([1.8]),
        light_position=eye.clone(),
        height=24,
        width=24,
    )
    out = render_shape(get_shape("arrow"), cams, (1.0, 0.0, 0.0), _flat(1))
    head = (out.region[0] == 0) & (out.mask[0, ..., 0] > 0)  # shaft + head are main colour
    fins = out.region[0] == 2
    cols = torch.arange(24).float()
    assert (head.float() * cols).sum() / head.sum() < (fins.float() * cols).sum() / fins.sum()


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    spec = ToyWorldSpec(image_size=32)
    cpu = render_dataset(spec, 64, seed=0)
    gpu = render_dataset(spec, 64, seed=0, device="cuda")
    # Float rounding differs (fused kernels), so a few edge pixels may flip by a step or two.
    diff = (cpu.images.int() - gpu.images.int()).abs()
    assert (diff > 2).float().mean() < 1e-3
    assert cpu.captions == gpu.captions
