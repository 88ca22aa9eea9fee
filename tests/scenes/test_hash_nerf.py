"""HashGridNeRF specifics: blob start, shading modes, normals, occupancy updates, background."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.data.cameras import look_at_c2w
from magic3d.scenes.background import EnvironmentMapBackground, SolidBackground
from magic3d.scenes.hash_nerf import HashGridNeRF, _TruncExp, join_renders
from magic3d.types import CameraBatch, Shading

SMALL = dict(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0, hidden_dim=16,
             n_samples_per_ray=48, grid_resolution=16)


def small_nerf(**overrides) -> HashGridNeRF:
    torch.manual_seed(0)
    return HashGridNeRF(**{**SMALL, **overrides})


def front_cameras(size: int = 16, light=(3.0, 0.0, 0.0)) -> CameraBatch:
    eye = torch.tensor([[2.5, 0.0, 0.0], [0.0, -2.5, 0.5]])
    return CameraBatch(
        c2w=look_at_c2w(eye),
        fovy=torch.full((2,), math.radians(45.0)),
        elevation=torch.asin(eye[:, 2] / eye.norm(dim=-1)),
        azimuth=torch.atan2(eye[:, 1], eye[:, 0]),
        distance=eye.norm(dim=-1),
        light_position=torch.tensor(light).expand(2, 3).clone(),
        height=size,
        width=size,
    )


def shading(mode: str, ambient: float = 0.3) -> Shading:
    return Shading(mode=mode, ambient=torch.full((2,), ambient))


def test_blob_start_is_opaque_at_the_centre_and_empty_at_the_corner():
    scene = small_nerf().eval()
    with torch.no_grad():
        out = scene.render(front_cameras(), shading("albedo"))
    centre, corner = out.opacity[:, 8, 8, 0], out.opacity[:, 0, 0, 0]
    assert (centre > 0.99).all() and (corner < 0.01).all()
    # The centre ray terminates inside the blob (it enters at distance - 0.5 where density is
    # below 1) and well before the centre, where the density peaks.
    distance = front_cameras().distance
    depth = out.depth[:, 8, 8, 0] / out.opacity[:, 8, 8, 0]
    assert ((depth > distance - 0.5) & (depth < distance - 0.1)).all()


def test_no_blob_renders_almost_empty():
    scene = small_nerf(density_bias="none").eval()
    with torch.no_grad():
        out = scene.render(front_cameras(), shading("albedo"))
    # softplus(~0) ~ 0.69 over a chord of ~2: about 75% opacity, far from the blob's ~100%.
    assert out.opacity.max() < 0.9


def test_textureless_is_grey_on_the_object_and_white_without_diffuse_term():
    scene = small_nerf(background=SolidBackground((0.1, 0.5, 0.9))).eval()
    with torch.no_grad():
        out = scene.render(front_cameras(), shading("textureless", ambient=0.3))
        full_ambient = scene.render(front_cameras(), shading("textureless", ambient=1.0))
    on_object = out.opacity[..., 0] > 0.5
    assert on_object.sum() > 20
    # Channels may differ only through the background seen through (1 - opacity): at most
    # (1 - opacity) * (0.9 - 0.1), plus float32 rounding.
    spread = out.rgb.amax(-1) - out.rgb.amin(-1)
    bound = (1 - out.opacity[..., 0]) * 0.8 + 1e-6
    assert (spread[on_object] <= bound[on_object]).all()
    # Ambient 1: a white object (1 * opacity) over the background, whatever the light.
    expected = full_ambient.opacity + (1 - full_ambient.opacity) * torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(full_ambient.rgb, expected, atol=1e-6, rtol=0)  # float32 rounding


def test_albedo_mode_ignores_light_and_lambertian_does_not():
    # Analytic normals: the blob's normals are geometric, so moving the light matters.
    scene = small_nerf(normal_mode="analytic").eval()
    with torch.no_grad():
        a = scene.render(front_cameras(light=(3.0, 0.0, 0.0)), shading("albedo"))
        b = scene.render(front_cameras(light=(-3.0, 1.0, -2.0)), shading("albedo"))
        c = scene.render(front_cameras(light=(3.0, 0.0, 0.0)), shading("lambertian"))
        d = scene.render(front_cameras(light=(-3.0, 1.0, -2.0)), shading("lambertian"))
    assert torch.equal(a.rgb, b.rgb)
    assert (c.rgb - d.rgb).abs().max() > 0.05


def test_lambertian_with_full_ambient_equals_albedo():
    scene = small_nerf().eval()
    with torch.no_grad():
        a = scene.render(front_cameras(), shading("albedo"))
        b = scene.render(front_cameras(), shading("lambertian", ambient=1.0))
    # Only the divide-then-multiply by opacity separates them: float32 rounding.
    torch.testing.assert_close(a.rgb, b.rgb, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["analytic", "finite_difference"])
def test_geometric_normals_of_the_blob_point_outwards(mode):
    # With the hash table at its ~1e-4 init, the blob term dominates the density gradient.
    scene = small_nerf(normal_mode=mode)
    points = torch.nn.functional.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    points = points * 0.4
    result = scene.query(points)
    assert result.density.shape == (64,) and result.albedo.shape == (64, 3)
    cosine = (result.normal * torch.nn.functional.normalize(points, dim=-1)).sum(-1)
    assert (cosine > 0.99).all()
    torch.testing.assert_close(result.normal.norm(dim=-1), torch.ones(64))


def test_analytic_normals_work_without_grad_and_train_with_grad():
    scene = small_nerf(normal_mode="analytic")
    points = torch.rand(32, 3) - 0.5
    with torch.no_grad():
        frozen = scene.query(points)
    assert not frozen.normal.requires_grad and not frozen.density.requires_grad
    live = scene.query(points)
    assert live.normal.requires_grad
    torch.testing.assert_close(live.normal, frozen.normal, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(live.normal.sum(), scene.encoding.params)
    assert grad.abs().sum() > 0, "normals must train the hash table (create_graph)"


def test_public_density_and_albedo_match_query():
    scene = small_nerf()
    points = torch.rand(16, 3) * 2 - 1
    result = scene.query(points, with_normal=False)
    assert result.normal is None
    torch.testing.assert_close(scene.density(points), result.density, atol=0, rtol=0)
    torch.testing.assert_close(scene.albedo(points), result.albedo, atol=0, rtol=0)
    assert (result.density >= 0).all() and (result.albedo >= 0).all() and (result.albedo <= 1).all()


def test_update_step_prunes_empty_space_without_changing_the_image():
    scene = small_nerf(grid_update_every=5).eval()
    cams = front_cameras()
    with torch.no_grad():
        before = scene.render(cams, shading("albedo"))
        scene.update_step(3)  # not an update step
        assert scene.occupancy.occupied.all()
        scene.update_step(5)
        after = scene.render(cams, shading("albedo"))
    assert 0 < scene.occupancy.occupied_fraction < 0.5
    assert after.samples_per_ray < 0.6 * before.samples_per_ray
    # A pruned cell's probe had density * step < 0.01; a ray grazing the blob's soft edge
    # crosses up to ~10 such cells (measured worst pixel: 0.09), the image as a whole barely.
    assert (after.opacity - before.opacity).abs().max() < 0.15
    assert (after.rgb - before.rgb).abs().mean() < 1e-3


def test_grid_can_be_disabled():
    scene = small_nerf(grid_resolution=0)
    assert scene.occupancy is None
    scene.update_step(0)
    out = scene.render(front_cameras(), shading("albedo"))
    assert torch.isfinite(out.rgb).all()


def test_param_groups_name_the_parts():
    scene = small_nerf()
    groups = scene.param_groups()
    assert set(groups) == {"encoding", "network", "background"}
    assert len(groups["encoding"]) == 1 and groups["encoding"][0] is scene.encoding.params
    assert "background" not in small_nerf(background=SolidBackground()).param_groups()
    assert len(small_nerf(normal_mode="analytic").param_groups()["network"]) == 4  # no normal head


def test_orientation_penalises_normals_facing_away():
    scene = small_nerf(normal_mode="analytic").eval()
    out = scene.render(front_cameras(), shading("albedo"))
    # Blob normals point outwards: visible samples face the camera; only samples behind the
    # (almost opaque) front surface face away, and they carry tiny weights.
    assert 0 <= out.regularisers["orientation"].item() < 1e-2
    torch.testing.assert_close(out.regularisers["sparsity"], out.opacity.mean())


def test_training_render_is_reproducible_under_a_seed():
    scene = small_nerf(background=EnvironmentMapBackground(random_aug_prob=0.5)).train()
    torch.manual_seed(7)
    a = scene.render(front_cameras(), shading("lambertian"))
    torch.manual_seed(7)
    b = scene.render(front_cameras(), shading("lambertian"))
    assert torch.equal(a.rgb, b.rgb)


def _loss_and_grads(scene: HashGridNeRF, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = out.rgb.square().mean() + out.regularisers["orientation"] + out.regularisers["sparsity"]
    scene.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in scene.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("normal_mode", ["predicted", "analytic"])
def test_recomputed_chunks_render_and_train_as_one_batch(normal_mode: str) -> None:
    """Deterministic marching (eval): the chunked, recomputed render is the one-call render,
    its regularisers and its gradients, up to float summation order."""
    cams, shade = front_cameras(), shading("lambertian")
    whole = small_nerf(normal_mode=normal_mode).eval()
    chunked = small_nerf(normal_mode=normal_mode, recompute_chunk_cameras=1).eval()
    a, b = whole.render(cams, shade), chunked.render(cams, shade)
    for name in ("rgb", "opacity", "depth", "normal"):
        # float32, same ops per ray; only reductions over the batch may differ in order
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-5)
    assert b.samples_per_ray == pytest.approx(a.samples_per_ray)
    loss_a, grads_a = _loss_and_grads(whole, a)
    loss_b, grads_b = _loss_and_grads(chunked, b)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        # Hash-table gradients are scatter-adds over samples: the order differs between chunks.
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4, msg=name)


def test_recompute_replays_the_stratified_samples() -> None:
    """Training (stratified jitter): the re-render in backward draws the same samples as the
    forward did, so the gradient equals that of the same chunks rendered without recompute."""
    cams, shade = front_cameras(), shading("lambertian")
    plain = small_nerf().train()
    chunked = small_nerf(recompute_chunk_cameras=1).train()
    torch.manual_seed(3)
    reference = join_renders([plain._render_batch(cams[i: i + 1], Shading("lambertian", shade.ambient[i: i + 1]))
                              for i in range(2)])
    torch.manual_seed(3)
    recomputed = chunked.render(cams, shade)
    assert torch.equal(recomputed.rgb, reference.rgb)
    loss_a, grads_a = _loss_and_grads(plain, reference)
    loss_b, grads_b = _loss_and_grads(chunked, recomputed)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=0, rtol=0, msg=name)  # same ops replayed
    with torch.no_grad():  # no graph, nothing to bound: one call
        assert torch.isfinite(chunked.render(cams, shade).rgb).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="normal_mode"):
        small_nerf(normal_mode="sobel")
    with pytest.raises(ValueError, match="density_activation"):
        small_nerf(density_activation="relu")
    with pytest.raises(ValueError, match="radius"):
        small_nerf(radius=0.0)
    with pytest.raises(ValueError, match="recompute_chunk_cameras"):
        small_nerf(recompute_chunk_cameras=-1)


def test_trunc_exp_caps_the_gradient():
    x = torch.tensor([0.5, 20.0], dtype=torch.float64, requires_grad=True)
    y = _TruncExp.apply(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([math.exp(0.5), math.exp(15.0)], dtype=torch.float64))
    small = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(_TruncExp.apply, (small,))


# ----------------------------------------------------------------------------- backgrounds


def test_environment_map_background_and_random_augmentation():
    dirs = torch.nn.functional.normalize(torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    env = EnvironmentMapBackground(random_aug_prob=1.0)
    env.eval()
    learned = env(dirs)
    assert learned.shape == dirs.shape and ((learned > 0) & (learned < 1)).all()
    assert learned.flatten(0, 2).std(0).max() > 0  # varies with direction
    env.train()
    solid = env(dirs, generator=torch.Generator().manual_seed(1))
    # p = 1: every camera gets one solid colour over all its pixels.
    assert torch.equal(solid, solid[:, :1, :1].expand_as(solid))
    env_never = EnvironmentMapBackground(random_aug_prob=0.0)
    env_never.train()
    assert torch.equal(env_never(dirs), env_never.eval()(dirs))
    with pytest.raises(ValueError, match="random_aug_prob"):
        EnvironmentMapBackground(random_aug_prob=1.5)


def test_solid_background_has_no_state():
    bg = SolidBackground((0.2, 0.4, 0.6))
    assert list(bg.parameters()) == [] and bg.state_dict() == {}
    out = bg(torch.zeros(2, 3, 4, 3))
    torch.testing.assert_close(out[1, 2, 3], torch.tensor([0.2, 0.4, 0.6]))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["predicted", "analytic", "finite_difference"])
def test_cuda_render_matches_cpu_and_trains(mode):
    scene = small_nerf(normal_mode=mode, grid_backend="auto").eval()
    scene.update_step(0)
    cams = front_cameras(size=32)
    with torch.no_grad():
        cpu = scene.render(cams, shading("lambertian"))
    scene = scene.cuda()
    gpu_shading = Shading("lambertian", torch.full((2,), 0.3, device="cuda"))
    with torch.no_grad():
        gpu = scene.render(cams.to("cuda"), gpu_shading)
    # Compiled vs eager float32 hash-grid and summation order: ~1e-5; opacity near a surface
    # amplifies it a little.
    torch.testing.assert_close(gpu.rgb.cpu(), cpu.rgb, atol=1e-4, rtol=0)
    scene.train()
    out = scene.render(cams.to("cuda"), gpu_shading)
    (out.rgb.mean() + out.regularisers["orientation"]).backward()
    assert scene.encoding.params.grad.abs().sum() > 0
