"""The Fisher spectrum equals eigvalsh of the dense empirical L1 Fisher, whichever route computes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekf_plugin.fisher import FisherSpectrum, GramAccumulator, LabelSet, fisher_spectrum, sample_labels, summarize
from ekf_plugin.fisher.compute import default_collate
from tests.fisher._tiny import cu_frames, structures, tiny_model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    frames = cu_frames(40, seed=3)
    model = tiny_model(n_atom_basis=1, n_hidden=2, n_rbf=2, seed=1)  # 117 weights, float64
    return model, frames, structures(frames)


def dense_fisher(model, structs, labels: LabelSet, per_atom: bool = True):
    """F = (1/N) Σ ∇|e_i| ∇|e_i|ᵀ with one scalar backward of the L1 loss per label (no Jacobian code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    model.train()  # SchNetPack's Forces keeps the graph (create_graph=self.training)
    try:
        for s, c in zip(labels.structure.tolist(), labels.component.tolist()):
            batch = default_collate([structs[s]])
            target_e, target_f = batch["energy"].clone(), batch["forces"].clone()
            out = model(dict(batch))
            if c < 0:
                e = out["energy"][0] - target_e[0]
                if per_atom:
                    e = e / batch["_n_atoms"][0]
            else:
                e = out["forces"].reshape(-1)[c] - target_f.reshape(-1)[c]
            g = torch.autograd.grad(e.abs(), params, allow_unused=True)  # force labels ignore output biases
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)]))
    finally:
        model.eval()
    G = torch.stack(grads)  # (N, n)
    return (G.T @ G / len(grads)).numpy()  # (n, n)


def top(eigs: np.ndarray, k: int) -> np.ndarray:
    return np.sort(eigs)[::-1][:k]


@pytest.mark.parametrize("n_labels", [30, 160])  # N < n (JJᵀ route) and N > n = 117 (JᵀJ route)
def test_spectrum_equals_dense_eigvalsh(setup, n_labels):
    model, frames, structs = setup
    labels = sample_labels(len(frames), lambda s: len(frames[s]), n_labels, "both", seed=2, energy_fraction=0.2,
                           forces_per_structure=12)
    spec = fisher_spectrum(model, structs, labels)
    n = spec.n_weights
    assert spec.method == ("JJt" if n_labels <= n else "JtJ")
    for group, sub in (("all", labels), ("energy", _only(labels, True)), ("forces", _only(labels, False))):
        ref = np.linalg.eigvalsh(dense_fisher(model, structs, sub))
        k = min(len(sub), n)
        assert spec.eigenvalues[group].shape == (k,)
        np.testing.assert_allclose(spec.eigenvalues[group], top(ref, k), rtol=1e-7, atol=1e-10 * ref.max())


def _only(labels: LabelSet, energy: bool) -> LabelSet:
    keep = (labels.component < 0) if energy else (labels.component >= 0)
    return LabelSet(labels.structure[keep], labels.component[keep])


@pytest.mark.parametrize("kind", ["energy", "forces", "both"])
def test_jjt_and_jtj_routes_agree(setup, kind):
    model, frames, structs = setup
    labels = sample_labels(len(frames), lambda s: len(frames[s]), 36, kind, seed=5)
    a = fisher_spectrum(model, structs, labels, method="JJt")
    b = fisher_spectrum(model, structs, labels, method="JtJ")
    assert (a.method, b.method) == ("JJt", "JtJ")
    assert set(a.eigenvalues) == set(b.eigenvalues)
    for g in a.eigenvalues:
        scale = a.eigenvalues[g].max()
        np.testing.assert_allclose(a.eigenvalues[g], b.eigenvalues[g], rtol=1e-7, atol=1e-11 * scale)


def test_invariant_to_label_order_batching_and_chunking(setup):
    model, frames, structs = setup
    labels = sample_labels(len(frames), lambda s: len(frames[s]), 40, "both", seed=7)
    ref = fisher_spectrum(model, structs, labels)
    for perm_seed, batch_size, chunk_size in ((1, 1, 1), (2, 5, 7), (3, 40, 64)):
        other = fisher_spectrum(model, structs, labels.permuted(perm_seed), batch_size=batch_size, chunk_size=chunk_size)
        for g in ref.eigenvalues:
            np.testing.assert_allclose(other.eigenvalues[g], ref.eigenvalues[g], rtol=1e-8, atol=1e-12 * ref.eigenvalues[g].max())


def test_float32_model_is_close_to_float64(setup):
    model, frames, structs = setup
    labels = sample_labels(len(frames), lambda s: len(frames[s]), 20, "both", seed=1)
    ref = fisher_spectrum(model, structs, labels)
    m32 = tiny_model(n_atom_basis=1, n_hidden=2, n_rbf=2, seed=1, dtype=torch.float32)
    got = fisher_spectrum(m32, structures(frames, dtype=torch.float32), labels)
    np.testing.assert_allclose(got.eigenvalues["all"][:3], ref.eigenvalues["all"][:3], rtol=1e-3)


def test_label_sampling_is_seeded_and_counts_are_right(setup):
    _, frames, _ = setup
    n_atoms = lambda s: len(frames[s])  # noqa: E731
    a = sample_labels(len(frames), n_atoms, 50, "both", seed=4, energy_fraction=0.3, forces_per_structure=5)
    b = sample_labels(len(frames), n_atoms, 50, "both", seed=4, energy_fraction=0.3, forces_per_structure=5)
    c = sample_labels(len(frames), n_atoms, 50, "both", seed=5, energy_fraction=0.3, forces_per_structure=5)
    assert a.state() == b.state() and a.state() != c.state()
    assert (a.n_energy, a.n_forces) == (15, 35)
    by = a.by_structure()
    assert all((comps >= 0).sum() <= 5 for comps in by.values())
    assert all(c < 3 * len(frames[s]) for s, comps in by.items() for c in comps)
    pairs = list(zip(a.structure.tolist(), a.component.tolist()))
    assert len(set(pairs)) == len(pairs), "labels are drawn without replacement"


def test_summary_scalars_on_known_eigenvalues():
    s = summarize(np.array([4.0, 1.0, 1.0, 0.0]))
    assert s["rank"] == 3
    assert s["log10_max"] == pytest.approx(np.log10(4.0))
    assert s["log10_median"] == pytest.approx(0.0)
    assert s["log10_mean"] == pytest.approx(np.log10(2.0))
    p = np.array([4, 1, 1]) / 6
    assert s["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert summarize(np.full(7, 3.0))["effective_rank"] == pytest.approx(7.0)
    assert summarize(np.zeros(3))["rank"] == 0


def test_spectrum_file_round_trip(tmp_path, setup):
    model, frames, structs = setup
    labels = sample_labels(len(frames), lambda s: len(frames[s]), 10, "both", seed=0)
    spec = fisher_spectrum(model, structs, labels)
    spec.meta["epoch"] = 3
    back = FisherSpectrum.load(spec.save(tmp_path / "s.npz"))
    assert back.method == spec.method and back.n_weights == spec.n_weights and back.meta["epoch"] == 3
    assert back.n_labels == spec.n_labels
    for g in spec.eigenvalues:
        np.testing.assert_array_equal(back.eigenvalues[g], spec.eigenvalues[g])
    assert back.metrics() == spec.metrics()


def test_bad_arguments_give_clear_errors(setup):
    model, frames, structs = setup
    n_atoms = lambda s: len(frames[s])  # noqa: E731
    with pytest.raises(ValueError, match="n_labels must be a positive integer"):
        sample_labels(len(frames), n_atoms, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        sample_labels(len(frames), n_atoms, 5, kind="stress")
    with pytest.raises(ValueError, match="energy labels but the data hold only 40 structures"):
        sample_labels(len(frames), n_atoms, 100, kind="energy")
    with pytest.raises(ValueError, match="no labels"):
        fisher_spectrum(model, structs, LabelSet([], []))
    with pytest.raises(ValueError, match="method must be one of"):
        fisher_spectrum(model, structs, sample_labels(len(frames), n_atoms, 4), method="svd")
    with pytest.raises(ValueError, match="at least one label"):
        GramAccumulator(10, 0, 0)
    with pytest.raises(ValueError, match="same length"):
        LabelSet([0, 1], [0])


def test_bpnn_fast_label_rows_give_the_same_spectrum():
    """BPNN potentials use the label predictor by default; the full-model route gives the same spectrum."""
    from ekf_plugin.models import water_bpnn
    from tests.bpnn._systems import converter, randomise_scaling, water_cluster, water_pair

    model = water_bpnn(dtype=torch.float64, stress=False, n_hidden=(3,), seed=2)  # 2 × (inputs·3 + 3 + 3 + 1) weights
    randomise_scaling(model)
    conv = converter(model)
    structs = []
    for atoms in [water_pair(seed=k) for k in range(4)] + [water_cluster(3, seed=k) for k in range(3)]:
        s = {k: v for k, v in conv(atoms).items()}
        s["_idx"] = torch.tensor([len(structs)])
        structs.append(s)
    labels = sample_labels(len(structs), lambda i: int(structs[i]["_n_atoms"]), 14, seed=1, forces_per_structure=3)
    assert labels.n_energy and labels.n_forces
    fast = fisher_spectrum(model, structs, labels, batch_size=2)
    full = fisher_spectrum(model, structs, labels, batch_size=2, fast_labels=False)
    for group in ("all", "energy", "forces"):
        np.testing.assert_allclose(fast.eigenvalues[group], full.eigenvalues[group], rtol=1e-8, atol=1e-14)
    assert float(np.max(fast.eigenvalues["forces"])) > 0
