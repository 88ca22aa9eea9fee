import time, torch
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.data.cameras import CameraRanges, sample_random_cameras, orbit_cameras
from magic3d.types import Shading
dev = torch.device("cuda")
def t(fn, n=1):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): out = fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1000
scene = HashGridNeRF(n_samples_per_ray=1024, grid_resolution=256).to(dev)
print("grid update (all cells)", [round(t(lambda: scene.update_step(0))) for _ in range(3)], "ms")
g = torch.Generator().manual_seed(0)
def train():
    cams = sample_random_cameras(CameraRanges(), 32, 64, 64, g).to(dev)
    out = scene.render(cams, Shading("lambertian", torch.full((32,), .3, device=dev)))
    (out.rgb.mean() + out.regularisers["orientation"]).backward()
    return out
print("train render+bwd b32", [round(t(train)) for _ in range(6)], "ms")
cams = orbit_cameras(8, 15, 2.0, 50, 128, 128).to(dev)
def ev(i):
    with torch.no_grad():
        c = cams[i:i+4]
        return scene.render(c, Shading("lambertian", torch.full((4,), .3, device=dev)))
scene.eval()
print("eval render 4x128^2", [round(t(lambda: ev(i % 2 * 4))) for i in range(5)], "ms")
scene.train()
print("train again", [round(t(train)) for _ in range(3)], "ms")
