"""On a CUDA device, the same numbers as on the CPU: the EKF filter, the BPNN model (energy, forces, stress),
the fast BPNN label path with threshold selection, the n2p2 potential, the model errors and pressure bias
(``ekf-plugin errors``), and the i-PI client with ``--device cuda``
against a real i-PI server.

Skipped without a GPU (this project's CI has none); ``scripts/device_check.sh`` runs them on a lent device."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (scripts/device_check.sh runs these on a lent GPU)")
GPU = "cuda"  # the device under test (a dry run of this file on the CPU sets "cpu")


def test_ekf_updates_on_cuda_equal_the_cpu_ones():
    """Ten EKF updates of a small float64 network (autograd Jacobians, dense P) on CUDA and on the CPU."""
    from ekf_plugin.optim import EKF

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
            for _ in range(10)]
    weights = {}
    for key, device in (("cpu", "cpu"), ("gpu", GPU)):
        model = copy.deepcopy(net).to(device)
        opt = EKF(model.parameters(), lr=1e-2)
        for x, y in data:
            x, y = x.to(device), y.to(device)
            opt.step(lambda x=x, y=y, model=model: (model(x) - y).reshape(-1))  # ξ (15,)
        weights[key] = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    assert not torch.equal(weights["cpu"], torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    torch.testing.assert_close(weights["gpu"], weights["cpu"], rtol=1e-10, atol=1e-12)


def test_water_bpnn_energy_forces_stress_on_cuda_equal_the_cpu_ones():
    from ekf_plugin.demo import water_box
    from ekf_plugin.evaluation import ModelEvaluator
    from ekf_plugin.models import water_bpnn

    from tests.bpnn._systems import randomise_scaling

    model = water_bpnn(dtype=torch.float64, stress=True, seed=3)
    randomise_scaling(model)
    atoms = water_box(n_side=2, density=1.0, seed=3)
    res = {k: ModelEvaluator(copy.deepcopy(model), device=d, dtype=torch.float64)(
        atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc) for k, d in (("cpu", "cpu"), ("gpu", GPU))}
    assert res["gpu"].energy == pytest.approx(res["cpu"].energy, rel=1e-12, abs=1e-10)
    np.testing.assert_allclose(res["gpu"].forces, res["cpu"].forces, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res["gpu"].stress, res["cpu"].stress, rtol=1e-9, atol=1e-12)
    assert np.abs(res["cpu"].forces).max() > 1e-3


def test_fast_labels_with_threshold_selection_on_cuda_equal_the_cpu_ones():
    """The study's schedule through the BPNN label predictor (cached features, closed-form rows, threshold
    selection of the force labels), six EKF updates on each device: the same ξ and weights."""
    from ekf_plugin.models import water_bpnn
    from ekf_plugin.optim import EKF
    from ekf_plugin.training import PaperScheduleTask
    from ekf_plugin.training.schedule import draw_kinds

    from tests.bpnn._systems import converter, randomise_scaling, water_cluster, water_pair
    from tests.training._toy import outputs

    model = water_bpnn(dtype=torch.float64, stress=False, seed=3)
    randomise_scaling(model)
    frames = [water_pair(seed=2), water_cluster(3, seed=2)]
    batch = converter(model)(frames)
    g = torch.Generator().manual_seed(2)
    batch["energy"] = torch.randn(2, generator=g, dtype=torch.float64)
    batch["forces"] = torch.randn(batch["_positions"].shape, generator=g, dtype=torch.float64)
    batch["_idx"] = torch.tensor([5, 9])
    xis, weights = {}, {}
    for key, device in (("cpu", "cpu"), ("gpu", GPU)):
        task = PaperScheduleTask(copy.deepcopy(model).to(device), outputs(), fast_labels=True, seed=4,
                                 force_selection="threshold", n_force_components=5)
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        opt = EKF(task.model.parameters(), lr=1e-2)
        xis[key] = []
        for _ in range(6):
            kinds = draw_kinds(2, 0.3, task.label_rng)
            xis[key].append(opt.step(lambda: task._errors(b, kinds, {}, opt.params)).cpu())
        weights[key] = torch.cat([p.detach().reshape(-1).cpu() for p in task.model.parameters()])
    for a, b in zip(xis["gpu"], xis["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(weights["gpu"], weights["cpu"], rtol=1e-9, atol=1e-11)


def test_n2p2_water_potential_on_cuda_equals_the_cpu(shared_data):
    from ekf_plugin.demo import water_box
    from ekf_plugin.evaluation import ModelEvaluator

    path = shared_data("n2p2-h2o-potentials", "H2O_RPBE-D3")
    atoms = water_box(n_side=4, density=1.0, seed=0)  # 192 atoms
    res = {k: ModelEvaluator(str(path), device=d, dtype=torch.float64)(
        atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc) for k, d in (("cpu", "cpu"), ("gpu", GPU))}
    assert res["gpu"].energy == pytest.approx(res["cpu"].energy, rel=1e-12, abs=1e-9)
    np.testing.assert_allclose(res["gpu"].forces, res["cpu"].forces, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(res["gpu"].stress, res["cpu"].stress, rtol=1e-8, atol=1e-11)


def test_ipi_client_on_cuda_runs_npt_and_its_first_step_equals_the_cpu_evaluation(tmp_path):
    from ekf_plugin.md.runner import IPIServer, read_properties

    from tests.md.test_ipi import Setup, check_step0

    s = Setup(tmp_path)
    with IPIServer(tmp_path, s.socket_xml(20, stride=1), socket_path=s.socket) as server:
        proc = s.client(extra=("--device", GPU))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert server.wait(60) == 0
    props = read_properties(tmp_path / "npt.out")
    assert props["step"][-1] == 20
    check_step0(props, s.direct(), abs(np.linalg.det(s.cell_ipi)))  # step 0 against the CPU evaluation


def test_model_errors_and_pressure_bias_on_cuda_equal_the_cpu_ones():
    """``ekf-plugin errors``' per-frame errors (ekf_plugin.model_errors) with the evaluator on CUDA: water boxes at
    four densities, labels from a second model, the same errors and pressure bias as on the CPU."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from ekf_plugin.demo import water_box
    from ekf_plugin.evaluation import ModelEvaluator
    from ekf_plugin.model_errors import error_summary, frame_errors
    from ekf_plugin.models import water_bpnn

    from tests.bpnn._systems import randomise_scaling

    model, reference = water_bpnn(dtype=torch.float64, seed=3), water_bpnn(dtype=torch.float64, seed=4)
    randomise_scaling(model), randomise_scaling(reference)
    ref = ModelEvaluator(reference, device="cpu")
    frames = []
    for k, density in enumerate((0.8, 0.9, 1.0, 1.1)):
        atoms = water_box(n_side=2, density=density, seed=k)
        r = ref(atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc)
        atoms.calc = SinglePointCalculator(atoms, energy=r.energy, forces=r.forces)
        frames.append(atoms)
    out = {k: error_summary(frame_errors(ModelEvaluator(copy.deepcopy(model), device=d), frames))
           for k, d in (("cpu", "cpu"), ("gpu", GPU))}
    for key in ("energy_rmse_meV_per_atom", "forces_rmse_meV_per_A", "pressure_bias_bar"):
        assert out["gpu"][key] == pytest.approx(out["cpu"][key], rel=1e-8, abs=1e-6), key
    assert out["cpu"]["forces_rmse_meV_per_A"] > 1.0  # two different models: real errors
