"""The demo's renderer: chest-X-ray-like images with planted, learnable signals (`render_chest`).

- One renderer, `render_chest`, draws every image of every set from a `ChestFactors` (findings, TB, sex, age,
  view, acquisition style). Anatomy is analytic in isotropic normalised coordinates (lungs are tapered
  superellipses cut by diaphragm domes), so lung masks come for free and any image size works. Densities are
  added up, then windowed, gamma-mapped, blurred and noised; everything is vectorised numpy (FFT blurs).
- Each factor changes the image in its own way (see PLANTED_SIGNALS). A TB image carries its sign, a faint cavity
  with an air-fluid level drawn with the NIH Hernia painter, and every TB-set image may carry other lung disease
  (the NIH opacity, effusion, edema and fibrosis painters): telling TB from other disease is what the NIH labels
  teach.
- Randomness: every image draws from `np.random.default_rng((seed, dataset, purpose, index, component))`, one
  stream per component (pose, anatomy, each finding, ...). Parallelism therefore cannot change a byte, and
  toggling one finding leaves every other part of the image identical (the tests use this).
Runs in spawned worker processes (write.py): imports neither jax nor tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from metachex_jax.core.labels import PATHOLOGIES

# The eight findings the real BBox_List_2017.csv has boxes for (it spells Infiltration "Infiltrate").
BOX_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax")

# Generator version 9. A TB image carries a cavity with an air-fluid level, drawn by the NIH Hernia painter at
# TB_SIGN_CONTRAST of the hernia's contrast, so its look is what the NIH-like labels teach, only fainter; every
# TB-set image (both classes) carries other lung disease in OTHER_DISEASE_FRACTION of cases. Features that learned
# the bubble from the NIH labels still see the faint one and tell it from the other disease; an untrained network's
# features see it far less well (docs/data.md, "What is planted, and why transfer must help").
# Version 8 drew the cavity at full contrast: random features separated it too (probe AUROC 0.94 within the
# Shenzhen-like set), and the MetaChexNet probe's lead across sets was too small to decide on 138 images.
# Version 7 drew volume loss (the Atelectasis painter), which the 64 px demo pretraining learns only moderately.
TB_SIGN = "Hernia"
TB_SIGN_CONTRAST = 0.6  # the fraction of the painter's change (in density) a TB image gets

PLANTED_SIGNALS = f"""\
Planted signals (each factor changes the image in its own way, with random nuisance variation). Findings are
sized and contrasted to stay visible at the demo's 64 px (a lesion >= ~3 px wide, line >= ~1 px); ribs are
fainter than findings. Sex and view cues overlap between the classes, so they are learnable but not trivial:
  Atelectasis         a dense plate-like band in a lower zone, ipsilateral hemidiaphragm raised
  Cardiomegaly        heart about 1.38x larger (wider cardiac silhouette)
  Effusion            fluid filling a lung base with a lateral meniscus (blunted costophrenic angle)
  Infiltration        large, diffuse, fine-textured fainter patchy opacity
  Mass                one large irregular bright blob
  Nodule              2-4 small round bright spots
  Pneumonia           medium patchy opacity, medium texture, mid/lower zones
  Pneumothorax        a wide apical-lateral rim without vessels, darker, bounded by a bright pleural line
  Consolidation       a large dense homogeneous opacity with lobulated edges
  Edema               bilateral hazy perihilar ("butterfly") opacity
  Emphysema           hyperlucent lungs, sparse vessels, low flattened diaphragm
  Fibrosis            bright reticular network of lines, basal and peripheral
  Pleural_Thickening  a bright lumpy rim along the lateral pleura
  Hernia              a gas bubble with an air-fluid level behind the heart
  Sex                 female: narrower, shorter thorax; breast soft-tissue shadows (fainter ones in some men)
  View AP             magnification: larger heart, wider mediastinum; clavicles higher and scapulae over the
                      lungs (ranges overlap with PA)
  Age (years)         bone density: ribs, clavicles and spine get fainter linearly with age
  TB (version 9)      a faint cavity with an air-fluid level: the NIH Hernia painter's walled gas bubble with a
                      fluid level behind the heart (the hernia's place, not TB's usual upper zones) at {TB_SIGN_CONTRAST:.0%} of
                      its contrast
  Other disease       TB-set images of both classes: one of Infiltration, Consolidation, Pneumonia, Fibrosis,
                      Pleural_Thickening, Edema, Effusion in 90% (a screening population's other findings)
Nuisance, alike in every set and class: position, scale, rotation, thorax shape, heart size, exposure window,
gamma and gradient, blur and noise levels, devices (ECG electrodes and lead wires, a side marker, collimation)."""


# ----------------------------------------------------------------------------------------------------------
# Random streams: one per (seed, dataset, purpose, index, component).
# ----------------------------------------------------------------------------------------------------------

DATASET_CODES = {"chestxray14": 1, "shenzhen": 2, "montgomery": 3, "hospital": 4}
PURPOSE_METADATA, PURPOSE_IMAGE = 0, 1
# tb (version 6's sign choice), tb_lesions, tb_effusion, tb_fibrosis (version 5's TB): unused, kept so later
# components keep their streams
COMPONENTS = ("pose", "anatomy", "vessels", "style", "noise", "tb", "tb_lesions", "tb_effusion", "tb_fibrosis",
              "devices")
COMPONENTS += PATHOLOGIES
COMPONENTS += ("other_disease",)  # appended (version 6): earlier components keep their streams
COMPONENT_CODES = {name: code for code, name in enumerate(COMPONENTS)}


def metadata_rng(seed: int, dataset: str) -> np.random.Generator:
    return np.random.default_rng([seed, DATASET_CODES[dataset], PURPOSE_METADATA, 0, 0])


def image_key(seed: int, dataset: str, index: int) -> tuple[int, int, int, int]:
    """The key every random draw of one image derives from (independent of processes and order)."""
    return (seed, DATASET_CODES[dataset], PURPOSE_IMAGE, index)


def component_rng(key: Sequence[int], component: str) -> np.random.Generator:
    return np.random.default_rng([*key, COMPONENT_CODES[component]])


# ----------------------------------------------------------------------------------------------------------
# Image primitives (vectorised; coordinates are isotropic: 1 unit = half the shorter image side).
# ----------------------------------------------------------------------------------------------------------


def _gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur in the Fourier domain (periodic edges; fine for the small sigmas and noise used here)."""
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2)).astype(np.float32)
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape).astype(np.float32, copy=False)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float, px_per_unit: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length `sigma` (normalised units)."""
    field = _gaussian_blur(rng.standard_normal(shape, dtype=np.float32), max(sigma * px_per_unit, 0.5))
    return field / (field.std() + 1e-8)


def _ridges(field: np.ndarray, width: float) -> np.ndarray:
    """Thin curvy lines along the zero level set of a smooth random field (vessels, reticulation)."""
    return np.exp(-((field / width) ** 2))


def _soft_step(x: np.ndarray, edge: float) -> np.ndarray:
    """0 for x < -edge, 1 for x > edge, a linear ramp between (the final blur rounds it off; cheap)."""
    t = x * (0.5 / edge)
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


def _soft_disk(u, v, cu: float, cv: float, radius, edge: float) -> np.ndarray:
    return _soft_step(radius - np.sqrt((u - cu) ** 2 + (v - cv) ** 2), edge)


def _ellipse(u, v, cu: float, cv: float, ru: float, rv: float, edge: float) -> np.ndarray:
    distance = (np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1.0) * min(ru, rv)
    return _soft_step(-distance, edge)


def _segment_distance(u, v, start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    (u0, v0), (u1, v1) = start, end
    du, dv = u1 - u0, v1 - v0
    t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.sqrt((u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2)


# ----------------------------------------------------------------------------------------------------------
# The renderer.
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AcquisitionStyle:
    """Per-dataset look (a domain shift between NIH, Shenzhen and Montgomery)."""

    gamma: float
    window_low: float
    window_high: float
    noise_std: float
    blur: float  # normalised units


STYLES = {
    "chestxray14": AcquisitionStyle(gamma=1.0, window_low=-0.02, window_high=0.95, noise_std=0.012, blur=0.009),
    "shenzhen": AcquisitionStyle(gamma=0.85, window_low=0.02, window_high=0.90, noise_std=0.008, blur=0.008),
    "montgomery": AcquisitionStyle(gamma=1.15, window_low=-0.05, window_high=1.00, noise_std=0.010, blur=0.011),
    "hospital": AcquisitionStyle(gamma=0.95, window_low=0.00, window_high=0.92, noise_std=0.014, blur=0.010),
}


@dataclasses.dataclass(frozen=True)
class ChestFactors:
    """Everything that is a label somewhere; all other variation is nuisance drawn from the image key."""

    findings: frozenset[str] = frozenset()  # NIH pathologies (names from labels.PATHOLOGIES)
    tb: bool = False
    sex_male: bool = True
    age: float = 45.0  # years
    view_ap: bool = False
    style: str = "chestxray14"


OTHER_DISEASE = ("Infiltration", "Consolidation", "Pneumonia", "Fibrosis", "Pleural_Thickening", "Edema", "Effusion")
OTHER_DISEASE_FRACTION = 0.9


def sample_other_disease(key: Sequence[int]) -> frozenset[str]:
    """The other lung disease a TB-set image carries (none or one of OTHER_DISEASE), from its own stream."""
    rng = component_rng(key, "other_disease")
    return frozenset({str(rng.choice(OTHER_DISEASE))}) if rng.random() < OTHER_DISEASE_FRACTION else frozenset()


@dataclasses.dataclass
class _Lung:
    """One lung: a superellipse tapered towards the apex, cut by a diaphragm dome."""

    side: int
    center_u: float
    center_v: float
    half_width: float
    half_height: float
    dome_top: float
    dome_curvature: float

    def half_width_at(self, v):
        taper = np.clip((v - (self.center_v - self.half_height)) / (1.2 * self.half_height), 0.0, 1.0)
        return self.half_width * (0.45 + 0.55 * np.sqrt(taper))

    def local(self, u, v):
        """(a, b): lung-local coordinates, a > 0 lateral, |a|, |b| < ~1 inside."""
        a = self.side * (u - self.center_u) / self.half_width_at(v)
        b = (v - self.center_v) / self.half_height
        return a, b

    def boundary_level(self, u, v):
        """< 0 inside the superellipse, 0 on its boundary (unitless)."""
        a, b = self.local(u, v)
        p = 2.6
        return (np.abs(a) ** p + np.abs(b) ** p) ** (1.0 / p) - 1.0

    def dome(self, u):
        return self.dome_top + self.dome_curvature * ((u - self.center_u) / self.half_width) ** 2

    def point(self, rng: np.random.Generator, b_range: tuple[float, float], a_range=(-0.55, 0.6)):
        """A random point inside the lung at relative height b (-1 apex .. +1 base)."""
        b = rng.uniform(*b_range)
        v = self.center_v + b * self.half_height
        a = rng.uniform(*a_range)
        u = self.center_u + self.side * a * float(self.half_width_at(v))
        return float(u), float(min(v, self.dome(u) - 0.03))


class _Canvas:
    """Coordinate grids for one image plus helpers that need the pixel scale."""

    def __init__(self, shape: tuple[int, int], pose_rng: np.random.Generator):
        h, w = shape
        self.shape = shape
        self.px_per_unit = min(h, w) / 2.0
        shift_u, shift_v = pose_rng.normal(0.0, POSE_SHIFT, size=2).tolist()
        zoom = 1.0 + float(pose_rng.normal(0.0, POSE_ZOOM))
        angle = float(pose_rng.normal(0.0, POSE_ANGLE))
        u0 = ((np.arange(w) - (w - 1) / 2.0) / self.px_per_unit)[None, :]
        v0 = ((np.arange(h) - (h - 1) / 2.0) / self.px_per_unit)[:, None]
        cos, sin = math.cos(angle), math.sin(angle)
        # float32 halves the cost of every elementwise operation below.
        self.u = ((cos * u0 + sin * v0) / zoom - shift_u).astype(np.float32)
        self.v = ((-sin * u0 + cos * v0) / zoom - shift_v).astype(np.float32)
        self.edge = max(0.012, 1.5 / self.px_per_unit)  # soft edges never sharper than ~1.5 px

    def noise(self, rng: np.random.Generator, sigma: float) -> np.ndarray:
        return _smooth_noise(rng, self.shape, sigma, self.px_per_unit)


# Pose jitter (generator version 5): shift and zoom in half-widths, angle in radians.
POSE_SHIFT, POSE_ZOOM, POSE_ANGLE = 0.05, 0.05, 0.05


# (texture scale, threshold, roughness, softness): Consolidation = coarse, Pneumonia = medium, Infiltration = fine;
OPACITY_TEXTURES = {
    "coarse": (0.06, 0.45, 0.2, 0.12),
    "medium": (0.03, 0.45, 0.4, 0.12),
    "fine": (0.022, 0.5, 0.6, 0.25),
}


def _patchy_opacity(c: _Canvas, rng, center, radius, texture, threshold, roughness, softness):
    """Shared opacity primitive (consolidation, pneumonia, infiltration): a textured, thresholded blob."""
    cu, cv = center
    envelope = np.exp(-((c.u - cu) ** 2 + (c.v - cv) ** 2) / (2.0 * radius**2))
    return np.clip((envelope * (1.0 + roughness * c.noise(rng, texture)) - threshold) / softness, 0.0, 1.0)


def _nodules(c: _Canvas, centers, radii) -> np.ndarray:
    """Shared small round bright spots (Nodule)."""
    out = np.zeros(c.shape, np.float32)
    for (cu, cv), r in zip(centers, np.asarray(radii).tolist()):
        out = np.maximum(out, _soft_disk(c.u, c.v, cu, cv, r, 0.3 * r + 0.5 / c.px_per_unit))
    return out


def _reticulation(c: _Canvas, rng) -> np.ndarray:
    """Shared reticular network of fine lines (Fibrosis)."""
    return _ridges(c.noise(rng, 0.03), 0.3)  # mesh ~0.1 units: resolved at 64 px


def _effusion(c: _Canvas, lung: _Lung, rng) -> np.ndarray:
    """Fluid in the lung base with a meniscus rising laterally (blunted costophrenic angle)."""
    level = lung.dome_top - float(rng.uniform(0.05, 0.18))
    lateral = np.clip(lung.side * (c.u - lung.center_u) / lung.half_width + 0.3, 0.0, 1.3)
    meniscus = level - float(rng.uniform(0.08, 0.16)) * lateral**2
    return _soft_step(c.v - meniscus, 0.02)


@dataclasses.dataclass
class _Chest:
    """One radiograph under construction: geometry plus the density layers the painters add to."""

    key: Sequence[int]
    factors: ChestFactors
    canvas: _Canvas
    thorax_w: float
    thorax_h: float
    bone: float  # bone density factor: falls linearly with age
    breast: float  # breast soft-tissue density (ranges overlap between the sexes)
    clavicle_v: float  # clavicle height (AP projects them higher)
    scapula_u: float  # scapula distance from the midline (AP: over the lungs)
    heart_center: tuple[float, float]
    lungs: dict[int, _Lung]
    lung_field: dict[int, np.ndarray]  # soft masks, -1 = image left (patient right), +1 = image right
    body: np.ndarray
    heart: np.ndarray
    density: np.ndarray  # soft tissue, heart, mediastinum, direct additions by painters
    air: np.ndarray  # aerated lung (fluid and organs remove air)
    lesions: np.ndarray  # opacities inside the lungs
    vessel_weight: np.ndarray

    def rng(self, component: str) -> np.random.Generator:
        return component_rng(self.key, component)

    def lung_point(self, rng, zone=(-0.7, 0.5)) -> tuple[float, float]:
        return self.lungs[int(rng.choice([-1, 1]))].point(rng, zone)


def atelectasis_side(key: Sequence[int]) -> int:
    """The collapsed side: the first draw of the Atelectasis stream (the geometry and the painter agree)."""
    return int(component_rng(key, "Atelectasis").choice([-1, 1]))


def _build_anatomy(key: Sequence[int], shape: tuple[int, int], factors: ChestFactors) -> _Chest:
    """Pose, thorax, lungs, heart, mediastinum. Sex, view, age and the geometric findings act here."""
    has = factors.findings.__contains__
    c = _Canvas(shape, component_rng(key, "pose"))
    u, v, edge = c.u, c.v, c.edge
    anatomy = component_rng(key, "anatomy")
    thorax_w = (1.0 if factors.sex_male else 0.95) * (1.0 + float(anatomy.normal(0.0, 0.035)))
    thorax_h = (1.0 if factors.sex_male else 0.98) * (1.0 + float(anatomy.normal(0.0, 0.03)))
    magnification = 1.1 if factors.view_ap else 1.0  # AP: the heart is farther from the detector
    heart_scale = magnification * (1.0 + float(anatomy.normal(0.0, 0.06))) * (1.38 if has("Cardiomegaly") else 1.0)
    bone = max(1.25 - 0.0085 * factors.age, 0.3) * (1.0 + float(anatomy.normal(0.0, 0.015)))
    heart_u, heart_v = 0.1 + float(anatomy.normal(0.0, 0.015)), 0.17 + float(anatomy.normal(0.0, 0.02))
    dome_tilt = float(anatomy.normal(0.0, 0.015))
    # Sex and view cues overlap between the classes, so neither is perfectly decodable from one image.
    breast = float(anatomy.uniform(0.0, 0.035) if factors.sex_male else anatomy.uniform(0.02, 0.09))
    clavicle_v = -0.66 - (0.08 if factors.view_ap else 0.0) + float(anatomy.normal(0.0, 0.03))
    scapula_u = float(anatomy.uniform(0.62, 0.8) if factors.view_ap else anatomy.uniform(0.74, 0.9))

    emphysema = has("Emphysema")  # hyperinflation: taller lungs, low flat diaphragm
    lungs = {
        side: _Lung(
            side=side,
            center_u=side * 0.40 * thorax_w,
            center_v=-0.08,
            half_width=0.29 * thorax_w,
            half_height=0.58 * thorax_h * (1.05 if emphysema else 1.0),
            dome_top=0.33 * thorax_h + (0.03 if side == 1 else 0.0) + side * dome_tilt + (0.09 if emphysema else 0.0),
            dome_curvature=0.03 if emphysema else 0.12,
        )
        for side in (-1, 1)
    }
    if has("Atelectasis"):  # volume loss raises the hemidiaphragm on the collapsed side
        lungs[atelectasis_side(key)].dome_top -= 0.1

    body = _ellipse(u, v, 0.0, 0.12, 0.88 * thorax_w, 1.35, edge)
    for side in (-1, 1):  # shoulders
        body = np.maximum(body, _ellipse(u, v, side * 0.72 * thorax_w, -0.9, 0.38, 0.3, edge))
    thickness = np.sqrt(np.clip(1.0 - (u / (0.9 * thorax_w)) ** 2, 0.0, 1.0))
    heart = _ellipse(u, v, heart_u, heart_v, 0.29 * heart_scale, 0.21 * heart_scale, edge)
    mediastinum_half_width = 0.09 * (1.2 if factors.view_ap else 1.0) + 0.03 * np.clip(v + 0.5, 0.0, 0.8)
    mediastinum = _soft_step(mediastinum_half_width - np.abs(u - 0.01), edge) * _soft_step(0.3 - v, edge)
    mediastinum = np.maximum(mediastinum, _soft_disk(u, v, 0.1, -0.33, 0.07, edge))  # aortic knob
    lung_field = {
        side: _soft_step(-lung.boundary_level(u, v) * lung.half_height, edge) * _soft_step(lung.dome(u) - v, edge)
        for side, lung in lungs.items()
    }
    abdomen = np.where(u < 0.0, _soft_step(v - lungs[-1].dome(u), edge), _soft_step(v - lungs[1].dome(u), edge))
    hila = np.exp(-((np.abs(u) - 0.2) ** 2 + (v + 0.02) ** 2) / 0.18)
    return _Chest(
        key=key, factors=factors, canvas=c, thorax_w=thorax_w, thorax_h=thorax_h, bone=bone, breast=breast,
        clavicle_v=clavicle_v, scapula_u=scapula_u,
        heart_center=(heart_u, heart_v), lungs=lungs, lung_field=lung_field, body=body, heart=heart,
        density=0.5 * body * (0.75 + 0.25 * thickness) + 0.04 * abdomen * body + 0.15 * mediastinum + 0.2 * heart,
        air=np.maximum(lung_field[-1], lung_field[1]) * (1.0 - heart) * (1.0 - mediastinum),
        lesions=np.zeros(c.shape, np.float32),
        vessel_weight=(0.35 + 0.65 * hila) * (0.35 if emphysema else 1.0),  # vessels densest at the hila
    )


# ---- Finding painters: each draws from its own stream and adds to the chest's layers. ----


def _add_effusion(ch: _Chest, side: int, rng) -> None:
    fluid = _effusion(ch.canvas, ch.lungs[side], rng) * ch.lung_field[side]
    ch.air = ch.air * (1.0 - fluid)
    ch.density += 0.08 * fluid


def _paint_effusion(ch: _Chest, rng) -> None:
    for side in (-1, 1) if rng.random() < 0.35 else (int(rng.choice([-1, 1])),):
        _add_effusion(ch, side, rng)


def _paint_pneumothorax(ch: _Chest, rng) -> None:
    u, v = ch.canvas.u, ch.canvas.v
    lung = ch.lungs[int(rng.choice([-1, 1]))]
    width = float(rng.uniform(0.2, 0.3))
    level = lung.boundary_level(u, v)
    _, b = lung.local(u, v)
    upper = _soft_step(0.45 - b, 0.1) * ch.lung_field[lung.side]
    rim = _soft_step(level + width, 0.01) * upper  # collapsed-away zone: no vessels, more air
    ch.vessel_weight = ch.vessel_weight * (1.0 - rim)
    ch.density -= 0.2 * rim
    ch.density += 0.3 * np.exp(-(((level + width) / 0.03) ** 2)) * upper  # visceral pleural line (>= 1 px)


def _paint_atelectasis(ch: _Chest, rng) -> None:
    u, v = ch.canvas.u, ch.canvas.v
    side = int(rng.choice([-1, 1]))  # == atelectasis_side(key): the same first draw
    pu, pv = ch.lungs[side].point(rng, (0.05, 0.45))
    angle = float(rng.uniform(-0.35, 0.35))
    across = np.abs((u - pu) * math.sin(angle) - (v - pv) * math.cos(angle))
    along = np.abs((u - pu) * math.cos(angle) + (v - pv) * math.sin(angle))
    width = float(rng.uniform(0.05, 0.07))
    ch.lesions += 0.4 * np.exp(-((across / width) ** 2)) * _soft_step(0.3 - along, 0.04)


def _paint_nodule(ch: _Chest, rng) -> None:
    count = int(rng.integers(2, 5))
    centers = [ch.lung_point(rng) for _ in range(count)]
    ch.lesions += 0.42 * _nodules(ch.canvas, centers, rng.uniform(0.045, 0.065, count))


def _paint_mass(ch: _Chest, rng) -> None:
    u, v = ch.canvas.u, ch.canvas.v
    mu, mv = ch.lung_point(rng, (-0.5, 0.35))
    radius = float(rng.uniform(0.12, 0.17))
    theta = np.arctan2(v - mv, u - mu)
    phase3, phase5 = rng.uniform(0.0, 2.0 * np.pi, 2).tolist()
    lobes = 1.0 + 0.12 * np.sin(3 * theta + phase3) + 0.08 * np.sin(5 * theta + phase5)
    ch.lesions += 0.42 * _soft_disk(u, v, mu, mv, radius * lobes, 0.02)


def _opacity_painter(density: float, radius_range, zone, texture: str):
    """Consolidation, Pneumonia and Infiltration differ only in extent, zone, texture and density."""

    def paint(ch: _Chest, rng) -> None:
        radius = float(rng.uniform(*radius_range))
        center = ch.lung_point(rng, zone)
        ch.lesions += density * _patchy_opacity(ch.canvas, rng, center, radius, *OPACITY_TEXTURES[texture])

    return paint


def _paint_edema(ch: _Chest, rng) -> None:
    u, v = ch.canvas.u, ch.canvas.v
    spread = float(rng.uniform(0.14, 0.19))
    haze = sum(np.exp(-(((u - s * 0.22) / spread) ** 2 + ((v - 0.02) / (1.3 * spread)) ** 2) / 2.0) for s in (-1, 1))
    ch.lesions += 0.28 * haze * (1.0 + 0.25 * ch.canvas.noise(rng, 0.04))


def _paint_fibrosis(ch: _Chest, rng) -> None:
    weight = np.zeros(ch.canvas.shape, np.float32)
    for lung in ch.lungs.values():  # basal and peripheral
        a, b = lung.local(ch.canvas.u, ch.canvas.v)
        weight = np.maximum(weight, np.clip(0.3 + 0.6 * b + 0.6 * a, 0.0, 1.0))
    ch.lesions += 0.5 * _reticulation(ch.canvas, rng) * weight


def _paint_pleural_thickening(ch: _Chest, rng) -> None:
    sides = (-1, 1) if rng.random() < 0.4 else (int(rng.choice([-1, 1])),)
    thickness_level = float(rng.uniform(0.1, 0.15)) * (1.0 + 0.5 * ch.canvas.noise(rng, 0.06))
    for side in sides:
        lung = ch.lungs[side]
        a, _ = lung.local(ch.canvas.u, ch.canvas.v)
        lateral = _soft_step(a + 0.2, 0.1)
        rim = _soft_step(lung.boundary_level(ch.canvas.u, ch.canvas.v) + thickness_level, 0.01) * lateral
        ch.lesions += 0.55 * rim * ch.lung_field[side]


def _paint_hernia(ch: _Chest, rng) -> None:
    u, v = ch.canvas.u, ch.canvas.v
    heart_u, heart_v = ch.heart_center
    cu, cv = heart_u + float(rng.normal(0.0, 0.03)), heart_v + 0.06 + float(rng.normal(0.0, 0.02))
    radius = float(rng.uniform(0.1, 0.14))
    inside = _soft_disk(u, v, cu, cv, radius, 0.008)
    gas = inside * _soft_step(cv + float(rng.uniform(0.0, 0.4)) * radius - v, 0.006)  # above the fluid level
    wall = np.exp(-(((np.sqrt((u - cu) ** 2 + (v - cv) ** 2) - radius) / 0.02) ** 2))
    ch.density += -0.36 * gas + 0.06 * (inside - gas) + 0.16 * wall


# Cardiomegaly and Emphysema change the geometry (see _build_anatomy); Emphysema also darkens the lungs.
FINDING_PAINTERS = {
    "Atelectasis": _paint_atelectasis,
    "Effusion": _paint_effusion,
    "Infiltration": _opacity_painter(0.24, (0.22, 0.3), (-0.4, 0.4), "fine"),
    "Mass": _paint_mass,
    "Nodule": _paint_nodule,
    "Pneumonia": _opacity_painter(0.42, (0.14, 0.2), (-0.2, 0.45), "medium"),
    "Pneumothorax": _paint_pneumothorax,
    "Consolidation": _opacity_painter(0.42, (0.16, 0.22), (-0.3, 0.4), "coarse"),
    "Edema": _paint_edema,
    "Fibrosis": _paint_fibrosis,
    "Pleural_Thickening": _paint_pleural_thickening,
    "Hernia": _paint_hernia,
}


def _bones(ch: _Chest) -> np.ndarray:
    """Ribs, clavicles, scapulae, spine (all scaled by bone density, i.e. age) and breast shadows."""
    u, v = ch.canvas.u, ch.canvas.v
    bone = ch.bone
    cage = _ellipse(u, v, 0.0, -0.05, 0.74 * ch.thorax_w, 0.78, 0.03) * _soft_step(np.abs(u) - 0.06, 0.01)
    spread = np.abs(u)
    rib_height = v - 0.9 * spread**2 + 0.45 * spread  # posterior ribs rise from the spine, then curve down
    ribs = (0.5 + 0.5 * np.cos(2.0 * np.pi * rib_height / (0.125 * ch.thorax_h))) ** 4
    # Ribs are fainter than the lesions: at the demo's 64 px a strong rib pattern hides most findings.
    density = 0.1 * bone * ribs * cage
    for side in (-1, 1):
        start, end = (side * 0.07, ch.clavicle_v + 0.06), (side * 0.62 * ch.thorax_w, ch.clavicle_v - 0.08)
        density += 0.2 * bone * _soft_step(0.03 - _segment_distance(u, v, start, end), 0.008)
        scapula_u = side * ch.scapula_u * ch.thorax_w
        density += 0.12 * bone * _ellipse(u, v, scapula_u, -0.4, 0.14, 0.28, 0.02) * ch.body
    vertebrae = 0.7 + 0.3 * (0.5 + 0.5 * np.cos(2.0 * np.pi * v / 0.11)) ** 2
    density += 0.14 * bone * vertebrae * _soft_step(0.06 - np.abs(u), 0.01) * ch.body
    for side in (-1, 1):
        breast = _ellipse(u, v, side * 0.43 * ch.thorax_w, 0.36, 0.27, 0.19, 0.05) * _soft_step(v - 0.3, 0.06)
        density += ch.breast * breast
    return density


def _devices(ch: _Chest) -> np.ndarray:
    """Things on or around the patient that carry no label: ECG electrodes and their wires, a side marker,
    collimation. Drawn from the "devices" stream, alike for every set and class."""
    c, rng = ch.canvas, ch.rng("devices")
    u, v = c.u, c.v
    out = np.zeros(c.shape, np.float32)
    electrodes = []
    for _ in range(int(rng.integers(0, 5))):
        eu, ev = float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.8, 0.7))
        electrodes.append((eu, ev))
        out += 0.08 * _soft_disk(u, v, eu, ev, float(rng.uniform(0.04, 0.06)), 0.01)
        out += 0.5 * _soft_disk(u, v, eu, ev, float(rng.uniform(0.012, 0.02)), 0.006)
    for eu, ev in electrodes:
        if rng.random() < 0.6:  # a lead wire to the image edge: a bright smooth curve
            end = (float(rng.uniform(-1.1, 1.1)), float(rng.choice([-1.1, 1.1])))
            mid = ((eu + end[0]) / 2 + float(rng.normal(0, 0.25)), (ev + end[1]) / 2 + float(rng.normal(0, 0.25)))
            t = np.linspace(0.0, 1.0, 12)
            pts = [((1 - s) ** 2 * eu + 2 * (1 - s) * s * mid[0] + s * s * end[0],
                    (1 - s) ** 2 * ev + 2 * (1 - s) * s * mid[1] + s * s * end[1]) for s in t]
            dist = np.min([_segment_distance(u, v, p0, p1) for p0, p1 in zip(pts[:-1], pts[1:])], axis=0)
            out += 0.25 * np.exp(-((dist / 0.008) ** 2))
    if rng.random() < 0.7:  # a side marker ("L"-shaped lead letter) near a top corner
        mu, mv = float(rng.choice([-1, 1])) * float(rng.uniform(0.55, 0.85)), float(rng.uniform(-0.95, -0.7))
        bar = _soft_step(0.012 - np.abs(u - mu), 0.005) * _soft_step(0.06 - np.abs(v - mv), 0.005)
        foot = _soft_step(0.012 - np.abs(v - mv - 0.05), 0.005) * _soft_step(u - mu + 0.01, 0.005) * \
            _soft_step(mu + 0.05 - u, 0.005)
        out += 0.8 * np.maximum(bar, foot)
    if rng.random() < 0.5:  # collimation: unexposed (bright) bands along some edges
        h, w = c.shape
        top, bottom, left, right = rng.uniform(0.0, 0.12, 4).tolist()
        vmax, umax = (h - 1) / 2 / c.px_per_unit, (w - 1) / 2 / c.px_per_unit
        v0 = (np.arange(h) - (h - 1) / 2)[:, None] / c.px_per_unit
        u0 = (np.arange(w) - (w - 1) / 2)[None, :] / c.px_per_unit
        outside = np.maximum(np.maximum(_soft_step(-vmax + top - v0, 0.01), _soft_step(v0 - vmax + bottom, 0.01)),
                             np.maximum(_soft_step(-umax + left - u0, 0.01), _soft_step(u0 - umax + right, 0.01)))
        out += 0.9 * outside
    return out


def render_chest(key: Sequence[int], shape: tuple[int, int], factors: ChestFactors) -> dict[str, np.ndarray]:
    """Draws one radiograph.

    Returns {"image": float (H, W) in [0, 1], "left_lung": bool, "right_lung": bool, "boxes": {finding: (x, y,
    w, h)}}; left/right are the PATIENT's lungs (radiological convention: the patient's left lung is on the
    image's right). `boxes` holds a pixel bounding box for each of BOX_FINDINGS present: where its painter changed
    the image (Cardiomegaly: the heart).
    """
    unknown = sorted(set(factors.findings) - set(PATHOLOGIES))
    if unknown:
        raise ValueError(f"unknown findings {unknown}; expected names from {PATHOLOGIES}")
    # The TB sign is an NIH painter's finding, drawn fainter (TB_SIGN_CONTRAST), unless the image also carries that
    # finding as an NIH label (no TB-set image does: it is never other disease)
    faint_sign = TB_SIGN if factors.tb and TB_SIGN not in factors.findings else None
    if factors.tb:
        factors = dataclasses.replace(factors, findings=factors.findings | {TB_SIGN})
    ch = _build_anatomy(key, shape, factors)
    layers = {}  # a boxed finding -> what its painter changed (for its bounding box)
    for name in PATHOLOGIES:
        if name in factors.findings and name in FINDING_PAINTERS:
            copied = name in BOX_FINDINGS or name == faint_sign
            before = (ch.lesions.copy(), ch.density.copy(), ch.air.copy()) if copied else None
            FINDING_PAINTERS[name](ch, ch.rng(name))
            if name == faint_sign:  # keep TB_SIGN_CONTRAST of the painter's change to each layer
                for layer, old in zip(("lesions", "density", "air"), before):
                    setattr(ch, layer, old + TB_SIGN_CONTRAST * (getattr(ch, layer) - old))
            if name in BOX_FINDINGS:
                layers[name] = (np.abs(ch.lesions - before[0]), np.abs(ch.density - before[1]) + np.abs(ch.air - before[2]))

    lungs_total = np.maximum(ch.lung_field[-1], ch.lung_field[1])
    boxes = {name: _bounding_box(lesion * lungs_total + other) for name, (lesion, other) in layers.items()}
    if "Cardiomegaly" in factors.findings:  # a change of geometry: the (enlarged) heart's silhouette
        boxes["Cardiomegaly"] = _bounding_box(ch.heart)
    vessels = _ridges(ch.canvas.noise(ch.rng("vessels"), 0.035), 0.14)
    density = ch.density + 0.1 * vessels * ch.vessel_weight * lungs_total * (1.0 - ch.heart)
    density -= (0.42 if "Emphysema" in factors.findings else 0.33) * ch.air
    density += ch.lesions * lungs_total * (1.0 - 0.6 * ch.heart)
    density += _bones(ch)
    density += _devices(ch)

    # Acquisition: exposure window, gamma, blur, noise.
    style = STYLES[factors.style]
    look = ch.rng("style")
    low = style.window_low + float(look.normal(0.0, 0.05))
    high = max(style.window_high + float(look.normal(0.0, 0.08)), low + 0.5)
    gamma = style.gamma * float(np.exp(look.normal(0.0, 0.2)))
    angle = float(look.uniform(0.0, 2.0 * np.pi))  # an exposure gradient (heel effect, tilted detector)
    density = density + float(look.uniform(0.0, 0.12)) * (math.cos(angle) * ch.canvas.u + math.sin(angle) * ch.canvas.v)
    blur = style.blur * float(look.uniform(0.7, 1.6))
    noise = style.noise_std * float(look.uniform(0.5, 2.5))
    image = np.clip((density - low) / (high - low), 0.0, 1.0) ** gamma
    image = _gaussian_blur(image, blur * ch.canvas.px_per_unit)
    image += noise * ch.rng("noise").standard_normal(ch.canvas.shape, dtype=np.float32)
    lung_mask = {side: ch.lung_field[side] * (1.0 - ch.heart) > 0.5 for side in (-1, 1)}
    return {"image": np.clip(image, 0.0, 1.0), "left_lung": lung_mask[1], "right_lung": lung_mask[-1],
            "boxes": {name: box for name, box in boxes.items() if box is not None}}


def _bounding_box(layer: np.ndarray, fraction: float = 0.25) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) in pixels of where `layer` exceeds `fraction` of its maximum (None when it is empty)."""
    peak = float(layer.max())
    if peak <= 1e-6:
        return None
    rows, cols = np.nonzero(layer > fraction * peak)
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)
