"""The trained revPBE0-D3 models committed under examples/water_revpbe0/models load, evaluate, and reproduce
the validation errors committed in examples/water_revpbe0/results/errors.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "water_revpbe0"
# The first 4 of the 280 validation frames (0-based indices into dataset_1400_au.extxyz) of the example's runs:
# val_idx of split.npz written by `spktrain experiment=water_bpnn_ekf +seed=0` on the 1400 frames, as in
# workflow.sh. Recomputed for this test and verified on all 280 frames: ekf_lr1e-3_s0 gives 3.1934364027719
# meV/atom and 198.455464188963 meV/Å (errors.json: 3.1934364027755, 198.4554641889632). All 280 frames take
# minutes on two cores, so the test uses these 4.
VALIDATION_SUBSET = [1111, 570, 454, 328]
# Per frame of VALIDATION_SUBSET: (E_model − E_DFT per atom in meV, force-component RMSE in meV/Å), float64,
# computed with ekf_plugin.evaluation.ModelEvaluator as examples/water_revpbe0/evaluate.py does.
PER_FRAME = {
    "ekf_lr1e-3_s0": [(-0.308223, 119.7549), (1.463321, 242.389), (0.741334, 141.0676), (-2.451111, 274.4905)],
    "ekf_lr1e-3_s1": [(-0.015017, 111.8467), (0.959086, 249.7986), (0.163622, 152.4625), (-1.824403, 269.6404)],
    "adam_lr1e-3_s0": [(-6.668641, 134.8255), (-22.746579, 253.7276), (4.134362, 173.3761), (-28.652723, 260.305)],
    "adam_lr1e-4_s0": [(1.546482, 202.1322), (-8.323013, 358.5915), (4.368908, 285.6665), (-15.595466, 398.8801)],
    "adam_lr1e-4_s1": [(-2.004642, 184.3706), (-22.465981, 336.4132), (7.324807, 346.0168), (-30.619697, 403.3973)],
}

MODELS = sorted((Path(__file__).resolve().parents[1] / "examples" / "water_revpbe0" / "models").glob("*.pt"))


def test_both_optimizers_are_committed():
    names = {p.stem.split("_")[0] for p in MODELS}
    assert {"ekf", "adam"} <= names


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_model_loads_safely_and_gives_finite_energy_forces_stress(path):
    import ekf_plugin
    from ekf_plugin.demo import water_box

    assert torch.load(path, weights_only=True)["format"]  # our format: no pickled code
    atoms = water_box(n_side=2, density=1.0, seed=3)
    atoms.calc = ekf_plugin.calculator(path)
    energy = atoms.get_potential_energy()  # eV
    forces = atoms.get_forces()  # eV/Å
    stress = atoms.get_stress()  # eV/Å³
    assert np.isfinite(energy) and forces.shape == (24, 3) and stress.shape == (6,)
    assert np.all(np.isfinite(forces)) and np.all(np.isfinite(stress))
    assert abs(forces.sum(axis=0)).max() < 1e-6 * max(1.0, abs(forces).max()) * 24  # Newton's third law


def test_errors_json_names_the_committed_models_and_the_validation_split():
    errors = json.loads((EXAMPLE / "results" / "errors.json").read_text())
    assert set(errors) == {p.stem for p in MODELS} == set(PER_FRAME)
    assert {row["frames"] for row in errors.values()} == {280}  # 20 % of 1400: the whole validation split


def test_models_reproduce_the_committed_errors_on_validation_frames():
    """Per-frame errors on the documented subset reproduce to float64 round-off, and agree with the committed
    280-frame RMSE: forces within 25 % (4 frames), energies rank EKF below every Adam run (as in errors.json)."""
    from tests.helpers import shared_data_path

    from ekf_plugin.data import read_frames
    from ekf_plugin.evaluation import ModelEvaluator

    source = shared_data_path("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    frames = read_frames(source, max_frames=max(VALIDATION_SUBSET) + 1)  # Bohr/Hartree -> Å/eV, validated
    errors = json.loads((EXAMPLE / "results" / "errors.json").read_text())
    subset_energy = {}
    for name, reference in PER_FRAME.items():
        evaluator = ModelEvaluator(str(EXAMPLE / "models" / f"{name}.pt"))
        got = []
        for k in VALIDATION_SUBSET:
            atoms = frames[k]
            res = evaluator(atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc)
            de = 1e3 * (res.energy - atoms.get_potential_energy()) / len(atoms)  # meV/atom
            f_rmse = 1e3 * float(np.sqrt(np.mean((res.forces - atoms.get_forces()) ** 2)))  # meV/Å
            got.append((de, f_rmse))
        np.testing.assert_allclose(got, reference, atol=2e-4, err_msg=name)
        e_rmse = float(np.sqrt(np.mean([g[0] ** 2 for g in got])))
        f_rmse = float(np.sqrt(np.mean([g[1] ** 2 for g in got])))
        assert f_rmse == pytest.approx(errors[name]["forces_rmse_meV_per_A"], rel=0.25), name
        subset_energy[name] = e_rmse
    ekf = [v for k, v in subset_energy.items() if k.startswith("ekf")]
    adam = [v for k, v in subset_energy.items() if k.startswith("adam")]
    assert max(ekf) < min(adam), subset_energy
    assert max(errors[k]["energy_rmse_meV_per_atom"] for k in errors if k.startswith("ekf")) < min(
        errors[k]["energy_rmse_meV_per_atom"] for k in errors if k.startswith("adam"))


# The longer EKF runs of sessions 4 and 5 (examples/water_revpbe0/models/session<k>, final weights of each run's
# checkpoints/last.ckpt; errors of all 280 validation frames in results/session<k>/errors.json), same 4 frames.
PER_FRAME_SESSIONS = {
    "session4": {
        "ekf_lr1e-3_s0": [(-0.074457, 88.8252), (3.382356, 193.6374), (-0.018262, 108.5196), (-3.099784, 222.023)],
        "ekf_lr1e-3_s0_ef0.1": [(0.222736, 71.8565), (3.266705, 147.127), (0.920987, 90.2806), (-1.340992, 197.0199)],
    },
    "session5": {  # ef0.1 seed 0 continued from 63 k to 216 k updates; seed 1 from scratch to 73 k
        "ekf_lr1e-3_s0_ef0.1": [(0.032731, 65.8576), (4.185519, 144.0907), (0.182387, 87.24), (-0.814181, 180.5514)],
        "ekf_lr1e-3_s1_ef0.1": [(-0.306789, 74.7086), (3.73264, 147.957), (0.385648, 85.4714), (-0.788918, 197.8167)],
    },
    "session6": {  # ef0.1 seeds 0 and 1 at the study's budget, 5 × 10⁵ updates
        "ekf_lr1e-3_s0_ef0.1": [(-0.137451, 64.7169), (4.698125, 145.6752), (0.214764, 83.5462), (-1.016594, 175.7613)],
        "ekf_lr1e-3_s1_ef0.1": [(-0.134696, 66.6535), (5.106815, 139.823), (0.293478, 79.0384), (-0.841483, 173.4905)],
    },
    "session7": {  # threshold selection of the force labels, seed 0, at 150 k updates (both targets met)
        "ekf_lr1e-3_s0_ef0.1_thr_150k": [(-0.208083, 62.6862), (4.138221, 133.9331), (1.125276, 78.9323),
                                         (-0.753959, 168.8253)],
        # Adam with the same schedule, seed and labels, after the same wall clock as ~76 k EKF updates
        "adam_lr1e-3_s0_ef0.1_thr_98k": [(11.923391, 88.2087), (18.738876, 187.81), (11.662409, 94.3354),
                                         (4.05655, 172.3866)],
        "adam_lr1e-3_s0_ef0.1_thr_190k": [(-49.145404, 79.9803), (-47.359474, 163.0606), (-48.566402, 84.4053),
                                          (-63.003101, 159.9401)],
    },
    "session8": {  # the same threshold-selection run at the study's budget, 5 × 10⁵ updates
        "ekf_lr1e-3_s0_ef0.1_thr_500k": [(-0.523995, 61.259), (5.342572, 134.5443), (0.896593, 75.5479),
                                         (-0.839498, 163.8854)],
        # Adam, same schedule, seed and labels, after 88 % of that EKF run's wall clock (side by side)
        "adam_lr1e-3_s0_ef0.1_thr_577k": [(39.520729, 80.0601), (30.90959, 138.7935), (41.328935, 95.7608),
                                          (20.722072, 140.8274)],
    },
    "session9": {  # that Adam run at the EKF run's whole wall clock (1.32 Adam updates per EKF update, measured)
        "adam_lr1e-3_s0_ef0.1_thr_659k": [(24.284872, 62.6638), (10.19511, 131.3722), (26.10599, 88.2621),
                                          (6.333658, 141.5726)],
    },
    "session10": {  # the threshold-selection EKF run's second seed at 300 k of its 500 k updates (still training)
        "ekf_lr1e-3_s1_ef0.1_thr_300k": [(0.090558, 65.3877), (5.135475, 133.4822), (1.021496, 79.9489),
                                         (-0.650881, 164.4501)],
    },
    "session11": {  # the third seed at 194 k updates (one session's wall clock), Adam η = 1e-4 at 265 k
        "ekf_lr1e-3_s2_ef0.1_thr_194k": [(-0.219402, 64.8871), (4.0695, 137.2121), (0.926922, 75.5696),
                                         (-0.824318, 166.2093)],
        "adam_lr1e-4_s0_ef0.1_thr_265k": [(-8.708036, 79.9899), (-7.949633, 150.3514), (-7.675712, 91.2722),
                                          (-20.614811, 170.0554)],
    },
    "session12": {  # Adam η = 1e-5, seed 0, at 117 k (copied during the run, for NPT) and 357 k updates (54 % of
        # the EKF run's wall clock, the session's end)
        "adam_lr1e-5_s0_ef0.1_thr_117k": [(6.236024, 167.6121), (-16.008418, 288.7196), (10.928943, 232.9321),
                                          (-22.319921, 344.2649)],
        "adam_lr1e-5_s0_ef0.1_thr_357k": [(1.179823, 115.5621), (-8.785979, 212.207), (5.370091, 141.3042),
                                          (-16.124852, 233.0744)],
    },
    "session13": {  # the EKF's second seed rerun from zero to the study's 500 k, Adam η = 1e-5 at the EKF run's
        # whole wall clock (the session-12 run resumed)
        "ekf_lr1e-3_s1_ef0.1_thr_500k": [(-0.207091, 63.2282), (5.625448, 123.3497), (1.150722, 72.4618),
                                         (-0.187695, 163.0349)],
        "adam_lr1e-5_s0_ef0.1_thr_659k": [(2.102476, 101.2922), (-3.535521, 185.6245), (5.469367, 119.6474),
                                          (-12.62148, 208.7301)],
    },
    "session17": {  # Adam η = 1e-4, seed 1, at 659 k updates
        "adam_lr1e-4_s1_ef0.1_thr_659k": [(-1.374163, 75.6459), (2.87163, 141.5174), (0.190167, 88.8598),
                                          (-7.859822, 162.2588)],
    },
    "session18": {  # the EKF's third seed rerun from zero to the study's 500 k
        "ekf_lr1e-3_s2_ef0.1_thr_500k": [(-0.230533, 60.3736), (4.656, 119.6963), (0.857203, 72.706),
                                         (-0.41759, 163.8861)],
    },
    "session19": {  # the session-17 Adam run continued to 1.05 M updates (an EKF run's wall clock, session 18)
        "adam_lr1e-4_s1_ef0.1_thr_1050k": [(-0.404693, 65.8732), (-4.397867, 137.9698), (2.875406, 76.2692),
                                           (-11.66871, 147.8699)],
    },
    "session20": {  # Adam η = 1e-3, seed 1, at 1.05 M updates (sessions 17–20)
        "adam_lr1e-3_s1_ef0.1_thr_1050k": [(18.774668, 61.3163), (23.657698, 125.3801), (19.402679, 67.2477),
                                           (11.23611, 138.3022)],
    },
    "session21": {  # Adam η = 1e-5, seed 1, at 1.05 M updates (sessions 18–21)
        "adam_lr1e-5_s1_ef0.1_thr_1050k": [(2.185474, 98.2106), (-3.731378, 178.4302), (6.494413, 110.351),
                                           (-12.306073, 191.2733)],
    },
    "session23": {  # Adam η = 1e-4 and η = 1e-5, seed 0, at 1.05 M updates (restarted in session 22)
        "adam_lr1e-4_s0_ef0.1_thr_1050k": [(12.864669, 65.5026), (1.284832, 138.5925), (16.090263, 77.0623),
                                           (-5.604197, 153.1964)],
        "adam_lr1e-5_s0_ef0.1_thr_1050k": [(-0.259847, 93.7357), (-4.716292, 171.0966), (3.096021, 107.8134),
                                           (-15.524627, 195.9982)],
    },
}


def _session_errors(session: str) -> dict:
    return json.loads((EXAMPLE / "results" / session / "errors.json").read_text())


@pytest.mark.parametrize("session", sorted(PER_FRAME_SESSIONS))
def test_session_models_reproduce_their_errors_and_load_safely(session):
    from tests.helpers import shared_data_path

    from ekf_plugin.data import read_frames
    from ekf_plugin.evaluation import ModelEvaluator

    folder, per_frame = EXAMPLE / "models" / session, PER_FRAME_SESSIONS[session]
    errors = _session_errors(session)
    assert set(errors) == {p.stem for p in folder.glob("*.pt")} == set(per_frame)
    frames = read_frames(shared_data_path("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz"),
                         max_frames=max(VALIDATION_SUBSET) + 1)
    for name, reference in per_frame.items():
        path = folder / f"{name}.pt"
        assert torch.load(path, weights_only=True)["format"]
        evaluator = ModelEvaluator(str(path))
        got = []
        for k in VALIDATION_SUBSET:
            atoms = frames[k]
            res = evaluator(atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc)
            got.append((1e3 * (res.energy - atoms.get_potential_energy()) / len(atoms),
                        1e3 * float(np.sqrt(np.mean((res.forces - atoms.get_forces()) ** 2)))))
        np.testing.assert_allclose(got, reference, atol=2e-4, err_msg=name)
        assert errors[name]["frames"] == 280 and errors[name]["kept"] == "last"
    if session == "session7":  # the docs' claim: both accuracy targets (RuNNer's 2.37 meV/atom, 119 meV/Å) met
        row, adam = errors["ekf_lr1e-3_s0_ef0.1_thr_150k"], errors["adam_lr1e-3_s0_ef0.1_thr_98k"]
        assert row["energy_rmse_meV_per_atom"] <= 2.37 and row["forces_rmse_meV_per_A"] <= 119.0
        assert adam["energy_rmse_meV_per_atom"] > 2.37 and adam["forces_rmse_meV_per_A"] > 119.0
    if session == "session8":  # both targets still met at 5 × 10⁵ updates, and forces better than at 150 k
        row, before = errors["ekf_lr1e-3_s0_ef0.1_thr_500k"], _session_errors("session7")["ekf_lr1e-3_s0_ef0.1_thr_150k"]
        assert row["energy_rmse_meV_per_atom"] <= 2.37 and row["forces_rmse_meV_per_A"] <= 119.0
        assert row["updates"] == 500000 > before["updates"]
        assert row["forces_rmse_meV_per_A"] < before["forces_rmse_meV_per_A"]
        adam = errors["adam_lr1e-3_s0_ef0.1_thr_577k"]  # at nearly equal wall clock, worse on both
        assert adam["energy_rmse_meV_per_atom"] > 2.37 and adam["forces_rmse_meV_per_A"] > 119.0
    if session == "session9":  # Adam at the EKF's wall clock: forces as good as the EKF's (113.2 vs 114.9 meV/Å),
        # energies 9× worse (20.2 vs 2.26 meV/atom), most of it one offset common to all frames
        adam, ekf = errors["adam_lr1e-3_s0_ef0.1_thr_659k"], _session_errors("session8")["ekf_lr1e-3_s0_ef0.1_thr_500k"]
        assert adam["updates"] == 659000 > _session_errors("session8")["adam_lr1e-3_s0_ef0.1_thr_577k"]["updates"]
        assert abs(adam["forces_rmse_meV_per_A"] / ekf["forces_rmse_meV_per_A"] - 1) < 0.03
        assert adam["energy_rmse_meV_per_atom"] > 5 * ekf["energy_rmse_meV_per_atom"]
    if session == "session10":  # seed 1 at 300 k: the force target met, within 2 % of seed 0's 500 k forces
        row, seed0 = errors["ekf_lr1e-3_s1_ef0.1_thr_300k"], _session_errors("session8")["ekf_lr1e-3_s0_ef0.1_thr_500k"]
        assert row["updates"] == 300000 and row["forces_rmse_meV_per_A"] <= 119.0
        assert abs(row["forces_rmse_meV_per_A"] / seed0["forces_rmse_meV_per_A"] - 1) < 0.02
    if session == "session13":  # the second seed at 500 k meets the force target, the energy target is missed by
        # one frame (see test_example_analysis); Adam η = 1e-5 at the same wall clock is worse on both
        row, adam = errors["ekf_lr1e-3_s1_ef0.1_thr_500k"], errors["adam_lr1e-5_s0_ef0.1_thr_659k"]
        assert row["updates"] == 500000 and row["forces_rmse_meV_per_A"] <= 119.0
        assert adam["updates"] == 659000 and adam["forces_rmse_meV_per_A"] > 1.4 * row["forces_rmse_meV_per_A"]
        assert adam["energy_rmse_meV_per_atom"] > 3 * row["energy_rmse_meV_per_atom"]
    if session == "session4":  # the force-heavy schedule (one energy update in ten) is the more accurate force model
        assert errors["ekf_lr1e-3_s0_ef0.1"]["forces_rmse_meV_per_A"] < errors["ekf_lr1e-3_s0"]["forces_rmse_meV_per_A"]
    if session in ("session5", "session6"):  # the same run further on has a lower force error on all 280 frames
        earlier = {"session5": "session4", "session6": "session5"}[session]
        before, after = _session_errors(earlier)["ekf_lr1e-3_s0_ef0.1"], errors["ekf_lr1e-3_s0_ef0.1"]
        assert after["updates"] > before["updates"]
        assert after["forces_rmse_meV_per_A"] < before["forces_rmse_meV_per_A"]
        if session == "session5":  # 63 k → 216 k: the energy error fell too (216 k → 500 k: 2.34 → 2.35, flat)
            assert after["energy_rmse_meV_per_atom"] < before["energy_rmse_meV_per_atom"]
