"""Tier 1: the Python entry points a newcomer hits first say what they expected (issue 25):
loaders given a Hub name or a folder without config.json, patch_hf given a name, attention given
q/k/v in SDPA's (B, H, S, D) layout."""
import pytest
import torch

import fastbert


def test_from_pretrained_on_a_hub_name_says_it_does_not_download():
    with pytest.raises(FileNotFoundError, match=r"BertModel.from_pretrained: expected a checkpoint "
                                                r"directory, got 'bert-base-uncased' \(no such directory; "
                                                r"fastbert reads local folders and does not download"):
        fastbert.BertModel.from_pretrained("bert-base-uncased")


def test_from_pretrained_on_a_folder_without_config_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face checkpoint folder: expected config.json"):
        fastbert.BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_patch_hf_on_a_name_asks_for_a_loaded_model():
    with pytest.raises(TypeError, match=r"patch_hf: expected a transformers model \(an nn.Module\), got "
                                        r"str 'bert-base-uncased'; load it first"):
        fastbert.patch_hf("bert-base-uncased")


def test_attention_mask_error_names_the_layout():
    b, h, s, d = 2, 4, 16, 8
    q = k = v = torch.randn(b, h, s, d)  # SDPA's order
    mask = torch.ones(b, s, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected shape \(B, Sk\) = \(2, 4\) for q/k/v in \(B, S, H, D\) "
                                         r"layout, got \(2, 16\); k \(2, 4, 16, 8\) looks like SDPA's "
                                         r"\(B, H, S, D\) layout"):
        fastbert.attention(q, k, v, mask)
    # transposed as the message says, it runs and equals SDPA
    out = fastbert.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
