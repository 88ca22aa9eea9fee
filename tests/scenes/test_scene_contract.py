"""The contract every scene honours, parametrised over SCENE_FACTORIES; plus `shade`.

To cover a new scene, append a (name, factory) pair to SCENE_FACTORIES: the factory builds a
small CPU-friendly instance whose every trainable parameter should receive a gradient from a
single training render (so no random background replacement).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from magic3d.data.cameras import look_at_c2w
from magic3d.scenes.background import EnvironmentMapBackground
from magic3d.scenes.base import Scene, SceneModule, shade
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.types import CameraBatch, Shading


def _small_hash_nerf(**overrides) -> Callable[[], Scene]:
    def build() -> Scene:
        args = dict(
            n_levels=4,
            log2_hashmap_size=12,
            base_resolution=4,
            per_level_scale=2.0,
            hidden_dim=16,
            n_samples_per_ray=32,
            grid_resolution=16,
            background=EnvironmentMapBackground(random_aug_prob=0.0),
        )
        args.update(overrides)
        return HashGridNeRF(**args)

    return build


def _small_dmtet() -> Scene:
    from magic3d.scenes.dmtet import DMTetScene

    return DMTetScene(
        tet_resolution=8,
        n_levels=4,
        log2_hashmap_size=12,
        base_resolution=4,
        per_level_scale=2.0,
        hidden_dim=16,
        background=EnvironmentMapBackground(random_aug_prob=0.0),
        raster_backend="torch",
    )


SCENE_FACTORIES: list[tuple[str, Callable[[], Scene]]] = [
    ("hash_nerf_predicted", _small_hash_nerf(normal_mode="predicted")),
    ("hash_nerf_analytic", _small_hash_nerf(normal_mode="analytic")),
    ("hash_nerf_finite_difference", _small_hash_nerf(normal_mode="finite_difference")),
    ("hash_nerf_trunc_exp", _small_hash_nerf(density_activation="trunc_exp", blob_density=3.0)),
    ("dmtet", _small_dmtet),
]
FACTORIES = pytest.mark.parametrize("factory", [f for _, f in SCENE_FACTORIES], ids=[n for n, _ in SCENE_FACTORIES])


def two_cameras(size: int = 16) -> CameraBatch:
    eye = torch.tensor([[2.0, 0.0, 0.4], [-0.6, 1.9, 0.8]])
    return CameraBatch(
        c2w=look_at_c2w(eye),
        fovy=torch.full((2,), math.radians(50.0)),
        elevation=torch.asin(eye[:, 2] / eye.norm(dim=-1)),
        azimuth=torch.atan2(eye[:, 1], eye[:, 0]),
        distance=eye.norm(dim=-1),
        light_position=eye * 1.5 + torch.tensor([0.0, 0.5, 1.0]),
        height=size,
        width=size,
    )


LAMBERTIAN = Shading(mode="lambertian", ambient=torch.tensor([0.3, 0.6]))


@FACTORIES
def test_render_shapes_ranges_and_finiteness(factory):
    torch.manual_seed(0)
    scene = factory()
    scene.update_step(0)
    for training in (True, False):
        scene.train(training)
        out = scene.render(two_cameras(), LAMBERTIAN)
        assert out.rgb.shape == (2, 16, 16, 3)
        assert out.opacity.shape == out.depth.shape == (2, 16, 16, 1)
        for name in ("rgb", "opacity", "depth", "normal", "albedo", "background"):
            value = getattr(out, name)
            if value is not None:
                assert value.shape[:3] == (2, 16, 16) and torch.isfinite(value).all(), name
        # Weights sum to 1 - transmittance; float32 rounding may overshoot 1 by a few ulps.
        assert out.rgb.min() >= 0 and out.rgb.max() <= 1 + 1e-6
        assert out.opacity.min() >= 0 and out.opacity.max() <= 1 + 1e-6
        assert set(out.regularisers) == set(scene.regulariser_names())
        for name, value in out.regularisers.items():
            assert value.dim() == 0 and torch.isfinite(value), name


@FACTORIES
def test_scene_implements_the_protocol(factory):
    assert isinstance(factory(), Scene), "configs type-check scenes against magic3d.scenes.base.Scene"


@FACTORIES
def test_gradients_reach_every_trainable_parameter(factory):
    torch.manual_seed(0)
    scene = factory().train()
    scene.update_step(0)
    out = scene.render(two_cameras(), LAMBERTIAN)
    loss = out.rgb.square().mean()
    for regulariser in out.regularisers.values():
        loss = loss + regulariser
    loss.backward()
    for name, param in scene.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
            assert torch.isfinite(param.grad).all(), name


@FACTORIES
def test_param_groups_cover_each_trainable_parameter_once(factory):
    scene = factory()
    grouped = [id(p) for params in scene.param_groups().values() for p in params]
    trainable = [id(p) for p in scene.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert all(params for params in scene.param_groups().values()), "empty groups are left out"


@FACTORIES
def test_state_dict_round_trip_reproduces_the_render(factory):
    torch.manual_seed(0)
    scene = factory()
    scene.update_step(0)
    scene.eval()
    with torch.no_grad():
        expected = scene.render(two_cameras(), LAMBERTIAN)
    torch.manual_seed(1)  # a differently initialised twin
    twin = factory()
    twin.load_state_dict(scene.state_dict())
    twin.eval()
    with torch.no_grad():
        got = twin.render(two_cameras(), LAMBERTIAN)
    for name in ("rgb", "opacity", "depth", "normal", "albedo"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


# ----------------------------------------------------------------------------- shade


def _unit(*xyz):
    v = torch.tensor(xyz, dtype=torch.float32)
    return v / v.norm()


def test_shade_soft_lambertian_by_hand():
    albedo = torch.tensor([[0.2, 0.4, 0.8], [0.2, 0.4, 0.8]])
    normal = torch.stack([_unit(0, 0, 1), _unit(0, 0, 1)])
    # n.l = cos 60 deg = 0.5 for camera 0; facing away (n.l < 0) for camera 1.
    light = torch.stack([_unit(math.sin(math.pi / 3), 0, 0.5), _unit(0, 0, -1)]) * 3.0
    shading = Shading("lambertian", ambient=torch.tensor([0.2, 0.4]))
    got = shade(albedo, normal, light, shading)
    expected = torch.stack([albedo[0] * (0.2 + 0.8 * 0.5), albedo[1] * 0.4])
    torch.testing.assert_close(got, expected)  # float32 rounding of a few products
    textureless = shade(albedo, normal, light, Shading("textureless", shading.ambient))
    torch.testing.assert_close(textureless, torch.tensor([[0.6] * 3, [0.4] * 3]))
    assert shade(albedo, normal, light, Shading("albedo", shading.ambient)) is albedo


def test_shade_broadcasts_ambient_over_image_axes_and_rejects_bad_modes():
    albedo = torch.rand(2, 4, 5, 3)
    normal = torch.zeros(2, 4, 5, 3)  # empty pixels: ambient only
    out = shade(albedo, normal, torch.ones(2, 4, 5, 3), Shading("lambertian", torch.tensor([0.1, 0.9])))
    torch.testing.assert_close(out, albedo * torch.tensor([0.1, 0.9]).view(2, 1, 1, 1))
    with pytest.raises(ValueError, match="shading mode"):
        shade(albedo, normal, normal, Shading("phong", torch.tensor([0.1, 0.9])))


def test_base_scene_defaults():
    class Constant(SceneModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

    scene = Constant()
    scene.update_step(3)  # a no-op by default
    assert scene.param_groups() == {"network": [scene.weight]}
    with pytest.raises(NotImplementedError):
        scene.render(two_cameras(), LAMBERTIAN)
    # Optional abilities default to "absent", declared rather than probed with hasattr.
    assert scene.extract_mesh() is None and scene.density_field() is None
    assert scene.regulariser_names() == ()
    assert isinstance(scene, Scene)
