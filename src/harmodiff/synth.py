"""Synthetic traveling-subject cohort rendered from the MNI152 2009a maps shipped with nilearn.

Nothing is downloaded: the template, brain mask and GM/WM maps come from nilearn's package data.

* A **subject** is a smooth random warp of the template tissue maps plus two geometric changes,
  so tissue ratios differ between subjects in a way a segmentation can see: cortical atrophy
  (GM within `atrophy_mm` of CSF or the brain's edge becomes CSF) and a shift of the GM/WM
  boundary by `wm_shift_mm` (positive: WM grows into GM). A voxel-wise GM->CSF mixture was
  tried first: it reads as a darker cortex that Atropos still calls GM. The atrophy is the
  subject's age's (linear in `age_years`): a biological effect whose true size is known. A regional
  effect may come with it (`ventricle_growth_mm`): the lateral ventricles grow into the tissue around
  them, also linear in age, so the WM ratio falls with age too.
* A **site** (`site_model: contrast`) is a tissue contrast (CSF/GM/WM/skull/scalp intensities), a
  power-law intensity curve, blur, the amplitude of a smooth multiplicative bias field, Rician noise
  and a global intensity scale. Its intensities are close to one monotone function of another
  site's, which histogram matching inverts.
* With `site_model: tissue` a site is a scanner instead: a field strength (1.5 or 3 T) and an
  MPRAGE-like or SPGR-like sequence (TI, TR, inversion efficiency; TR, flip angle) that turns each
  voxel's T1 and proton density into signal, plus thicker slices along one axis, and the same blur,
  bias, noise and scale. T1 and PD vary inside a tissue class (deep gray matter against cortex, a
  front-to-back white-matter gradient, a smooth per-subject field), so two regions equal at one site
  differ at another and no global intensity curve maps one site onto another (`RELAXATION`,
  docs/decisions.md).
* A **scan** renders a subject's head (brain plus a synthetic CSF rim, skull and scalp, so skull
  stripping has work) at a site, in a random pose (rotation, shift) on a native grid with its
  own voxel size and axis order/orientation.

The training cohort has distinct subjects per site; the test cohort has traveling subjects, each
scanned at every test site (test sites are not training sites), as in SRPBS. A new site
(`new_sites`) is a scanner the model is not trained on: its own subjects' scans are target-only (cohort
`target`: a site token is learned from them, `harmodiff.sites`), and the traveling subjects' truth is
rendered at it as at every training site. Each traveling
subject also has a study site (`study_site`): the one scan a pooled study would have of it, older
subjects more often at later sites, so that a study's site and age are partly confounded. Ground truth is
written beside the scans: per subject the MNI-space brain mask and tissue maps and the true
tissue volumes, per scan the site parameters, the native-space brain mask and the
scanner-to-MNI affine. Every random draw comes from a generator seeded by (seed, kind, index),
so the same seed gives the same bytes whatever order things are rendered in.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from harmodiff.config import SyntheticCohort, add_setting_options, load_settings, setting
from harmodiff.io import one_line_errors, save_image, write_json, write_text

PAD_MM = 20.0  # room around the template brain for the synthetic CSF rim, skull and scalp
HEAD_LAYERS_MM = {"csf_rim": (0.0, 2.5), "skull": (2.5, 7.5), "scalp": (7.5, 12.5)}

# site_model tissue: of each compartment, T1 (ms) at 1.5 T and 3 T, proton density (water fraction) and T2*
# (ms) at 1.5 T and 3 T, inside the ranges measured in vivo (docs/decisions.md); between the two fields
# each relaxation time follows a power law
RELAXATION = {
    "csf": {"t1": (4300.0, 4300.0), "pd": 1.00, "t2s": (1000.0, 1000.0)},
    "gm": {"t1": (1150.0, 1500.0), "pd": 0.82, "t2s": (85.0, 55.0)},       # cortex
    "gm_deep": {"t1": (950.0, 1250.0), "pd": 0.78, "t2s": (55.0, 35.0)},   # basal ganglia, thalamus: iron
    "wm": {"t1": (750.0, 1000.0), "pd": 0.70, "t2s": (70.0, 50.0)},
    "scalp": {"t1": (350.0, 450.0), "pd": 0.50, "t2s": (60.0, 40.0)},      # subcutaneous fat
    "skull": {"t1": (300.0, 400.0), "pd": 0.08, "t2s": (2.0, 1.0)},        # cortical bone: little MR-visible water
}
DEEP_GM_MM = (8.0, 11.0)   # GM this near a basal ganglia or thalamus ROI centre is deep GM (a ramp between)
# the lateral ventricles (ventricle_growth_mm): CSF this deep inside the brain, in this MNI box (mm; x, y, z)
VENTRICLE_DEPTH_MM = 15.0
VENTRICLE_BOX_MM = ((-25.0, 25.0), (-40.0, 25.0), (-5.0, 30.0))
WM_T1_GRADIENT = 0.05      # WM T1 changes by this fraction per 70 mm from back to front
T1_FIELD_SD = 0.03         # sd of each subject's smooth multiplicative T1 field (GM and WM)
PD_FIELD_SD = 0.02         # ... and of its PD field, drawn apart from the T1 field


@dataclass(frozen=True)
class SynthConfig(SyntheticCohort):
    """The cohort a run renders: the workflow's settings (its base, config `cohort.synthetic`, with their
    defaults and rules) and the cohort's anatomy, which is this module's and not a workflow setting."""

    warp_mm: float = setting(2.0, "sd of the subject warp's control-point displacements (mm)", minimum=0)
    max_rotation_deg: float = setting(10.0, "largest rotation of a scan's head pose (degrees)", minimum=0)
    max_shift_mm: float = setting(10.0, "largest shift of a scan's head pose (mm)", minimum=0)
    atrophy_mm: tuple[float, float] = setting((0.0, 2.5), "range of the subjects' cortical atrophy (mm)", length=2)
    age_years: tuple[float, float] = setting((20.0, 80.0), "range of the subjects' ages: atrophy grows linearly "
                                             "with age from the first to the last end of atrophy_mm", length=2)
    study_site_sd: float = setting(0.5, "how loosely a traveling subject's study site follows its age (sd, in "
                                   "sites, around its age's place among the test sites)", minimum=0)
    wm_shift_mm: tuple[float, float] = setting((-1.5, 1.5), "range of the subjects' GM/WM boundary shift (mm)",
                                               length=2)


def _codes(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{chr(ord('A') + i)}" if i < 26 else f"{prefix}{i}" for i in range(n)]


def site_names(cfg: SynthConfig) -> tuple[list[str], list[str]]:
    """Training and test site codes (three letters, like SRPBS's)."""
    return _codes("TR", cfg.train_sites), _codes("TS", cfg.test_sites)


def new_site_names(cfg: SynthConfig) -> list[str]:
    """Codes of the scanners outside the training sites (`new_sites`): target-only scans."""
    return _codes("NS", cfg.new_sites)


def target_site_names(cfg: SynthConfig) -> list[str]:
    """The sites a traveling subject's truth is rendered at: the training sites, then the new ones."""
    return site_names(cfg)[0] + new_site_names(cfg)


def cohort_plan(cfg: SynthConfig) -> pd.DataFrame:
    """The scans the generator will write (no rendering): scan_id, subject, site, cohort, path.

    Paths are relative to the cohort folder. Snakemake uses this to know the scans before the
    generator has run.
    """
    train_sites, test_sites = site_names(cfg)
    rows = []
    k = 0
    for site in train_sites:
        for _ in range(cfg.train_subjects_per_site):
            k += 1
            subject = f"sub-tr{k:03d}"
            rows.append((subject, site, "train"))
    for j in range(cfg.test_subjects):
        subject = f"sub-ts{j + 1:02d}"
        for site in test_sites:
            rows.append((subject, site, "test"))
    # after every other subject: a cohort without new sites keeps its subjects' seeds and bytes
    k = 0
    for site in new_site_names(cfg):
        for _ in range(cfg.new_site_subjects):
            k += 1
            rows.append((f"sub-ns{k:03d}", site, "target"))
    df = pd.DataFrame(rows, columns=["subject", "site", "cohort"])
    df.insert(0, "scan_id", [f"{r.subject}_ses-{r.site}" for r in df.itertuples()])
    df["path"] = [f"raw/{r.cohort}/{r.site}/{r.scan_id}.nii.gz" for r in df.itertuples()]
    return df


# --------------------------------------------------------------------------------------------
# template on the render grid


@lru_cache(maxsize=4)
def _template_maps(spacing: float):
    """Template brain mask, GM and WM probability maps on the padded render grid."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = mask_img.get_fdata(dtype=np.float32)
    t_aff = mask_img.affine
    t_shape = np.array(mask.shape)
    extent = (t_shape - 1) * np.abs(np.diag(t_aff)[:3]) + 2 * PAD_MM
    shape = tuple(int(math.floor(e / spacing)) + 1 for e in extent)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = t_aff[:3, 3] - PAD_MM
    # render voxel -> template voxel
    to_template = np.linalg.inv(t_aff) @ affine
    maps = [_resample(m, to_template, shape, order=1) for m in (mask, gm, wm)]
    return affine, maps[0], maps[1], maps[2]


def deep_gm_centres() -> np.ndarray:
    """MNI coordinates (mm) of the basal ganglia and thalamus ROIs of Seitzman et al. 2018 (NeuroImage
    206:116290), the one subcortical atlas in nilearn's packaged data (its 300-ROI table; anatomical
    labels 5 and 6)."""
    from nilearn import datasets

    data = Path(datasets.__file__).parent / "data"
    coords = pd.read_csv(data / "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt", sep=r"\s+")
    labels = pd.read_csv(data / "seitzman_2018_ROIs_anatomicalLabels.txt", header=None, skiprows=1)[0]
    return coords.loc[labels.isin([5, 6]).to_numpy(), ["x", "y", "z"]].to_numpy(float)


@lru_cache(maxsize=4)
def _deep_gm_template(spacing: float) -> np.ndarray:
    """On the padded render grid: 1 within DEEP_GM_MM[0] of a deep-GM ROI centre, 0 beyond DEEP_GM_MM[1]."""
    affine, mask, _, _ = _template_maps(spacing)
    seeds = np.zeros(mask.shape, bool)
    voxels = np.rint((deep_gm_centres() - affine[:3, 3]) / spacing).astype(int)
    seeds[tuple(voxels.T)] = True
    distance = ndimage.distance_transform_edt(~seeds, sampling=spacing).astype(np.float32)
    lo, hi = DEEP_GM_MM
    return np.clip((hi - distance) / (hi - lo), 0, 1)


def _resample(volume: np.ndarray, vox_to_src: np.ndarray, shape, order=1, cval=0.0) -> np.ndarray:
    """Pull `volume` onto a grid of `shape`, given the output-voxel -> source-voxel affine."""
    return ndimage.affine_transform(
        volume, vox_to_src[:3, :3], offset=vox_to_src[:3, 3], output_shape=tuple(shape),
        order=order, mode="constant", cval=cval, output=np.float32,
    )


def _smooth_field(rng: np.random.Generator, shape, spacing_mm: float, control_mm: float,
                  sd: float, n_components: int) -> np.ndarray:
    """A smooth random field: normal control points every `control_mm`, cubic upsampling."""
    ctrl = [max(2, int(math.ceil(n * spacing_mm / control_mm)) + 1) for n in shape]
    coeffs = rng.normal(0.0, sd, size=(n_components, *ctrl)).astype(np.float32)
    coords = np.meshgrid(*[np.linspace(0, c - 1, n, dtype=np.float32) for c, n in zip(ctrl, shape)],
                         indexing="ij", sparse=True)
    coords = np.broadcast_arrays(*coords)
    return np.stack([
        ndimage.map_coordinates(coeffs[k], coords, order=3, mode="nearest", output=np.float32)
        for k in range(n_components)
    ])


# --------------------------------------------------------------------------------------------
# subjects, sites, scans


def _remove_affine_part(disp: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Subtract the least-squares affine fit of the displacement over `region`.

    What remains is the subject's non-affine shape difference, so the truth "in MNI space" is
    what an ideal affine registration (the paper's preprocessing) would produce.
    """
    idx = np.argwhere(region)[::97].astype(np.float64)
    design = np.c_[idx, np.ones(len(idx))]
    values = np.stack([d[tuple(idx.astype(int).T)] for d in disp], axis=1)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)  # 4 x 3
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in region.shape], indexing="ij", sparse=True)
    out = np.empty_like(disp)
    for k in range(3):
        out[k] = disp[k] - (coef[0, k] * grids[0] + coef[1, k] * grids[1] + coef[2, k] * grids[2] + coef[3, k])
    return out


def subject_params(cfg: SynthConfig, subject_index: int) -> dict:
    """A subject's age, the cortical atrophy it drives (linear: the planted biological effect, known
    exactly), its GM/WM boundary shift and its warp's seed."""
    rng = np.random.default_rng([cfg.seed, 1, subject_index])
    u = rng.random()  # = rng.uniform(*atrophy_mm)'s draw: cohorts rendered before ages existed keep their bytes
    (a0, a1), (y0, y1) = cfg.atrophy_mm, cfg.age_years
    v0, v1 = cfg.ventricle_growth_mm
    return {"age": float(y0 + (y1 - y0) * u), "atrophy_mm": float(a0 + (a1 - a0) * u),
            "wm_shift_mm": float(rng.uniform(*cfg.wm_shift_mm)), "warp_seed": int(rng.integers(2**31)),
            "ventricle_growth_mm": float(v0 + (v1 - v0) * u)}


def study_site(cfg: SynthConfig, subject_index: int, age: float, sites: list[str]) -> str:
    """The one site a pooled study scanned this traveling subject at: older subjects more often at the
    later sites (the site's place follows the age's place in `age_years`, plus a normal draw of sd
    `study_site_sd`), so that site and age are partly confounded, as in pooled studies."""
    rng = np.random.default_rng([cfg.seed, 6, subject_index])
    (y0, y1) = cfg.age_years
    place = (len(sites) - 1) * (age - y0) / (y1 - y0) + rng.normal(0.0, cfg.study_site_sd)
    return sites[int(np.clip(np.rint(place), 0, len(sites) - 1))]


def _ramp(x: np.ndarray, soft_mm: float = 1.5) -> np.ndarray:
    """Soft step 0 -> 1 around x = 0 (width `soft_mm`): smooth boundaries, no staircase."""
    return np.clip(x / soft_mm + 0.5, 0, 1).astype(np.float32)


def _reshape_tissues(p_gm, p_wm, p_csf, brain_mask, spacing, atrophy_mm, wm_shift_mm):
    """Move whole-voxel tissue across the GM/WM and GM/CSF boundaries (geometric, not mixed).

    Distances are measured from the region's boundary, half a voxel from the centres that
    `distance_transform_edt` measures to.
    """
    half = 0.5 * spacing
    wm_region = p_wm > 0.5
    if wm_shift_mm > 0:  # GM voxels within wm_shift_mm outside the WM become WM
        d = ndimage.distance_transform_edt(~wm_region, sampling=spacing) - half
        w = _ramp(wm_shift_mm - d) * ~wm_region
        p_wm, p_gm = p_wm + w * p_gm, (1 - w) * p_gm
    elif wm_shift_mm < 0:  # WM within |wm_shift_mm| inside its boundary becomes GM
        d = ndimage.distance_transform_edt(wm_region, sampling=spacing) - half
        w = _ramp(-wm_shift_mm - d) * wm_region
        p_gm, p_wm = p_gm + w * p_wm, (1 - w) * p_wm
    # atrophy: GM nearest to sulcal CSF or to the brain's edge becomes CSF
    d = ndimage.distance_transform_edt(~((p_csf > 0.5) | ~brain_mask), sampling=spacing) - half
    w = _ramp(atrophy_mm - d)
    return (1 - w) * p_gm, p_wm, p_csf + w * p_gm


def lateral_ventricles(p_csf: np.ndarray, brain_mask: np.ndarray, affine: np.ndarray, spacing: float) -> np.ndarray:
    """The lateral ventricles of a subject: the largest connected piece of CSF (p > 0.5) deeper than
    VENTRICLE_DEPTH_MM inside the brain and inside VENTRICLE_BOX_MM (MNI), which keeps the deep sulci and
    the interhemispheric fissure out (about 30 ml on the MNI152 maps)."""
    depth = ndimage.distance_transform_edt(brain_mask, sampling=spacing)
    candidate = (p_csf > 0.5) & (depth > VENTRICLE_DEPTH_MM)
    for axis, (lo, hi) in enumerate(VENTRICLE_BOX_MM):
        mm = affine[axis, 3] + spacing * np.arange(p_csf.shape[axis])
        inside = (mm > lo) & (mm < hi)
        candidate &= inside.reshape([-1 if k == axis else 1 for k in range(3)])
    labels, n = ndimage.label(candidate)
    if n == 0:
        raise ValueError("no lateral ventricles found in the subject's CSF map")
    sizes = ndimage.sum(candidate, labels, range(1, n + 1))
    return labels == int(np.argmax(sizes)) + 1


def _grow_ventricles(p_gm, p_wm, p_csf, ventricles, spacing, growth_mm):
    """Tissue (GM and WM) within `growth_mm` of the ventricles becomes CSF: age's regional effect."""
    d = ndimage.distance_transform_edt(~ventricles, sampling=spacing) - 0.5 * spacing
    w = _ramp(growth_mm - d) * ~ventricles
    return (1 - w) * p_gm, (1 - w) * p_wm, p_csf + w * (p_gm + p_wm)


def render_subject(cfg: SynthConfig, subject_index: int) -> dict:
    """Tissue probability maps of one subject in MNI space (render grid)."""
    affine, mask, gm, wm = _template_maps(cfg.render_spacing)
    params = subject_params(cfg, subject_index)
    rng = np.random.default_rng(params["warp_seed"])
    s = cfg.render_spacing
    disp = _smooth_field(rng, mask.shape, s, 40.0, cfg.warp_mm / s, 3)  # in voxels
    disp = _remove_affine_part(disp, mask > 0.5)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mask.shape], indexing="ij", sparse=True)
    coords = [g + d for g, d in zip(grid, disp)]
    del disp

    def warp(v):
        return ndimage.map_coordinates(v, coords, order=1, mode="constant", output=np.float32)

    brain, gm_w, wm_w = warp(mask), warp(gm), warp(wm)
    deep = warp(_deep_gm_template(s))  # where the tissue model puts deep GM (the benchmarks score it for both)
    brain = np.clip(brain, 0, 1)
    total = np.maximum(gm_w + wm_w, 1.0)
    p_gm = np.clip(gm_w, 0, None) * brain / total
    p_wm = np.clip(wm_w, 0, None) * brain / total
    p_csf = np.clip(brain - p_gm - p_wm, 0, 1)
    brain_mask = brain > 0.5
    p_gm, p_wm, p_csf = _reshape_tissues(p_gm, p_wm, p_csf, brain_mask, s, params["atrophy_mm"],
                                         params["wm_shift_mm"])
    if params["ventricle_growth_mm"] > 0:  # only then: a cohort without it keeps its bytes
        ventricles = lateral_ventricles(p_csf, brain_mask, affine, s)
        p_gm, p_wm, p_csf = _grow_ventricles(p_gm, p_wm, p_csf, ventricles, s, params["ventricle_growth_mm"])
    outside_mm = ndimage.distance_transform_edt(~brain_mask, sampling=s).astype(np.float32)
    return {
        "affine": affine, "brain": brain, "brain_mask": brain_mask,
        "gm": p_gm, "wm": p_wm, "csf": p_csf, "outside_mm": outside_mm, **params,
        "index": subject_index, "seed": cfg.seed, "deep_gm": deep,
    }


def nominal(name: str, quantity: str, field_t: float) -> float:
    """RELAXATION's T1 or T2* ("t1", "t2s") of a compartment at a field strength (ms), a power law
    through its 1.5 T and 3 T values."""
    lo, hi = RELAXATION[name][quantity]
    return lo * (hi / lo) ** (math.log(field_t / 1.5) / math.log(2.0))


def tissue_properties(subject: dict, field_t: float) -> dict[str, dict]:
    """Each compartment's T1 (ms), proton density and T2* (ms) in a subject at a field strength (each a
    map or a number).

    Deep GM (the subject's GM near the basal ganglia and thalamus ROIs, `deep_gm_centres`, warped with
    its anatomy) has its own T1, PD and T2*; WM T1 follows a back-to-front gradient; GM and WM share a
    smooth per-subject T1 field and, drawn apart, a PD field. All of it is the subject's, the same at
    every site."""
    shape, s = subject["brain"].shape, subject["affine"][0, 0]
    deep = subject["deep_gm"]
    rng = np.random.default_rng([subject["seed"], 6, subject["index"]])
    t1_field, pd_field = np.exp(_smooth_field(rng, shape, s, 40.0, 1.0, 2) * np.array(
        [T1_FIELD_SD, PD_FIELD_SD], np.float32)[:, None, None, None])
    y_mm = subject["affine"][1, 1] * np.arange(shape[1], dtype=np.float32) + subject["affine"][1, 3]
    gradient = (1.0 + WM_T1_GRADIENT * y_mm / 70.0)[None, :, None]
    props = {name: {"t1": nominal(name, "t1", field_t), "pd": RELAXATION[name]["pd"],
                    "t2s": nominal(name, "t2s", field_t)} for name in RELAXATION}
    cortex, deep_gm = props.pop("gm"), props.pop("gm_deep")
    props["gm"] = {k: ((1 - deep) * cortex[k] + deep * deep_gm[k]) for k in ("t1", "pd", "t2s")}
    props["gm"]["t1"], props["gm"]["pd"] = props["gm"]["t1"] * t1_field, props["gm"]["pd"] * pd_field
    props["wm"] = {**props["wm"], "t1": props["wm"]["t1"] * gradient * t1_field, "pd": props["wm"]["pd"] * pd_field}
    return props


def sequence_signal(t1_ms, pd, sequence: dict, t2s_ms=None):
    """Magnitude signal of a tissue (T1 in ms, proton density; T2* in ms when the sequence has an echo
    time te_ms: times e^(-TE/T2*)) under a sequence.

    mprage: inversion recovery read at TI with repetition TR and inversion efficiency eta,
    PD |1 - (1 + eta) e^(-TI/T1) + eta e^(-TR/T1)| (the readout train's own saturation ignored).
    spgr: spoiled gradient echo, PD sin(a) (1 - E1) / (1 - cos(a) E1), E1 = e^(-TR/T1).
    """
    t1 = np.asarray(t1_ms, np.float32)
    if sequence["family"] == "mprage":
        e_ti, e_tr = np.exp(-sequence["ti_ms"] / t1), np.exp(-sequence["tr_ms"] / t1)
        eta = sequence["inversion_efficiency"]
        signal = pd * np.abs(1.0 - (1.0 + eta) * e_ti + eta * e_tr)
    elif sequence["family"] == "spgr":
        e1, a = np.exp(-sequence["tr_ms"] / t1), math.radians(sequence["flip_deg"])
        signal = pd * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1)
    else:
        raise ValueError(f"unknown sequence family {sequence['family']!r}")
    if t2s_ms is not None and "te_ms" in sequence:
        signal = signal * np.exp(-sequence["te_ms"] / np.asarray(t2s_ms, np.float32))
    return signal


def site_params(cfg: SynthConfig, site: str, site_index: int) -> dict:
    rng = np.random.default_rng([cfg.seed, 2, site_index])
    params = {
        "site": site,
        "contrast": {
            "csf": float(rng.uniform(0.12, 0.40)),
            "gm": float(rng.uniform(0.48, 0.70)),
            "wm": float(rng.uniform(0.82, 1.00)),
            "skull": float(rng.uniform(0.02, 0.10)),
            "scalp": float(rng.uniform(0.70, 1.10)),
        },
        "gamma": float(np.exp(rng.uniform(-0.35, 0.35))),
        "blur_mm": float(rng.uniform(0.0, 1.0)),
        "bias_sd": float(rng.uniform(0.03, 0.10)),
        "noise": float(rng.uniform(0.01, 0.035)),
        "scale": float(rng.uniform(300.0, 3000.0)),
        "spacing_mm": float(rng.uniform(*cfg.native_spacing)),
    }
    if cfg.site_model == "tissue":  # its own stream: the contrast model's draws stay as they were
        params.update(scanner_params(np.random.default_rng([cfg.seed, 5, site_index])))
    return params


def scanner_params(rng: np.random.Generator) -> dict:
    """A scanner of the tissue site model: field, sequence, and thicker slices along one voxel axis.
    The ranges are those of common T1-weighted protocols (docs/decisions.md)."""
    field = float(rng.choice([1.5, 3.0]))
    if rng.uniform() < 0.7:
        sequence = {"family": "mprage", "ti_ms": float(rng.uniform(800.0, 1100.0)),
                    "tr_ms": float(rng.uniform(1900.0, 2500.0)), "inversion_efficiency": float(rng.uniform(0.85, 0.98)),
                    "te_ms": float(rng.uniform(2.0, 4.5))}
    else:
        sequence = {"family": "spgr", "tr_ms": float(rng.uniform(15.0, 30.0)), "flip_deg": float(rng.uniform(25.0, 40.0)),
                    "te_ms": float(rng.uniform(3.0, 9.0))}
    return {"model": "tissue", "field_t": field, "sequence": sequence, "slice_axis": int(rng.integers(3)),
            "slice_factor": float(rng.uniform(1.0, 1.6))}


def wm_level(site: dict) -> float:
    """The white matter's intensity at a site before its scale (what the noise is relative to)."""
    return 1.0 if site.get("model") == "tissue" else site["contrast"]["wm"]


def _layer_weight(outside_mm: np.ndarray, lo: float, hi: float, soft: float = 1.0) -> np.ndarray:
    """Soft indicator of lo < distance <= hi (ramps of width `soft` mm)."""
    up = np.clip((outside_mm - lo) / soft + 0.5, 0, 1)
    down = np.clip((hi - outside_mm) / soft + 0.5, 0, 1)
    return up * down


def render_site_mni(subject: dict, site: dict, spacing: float) -> np.ndarray:
    """Noise-free, bias-free image of a subject's head at a site, in MNI space (render grid)."""
    if site.get("model") == "tissue":
        field = site["field_t"]
        props = tissue_properties(subject, field)
        signal = {k: sequence_signal(p["t1"], p["pd"], site["sequence"], p["t2s"]) for k, p in props.items()}
        wm = sequence_signal(nominal("wm", "t1", field), RELAXATION["wm"]["pd"], site["sequence"],
                             nominal("wm", "t2s", field))
        c = {k: v / wm for k, v in signal.items()}  # nominal WM at 1
    else:
        c = site["contrast"]
    img = c["csf"] * subject["csf"] + c["gm"] * subject["gm"] + c["wm"] * subject["wm"]
    d = subject["outside_mm"]
    outside = ~subject["brain_mask"]
    for layer, key in (("csf_rim", "csf"), ("skull", "skull"), ("scalp", "scalp")):
        lo, hi = HEAD_LAYERS_MM[layer]
        img += outside * c[key] * _layer_weight(d, max(lo, 1e-3), hi)
    if site.get("model") != "tissue":  # the sequence is the tissue model's intensity curve
        img = np.power(np.clip(img, 0, None), site["gamma"], dtype=np.float32)
    if site["blur_mm"] > 0:
        img = ndimage.gaussian_filter(img, site["blur_mm"] / spacing / 2.355)  # FWHM -> sigma
    return img.astype(np.float32)


def scan_pose(cfg: SynthConfig, scan_index: int) -> dict:
    rng = np.random.default_rng([cfg.seed, 3, scan_index])
    angles = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3))
    shift = rng.uniform(-cfg.max_shift_mm, cfg.max_shift_mm, 3)
    perm = rng.permutation(3)
    flips = rng.choice([-1.0, 1.0], size=3)
    return {"angles": angles, "shift": shift, "perm": perm, "flips": flips,
            "bias_seed": int(rng.integers(2**31)), "noise_seed": int(rng.integers(2**31))}


def _rotation(angles) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def native_grid(pose: dict, spacing_mm, head_box_mni: np.ndarray):
    """Scanner-to-MNI rigid transform and the native voxel grid (affine, shape) covering the head;
    `spacing_mm` is one voxel size or one per voxel axis."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, float), (3,))
    scan_to_mni = np.eye(4)
    scan_to_mni[:3, :3] = _rotation(pose["angles"])
    scan_to_mni[:3, 3] = pose["shift"]
    mni_to_scan = np.linalg.inv(scan_to_mni)
    corners = np.array([[x, y, z, 1.0] for x in head_box_mni[:, 0] for y in head_box_mni[:, 1]
                        for z in head_box_mni[:, 2]])
    pts = (mni_to_scan @ corners.T).T[:, :3]
    lo, hi = pts.min(0) - 4.0, pts.max(0) + 4.0
    vox = np.zeros((4, 4))
    vox[3, 3] = 1.0
    shape = []
    for j in range(3):  # voxel axis j runs along scanner axis perm[j], in direction flips[j]
        a, sgn = int(pose["perm"][j]), float(pose["flips"][j])
        vox[a, j] = sgn * spacing[j]
        vox[a, 3] = lo[a] if sgn > 0 else hi[a]
        shape.append(int(math.ceil((hi[a] - lo[a]) / spacing[j])) + 1)
    return scan_to_mni, vox, tuple(shape)


def voxel_sizes(site: dict) -> tuple[float, float, float]:
    """A site's voxel size along each native axis: thicker slices along its slice axis (tissue model)."""
    sizes = [site["spacing_mm"]] * 3
    if "slice_axis" in site:
        sizes[site["slice_axis"]] *= site["slice_factor"]
    return tuple(sizes)


def _shift(axis: int, voxels: float) -> np.ndarray:
    shift = np.eye(4)
    shift[axis, 3] = voxels
    return shift


def render_scan(cfg: SynthConfig, subject: dict, site: dict, scan_index: int):
    """Render one scan.

    Returns (image, native affine, native brain mask, scan_to_mni, pose, noise-free MNI render).
    """
    s = cfg.render_spacing
    pose = scan_pose(cfg, scan_index)
    mni_img = render_site_mni(subject, site, s)
    head = subject["outside_mm"] <= HEAD_LAYERS_MM["scalp"][1] + 1.0
    idx = np.argwhere(head)
    box_vox = np.stack([idx.min(0), idx.max(0)]).astype(float)
    box_mni = (subject["affine"][:3, :3] @ box_vox.T).T + subject["affine"][:3, 3]
    scan_to_mni, vox, shape = native_grid(pose, voxel_sizes(site), box_mni)
    native_to_render = np.linalg.inv(subject["affine"]) @ scan_to_mni @ vox
    if "slice_axis" in site:  # a slice as thick as its spacing: the mean over it (a box profile, 3 samples)
        image = np.mean([_resample(mni_img, native_to_render @ _shift(site["slice_axis"], o), shape, order=1)
                         for o in (-1 / 3, 0.0, 1 / 3)], axis=0)
    else:
        image = _resample(mni_img, native_to_render, shape, order=1)
    brain = _resample(subject["brain"], native_to_render, shape, order=1) > 0.5
    rng_b = np.random.default_rng(pose["bias_seed"])
    # control points every 100 mm: a head-scale field, like a receive-coil profile
    bias = np.exp(_smooth_field(rng_b, shape, site["spacing_mm"], 100.0, site["bias_sd"], 1)[0])
    image *= bias
    rng_n = np.random.default_rng(pose["noise_seed"])
    sd = site["noise"] * wm_level(site)
    n1 = rng_n.normal(0, sd, shape).astype(np.float32)
    n2 = rng_n.normal(0, sd, shape).astype(np.float32)
    image = np.sqrt((image + n1) ** 2 + n2 ** 2) * site["scale"]  # Rician magnitude
    return image.astype(np.float32), vox, brain, scan_to_mni, pose, mni_img


# --------------------------------------------------------------------------------------------
# the whole cohort


def native_brain_mask(outdir: str | Path, scan_id: str) -> Path:
    """The true brain mask of one scan on its own (native) grid, in a cohort written by `generate`."""
    return Path(outdir) / "truth" / "scans" / f"{scan_id}_brainmask.nii.gz"


def all_site_params(cfg: SynthConfig) -> dict:
    """Every site's parameters, seeded by its place among the training, the test, then the new sites."""
    train_sites, test_sites = site_names(cfg)
    return {name: site_params(cfg, name, i) for i, name in enumerate(train_sites + test_sites + new_site_names(cfg))}


def plan_subjects(plan: pd.DataFrame) -> list[str]:
    """The plan's subjects in order of first appearance (a subject is seeded by its place here)."""
    return list(dict.fromkeys(plan["subject"]))


def render_one_scan(cfg: SynthConfig, scan_id: str):
    """One scan of the cohort exactly as `generate` renders it (same seeds), without the rest:
    `render_scan`'s tuple."""
    plan = cohort_plan(cfg)
    row = plan.index[plan["scan_id"] == scan_id][0]
    subject = render_subject(cfg, plan_subjects(plan).index(plan.at[row, "subject"]))
    return render_scan(cfg, subject, all_site_params(cfg)[plan.at[row, "site"]], row)


def subject_volumes(subject: dict, voxel_ml: float) -> dict:
    """A rendered subject's true tissue volumes (ml) and ratios (of GM + WM + CSF)."""
    vols = {f"{t}_ml": float(subject[t].astype(np.float64).sum() * voxel_ml) for t in ("gm", "wm", "csf")}
    total = sum(vols.values())
    return vols | {f"{t}_ratio": vols[f"{t}_ml"] / total for t in ("gm", "wm", "csf")}


def generate(outdir: str | Path, cfg: SynthConfig, progress: bool = True) -> pd.DataFrame:
    """Render the cohort into `outdir`; returns the scan sheet (also written as scans.tsv).

    Layout: raw/{cohort}/{site}/{scan_id}.nii.gz, truth/subjects/{subject}_{mask,gm,wm,csf}.nii.gz
    (MNI space), truth/scans/{scan_id}_brainmask.nii.gz (native), truth/rendered/{scan_id}.nii.gz
    (the scan's noise- and bias-free brain in MNI space), truth/at_site/{site}/{subject}.nii.gz
    (each traveling subject's noise-free brain at each training and new site: the ideal harmonization
    to that target), truth/subjects.tsv (cohort, age, study_site, true volumes and ratios),
    truth/scans.tsv, truth/sites.json, truth/config.json, scans.tsv.
    """
    from tqdm import tqdm

    out = Path(outdir)
    plan = cohort_plan(cfg)
    test_sites = site_names(cfg)[1]
    sites, subjects = all_site_params(cfg), plan_subjects(plan)
    subj_rows, scan_rows = [], []
    voxel_ml = cfg.render_spacing ** 3 / 1000.0
    bar = tqdm(total=len(plan), desc="synthetic scans", disable=not progress)
    for si, subject_id in enumerate(subjects):
        subject = render_subject(cfg, si)
        aff = subject["affine"]
        tdir = out / "truth" / "subjects"
        save_image(subject["brain_mask"], aff, tdir / f"{subject_id}_mask.nii.gz", dtype=np.uint8)
        for tissue in ("gm", "wm", "csf"):
            save_image(subject[tissue], aff, tdir / f"{subject_id}_{tissue}.nii.gz")
        own = plan[plan["subject"] == subject_id]
        cohort = own["cohort"].iloc[0]
        study = study_site(cfg, si, subject["age"], test_sites) if cohort == "test" else own["site"].iloc[0]
        subj_rows.append({"subject": subject_id, "cohort": cohort, "age": subject["age"], "study_site": study,
                          **subject_volumes(subject, voxel_ml), "atrophy_mm": subject["atrophy_mm"],
                          "wm_shift_mm": subject["wm_shift_mm"], "ventricle_growth_mm": subject["ventricle_growth_mm"]})
        for row in plan[plan["subject"] == subject_id].itertuples():
            image, vox, brain, scan_to_mni, pose, mni_img = render_scan(cfg, subject, sites[row.site], row.Index)
            save_image(image, vox, out / row.path)
            # what the preprocessed scan should look like: the noise-free brain in MNI space
            save_image(mni_img * subject["brain_mask"], aff, out / "truth" / "rendered" / f"{row.scan_id}.nii.gz")
            save_image(brain, vox, native_brain_mask(out, row.scan_id), dtype=np.uint8)
            scan_rows.append({
                "scan_id": row.scan_id, "subject": subject_id, "site": row.site, "cohort": row.cohort,
                "shape": json.dumps(list(image.shape)),
                "spacing_mm": sites[row.site]["spacing_mm"],
                "voxel_mm": json.dumps([round(v, 6) for v in voxel_sizes(sites[row.site])]),
                "axis_perm": json.dumps([int(p) for p in pose["perm"]]),
                "axis_flips": json.dumps([int(f) for f in pose["flips"]]),
                "scan_to_mni": json.dumps(np.round(scan_to_mni, 10).tolist()),
            })
            bar.update(1)
        if (plan[plan["subject"] == subject_id]["cohort"] == "test").any():
            # what a perfect harmonization of this subject to each possible target looks like
            for site in target_site_names(cfg):
                img = render_site_mni(subject, sites[site], cfg.render_spacing) * subject["brain_mask"]
                save_image(img, aff, out / "truth" / "at_site" / site / f"{subject_id}.nii.gz")
    bar.close()
    tdir = out / "truth"
    write_text(pd.DataFrame(subj_rows).to_csv(sep="\t", index=False, float_format="%.6f"), tdir / "subjects.tsv")
    write_text(pd.DataFrame(scan_rows).to_csv(sep="\t", index=False, float_format="%.6f"), tdir / "scans.tsv")
    write_json(sites, tdir / "sites.json")
    write_json({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}, tdir / "config.json")
    sheet = plan[["scan_id", "subject", "site", "cohort", "path"]]
    write_text(sheet.to_csv(sep="\t", index=False), out / "scans.tsv")
    return sheet


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.synth", description=__doc__.split("\n")[0])
    p.add_argument("outdir", help="folder to write the cohort into")
    p.add_argument("--config", help="settings file (its cohort.synthetic section: the workflow's "
                   "results/config/synth.yaml, or a workflow config); the options below override it")
    add_setting_options(p, SynthConfig)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cfg = load_settings(SynthConfig, a.config, a)
    sheet = generate(a.outdir, cfg, progress=not a.quiet)
    print(f"wrote {len(sheet)} scans to {a.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
