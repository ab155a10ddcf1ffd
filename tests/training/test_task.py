"""PaperScheduleTask inside Lightning: training lowers the error, Adam baseline settings, exact resume,
hparams round-trip (what `spktrain` relies on)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
import schnetpack.properties as spk_props

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import outputs, toy_loaders, toy_model  # noqa: E402

from ekf_plugin.optim import EKF  # noqa: E402
from ekf_plugin.training import PaperScheduleTask  # noqa: E402


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    return toy_loaders(tmp_path_factory.mktemp("water"), n_frames=12)


def _trainer(tmp=None, **kw):
    cbs = [ModelCheckpoint(dirpath=tmp, save_last=True, every_n_epochs=1)] if tmp else []
    return pl.Trainer(
        logger=False, enable_checkpointing=bool(tmp), callbacks=cbs, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, **kw,
    )


def _ekf_task(lr=1.0, **kw):
    return PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, optimizer_args={"lr": lr, "q": 1e-6}, **kw)


def _val_rmse(task, loader):
    tr = _trainer()
    return tr.validate(task, loader, verbose=False)[0]


def test_ekf_training_lowers_force_and_energy_rmse(loaders):
    train, val = loaders
    task = _ekf_task(lr=1.0, c_energy=1e-2, c_forces=1.0)  # toy units: weigh forces up
    before = _val_rmse(task, val)
    fit = _trainer(max_epochs=4)
    fit.fit(task, train, val)
    after = _val_rmse(task, val)
    assert after["val_forces_rmse_all"] < 0.5 * before["val_forces_rmse_all"], (before, after)
    assert after["val_energy_per_atom_rmse"] < 0.5 * before["val_energy_per_atom_rmse"], (before, after)
    assert fit.optimizers[0].ekf_state["step"] == 4 * len(train)


def test_adam_baseline_steps_scheduler_per_update_and_clips(loaders):
    train, val = loaders
    task = PaperScheduleTask(
        toy_model(), outputs(), optimizer_cls=torch.optim.Adam, optimizer_args={"lr": 1e-2, "eps": 1e-7},
        scheduler_cls=torch.optim.lr_scheduler.StepLR, scheduler_args={"step_size": 4, "gamma": 0.5},
        clip_grad_norm=0.01,
    )
    norms = []
    task.on_before_optimizer_step = lambda opt: norms.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in task.parameters() if p.grad is not None])))
    )
    before = _val_rmse(task, val)
    fit = _trainer(max_epochs=2, gradient_clip_val=0)  # as SchNetPack's default trainer config
    fit.fit(task, train, val)
    n_updates = 2 * len(train)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** (n_updates // 4))
    assert len(norms) == n_updates and max(norms) <= 0.01 * (1 + 1e-4), norms
    after = _val_rmse(task, val)
    assert after["val_forces_rmse_all"] < before["val_forces_rmse_all"]


def _weights(task):
    return [p.detach().clone() for p in task.model.parameters()]


def test_resume_from_checkpoint_equals_uninterrupted_run(loaders, tmp_path):
    train, val = loaders
    full = _ekf_task(lr=0.5, seed=3)
    ta = _trainer(tmp_path / "a", max_epochs=2)
    ta.fit(full, train, val)
    part = _ekf_task(lr=0.5, seed=3)
    _trainer(tmp_path / "b", max_epochs=1).fit(part, train, val)
    resumed = _ekf_task(lr=0.5, seed=99)  # different label seed: the checkpoint must restore the RNG
    tc = _trainer(tmp_path / "c", max_epochs=2)
    # a Lightning checkpoint of a SchNetPack task pickles the model in its hyper-parameters: resuming one's own
    # run is an explicit opt-in (spktrain does it for its own run directory, see ekf_plugin.compat)
    tc.fit(resumed, train, val, ckpt_path=str(tmp_path / "b" / "last.ckpt"), weights_only=False)
    for a, b in zip(_weights(full), _weights(resumed)):
        assert torch.equal(a, b)
    pa = ta.optimizers[0].covariance()
    pb = tc.optimizers[0].covariance()
    assert torch.equal(pa, pb)
    assert torch.equal(full.label_rng.get_state(), resumed.label_rng.get_state())


def test_hparams_round_trip_load_from_checkpoint(loaders, tmp_path):
    train, val = loaders
    task = _ekf_task(lr=0.3, energy_fraction=0.4, n_force_components=6, param_blocks="layer", seed=5)
    fit = _trainer(tmp_path, max_epochs=1)
    fit.fit(task, train, val)
    loaded = PaperScheduleTask.load_from_checkpoint(str(tmp_path / "last.ckpt"), weights_only=False)  # own run
    assert (loaded.energy_fraction, loaded.n_force_components, loaded.param_blocks) == (0.4, 6, "layer")
    assert loaded.optimizer_cls is EKF and loaded.optimizer_kwargs["lr"] == 0.3
    for a, b in zip(_weights(task), _weights(loaded)):
        assert torch.equal(a, b)
    assert len(fit.optimizers[0].blocks) > 1  # one P block per module


@pytest.mark.parametrize(
    "kw", [dict(energy_fraction=1.5), dict(n_force_components=0), dict(param_blocks="atoms"), dict(c_energy=-1.0)]
)
def test_bad_task_arguments(kw):
    with pytest.raises(ValueError):
        _ekf_task(**kw)


def test_element_and_layer_blocks_of_the_water_bpnn():
    from ekf_plugin.models import water_bpnn

    task = PaperScheduleTask(water_bpnn(stress=False), outputs(), param_blocks="element")
    sizes = sorted(sum(p.numel() for p in g["params"]) for g in task._param_groups())
    assert sizes == [27 * 25 + 25 + 25 * 25 + 25 + 25 + 1, 30 * 25 + 25 + 25 * 25 + 25 + 25 + 1]  # H 1376, O 1451
    task.param_blocks = "layer"
    assert len(task._param_groups()) == 6  # 3 linear layers per element network


def test_non_finite_validation_loss_stops_the_run_with_an_error(tmp_path):
    """One NaN energy among the validation frames: fit() raises (spktrain exits non-zero), not a silent stop."""
    import schnetpack as spk
    import schnetpack.transform as trn
    from _toy import write_copper_database

    db = write_copper_database(tmp_path / "cu.db", n_frames=6)
    data = spk.data.ASEAtomsData(str(db), transforms=[trn.ASENeighborList(cutoff=3.0), trn.CastTo32()])
    train = spk.data.AtomsLoader(torch.utils.data.Subset(data, [0, 1, 2, 3]), batch_size=1)

    class NaNLabel(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            item = data[4 + i]
            if i == 1:
                item["energy"] = item["energy"] * float("nan")
            return item

    val = spk.data.AtomsLoader(NaNLabel(), batch_size=1)
    with pytest.raises(FloatingPointError, match="validation loss is not finite .* 1 validation batch"):
        _trainer(max_epochs=2).fit(_ekf_task(), train, val)


def test_reduced_row_ekf_trains_a_schnet_with_one_row_per_atom_group(loaders):
    """label_mode='reduced' (task=ekf): m = 1 + G rows per update, any SchNetPack model; errors fall."""
    train, val = loaders
    task = PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, label_mode="reduced", n_force_groups=3,
                             force_group_size=4, c_energy=1.0, c_forces=1.0,
                             optimizer_args={"lr": 1.0, "fading_lambda": 0.98, "fading_nu": 0.9987, "blocks": 500})
    assert task.label_predictor is None
    before = _val_rmse(task, val)
    seen = []
    orig = EKF._update

    def spy(self, xi, J):
        seen.append(tuple(J.shape))
        return orig(self, xi, J)

    EKF._update = spy
    try:
        _trainer(max_epochs=3).fit(task, train, val)
    finally:
        EKF._update = orig
    after = _val_rmse(task, val)
    assert {s[0] for s in seen} == {4}, "one energy row and three group rows per update"
    assert after["val_forces_rmse_all"] < 0.7 * before["val_forces_rmse_all"], (before, after)


def test_step_checkpoints_of_the_manual_update_do_not_warn(loaders, tmp_path):
    """Lightning notes at a step checkpoint of a manually optimised module that it holds the weights after the
    update (15 lines in every training's log); that is the task's contract (weights, P and label RNG of the
    same step, resumed exactly above), so the task drops that one note and no other."""
    import warnings

    train, val = loaders
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="last", every_n_train_steps=2)
    trainer = pl.Trainer(logger=False, callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, inference_mode=False, max_steps=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(_ekf_task(lr=0.5), train, val)
        warnings.warn("another warning of the run")
    messages = [str(w.message) for w in seen]
    assert (tmp_path / "last.ckpt").exists()
    assert not [m for m in messages if "manual optimization" in m], messages
    assert "another warning of the run" in messages


@pytest.mark.parametrize("flush_every", [1, 3, 1000])
def test_training_label_rmse_is_every_label_of_the_epoch_however_often_it_is_flushed(flush_every):
    """The BPNN fast path keeps the training labels and puts them into the RMSE metrics every few updates and at
    the epoch's end: each epoch's logged train RMSEs are those of all the labels its updates drew (eV/atom, eV/Å),
    also when the epoch length is not a multiple of the flush interval or the run stops at ``max_steps``."""
    from tests.bpnn._systems import converter, randomise_scaling, water_cluster, water_pair
    from ekf_plugin.models import water_bpnn

    model = water_bpnn(dtype=torch.float64, stress=False, seed=3)
    randomise_scaling(model)
    model.representation.scaling_fitted.fill_(True)  # no datamodule to fit them from
    for m in model.modules():
        if hasattr(m, "atom_energy_fitted"):
            m.atom_energy_fitted.fill_(True)
    conv = converter(model)
    g = torch.Generator().manual_seed(0)
    batches = []
    for k, atoms in enumerate([water_pair(seed=1), water_cluster(2, seed=2), water_pair(seed=3), water_cluster(3, seed=4),
                               water_pair(seed=5)]):
        b = conv(atoms)
        b["energy"] = torch.randn(1, generator=g, dtype=torch.float64)
        b["forces"] = torch.randn(b[spk_props.R].shape, generator=g, dtype=torch.float64)
        b[spk_props.idx] = torch.tensor([k])
        batches.append(b)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    task = PaperScheduleTask(model, outputs(), optimizer_cls=EKF, optimizer_args={"lr": 1e-2}, seed=1,
                             n_force_components=4)
    assert task.label_predictor is not None
    task.LABEL_FLUSH_EVERY = flush_every
    drawn = []  # per epoch: the (pred, ref) pairs of every update
    orig = task._update_label_rmse

    def record(labels, n, log=True, flush=False):
        drawn[-1].append({k: list(v) for k, v in labels.items()})
        return orig(labels, n, log, flush)

    task._update_label_rmse = record
    logged = []

    class Epochs(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            drawn.append([])

        def on_train_epoch_end(self, trainer, module):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")})

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, callbacks=[Epochs()], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, max_epochs=3,
                         max_steps=13, limit_val_batches=0)
    trainer.fit(task, loader)
    assert [len(d) for d in drawn] == [5, 5, 3]
    for epoch, (updates, got) in enumerate(zip(drawn, logged)):
        for kind, name in (("energy", "train_energy_per_atom_rmse"), ("forces", "train_forces_rmse_all")):
            pairs = [p for u in updates for p in u.get(kind, [])]
            if not pairs:
                continue
            err = torch.cat([p.double() - r.double() for p, r in pairs])
            assert got[name] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-6), (epoch, kind)  # logged as float32
