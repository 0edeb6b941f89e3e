"""What ``--resume`` refuses. Resuming killed runs (SIGKILL at each phase of a round, bit-identical weights, every
metric once) is drilled in tests/test_faults.py."""

import pytest
from mlflow.tracking import MlflowClient

from training.config import ConfigError
from training.train import train


def test_resume_of_a_finished_run_is_refused(tiny, store):
    """Resuming a FINISHED run would evaluate it again, log a second model and move the alias to a new version."""
    result = train(tiny())
    client = MlflowClient(store)
    versions = client.search_model_versions(f"name='{result.registered_name}'")
    with pytest.raises(ConfigError, match=f"--resume {result.run_id}: the run is FINISHED"):
        train(tiny(), resume=result.run_id)
    assert client.search_model_versions(f"name='{result.registered_name}'") == versions
    assert str(client.get_model_version_by_alias(result.registered_name, "candidate").version) == result.model_version
