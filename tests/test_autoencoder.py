"""Autoencoder mode: the alternating driver over the Engine, the latent clustering loss, the saved
AEModel, and `fit --autoencoder --loss ajs` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow_helpers import client_for, metric_history

from cluster_service.config import ConfigError, FitConfig
from cluster_service.datasets import make_embedded_mixture
from cluster_service.report.evaluate import score
from cluster_service.serve.ae_model import AEModel, load_ae_model
from cluster_service.serve.model import ModelError, load_model
from cluster_service.train.autoencoder import fit_autoencoder, latent_cluster_loss, rebase_engine
from cluster_service.train.engine import Engine
from cluster_service.train.fit import run_schedule

# A small AE and short schedules: the (500, 500, 2000) default is ImageNet-sized.
FAST = {
    "autoencoder.enabled": True,
    "autoencoder.hidden": (128, 128, 256),
    "autoencoder.pretrain_epochs": 20,
    "autoencoder.rounds": 1,
    "autoencoder.finetune_epochs": 3,
    "autoencoder.round_epochs": 30,
    "schedule.epochs": 60,
}
N_TRAIN = 2000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The nets here are small: one intra-op thread is as fast, and on a loaded 2-core box two
    threads spin-wait on each other (measured: 60x slower epochs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def embedded():
    """10 clusters in 8-d pushed through a fixed random tanh MLP to 64-d; train / held-out split."""
    x, y = make_embedded_mixture(N_TRAIN + 600, n_clusters=10, n_features=8, out_dim=64, seed=0)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


@pytest.fixture(scope="module")
def ae_fit(embedded):
    (x, _), _ = embedded
    cfg = FitConfig().replace(seed=0, **{"net.loss": "ajs", **FAST})
    return fit_autoencoder(x, cfg)


def test_ae_mode_recovers_k_on_nonlinear_embedding(embedded, ae_fit):
    (_, y), _ = embedded
    s = score(y, ae_fit.clusters)
    assert abs(ae_fit.n_clusters - 10) <= 2, ae_fit.k_per_round
    assert s.nmi > 0.8, s  # chance is ~0
    # K was inferred in the latent space (the evidence start, then the moves; no K_init
    # guessed) and survived the re-encoding round.
    assert len(ae_fit.k_per_round) == 2 and abs(ae_fit.k_per_round[0] - 10) <= 2
    assert [r.epoch for r in ae_fit.history] == list(range(60 + 30)) and ae_fit.round_starts == [0, 60]
    # Pretraining learned to reconstruct; fine-tuning kept reconstruction and ran the cluster loss.
    pre = [r for r in ae_fit.ae_history if r.phase == "pretrain"]
    fine = [r for r in ae_fit.ae_history if r.phase == "finetune"]
    assert len(pre) == 20 and len(fine) == 3
    assert pre[-1].loss_recon < 0.3 * pre[0].loss_recon
    assert fine[-1].loss_recon < 2 * pre[-1].loss_recon and all(r.loss_cluster > 0 for r in fine)
    assert ae_fit.codes.shape == (N_TRAIN, 10)


def test_ae_model_assigns_new_data_and_round_trips(embedded, ae_fit, tmp_path):
    (x, _), (x_new, y_new) = embedded
    model = ae_fit.model
    # The training rows: predict (encode, then the latent mixture) equals the fit's assignment.
    train_clusters, _ = model.predict(x)
    assert (train_clusters == ae_fit.clusters).mean() > 0.99
    new_clusters, log_prob = model.predict(x_new)
    assert score(y_new, new_clusters).nmi > 0.8 and np.isfinite(log_prob).all()

    path = model.save(tmp_path / "model")
    loaded = load_ae_model(path, n_features=64)
    np.testing.assert_array_equal(loaded.predict(x_new)[0], new_clusters)
    np.testing.assert_allclose(loaded.encode(x_new), model.encode(x_new), rtol=1e-6, atol=1e-6)
    # The directory is still a plain (latent-space) FittedModel; the encoder files are extra.
    latent = load_model(path)
    assert latent.n_features == 10 and latent.n_clusters == model.n_clusters
    assert latent.config["net"]["loss"] == "ajs"
    # Saving again replaces the directory (no stale temp dirs left beside it).
    model.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(ModelError, match=r"expected an \(n, 64\) array"):
        loaded.predict(x_new[:, :10])
    with pytest.raises(ModelError, match="d=64 features, the data has d=32"):
        load_ae_model(path, n_features=32)
    (path / "encoder.npz").unlink()
    with pytest.raises(ModelError, match="not an autoencoder model"):
        load_ae_model(path)


@pytest.fixture(scope="module")
def latent_engine(mixture_small):
    x, _ = mixture_small
    # The reference start, prior and proposals (K_init = 1, psi from the data variance): in 30 epochs the
    # evidence start is still merging, and a half-converged mixture moves under the rebase's
    # extra M-step (so are the cell-tree proposals), which is not what the rebase tests are about.
    cfg = FitConfig().replace(
        seed=0, init="kmeans",
        **{"schedule.epochs": 30, "prior.psi_mode": "data_diag", "prior.nu_mode": "fixed", "moves.split_cells": 0},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        engine = Engine(cfg, torch.from_numpy(x.astype(np.float64)))
        engine.initialize()
        run_schedule(engine)
    return engine


def test_only_the_last_epoch_of_the_last_round_is_marked_stopped(mixture_small):
    """Every round's schedule ends with a `stopped` record; the fit ends once, after the last
    round: one record says why (history and callbacks alike), the last."""
    x, _ = mixture_small
    cfg = FitConfig(seed=0, k_init=6).replace(**{
        **FAST, "autoencoder.hidden": (16, 16, 32), "autoencoder.pretrain_epochs": 1, "autoencoder.rounds": 2,
        "autoencoder.finetune_epochs": 1, "autoencoder.round_epochs": 3, "schedule.epochs": 3,
        "schedule.warmup_epochs": 1})
    seen = []
    res = fit_autoencoder(x[:600], cfg, callbacks=[lambda rec, eng: seen.append((rec.epoch, rec.stopped))])
    assert len(res.round_starts) == 3 and len(res.history) == 9
    assert [r.stopped for r in res.history[:-1]] == [""] * 8 and res.history[-1].stopped
    assert seen == [(r.epoch, r.stopped) for r in res.history]


def test_rebase_engine_follows_translated_codes(mixture_small, latent_engine):
    """Re-encoding that only translates the codes must leave the mixture (up to the translation)
    and every assignment unchanged: the rebase moves means into the new centring correctly."""
    x, _ = mixture_small
    old = latent_engine
    shift = torch.linspace(-3.0, 5.0, x.shape[1], dtype=torch.float64)
    new = rebase_engine(old, torch.from_numpy(x.astype(np.float64)) + shift, old.cfg, None, x.shape[0])
    assert new.n_clusters == old.n_clusters and new.epoch == 0
    np.testing.assert_array_equal(new.assign()[0], old.assign()[0])
    old_means, new_means = old.export_params().means, new.export_params().means
    torch.testing.assert_close(new_means, old_means + shift, atol=0.05, rtol=0)


def test_latent_cluster_loss_moves_codes_toward_the_nets_cluster(latent_engine):
    """Gradient descent on the codes alone lowers the loss and raises the E-step responsibility
    of the cluster the net assigns, for codes the DPGMM finds ambiguous (between two means)."""
    engine = latent_engine
    means = engine.export_params().means.float()  # (K, d) original coordinates
    dist = torch.cdist(means, means) + 1e9 * torch.eye(means.shape[0])
    a, b = divmod(int(dist.argmin()), means.shape[0])
    t = torch.linspace(0.3, 0.7, 41)[:, None]
    z0 = (1 - t) * means[a] + t * means[b]  # (41, d) codes on the segment between two clusters

    def responsibilities(z):
        return torch.softmax(engine.log_responsibilities((z - engine.shift.float()).double(), True), -1)

    for loss in ("kl", "ajs"):
        engine.cfg = engine.cfg.replace(**{"net.loss": loss})
        with torch.no_grad():
            r0 = responsibilities(z0)
            net_k = engine.cluster_net(z0 - engine.shift.float()).argmax(-1)
        ambiguous = (r0.max(-1).values < 0.99) & (net_k != r0.argmax(-1)) | (r0.max(-1).values < 0.9)
        assert ambiguous.sum() >= 3, loss
        z = z0[ambiguous].clone().requires_grad_(True)
        k = net_k[ambiguous]
        before = latent_cluster_loss(z, engine).detach()
        opt = torch.optim.SGD([z], lr=0.05)
        for _ in range(30):
            opt.zero_grad()
            latent_cluster_loss(z, engine).sum().backward()
            opt.step()
        after = latent_cluster_loss(z, engine).detach()
        assert after.mean() < 0.5 * before.mean(), loss
        with torch.no_grad():
            idx = torch.arange(k.numel())
            gained = responsibilities(z)[idx, k] - r0[ambiguous][idx, k]
        assert (gained > 0).float().mean() > 0.9, (loss, gained)


def test_config_validation():
    with pytest.raises(ConfigError, match="autoencoder.latent_dim"):
        FitConfig.from_dict({"autoencoder": {"latent_dim": 0}})
    with pytest.raises(ConfigError, match="autoencoder.hidden"):
        FitConfig.from_dict({"autoencoder.hidden": [64, 0]})
    with pytest.raises(ConfigError, match="cannot both be 0"):
        FitConfig.from_dict({"autoencoder.recon_weight": 0, "autoencoder.cluster_weight": 0})
    cfg = FitConfig.from_dict({"autoencoder.hidden": [64, 32]})  # YAML lists become tuples
    assert cfg.autoencoder.hidden == (64, 32) and not FitConfig().autoencoder.enabled
    assert FitConfig().autoencoder.hidden == (500, 500, 2000) and FitConfig().autoencoder.latent_dim == 10


def test_cli_fit_autoencoder_ajs(tmp_path, monkeypatch, mixture_small):
    from typer.testing import CliRunner

    from cluster_service.ops.cli import app

    monkeypatch.chdir(tmp_path)
    x, y = mixture_small
    np.savez(tmp_path / "data.npz", X=x, y=y)
    args = ["fit", "data.npz", "--out", "run", "--autoencoder", "--loss", "ajs", "--quiet", "--epochs", "40",
            "--k-init", "4",
            "--experiment", "ae",
            "--set", "autoencoder.hidden=[64, 64]", "--set", "autoencoder.latent_dim=6",
            "--set", "autoencoder.pretrain_epochs=10", "--set", "autoencoder.rounds=1",
            "--set", "autoencoder.finetune_epochs=2", "--set", "autoencoder.round_epochs=30"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["net"]["loss"] == "ajs" and cfg["autoencoder"]["enabled"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nmi"] > 0.8 and abs(summary["k_found"] - 6) <= 2
    assert len(json.loads((run / "history.json").read_text())) == 40 + 30
    model = load_ae_model(run / "model")
    assert isinstance(model, AEModel) and model.mixture.n_features == 6
    assert score(y, model.predict(x)[0]).nmi > 0.8
    # The run was tracked: per-epoch K over both rounds (global epochs) and the label scores.

    client = client_for()
    run_info = client.get_run(summary["mlflow_run"])
    assert run_info.data.params["net.loss"] == "ajs" and run_info.data.metrics["nmi"] > 0.8
    assert len(metric_history(client, summary["mlflow_run"], "n_clusters")) == 40 + 30


@pytest.mark.filterwarnings("ignore::cluster_service.config.ScheduleWarning")  # a few epochs: no moves, fine here
def test_cli_cut_works_on_an_autoencoder_run(tmp_path, monkeypatch, mixture_small):
    """An AE fit ends like every other fit (train.export.finish_fit): its model has a merge tree."""
    from typer.testing import CliRunner

    from cluster_service.ops.cli import app

    monkeypatch.chdir(tmp_path)
    x, y = mixture_small
    np.savez(tmp_path / "data.npz", X=x[:600], y=y[:600])
    args = ["fit", "data.npz", "--out", "run", "--autoencoder", "--quiet", "--no-tracking", "--epochs", "6",
            "--k-init", "4", "--set", "schedule.warmup_epochs=2", "--set", "net.min_steps_per_epoch=2",
            "--set", "autoencoder.hidden=[16]", "--set", "autoencoder.latent_dim=4",
            "--set", "autoencoder.pretrain_epochs=2", "--set", "autoencoder.rounds=0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    model = load_ae_model(tmp_path / "run" / "model")
    k = model.n_clusters
    assert k >= 2 and len(model.mixture.tree_log_ratios) == k - 1
    res = CliRunner().invoke(app, ["cut", "run", "--out", "groups.parquet", "--k", "1"])
    assert res.exit_code == 0, res.output
    groups = pq.read_table(tmp_path / "groups.parquet")
    assert groups.num_rows == 600 and set(groups.column("cluster").to_numpy()) == {0}


def test_cli_rejects_bad_autoencoder_config(tmp_path, monkeypatch, capsys, mixture_small):
    import sys

    from cluster_service.ops import cli

    x, _ = mixture_small
    np.savez(tmp_path / "data.npz", X=x[:100])
    monkeypatch.setattr(sys, "argv", ["cluster-service", "fit", str(tmp_path / "data.npz"), "--autoencoder",
                                      "--no-tracking", "--set", "autoencoder.latent_dim=0"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "autoencoder.latent_dim must be >= 1" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["cluster-service", "fit", str(tmp_path / "data.npz"), "--loss", "mse",
                                      "--no-tracking"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "net.loss must be one of 'kl', 'ajs'" in capsys.readouterr().err


# ---- distribution: the same driver under TorchDistComm (2 gloo processes, no Ray) -------------

DIST = {
    "device": "cpu",
    "k_init": 1,  # k-means runs on rank 0's rows only; from K=1 the init is the same everywhere
    "init": "kmeans",  # (so the reference start, and no k-means cells in the proposals)
    "prior.psi_mode": "data_diag",
    "prior.nu_mode": "fixed",
    "moves.split_cells": 0,
    "autoencoder.hidden": (32, 32),
    "autoencoder.latent_dim": 4,
    "autoencoder.pretrain_epochs": 4,
    "autoencoder.rounds": 1,
    "autoencoder.finetune_epochs": 2,
    "autoencoder.round_epochs": 14,
    "autoencoder.batch_size": 128,
    "schedule.epochs": 20,
    "schedule.first_split": 8,
    "schedule.move_period": 6,
    "schedule.final_epochs": 4,
    "net.batch_size": 256,
    "net.min_steps_per_epoch": 4,
    "net.loss": "ajs",
}


TOL = 2e-2  # relative to the code range; see the comment in the test


def _dist_worker(rank: int, world: int, store: str, x: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    from cluster_service.train.comm import TorchDistComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = np.arange(rank, x.shape[0], world)  # interleaved: every global batch spans both ranks
        res = fit_autoencoder(
            x[rows], FitConfig().replace(**DIST), comm=TorchDistComm(torch.device("cpu")),
            global_index=torch.from_numpy(rows), n_global=x.shape[0],
        )
        np.savez(f"{out}/rank{rank}.npz", rows=rows, clusters=res.clusters, codes=res.codes,
                 k=np.asarray(res.k_per_round), means=res.model.mixture.means)
        dist.barrier()  # both ranks done with collectives before gloo is torn down (else a rare SIGABRT)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_follow_the_single_process_run(tmp_path, mixture_small):
    import torch.multiprocessing as mp

    x = mixture_small[0][:1200]
    ref = fit_autoencoder(x, FitConfig().replace(**DIST))
    assert ref.k_per_round[-1] >= 2  # a split was accepted: the comparison covers moves, not just K = 1
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), x, str(tmp_path)), nprocs=2, join=True)
    clusters = np.empty(x.shape[0], dtype=np.int64)
    codes = np.empty_like(ref.codes)
    for rank in (0, 1):
        r = np.load(tmp_path / f"rank{rank}.npz")
        assert r["k"].tolist() == ref.k_per_round
        clusters[r["rows"]], codes[r["rows"]] = r["clusters"], r["codes"]
        np.testing.assert_allclose(r["means"], ref.model.mixture.means, atol=TOL * np.abs(ref.codes).max())
    # float32 gradients summed in another order drift the AE slightly; a lost or doubled rank
    # (or per-rank batches) would change the codes and the clustering by O(1).
    np.testing.assert_allclose(codes, ref.codes, atol=TOL * np.abs(ref.codes).max())
    assert (clusters == ref.clusters).mean() > 0.995
