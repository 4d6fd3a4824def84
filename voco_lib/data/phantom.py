"""A procedural torso CT phantom with organ labels: the embedded default data (no download needed).

VoCo learns from the consistent layout of anatomy, so the phantom puts organs where they belong in a patient:
in RAS+ world coordinates (+x towards the patient's right, +y anterior, +z superior; NIfTI's convention, the x
and y of DICOM's LPS negated) the liver lies on the patient's right (larger x) of the spleen, the kidneys lie
posterior to the aorta beside the spine, the lungs sit above the diaphragm and the bladder at the bottom. Each
seed gives a different "patient": body cavity size with 4-24 mm of subcutaneous fat around it, organ sizes (a
factor 0.8-1.2 per organ), shapes and positions (diaphragm height, kidney level and per-organ jitter of up to
~1 cm), a small rotation, HU per tissue and an optional lesion, all drawn from one numpy Generator. The grid
is a scan of the body, not the whole torso: a random z range (from just above the liver to the mid-chest, from
below the kidneys to below the bladder; slices outside it are air) and an in-plane offset that may cut a wide
patient's fat at the frame's edge, so after the foreground crop and resize the organs land at different places
in the region (`benchmarks/phantom.py --variation 24` measures it).

The anatomy is drawn in millimetres at roughly 0.55x adult size, so a torso section from the lung bases
to the bladder fits a 160 x 160 x 128 grid at 1.5 mm (a 240 mm frame). Organs are painted as superquadric
ellipsoids and tubes inside their own bounding boxes (cheap), wobbled by a smooth shape-noise field;
intensities come from the class table `data_manifests/phantom_classes.yaml` plus smooth texture and
white noise. Later organs overwrite earlier ones, which is how the adjacencies are resolved.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from voco_lib.files import publish

CLASS_TABLE = Path(__file__).resolve().parents[2] / "data_manifests" / "phantom_classes.yaml"

# Unlabelled tissues get internal ids above the label ids; `_LABEL_OF` maps them back to a label.
_TISSUES = ("air", "skin", "fat", "muscle", "bowel", "bowel_gas", "csf", "disc", "cortical_bone", "stomach_gas")
_FIRST_TISSUE = 32
_SIZE = (0.8, 1.2)  # per-organ linear size factor (ours): volumes 0.5-1.7x, organ volume CVs of ~30 %


@functools.lru_cache(maxsize=1)
def class_table() -> dict[str, Any]:
    """The phantom's class table (names, ids, HU ranges), read from `data_manifests/`."""
    with open(CLASS_TABLE) as f:
        return yaml.safe_load(f)


def class_ids() -> dict[str, int]:
    """Label name -> id, e.g. {'background': 0, 'spleen': 1, ...}."""
    return {c["name"]: int(c["id"]) for c in class_table()["classes"]}


def _tid(name: str) -> int:
    """Internal tissue id: a label id for labelled structures, >= 32 for unlabelled tissues."""
    ids = class_ids()
    return ids[name] if name in ids else _FIRST_TISSUE + _TISSUES.index(name)


def _label_lut() -> np.ndarray:
    lut = np.zeros(_FIRST_TISSUE + len(_TISSUES), np.uint8)
    lut[: _FIRST_TISSUE] = np.arange(_FIRST_TISSUE)
    lut[_tid("cortical_bone")] = class_ids()["vertebrae"]
    lut[_tid("stomach_gas")] = class_ids()["stomach"]
    for t in ("air", "skin", "fat", "muscle", "bowel", "bowel_gas", "csf", "disc"):
        lut[_tid(t)] = 0
    return lut


@dataclass
class PhantomSubject:
    """One generated patient: HU image, label map, RAS affine, and the attributes downstream tasks use.

    `attributes` holds organ volumes (ml, the part inside the field of view), organ mean HU, body size,
    rotation, field of view in world z, and `lesion` (None, or organ, RAS centre in mm, radius, volume, HU).
    """

    image: np.ndarray  # float32 HU, (X, Y, Z) in RAS array axes
    label: np.ndarray  # uint8, ids from phantom_classes.yaml
    affine: np.ndarray  # 4x4 voxel -> RAS+ world (mm)
    attributes: dict[str, Any] = field(default_factory=dict)


def make_phantom(
    seed: int, shape: tuple[int, int, int] = (160, 160, 128), spacing: float | tuple[float, float, float] = 1.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(image_hu float32, label uint8, affine 4x4)` of the phantom patient `seed` (see `make_phantom_subject`)."""
    s = make_phantom_subject(seed, shape, spacing)
    return s.image, s.label, s.affine


class _Canvas:
    """Voxel grid, the patient's pose, and painting of shapes given in anatomical millimetres.

    Anatomical frame: origin at the body centre, X towards the patient's LEFT (as a radiologist's screen
    shows it), Y anterior, Z superior; world RAS = R @ diag(-1, 1, 1) @ anat + t (a small rotation and the
    body's in-plane offset in the frame). Shapes are evaluated only inside their bounding boxes.
    """

    def __init__(self, shape, spacing, rot: np.ndarray, shift: np.ndarray, z_centre: float, shape_noise):
        self.shape = tuple(int(n) for n in shape)
        self.sp = np.asarray(spacing, np.float64)
        self.origin = -(np.asarray(self.shape) - 1) / 2 * self.sp
        self.origin[2] += z_centre
        self.R, self.t = rot @ np.diag([-1.0, 1.0, 1.0]), shift
        self.tissue = np.full(self.shape, _tid("air"), np.uint8)
        self.shape_noise = shape_noise
        self.inner: np.ndarray | None = None  # the body cavity, inside the muscle wall

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.sp, 1.0])
        a[:3, 3] = self.origin
        return a

    def box(self, centre, radius: float):
        """Slices of the voxels within `radius` mm of anatomical point `centre`, and their anatomical coords."""
        cw = self.R @ np.asarray(centre, np.float64) + self.t
        lo = np.floor((cw - radius - self.origin) / self.sp).astype(int)
        hi = np.ceil((cw + radius - self.origin) / self.sp).astype(int) + 1
        lo, hi = np.clip(lo, 0, self.shape), np.clip(hi, 0, self.shape)
        if (hi <= lo).any():
            return None
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        return sl, self.coords(sl)

    def slab(self, lo_xy, hi_xy, pad: float = 12.0) -> tuple[slice, slice, slice]:
        """Full-height slices covering anatomical x-y rectangle [lo, hi] (padded for the small rotation)."""
        out = []
        for d in range(2):
            a = np.floor((lo_xy[d] - pad + self.t[d] - self.origin[d]) / self.sp[d])
            b = np.ceil((hi_xy[d] + pad + self.t[d] - self.origin[d]) / self.sp[d]) + 1
            out.append(slice(int(np.clip(a, 0, self.shape[d])), int(np.clip(b, 0, self.shape[d]))))
        return out[0], out[1], slice(0, self.shape[2])

    def coords(self, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anatomical coordinates (X, Y, Z) of the voxels in `sl`, as float32 arrays of the box's shape."""
        axes = []
        for d, s in enumerate(sl):
            w = self.origin[d] + np.arange(s.start, s.stop) * self.sp[d] - self.t[d]
            axes.append(w.reshape([-1 if d == k else 1 for k in range(3)]).astype(np.float32))
        # anat = R^T (world - t): anat_k = sum_j R[j, k] * d_j
        return tuple(sum(np.float32(self.R[j, k]) * axes[j] for j in range(3)) for k in range(3))  # type: ignore

    def paint(self, sl, mask: np.ndarray, tissue: str, within_cavity: bool = True) -> None:
        if within_cavity:
            mask = mask & self.inner[sl]
        self.tissue[sl][mask] = _tid(tissue)

    def ellipsoid(self, tissue, centre, radii, rot=None, power=2.0, wobble=0.12, clip=None) -> None:
        """Superquadric |u/a|^p + |v/b|^p + |w/c|^p < 1 (+ smooth wobble) in the organ's own frame `rot`."""
        got = self.box(centre, max(radii) * (1 + wobble) * 1.1)
        if got is None:
            return
        sl, (X, Y, Z) = got
        d = (X - centre[0], Y - centre[1], Z - centre[2])
        q = np.eye(3) if rot is None else rot
        f = 0
        for k in range(3):
            u = sum(np.float32(q[j, k]) * d[j] for j in range(3)) / np.float32(radii[k])
            f = f + (u * u if power == 2 else np.abs(u) ** power)
        mask = f < 1 + wobble * self.shape_noise[sl]
        if clip is not None:
            mask &= clip(X, Y, Z)
        self.paint(sl, mask, tissue)

    def tube(self, tissue, points, radius: float, wobble=0.1) -> None:
        """Voxels within `radius` mm of a polyline (vessels, oesophagus, pancreas)."""
        p = np.asarray(points, np.float64)
        c = p.mean(0)
        got = self.box(c, np.linalg.norm(p - c, axis=1).max() + radius * (1 + wobble) + 2)
        if got is None:
            return
        sl, (X, Y, Z) = got
        d2 = None
        for a, b in zip(p[:-1], p[1:]):
            v = b - a
            rel = (X - np.float32(a[0]), Y - np.float32(a[1]), Z - np.float32(a[2]))
            s = np.clip(sum(r * np.float32(vv) for r, vv in zip(rel, v)) / np.float32(v @ v), 0, 1)
            e = sum((r - s * np.float32(vv)) ** 2 for r, vv in zip(rel, v))
            d2 = e if d2 is None else np.minimum(d2, e)
        r = np.float32(radius) * (1 + wobble * self.shape_noise[sl])
        self.paint(sl, d2 < r * r, tissue)


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _smooth_noise(rng: np.random.Generator, shape, cell_mm: float, spacing) -> np.ndarray:
    """Unit-variance-ish smooth random field: coarse Gaussian noise (one value per `cell_mm`), trilinear upsampled."""
    coarse = [max(2, int(math.ceil(n * s / cell_mm)) + 1) for n, s in zip(shape, spacing)]
    g = torch.from_numpy(rng.standard_normal(coarse, dtype=np.float32))[None, None]
    up = F.interpolate(g, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    return up / np.float32(0.6)  # trilinear averaging shrinks the std to ~0.6 on average



def _scan_range(U, z_dia_r: float, z_kidney: float, n_z: int, sp_z: float) -> tuple[tuple[float, float], float]:
    """The scanned z range (world mm) and the grid's z centre: a random crop of the torso, as CT scan ranges vary.

    The top lies between just above the liver dome (an abdominal scan) and the mid-chest, the bottom between
    below the kidneys and below the bladder, so liver, spleen, stomach, pancreas and kidneys are always
    scanned whole while lungs, heart and bladder are cut or left out. A range longer than the grid is
    trimmed on a random side; the grid then sits at a random height around the range.
    """
    length = (n_z - 1) * sp_z
    top, bot = U(z_dia_r + 15, z_dia_r + 120), U(-112, z_kidney - 40)
    excess, u = max(0.0, top - bot - length), U(0, 1)
    top, bot = top - u * excess, bot + (1 - u) * excess
    z0 = U(top - length, max(bot, top - length))  # world z of the grid's first slice
    return (bot, top), z0 + length / 2


def _frame_offset(U, shape, sp: np.ndarray, Ac: float, Bc: float) -> np.ndarray:
    """In-plane offset of the body in the frame: up to 25 mm, so a wide patient's fat is cut at the frame's edge,
    but the body cavity (and so every organ) stays inside the frame."""
    half = np.asarray(shape[:2], np.float64) * sp[:2] / 2
    room = np.clip(half - np.array([Ac, Bc]) - 8, 0, 25)
    return np.array([U(-1, 1) * room[0], U(-1, 1) * room[1], 0.0])


def make_phantom_subject(
    seed: int,
    shape: tuple[int, int, int] = (160, 160, 128),
    spacing: float | tuple[float, float, float] = 1.5,
    lesion: bool | None = None,
) -> PhantomSubject:
    """Generate phantom patient `seed`. `lesion`: None draws one with the table's probability; True/False forces it.

    The anatomy is in millimetres, so a coarser `spacing` gives the same patient on a smaller grid.
    """
    rng = np.random.default_rng(seed)
    table = class_table()
    sp = np.broadcast_to(np.asarray(spacing, np.float64), (3,)).copy()
    if (sp <= 0).any() or len(shape) != 3:
        raise ValueError(f"phantom needs a 3-D shape and positive spacing, got shape={shape}, spacing={spacing}")
    U = rng.uniform

    # Pose, body and the levels the field of view is placed by. The cavity (inside the muscle wall) is drawn
    # first and subcutaneous fat wraps it, so an obese patient has the same organs in a wider body.
    angles = (U(-6, 6), U(-3, 3), U(-3, 3))  # yaw about z, then tilts about x and y (degrees)
    R = _rot("z", angles[0]) @ _rot("x", angles[1]) @ _rot("y", angles[2])
    Ac, Bc = U(74, 92), U(52, 66)  # cavity semi-axes (mm), lateral and antero-posterior
    skin, fat, wall = 2.0, U(4, 24), U(5, 10)
    e0 = (Ac + Bc) / (Ac + Bc + 2 * (skin + fat + wall))  # the cavity edge in normalised body radius
    A, B = Ac / e0, Bc / e0  # body semi-axes
    z_dia_r = U(22, 48)  # diaphragm heights (right higher, under the liver); the viscera move with them
    z_dia_l = z_dia_r - U(4, 10)
    kz = {-1: z_dia_r - U(46, 58)}  # kidney centres, the right one lower
    kz[1] = kz[-1] + U(4, 16)
    fov, z_centre = _scan_range(U, z_dia_r, min(kz.values()), shape[2], sp[2])
    shift = _frame_offset(U, shape, sp, Ac, Bc)
    cv = _Canvas(shape, sp, R, shift, z_centre, _smooth_noise(rng, shape, 30.0, sp))

    # Body: an elliptic cylinder, skin / subcutaneous fat / muscle wall / cavity by normalised radius.
    X, Y, Z = cv.coords(tuple(slice(0, n) for n in cv.shape))
    rho = np.sqrt((X / np.float32(A)) ** 2 + (Y / np.float32(B)) ** 2)
    rm = (A + B) / 2
    edges = np.array([1 - (skin + fat + wall) / rm, 1 - (skin + fat) / rm, 1 - skin / rm, 1.0], np.float32)
    layer = np.array([_tid("fat"), _tid("muscle"), _tid("fat"), _tid("skin"), _tid("air")], np.uint8)
    cv.tissue = layer[np.searchsorted(edges, rho)]
    cv.inner = rho < edges[0]

    # The bowel fills the lower abdomen.
    bowel = _smooth_noise(rng, shape, 9.0, sp)
    belly = cv.inner & (Z < z_dia_l - 15)
    cv.tissue[belly & (bowel > 0.1)] = _tid("bowel")
    cv.tissue[belly & (bowel > 1.6)] = _tid("bowel_gas")

    # Posterior muscles (paraspinal, psoas) belong to the wall, not the cavity.
    yv = -0.49 * Bc  # vertebral body centre, placed by the cavity so that fat does not move the spine
    para = ((np.abs(X) - 24) / np.float32(20)) ** 2 + ((Y + np.float32(0.93 * Bc)) / np.float32(16)) ** 2 < 1
    cv.tissue[para & (rho < edges[1])] = _tid("muscle")
    cv.inner &= ~para
    for sx in (-1, 1):
        cv.ellipsoid("muscle", (sx * 22, yv + 4, -70), (11, 11, 60), wobble=0.05)

    ids = class_ids()
    # Chest: lungs above the diaphragm (posterior recess a little lower), the heart between them.
    for name, sx, zd in (("lung_right", -1, z_dia_r), ("lung_left", 1, z_dia_l)):
        cv.ellipsoid(name, (sx * 0.5 * Ac, -0.05 * Bc, zd + 60), (0.52 * Ac, 1.0 * Bc, 72), wobble=0.05,
                     clip=lambda x, y, z, zd=zd: z > zd - 10 * np.clip(-y / np.float32(Bc), 0, 1))
    zh = (z_dia_r + z_dia_l) / 2
    g = U(*_SIZE)
    cv.ellipsoid("heart", (0.12 * Ac + U(-8, 8), 0.3 * Bc + U(-5, 5), zh + U(28, 34)), (0.4 * Ac * g, 0.42 * Bc * g, 30 * g),
                 rot=_rot("z", U(20, 40)), clip=lambda x, y, z: z > zh - 2)

    # Upper abdomen: each organ has its own size factor g and position jitter (up to 8-12 mm, ~1.5-2 cm in an adult).
    g, lz = U(*_SIZE), U(34, 42)
    lz *= g
    liver_c = (-0.42 * Ac + U(-12, 12), U(-8, 8), z_dia_r - 0.85 * lz)
    cv.ellipsoid("liver", liver_c, (0.52 * Ac * g * U(0.9, 1.1), 0.85 * Bc * g, lz), power=2.2)
    cv.ellipsoid("liver", (0.08 * Ac + liver_c[0] + 0.42 * Ac, 0.42 * Bc, liver_c[2] + 10),
                 (0.38 * Ac * g * U(0.8, 1.2), 0.4 * Bc * g, 0.5 * lz), rot=_rot("y", U(-15, 5)))
    g = U(*_SIZE)
    cv.ellipsoid("gallbladder", (-0.28 * Ac + U(-6, 6), 0.55 * Bc, liver_c[2] - 0.55 * lz), (9 * g, 9 * g, 17 * g),
                 rot=_rot("x", U(20, 40)))
    g = U(*_SIZE)
    spleen_c = (0.7 * Ac + U(-10, 6), -0.32 * Bc + U(-10, 10), z_dia_l - U(14, 30))
    cv.ellipsoid("spleen", spleen_c, (12 * g * U(0.9, 1.1), 27 * g * U(0.9, 1.1), 24 * g * U(0.9, 1.1)),
                 rot=_rot("z", U(-45, -25)), power=2.3)
    cv.tube("esophagus", [(-4, yv + 22, 200), (-2, yv + 22, z_dia_l + 5), (0.3 * Ac, 0.1 * Bc, z_dia_l - 10)], 6)
    g, fz = U(*_SIZE), z_dia_l - 14 + U(-6, 6)
    sto_x, sto_y = 0.36 * Ac + U(-12, 12), U(-8, 8)
    cv.ellipsoid("stomach", (sto_x, 0.1 * Bc + sto_y, fz), (20 * g * U(0.9, 1.1), 22 * g * U(0.9, 1.1), 19 * g))
    cv.ellipsoid("stomach", (sto_x - 0.24 * Ac, 0.45 * Bc + sto_y, fz - 24), (32 * g, 15 * g, 15 * g), rot=_rot("z", U(-30, -10)))
    st = cv.box((sto_x - 0.16 * Ac, 0.3 * Bc, fz - 10), 70)
    if st is not None:  # gas rises to the anterior (upper, supine) part of the lumen
        sl, (_, y, _) = st
        cv.tissue[sl][(cv.tissue[sl] == ids["stomach"]) & (y > np.float32(0.5 * Bc))] = _tid("stomach_gas")

    # Retroperitoneum: kidneys (right lower than left), adrenals on top, pancreas and veins, great vessels.
    for name, adrenal, sx in (("kidney_right", "adrenal_gland_right", -1), ("kidney_left", "adrenal_gland_left", 1)):
        g = U(*_SIZE)
        krz = U(22, 28) * g
        c = (sx * (0.54 * Ac + U(-8, 8)), -0.5 * Bc + U(-6, 6), kz[sx])
        cv.ellipsoid(name, c, (14 * g * U(0.9, 1.1), 12 * g * U(0.9, 1.1), krz),
                     rot=_rot("z", -sx * U(20, 40)) @ _rot("y", sx * U(5, 15)), power=2.2)
        cv.ellipsoid(adrenal, (sx * 0.36 * Ac, -0.38 * Bc, kz[sx] + krz + 4), (4, 9, 10), rot=_rot("z", sx * 30))
    yp = yv + 38
    head = (-0.22 * Ac + U(-5, 5), yp, kz[-1] + U(4, 10))
    tail = (0.56 * Ac, -0.12 * Bc, z_dia_l - U(26, 32))
    cv.tube("pancreas", [head, (0.0, yp + 3, head[2] + 6), tail], U(6, 8))
    cv.ellipsoid("pancreas", head, (11, 9, 13))
    conf = (-0.04 * Ac, yp - 8, head[2] + 4)
    cv.tube("portal_and_splenic_vein", [(tail[0] - 4, tail[1] - 7, tail[2]), conf, (-0.25 * Ac, 0.08 * Bc, liver_c[2] + 8)], 3.8)
    z_bif = kz[-1] - U(34, 46)
    cv.tube("inferior_vena_cava", [(-0.2 * Ac, yv + 20, -200), (-0.2 * Ac, yv + 20, z_bif), (-0.18 * Ac, yv + 24, zh + 12)], U(7, 9))
    cv.tube("aorta", [(5, yv + 22, z_bif), (5, yv + 22, 200)], U(7, 9), wobble=0.02)

    g = U(*_SIZE)
    cv.ellipsoid("urinary_bladder", (U(-10, 10), 0.35 * Bc + U(-6, 6), U(-90, -72)), (24 * g * U(0.9, 1.1), 20 * g, 18 * g), power=2.6)

    # Spine: vertebral bodies (cancellous core, cortical rim) and discs, canal, arch and spinous process.
    sl = cv.slab((-35, yv - 45), (35, yv + 20))
    x, y, z = cv.coords(sl)
    period, disc = U(22, 25), U(4, 6)
    phase = np.mod(z - np.float32(U(0, period)), np.float32(period))
    in_body = phase < period - disc
    vb = (x / np.float32(16)) ** 2 + ((y - np.float32(yv)) / np.float32(13)) ** 2
    yc = yv - 13 - 7
    rc = np.sqrt(x * x + (y - np.float32(yc)) ** 2)
    arch = in_body & (rc < 11) & (y < np.float32(yc + 3))
    spinous = in_body & (np.abs(x) < 3.5) & (y < np.float32(yc - 6)) & (y > np.float32(yc - 26))
    transverse = (phase > 3) & (phase < 9) & (np.abs(y - np.float32(yc + 2)) < 3.5) & (np.abs(x) < 30)
    t = cv.tissue[sl]
    body_mask = rho[sl] < edges[1]
    t[body_mask & (arch | spinous | transverse)] = ids["vertebrae"]
    t[body_mask & (vb < 1)] = np.where(in_body, _tid("cortical_bone"), _tid("disc"))[body_mask & (vb < 1)]
    t[body_mask & (vb < 0.7) & in_body] = ids["vertebrae"]
    t[rc < 6.5] = _tid("csf")

    # Ribs: bands in the chest wall descending anteriorly, open at the front (cartilage) below the chest.
    z_rib = min(kz[1], kz[-1]) + 10
    lo = int(np.clip(np.floor((z_rib - 20 - cv.origin[2]) / sp[2]), 0, shape[2]))
    if lo < shape[2]:
        sl = (slice(None), slice(None), slice(lo, None))
        x, y, z = X[sl], Y[sl], Z[sl]
        r = rho[sl]
        ph = np.mod(z + np.float32(0.35) * (y + np.float32(B)) - np.float32(U(0, 19)), np.float32(19))
        band = np.abs(r - np.float32(edges[0] + 0.015)) * np.float32(rm) < 3.2
        rib = band & (ph < 7) & (z > np.float32(z_rib) - 0.25 * (y + np.float32(B))) & (
            (y < np.float32(0.35 * B)) | (np.abs(x) > np.float32(0.3 * A)) & (z > np.float32(z_dia_l - 15)))
        cv.tissue[sl][rib] = ids["ribs"]

    # Slices outside the scanned range are air: a shorter scan on the fixed grid (the foreground crop drops them).
    zs = cv.origin[2] + np.arange(cv.shape[2]) * sp[2]
    scanned = (zs >= fov[0]) & (zs <= fov[1])
    cv.tissue[:, :, ~scanned] = _tid("air")

    # Optional lesion inside one organ. Every draw happens either way, so forcing the lesion on or off
    # changes nothing else about the patient.
    les_cfg = table["lesion"]
    draw, where = rng.uniform(), rng.uniform()
    has_lesion = draw < les_cfg["probability"] if lesion is None else bool(lesion)
    organs = list(les_cfg["organs"])
    organ = organs[rng.choice(len(organs), p=np.array(list(les_cfg["organs"].values())) / sum(les_cfg["organs"].values()))]
    radius = U(*les_cfg["radius_mm"])
    contrast = U(*les_cfg["contrast_hu"])
    lesion_info = None
    if has_lesion:
        vox = np.flatnonzero(cv.tissue == ids[organ])
        if vox.size:
            ci = np.array(np.unravel_index(vox[min(int(where * vox.size), vox.size - 1)], cv.shape))
            cw = cv.origin + ci * sp
            centre = cv.R.T @ (cw - cv.t)
            got = cv.box(centre, radius)
            sl, (x, y, z) = got
            m = ((x - np.float32(centre[0])) ** 2 + (y - np.float32(centre[1])) ** 2 + (z - np.float32(centre[2])) ** 2
                 < np.float32(radius**2)) & (cv.tissue[sl] == ids[organ])
            cv.tissue[sl][m] = ids["lesion"]
            lesion_info = {"organ": organ, "center_ras_mm": [round(float(v), 2) for v in cw],
                           "radius_mm": round(radius, 2), "volume_ml": None, "hu": None}

    # Intensities: per-subject mean HU per tissue, smooth texture, white noise.
    n_t = _FIRST_TISSUE + len(_TISSUES)
    mean, tex = np.zeros(n_t, np.float32), np.zeros(n_t, np.float32)
    for c in table["classes"]:
        if c["hu"] is not None:
            mean[c["id"]] = U(*c["hu"])
        tex[c["id"]] = c["texture"]
    for name, c in table["tissues"].items():
        mean[_tid(name)], tex[_tid(name)] = U(*c["hu"]), c["texture"]
    mean[ids["lesion"]] = mean[ids[organ]] - contrast
    sigma = U(*table["noise_sigma_hu"])
    texture = _smooth_noise(rng, shape, 6.0, sp)
    image = mean[cv.tissue] + tex[cv.tissue] * texture
    image += rng.standard_normal(cv.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(image, -1024, 3071, out=image)
    label = _label_lut()[cv.tissue]

    counts = np.bincount(label.ravel(), minlength=len(ids))
    ml = float(np.prod(sp)) / 1000.0
    names = {v: k for k, v in ids.items()}
    if lesion_info is not None:
        lesion_info["volume_ml"] = round(float(counts[ids["lesion"]]) * ml, 3)
        lesion_info["hu"] = round(float(mean[ids["lesion"]]), 1)
    ext = zs[scanned][[0, -1]] if scanned.any() else zs[[0, 0]]
    attributes = {
        "seed": int(seed),
        "shape": list(cv.shape),
        "spacing_mm": [float(v) for v in sp],
        "body": {"width_mm": round(2 * A, 1), "depth_mm": round(2 * B, 1), "fat_mm": round(fat, 1),
                 "muscle_wall_mm": round(wall, 1)},
        "rotation_deg": [round(a, 2) for a in angles],
        "frame_offset_mm": [round(float(v), 2) for v in shift[:2]],
        "fov_z_mm": [round(float(ext[0]), 2), round(float(ext[1]), 2)],
        "noise_sigma_hu": round(sigma, 2),
        "organ_volumes_ml": {names[i]: round(float(counts[i]) * ml, 3) for i in range(1, len(ids)) if names[i] != "lesion"},
        "organ_hu": {names[i]: round(float(mean[i]), 1) for i in range(1, len(ids)) if names[i] != "lesion"},
        "lesion": lesion_info,
    }
    return PhantomSubject(image.astype(np.float32, copy=False), label, cv.affine, attributes)


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype) -> None:
    """Write a NIfTI atomically (temp file in the same folder, then rename): no partial files on failure."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_phantoms(out: str | Path, n: int, seed: int = 0, shape=(160, 160, 128), spacing=1.5) -> Path:
    """Write `n` phantoms (subject seeds seed..seed+n-1) as int16 HU / uint8 label NIfTIs plus an MSD datalist.

    Layout: `imagesTr/phantom_sNNNN.nii.gz`, `labelsTr/...`, `dataset.json` (training list, paths relative
    to `out`) and `attributes.json` (per-image organ volumes and lesion). Returns the datalist path.
    """
    out = Path(out)
    training, attrs = [], {}
    for s in range(seed, seed + n):
        subj = make_phantom_subject(s, shape, spacing)
        name = f"phantom_s{s:04d}.nii.gz"
        save_nifti(out / "imagesTr" / name, np.rint(subj.image), subj.affine, np.int16)
        save_nifti(out / "labelsTr" / name, subj.label, subj.affine, np.uint8)
        training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        attrs[f"imagesTr/{name}"] = subj.attributes
    labels = {str(c["id"]): c["name"] for c in class_table()["classes"]}
    datalist = out / "dataset.json"
    _write_datalist(datalist, training, name="voco-phantom", description="procedural torso CT phantom (voco_lib.data.phantom)",
                   modality={"0": "CT"}, labels=labels, numTraining=len(training))
    _write_json(out / "attributes.json", attrs)
    return datalist


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_datalist(path: Path, training: list[dict[str, str]], **header: Any) -> None:
    """MSD-style datalist: header fields, then `training` entries with paths relative to the JSON's folder."""
    _write_json(path, {**header, "training": training})


def cli_phantom(args: argparse.Namespace) -> int:
    """`voco phantom --n N --out DIR [--seed S]`."""
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    t0 = time.perf_counter()
    path = write_phantoms(args.out, args.n, args.seed)
    print(f"wrote {args.n} phantoms (seeds {args.seed}..{args.seed + args.n - 1}) and {path} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
