"""Radiographs of CT volumes rendered by another projector: DiffDRR 0.6.1 (Siddon ray tracing), in the kit's geometry.

    /path/to/diffdrr-venv/bin/python benchmarks/diffdrr_render.py IN_DIR OUT_DIR [--mapping kit|diffdrr]

Runs in its own virtualenv, without `progressive_ct` (DiffDRR pins its own dependencies):

    python3 -m venv VENV && VENV/bin/pip install torch && VENV/bin/pip install --no-deps diffdrr==0.6.1 \\
        && VENV/bin/pip install einops fastcore scipy torchio matplotlib pandas nibabel numpy

(on a CPU-only machine pin the CPU build of torch, e.g. `torch==2.13.0` from the CPU index, rather than a CUDA build.)

Input. IN_DIR/geometry.json is `{"spacing_mm": s, "geometry": Geometry.to_dict()}` (s: one number, or (sD, sH, sW));
IN_DIR/cts/<name>.npy is a CT in HU, float or int, [D, H, W] with the kit's axes: D towards the patient's feet
(inferior), H posterior, W the patient's left (I, P, L), the volume centre at the isocentre.

Output. OUT_DIR/<name>.npy: float32 [V, rows, cols], one image per view of geometry.json in its order, of line
integrals ∫μ dl (μ in 1/mm, dl in mm), oriented as `progressive_ct.drr.render_drr` orients its images: row 0
superior, rows towards the feet; columns along the view's `column_axis` (AP: towards the patient's left; the mirrored
lateral: towards posterior). `normalize_radiograph` of it is what the kit's models read.

HU to attenuation (`--mapping`):
  kit (default): μ = 0.0206 · (1 + HU/1000) per mm with HU clipped to the kit's window [-1000, 1500]: `hu_to_mu`
      (clamped at 0) for HU up to 1500, and exactly the formula of the dataset's stored radiographs,
      `render_drr(unit_to_mu(hu_to_unit(ct)))`. Only the projector differs from the stored ideal radiographs.
  diffdrr: DiffDRR's own `read()` default (`transform_hu_to_density`, bone_attenuation_multiplier 1): with m the
      lowest HU in (-800, 350] and M the volume's highest HU, density = (HU - m) / (M - m) for HU > -800 and 0 for
      HU <= -800: a per-volume [0, 1] scale (air and the softest soft tissue 0, the densest voxel 1). Then
      μ = 0.0206 · density per mm. It follows each volume's own extremes, so it is no fixed calibration: water
      (0 HU) gets -m / (M - m), 0.52 for the chest phantom below (m -800, M 742 HU), and the images come out about
      half as strong as the kit's. A volume with no voxel in (-800, 350] HU cannot be mapped this way (DiffDRR raises).

Geometry. The CT becomes a torchio ScalarImage with a RAS+ affine (R = -L, A = -P, S = -I, voxel centres at
(index - (n-1)/2)·spacing), read by `diffdrr.data.read(..., orientation=None)`, i.e. no frame change (the kit
mapping builds the same torchio Subject with μ as its density, as `read()` always applies its own map). Each view is a
camera pose (`RigidTransform`, camera to world): source at -sid·d, detector centre at (sdd - sid)·d, d the view's
beam direction (`View.direction`: angle 0 is the AP view with the source anterior, 90 the source at the patient's
right), camera y = -(the kit's row axis, inferior), camera x = ±(the view's column axis), the sign that makes the pose
a proper rotation; `DRR(..., reverse_x_axis=True)` then gives columns along -camera x, and the columns are flipped
back where the sign was +. Detector: sdd, rows × cols of `pixel_spacing` mm, principal point at the centre. Rays are
traced by Siddon's method (`renderer='siddon'`, nearest voxel per intersected segment, voxel_shift 0.5: voxel
centres at integer indices). Cone beams only: a 'parallel' geometry is refused.

Checked against the kit's projector, `render_drr(hu_to_mu(hu), 400/64, dataset_geometry(DataConfig(resolution=64,
xray_size=128, fov_mm=400)))` (x2ct preset: sid 541 mm, sdd 949 mm, 128² pixels of 8.70 mm), per view (AP, lateral):
  chest_phantom(seed=3, size=64, fov_mm=400), 6.25 mm voxels:
    --mapping kit:     Pearson r 0.99980, 0.99984; mean ratio DiffDRR / kit 1.0001, 0.9997 (largest difference 0.27
                       and 0.35 where the kit's largest value is 5.5 and 6.3: edges, nearest-voxel Siddon against the
                       kit's pixel-integrated cubic interpolation);
    --mapping diffdrr: against the kit's projector of the same density: r 0.99972, 0.99978, mean ratio 1.0001,
                       0.9998; against the kit's radiographs (kit mapping): r 0.99848, 0.99822, mean ratio 0.504, 0.505.
  a water ellipsoid in air (semi-axes 180, 120, 160 mm along I, P, L) with a 1000 HU block of 50 × 40 × 50 mm centred
  at I -100, P -60, L +90 mm (superior, anterior, patient's left); the block's image (with block minus without),
  its centroid (row, col):
    --mapping kit:     AP (40.96, 83.98) against the kit's (40.93, 83.94): upper rows, columns right of the centre
                       63.5 (the patient's left); lateral (46.25, 52.99) against (46.21, 53.04): upper rows, columns left
                       of the centre (anterior); the pinhole projection of the block's centre gives (40.8, 83.9) and
                       (46.2, 53.1). Whole images r 0.99996, 0.99996; mean ratio 0.9999, 0.9996.
    --mapping diffdrr: AP (41.13, 83.70), lateral (46.36, 53.07) (block minus the body at the same normalisation).
  a 48 × 64 × 56 volume with spacing (5, 6, 5.5) mm, a 97 × 130 detector, sid 600, sdd 1000 mm, views AP, lateral,
  30° and 200°: r 0.99986 to 0.99991, mean ratio 0.9997 to 1.0001, bright-spot centroids within 0.05 px.
Time: about 1.5 s per 64³ CT for two 128² views on a 2-core CPU shared with other work (1.2 to 2.1 s), plus about 3 s
to import DiffDRR once.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchio import ScalarImage, Subject

from diffdrr.data import read
from diffdrr.drr import DRR
from diffdrr.pose import RigidTransform

MU_WATER = 0.0206            # 1/mm, as the kit's `progressive_ct.geometry.MU_WATER`
HU_WINDOW = (-1000.0, 1500.0)  # the kit's window, the range its dataset radiographs are rendered from
KIT_TO_RAS = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])   # (I, P, L) → (R, A, S); det +1


def view_axes(view):
    "Beam direction d and column axis (z, y, x) of one view of `Geometry.to_dict()`, as `progressive_ct.geometry.View`."
    t, s = math.radians(float(view['angle'])), (-1.0 if view.get('mirror', False) else 1.0)
    clean = lambda x: 0.0 if abs(x) < 1e-12 else x
    d = np.array([0.0, clean(math.cos(t)), clean(math.sin(t))])
    eu = np.array([0.0, clean(-s * math.sin(t)), clean(s * math.cos(t))])
    return d, eu


def view_pose(view, sid):
    "Camera-to-world pose (RAS mm) of one view, and whether DiffDRR's columns must be flipped to the kit's."
    d, eu = view_axes(view)
    ey = -np.array([1.0, 0.0, 0.0])                       # camera y decreases down the rows; rows run inferior
    sign = 1.0 if np.linalg.det(np.stack([eu, ey, d], axis=1)) > 0 else -1.0
    ex = sign * eu                                        # a proper rotation
    m = np.eye(4)
    m[:3, :3] = KIT_TO_RAS @ np.stack([ex, ey, d], axis=1)
    m[:3, 3] = KIT_TO_RAS @ (-sid * d)
    return m, sign > 0                                    # reverse_x_axis: columns run along -ex


def ras_affine(shape, spacing):
    "Voxel index (D, H, W) → RAS mm, voxel centres at (index - (n-1)/2)·spacing."
    a = np.eye(4)
    a[:3, :3] = KIT_TO_RAS @ np.diag(spacing)
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return a


def make_drr(hu, spacing, geometry, mapping):
    "A DiffDRR module for one CT, and the factor that turns its output into ∫μ dl."
    hu = np.asarray(hu, dtype=np.float32)
    affine = ras_affine(hu.shape, spacing)
    image = ScalarImage(tensor=torch.from_numpy(hu)[None], affine=affine)
    if mapping == 'diffdrr':
        subject, scale = read(image, orientation=None), MU_WATER     # density in [0, 1], per volume
    else:
        # the subject `read(image, orientation=None)` makes (volume centred by its affine already), with μ as density:
        # read() itself always applies its own HU-to-density map, and needs soft tissue to do so
        mu = MU_WATER * (1.0 + np.clip(hu, *HU_WINDOW) / 1000.0)
        density = ScalarImage(tensor=torch.from_numpy(mu.astype(np.float32))[None], affine=affine)
        subject = Subject(volume=image, mask=None, orientation=None, reorient=torch.eye(4), density=density, fiducials=None)
        scale = 1.0
    rows, cols = geometry['detector']
    drr = DRR(subject, sdd=float(geometry['sdd']), height=int(rows), width=int(cols),
              delx=float(geometry['pixel_spacing']), renderer='siddon', reverse_x_axis=True)
    return drr, scale


@torch.no_grad()
def render(hu, spacing, geometry, mapping='kit'):
    "Line integrals ∫μ dl, float32 [V, rows, cols], of one CT in HU [D, H, W] for every view of `geometry` (a dict)."
    if geometry.get('kind', 'cone') != 'cone':
        raise SystemExit(f"geometry kind {geometry.get('kind')!r}: DiffDRR renders point sources only ('cone')")
    drr, scale = make_drr(hu, spacing, geometry, mapping)
    poses, flips = zip(*(view_pose(v, float(geometry['sid'])) for v in geometry['views']))
    img = drr(RigidTransform(torch.tensor(np.stack(poses), dtype=torch.float32)))[:, 0]   # [V, rows, cols]
    out = img.double().numpy() * scale
    for i, flip in enumerate(flips):
        if flip: out[i] = out[i][:, ::-1]
    return out.astype(np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('in_dir', type=Path, help="folder with geometry.json and cts/<name>.npy (HU, [D, H, W], axes I, P, L)")
    p.add_argument('out_dir', type=Path, help="folder for <name>.npy: float32 [views, rows, cols] of line integrals")
    p.add_argument('--mapping', choices=('kit', 'diffdrr'), default='kit',
                   help="HU to attenuation: the kit's μ = 0.0206·(1 + HU/1000) (default) or DiffDRR's read() density × 0.0206")
    args = p.parse_args(argv)
    meta = json.loads((args.in_dir / 'geometry.json').read_text())
    spacing = np.broadcast_to(np.asarray(meta['spacing_mm'], dtype=float), (3,)).copy()
    geometry = meta['geometry']
    files = sorted((args.in_dir / 'cts').glob('*.npy'))
    if not files: raise SystemExit(f"no CTs in {args.in_dir / 'cts'}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    t0 = time.time()
    for f in files:
        hu = np.load(f)
        if hu.ndim != 3: raise SystemExit(f"{f}: expected a CT [D, H, W], got shape {hu.shape}")
        np.save(args.out_dir / f.name, render(hu, spacing, geometry, args.mapping))
    dt = time.time() - t0
    print(f"{len(files)} CTs rendered by DiffDRR ({args.mapping} mapping) in {dt:.1f} s ({dt / len(files):.2f} s each)")


if __name__ == '__main__':
    sys.exit(main())
