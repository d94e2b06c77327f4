"""Config is parsed and validated once, at the edge: every invalid setting is refused with a message
that names the key and says what is allowed, through `FitConfig.from_dict`, `.replace`, YAML files
and `cluster-service fit --set` (exit code 2, before any data is read)."""

from __future__ import annotations

import warnings

import pytest

from cluster_service.config import ConfigError, FitConfig, PriorConfig, ScheduleWarning

# (override, words the message must contain: the key and what is allowed)
INVALID = [
    ({"prior.alpha": -1.0}, ["prior.alpha", "> 0"]),
    ({"prior.alpha": 0}, ["prior.alpha", "> 0"]),
    ({"prior.alpha": float("inf")}, ["prior.alpha", "finite"]),
    ({"prior.alpha": float("nan")}, ["prior.alpha", "finite"]),
    ({"prior.kappa": 0.0}, ["prior.kappa", "> 0"]),
    ({"prior.nu_offset": -1.0}, ["prior.nu_offset", "> -1", "nu > n_features - 1"]),  # nu = d - 1
    ({"prior.nu_offset": -3}, ["prior.nu_offset", "> -1"]),
    ({"prior.psi_scale": -0.1}, ["prior.psi_scale", "> 0"]),
    ({"prior.psi_mode": "identity"}, ["prior.psi_mode", "one of 'pooled', 'data_diag', 'fixed'"]),
    ({"k_init": 0}, ["k_init", ">= 1"]),
    ({"k_init": -4}, ["k_init", ">= 1"]),
    ({"k_init": 2.5}, ["k_init", "must be an integer"]),
    ({"k_init": True}, ["k_init", "must be an integer"]),
    ({"k_init": 6000}, ["k_init", "moves.max_clusters"]),
    ({"net.loss": "mse"}, ["net.loss", "one of 'kl', 'ajs'"]),
    ({"net.ajs_alpha": 1.0}, ["net.ajs_alpha", "(0, 1)"]),
    ({"net.lr": 0.0}, ["net.lr", "> 0"]),
    ({"net.lr": "fast"}, ["net.lr", "must be a number"]),
    ({"net.lr": float("inf")}, ["net.lr", "must be a finite number"]),
    ({"net.batch_size": 0}, ["net.batch_size", ">= 1"]),
    ({"moves.min_cluster_size": 1}, ["moves.min_cluster_size", ">= 2"]),
    ({"moves.max_clusters": 0}, ["moves.max_clusters", ">= 1"]),
    ({"schedule.epochs": 0}, ["schedule.epochs", ">= 1"]),
    ({"schedule.epochs": 4}, ["schedule.warmup_epochs", "< epochs"]),  # M-step would never run
    ({"schedule.first_split": 3}, ["schedule.first_split", "after subcluster_start"]),
    ({"schedule.move_period": 1}, ["schedule.move_period", ">= 2"]),
    ({"schedule.freeze_epochs": 6}, ["schedule.freeze_epochs", "move_period // 2"]),
    ({"schedule.final_epochs": -1}, ["schedule.final_epochs", ">= 0"]),
    ({"schedule.stop_k_tol": 1.0}, ["schedule.stop_k_tol", "in [0, 1)"]),
    ({"schedule.stop_k_tol": -0.01}, ["schedule.stop_k_tol", "in [0, 1)"]),
    ({"responsibilities": "hard"}, ["responsibilities", "one of 'net', 'estep'"]),
    ({"net_mass": "both"}, ["net_mass", "one of 'estep', 'net'"]),
    ({"device": "tpu"}, ["device", "auto, cpu, cuda or cuda:N"]),
    ({"chunk_size": 0}, ["chunk_size", ">= 1"]),
    ({"autoencoder.hidden": [64, 0]}, ["autoencoder.hidden", "positive integers"]),
    ({"autoencoder.hidden": [64, "wide"]}, ["autoencoder.hidden[1]", "must be an integer"]),
    ({"prior.pooled_evidence_scales": 0.5}, ["prior.pooled_evidence_scales", "must be a list"]),
    ({"autoencoder.enabled": "yes"}, ["autoencoder.enabled", "true or false"]),
    ({"prior.alpah": 5}, ["unknown key(s) prior.alpah", "allowed under prior", "alpha, covariance, kappa"]),
    ({"epochs": 5}, ["unknown key(s) epochs", "allowed under top level"]),
    ({"prior": 5}, ["prior must be a mapping"]),
]


@pytest.mark.parametrize("override,words", INVALID, ids=[next(iter(o)) + "=" + repr(v) for o, _ in INVALID
                                                          for v in o.values()])
def test_invalid_setting_is_rejected_with_what_is_allowed(override, words):
    for build in (lambda: FitConfig.from_dict(override), lambda: FitConfig().replace(**override)):
        with pytest.raises(ConfigError) as err:
            build()
        for w in words:
            assert w in str(err.value), f"{w!r} not in {err.value!r}"


def test_nested_and_dotted_forms_are_equivalent():
    a = FitConfig.from_dict({"prior": {"alpha": 3.0}, "schedule.epochs": 80})
    b = FitConfig().replace(**{"prior.alpha": 3, "schedule": {"epochs": 80}})
    assert a == b and a.prior.alpha == 3.0 and isinstance(a.prior.alpha, float)
    # a search space's whole float is an integer; YAML lists become tuples
    c = FitConfig().replace(**{"schedule.epochs": 80.0, "prior.pooled_evidence_scales": [0.25, 1]})
    assert c.schedule.epochs == 80 and isinstance(c.schedule.epochs, int)
    assert c.prior.pooled_evidence_scales == (0.25, 1.0)
    with pytest.raises(ConfigError, match="conflicts"):
        FitConfig.from_dict({"prior": 1, "prior.alpha": 2})


def test_validate_catches_directly_built_configs():
    """A config built without from_dict (library use) is checked when fit() validates it."""
    with pytest.raises(ConfigError, match="prior.alpha must be a finite number"):
        FitConfig(prior=PriorConfig(alpha=float("inf"))).validate()
    with pytest.raises(ConfigError, match="nu > n_features - 1"):
        FitConfig(prior=PriorConfig(nu_offset=-1.5)).validate()


def test_the_default_and_valid_edges_are_accepted():
    """Values just inside what is allowed are accepted and kept as given (not clamped or dropped)."""
    assert FitConfig().validate() == FitConfig()
    edges = {"prior.alpha": 1e-9, "prior.nu_offset": -0.999, "k_init": 1, "net.loss": "ajs", "schedule.epochs": 26}
    cfg = FitConfig.from_dict(edges)
    assert {k: cfg.flat()[k] for k in edges} == edges
    assert FitConfig.from_dict(cfg.to_dict()) == cfg != FitConfig()


def test_a_schedule_with_no_room_for_a_split_warns_what_it_needs():
    """Short no-move runs are legitimate (smoke tests, autoencoder rounds) so this is a warning
    that says which epoch count would allow a split; a schedule with room for one is silent."""
    with pytest.warns(ScheduleWarning, match=r"K stays <= k_init.*schedule.epochs >= 26"):
        FitConfig().replace(**{"schedule.epochs": 20})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleWarning)
        FitConfig().replace(**{"schedule.epochs": 26})


def test_cli_rejects_invalid_config_before_reading_data(tmp_path, capsys, monkeypatch):
    """`fit` with a bad --set or config file exits 2 with the message, before touching DATA (which
    here does not even exist) and without creating the run directory."""
    from cluster_service.ops.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("fit:\n  prior:\n    alpha: -2\n")
    cases = [
        (["--set", "net.loss=hinge"], "net.loss must be one of 'kl', 'ajs', got 'hinge'"),
        (["--set", "prior.nu_offset=-1"], "prior.nu_offset must be > -1"),
        (["--k-init", "0"], "k_init must be >= 1"),
        (["--set", "schedule.bogus=1"], "unknown key(s) schedule.bogus"),
        (["--set", "prior.alpha"], "--set expects key=value"),
        (["--config", str(cfg_file)], "prior.alpha must be > 0"),
        (["--config", str(tmp_path / "none.yaml")], "config file not found"),
    ]
    for args, message in cases:
        monkeypatch.setattr("sys.argv", ["cluster-service", "fit", str(tmp_path / "no-data.npz"),
                                         "--out", str(tmp_path / "run"), "--no-tracking", "--quiet", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (args, err)
        assert message in " ".join(err.split()), (args, err)
        assert not (tmp_path / "run").exists()


def test_the_delete_move_is_off_by_default():
    """Decided by cluster_service.bench.deletes: with it on, K and NMI stayed those of the fit
    without it (BENCHMARKS.md)."""
    assert FitConfig().moves.delete_largest == 0
