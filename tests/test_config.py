"""Config validation: unknown keys, wrong types and out-of-range values are refused with the field named."""

import pytest

from training import config
from training.config import ConfigError


@pytest.mark.parametrize(
    "override, field",
    [
        ("client.lr=0", "client.lr"),
        ("client.lr=-1e-5", "client.lr"),
        ("fl.rounds=0", "fl.rounds"),
        ("fl.num_clients=0", "fl.num_clients"),
        ("fl.client_fraction=1.5", "fl.client_fraction"),
        ("client.optimizer=adam", "client.optimizer"),
        ("partition.scheme=random", "partition.scheme"),
        ("fl.rounds=three", "fl.rounds"),
        ("fl.rounds=true", "fl.rounds"),
        ("client.lrr=1e-4", "client.lrr"),
        ("optim.lr=1e-4", "optim.lr"),
        ("data.seed=-1", "data.seed"),
        ("partition.seed=-1", "partition.seed"),
        ("fl.seed=-1", "fl.seed"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.load(None, [override])


def test_overrides_are_typed_and_applied():
    cfg = config.load(None, ["fl.rounds=5", "client.lr=1e-4", "model.name=tiny-bert", "fl.client_fraction=1"])
    assert cfg.fl.rounds == 5 and cfg.client.lr == 1e-4 and cfg.model.name == "tiny-bert"
    assert isinstance(cfg.fl.client_fraction, float)
    assert cfg.flat()["client.lr"] == 1e-4


def test_yaml_file_with_unknown_section_or_key_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("fl:\n  rounds: 2\nmodle:\n  name: x\n")
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        config.load(path)
    path.write_text("fl:\n  round: 2\n")
    with pytest.raises(ConfigError, match=r"fl\.round"):
        config.load(path)


def test_dvc_sections_are_ignored_and_file_values_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("study:\n  clients: [1, 2]\nfl:\n  rounds: 7\n")
    assert config.load(path).fl.rounds == 7


def test_missing_file_and_malformed_set():
    with pytest.raises(ConfigError, match="not found"):
        config.load("/nonexistent/params.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["fl.rounds"])


def test_round_trip_through_dict():
    cfg = config.load(None, ["fl.rounds=2"])
    assert config.from_dict(cfg.to_dict()) == cfg


def test_yaml_syntax_errors_name_the_file_or_option_line_and_column(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("fl:\n  rounds: 2\nclient:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=rf"^{path}: YAML syntax error at line 5, column 1: expected ',' or ']'"):
        config.load(path)
    with pytest.raises(ConfigError, match=rf"^--set-file {path}: YAML syntax error at line 5, column 1"):
        config.read_override_files([str(path)])
    with pytest.raises(ConfigError, match=r"^--set model\.name: the value 'a: b: c': YAML syntax error at line 1, "
                                          r"column 5: mapping values are not allowed here"):
        config.load(None, ["model.name=a: b: c"])


def test_a_bad_value_in_a_file_can_be_fixed_with_set(tmp_path):
    """Files and --set are applied first and checked once, so a later value fixes an earlier one."""
    params, tuned = tmp_path / "p.yaml", tmp_path / "tuned.yaml"
    params.write_text("client:\n  lr: -1\n  local_epochs: 2\n")
    assert config.load(params, ["client.lr=1e-4"]).client.lr == 1e-4
    tuned.write_text("client.lr: -1\nclient.local_epochs: 3\n")
    cfg = config.load(params, ["client.lr=1e-4"], [str(tuned)])
    assert (cfg.client.lr, cfg.client.local_epochs) == (1e-4, 3)  # --set over --set-file over the params file
    with pytest.raises(ConfigError, match=r"client\.lr: must be > 0, got -1"):  # left unfixed, it names the field
        config.load(params, [], [str(tuned)])


def test_set_files_are_read_into_one_mapping_the_later_file_winning(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.json"
    first.write_text("client.lr: 1.0e-4\ntune.space: {client.lr: {type: float, low: 1.0e-6, high: 1.0e-3}}\n")
    second.write_text('{"client.lr": 2.0e-4, "fl.rounds": 4}')
    assert config.read_override_files([str(first), str(second)]) == {
        "client.lr": 2e-4, "fl.rounds": 4, "tune.space": {"client.lr": {"type": "float", "low": 1e-6, "high": 1e-3}}}
    second.write_text("- client.lr\n")
    with pytest.raises(ConfigError, match=rf"^--set-file {second}: expected a mapping of section\.key: value"):
        config.read_override_files([str(second)])


ADAM = ["fl.strategy=fedadam", "fl.server_lr=1e-3"]


@pytest.mark.parametrize("overrides, message", [
    (["fl.strategy=fedsgd"], r"^fl\.strategy: must be one of \('fedavg'"),
    ([*ADAM, "fl.server_momentum=0.9"], r"^fl\.server_momentum: fedadam does not use it"),
    (["fl.strategy=fedadagrad", "fl.server_lr=1e-3", "fl.server_beta2=0.9"],
     r"^fl\.server_beta2: fedadagrad does not use it"),
    (["fl.server_tau=1e-2"], r"^fl\.server_tau: fedavg does not use it"),
    ([*ADAM, "fl.server_beta1=1.0"], r"^fl\.server_beta1: must be in \[0, 1\), got 1.0"),
    (["fl.strategy=fedyogi", "fl.server_lr=1e-3", "fl.server_beta2=-0.1"], r"^fl\.server_beta2: must be in \[0, 1\)"),
    (["fl.strategy=fedavgm", "fl.server_momentum=1.0"], r"^fl\.server_momentum: must be in \[0, 1\)"),
    ([*ADAM, "fl.server_tau=0"], r"^fl\.server_tau: must be > 0"),
    (["fl.strategy=fedadam"], r"^fl\.server_lr: 1.0 is FedAvg's default; fedadam needs its own, e\.g\. "),
    (["fl.strategy=fedprox", "client.prox_mu=-0.1"], r"^client\.prox_mu: must be >= 0"),
    (["client.prox_mu=0.01"], r"^client\.prox_mu: only fedprox uses it \(fl\.strategy=fedavg\)"),
    (["fl.weighting=equal"], r"^fl\.weighting: must be one of \('samples', 'uniform'\)"),
    (["fl.evaluation=sites"], r"^fl\.evaluation: must be one of"),
    (["client.schedule_scope=round"], r"^client\.schedule_scope: must be one of \('client', 'run'\)"),
    (['tune.space={"client.prox_mu": {"type": "float", "low": 0.001, "high": 0.1}}'],
     r"^tune\.space\.client\.prox_mu: fl\.strategy=fedavg does not use it"),
])
def test_bad_strategy_settings_are_refused_in_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        config.load(None, overrides)
    assert "\n" not in str(err.value)


def test_strategy_parameters_at_their_defaults_pass_for_any_strategy():
    # params.yaml may list every fl.* key at its default; only a moved value is a mistake
    defaults = [f"fl.{key}={getattr(config.FLConfig(), key)}" for key in config.SERVER_RANGES if key != "server_lr"]
    for name in config.STRATEGIES:
        cfg = config.load(None, [*defaults, f"fl.strategy={name}", "fl.server_lr=0.01", "client.prox_mu=0"])
        assert config.server_params(cfg.fl) == {k: getattr(cfg.fl, k) for k in config.STRATEGY_PARAMS[name]}
